"""Quality guard of the fast path (bf16 weights + channels_last) on a small trained breast MRI model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_diffusion_unet
from monai.networks.nets import UNet
from test_breast_mri_bundle import BUNDLE, TINY

from meddiff.data import encode_mask, load_slices
from meddiff.demo import run_bundle
from meddiff.evaluation import segment
from meddiff.inferers import ConditionedSamplingInferer
from meddiff.metrics import mean_class_dice
from meddiff.precision import autocast, cast_for_inference, resolve_precision

# Tolerances, stated: on the same weights and seed, bf16 sampling may move a pixel of a [-1, 1] image by a mean of
# at most 0.05, and the faithfulness Dice may move by at most twice its spread over fp32 seeds (or 0.05).
MEAN_ABS_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, phantom_dir: Path) -> tuple[Path, list[dict]]:
    """A tiny model trained for a few epochs through the bundle, and the test slices."""
    root = tmp_path_factory.mktemp("fast_path")
    for config in ("train.json", "train_segmenter.json"):
        run_bundle(
            BUNDLE,
            "training",
            [config],
            bundle_root=str(root),
            dataset_dir=str(phantom_dir),
            **{**TINY, "num_epochs": 4, "segmenter_epochs": 4, "learning_rate": 0.001},
        )
    slices = load_slices("msd", dataset_dir=str(phantom_dir), split="test", num_classes=4, img_size=16, progress=False)
    return root, slices


def load_networks(root: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The trained diffusion network and segmenter."""
    net = tiny_diffusion_unet()
    net.load_state_dict(torch.load(root / "models" / "model.pt", weights_only=True))
    seg = UNet(2, 1, 4, (16, 32, 64, 128), (2, 2, 2), num_res_units=2)
    seg.load_state_dict(torch.load(root / "models" / "segmenter.pt", weights_only=True))
    return net.eval(), seg.eval()


def generate(net: torch.nn.Module, labels: np.ndarray, precision: str, seed: int) -> torch.Tensor:
    """Sample one image per label slice with DDIM-10."""
    cond = torch.stack([encode_mask(label, 4) for label in labels])
    channels_last = precision != "fp32"
    return ConditionedSamplingInferer(
        num_inference_steps=10, seed=seed, precision=precision, channels_last=channels_last
    )(cond, net)


def test_bf16_matches_fp32_on_trained_model(trained: tuple[Path, list[dict]]) -> None:
    root, slices = trained
    net, segmenter = load_networks(root)
    labels = np.stack([s["label"] for s in slices])
    fp32, bf16 = generate(net, labels, "fp32", seed=0), generate(net, labels, "bf16", seed=0)
    assert (bf16 - fp32).abs().mean() < MEAN_ABS_TOLERANCE
    dice = {
        p: mean_class_dice(segment(segmenter, generate(net, labels, p, 0).numpy()), labels[:, 0], 4)
        for p in ("fp32", "bf16")
    }
    spread = np.std(
        [
            mean_class_dice(segment(segmenter, generate(net, labels, "fp32", s).numpy()), labels[:, 0], 4)
            for s in (1, 2, 3)
        ]
    )
    assert abs(dice["bf16"] - dice["fp32"]) <= max(0.05, 2 * spread)


def test_bf16_training_step_close_to_fp32(trained: tuple[Path, list[dict]]) -> None:
    root, slices = trained
    net, _ = load_networks(root)
    from meddiff.inferers import DiffusionTrainingInferer
    from meddiff.schedulers import DDPMScheduler

    images = torch.from_numpy(np.stack([s["image"] for s in slices]))
    cond = torch.stack([encode_mask(s["label"], 4) for s in slices])
    noise, t = torch.randn_like(images), torch.full((len(images),), 500)
    fp32 = DiffusionTrainingInferer(DDPMScheduler(1000))(images, net, noise, t, cond)
    fast_net = net.to(memory_format=torch.channels_last)
    bf16 = DiffusionTrainingInferer(DDPMScheduler(1000), "concat", "bf16", True)(images, fast_net, noise, t, cond)
    assert bf16.dtype == torch.float32
    assert torch.nn.functional.mse_loss(bf16, fp32) < 0.01 * fp32.pow(2).mean()


def test_precision_resolution() -> None:
    assert resolve_precision("fp32", "cpu").value == "fp32"
    assert resolve_precision("auto", "cpu").value in ("fp32", "bf16")
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", "cpu")
    net = torch.nn.Conv2d(1, 1, 3)
    assert cast_for_inference(net, "fp32", False) is net
    fast = cast_for_inference(net, "bf16", True)
    assert fast is not net and next(fast.parameters()).dtype == torch.bfloat16
    assert cast_for_inference(net, "bf16", True) is fast  # cached while the weights stay the same ...
    with torch.no_grad():
        net.weight.fill_(0.5)
    fresh = cast_for_inference(net, "bf16", True)
    assert fresh is not fast and torch.equal(fresh.weight.float(), net.weight)  # ... and made anew after a change
    with autocast("cpu", "bf16"):
        assert net(torch.rand(1, 1, 4, 4)).dtype == torch.bfloat16
