"""Turn images and label volumes into fixed-size 2D slices with their masks."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["normalize_intensity", "resize_image", "resize_label", "volume_to_slices", "foreground_fraction"]


def normalize_intensity(volume: np.ndarray, lower: float = 0.5, upper: float = 99.5) -> np.ndarray:
    """Scale intensities to [-1, 1] between the `lower` and `upper` percentiles of the whole volume."""
    lo, hi = np.percentile(volume, [lower, upper])
    if hi <= lo:
        return np.zeros_like(volume, dtype=np.float32)
    return (np.clip((volume - lo) / (hi - lo), 0.0, 1.0) * 2.0 - 1.0).astype(np.float32)


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a (C,H,W) float image to (C,size,size) with antialiased bilinear interpolation."""
    if image.shape[-2:] == (size, size):
        return image.astype(np.float32)
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    return F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0].numpy()


def resize_label(label: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a (1,H,W) integer label map with nearest-neighbour interpolation."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if label.shape[-2:] == size:
        return label.astype(np.int64)
    t = torch.from_numpy(np.ascontiguousarray(label, dtype=np.float32))[None]
    return F.interpolate(t, size=size, mode="nearest-exact")[0].numpy().astype(np.int64)


def foreground_fraction(label_slice: np.ndarray) -> float:
    """Fraction of non-background pixels in a label slice."""
    return float(np.count_nonzero(label_slice)) / max(label_slice.size, 1)


def volume_to_slices(
    image: np.ndarray,
    label: np.ndarray,
    name: str,
    img_size: int,
    min_foreground_fraction: float = 0.0,
) -> list[dict]:
    """Cut (Z,Y,X) image and label volumes into axial slices, skipping slices at or below the foreground rule.

    A slice is kept when its foreground fraction is strictly above `min_foreground_fraction` (0 keeps every slice
    with any labelled pixel). Intensities are normalised per volume to [-1, 1].
    """
    image = normalize_intensity(image.astype(np.float32))
    slices = []
    for z in range(image.shape[0]):
        if foreground_fraction(label[z]) <= min_foreground_fraction:
            continue
        slices.append(
            {
                "image": resize_image(image[z][None], img_size),
                "label": resize_label(label[z][None], img_size),
                "name": f"{name}_z{z:03d}",
            }
        )
    return slices
