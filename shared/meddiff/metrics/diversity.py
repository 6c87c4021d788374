"""Sample diversity as the mean pairwise MS-SSIM of a set of generated images (lower = more diverse).

Settings: MONAI's `MultiScaleSSIMMetric` with a Gaussian window (sigma 1.5, k1 0.01, k2 0.03); the window size and
number of scales follow the image size (`ms_ssim_config`); each coarser scale is a 2x2 average pool of the last.
`ms_ssim_settings` states what was used, for the metrics file.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from monai.metrics import MultiScaleSSIMMetric

__all__ = ["MS_SSIM_WEIGHTS", "ms_ssim_config", "ms_ssim_diversity", "ms_ssim_per_mask", "ms_ssim_settings"]

#: standard MS-SSIM scale weights of Wang et al. (2003)
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
#: MONAI's default Gaussian window width, used unchanged
KERNEL_SIGMA = 1.5
_KERNEL_SIZES = (11, 7, 5, 3)


def _config_valid(size: int, kernel_size: int, num_scales: int) -> bool:
    """True when MONAI's size check passes and the coarsest scale is at least one kernel wide."""
    monai_div = max(1, num_scales - 1) ** 2  # the check made by monai.metrics.regression.compute_ms_ssim
    coarsest = size // 2 ** (num_scales - 1)  # what avg_pool(kernel_size=2) actually leaves
    return size // monai_div > kernel_size - 1 and coarsest >= kernel_size


def ms_ssim_config(height: int) -> tuple[int, tuple[float, ...]]:
    """Return ``(kernel_size, weights)`` for MS-SSIM on images whose smallest side is ``height``.

    Rule: use as many scales as possible (at most 5), and for that number of scales the largest Gaussian kernel
    among 11, 7, 5, 3 such that MONAI's size check passes and the coarsest scale is at least one kernel wide.
    The weights are the standard ones (0.0448, 0.2856, 0.3001, 0.2363, 0.1333) truncated to the first scales and
    renormalised to sum to 1. Examples: 256 -> (11, 5 scales), 128 -> (7, 5), 64 -> (3, 5), 32 -> (3, 4),
    16 -> (3, 3). Raises ValueError below 3 pixels.
    """
    size = int(height)
    for num_scales in range(len(MS_SSIM_WEIGHTS), 0, -1):
        for kernel_size in _KERNEL_SIZES:
            if _config_valid(size, kernel_size, num_scales):
                w = np.asarray(MS_SSIM_WEIGHTS[:num_scales], dtype=np.float64)
                return kernel_size, tuple(float(v) for v in w / w.sum())
    raise ValueError(f"Images of side {height} are too small for (MS-)SSIM; need at least 3 pixels.")


def ms_ssim_diversity(images: Any, data_range: float = 2.0, batch_size: int = 64) -> float:
    """Return the mean MS-SSIM over all unordered pairs i < j of generated images (N, C, H, W); lower = more diverse.

    ``data_range`` is the width of the intensity range (2.0 for images in [-1, 1]). The kernel size and number
    of scales come from :func:`ms_ssim_config` applied to ``min(H, W)``. Needs N >= 2.
    """
    x = images.detach().cpu() if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    x = x.float()
    if x.ndim != 4:
        raise ValueError(f"Expected images of shape (N, C, H, W), got {tuple(x.shape)}.")
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"ms_ssim_diversity needs at least 2 images, got {n}.")
    kernel_size, weights = ms_ssim_config(min(x.shape[-2:]))
    metric = MultiScaleSSIMMetric(
        spatial_dims=2, data_range=data_range, kernel_size=kernel_size, kernel_sigma=KERNEL_SIGMA, weights=weights
    )
    ii, jj = torch.triu_indices(n, n, offset=1)
    total = 0.0
    with torch.no_grad():
        for start in range(0, ii.numel(), batch_size):
            i, j = ii[start : start + batch_size], jj[start : start + batch_size]
            total += float(metric(x[i], x[j]).sum())
    return total / ii.numel()


def ms_ssim_settings(height: int, data_range: float = 2.0) -> dict:
    """What `ms_ssim_diversity` uses on images of smallest side ``height``: window, sigma, scales (px) and weights."""
    kernel_size, weights = ms_ssim_config(height)
    return {
        "image_size": int(height),
        "kernel_size": kernel_size,
        "kernel_sigma": KERNEL_SIGMA,
        "num_scales": len(weights),
        "scale_sizes": [int(height) // 2**s for s in range(len(weights))],
        "weights": list(weights),
        "data_range": float(data_range),
    }


def ms_ssim_per_mask(sample_sets: Any, data_range: float = 2.0) -> list[float]:
    """Return the mean pairwise MS-SSIM within each set of samples (K, M, C, H, W) from one mask each (M >= 2)."""
    sets = (
        sample_sets.detach().cpu()
        if isinstance(sample_sets, torch.Tensor)
        else torch.as_tensor(np.asarray(sample_sets))
    )
    if sets.ndim != 5:
        raise ValueError(f"Expected sample sets of shape (K, M, C, H, W), got {tuple(sets.shape)}.")
    return [ms_ssim_diversity(samples, data_range=data_range) for samples in sets]
