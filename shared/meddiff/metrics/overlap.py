"""Overlap between integer label maps, used for mask faithfulness of mask-conditioned generation."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["per_class_dice", "mean_class_dice"]


def _labels(x: Any, name: str) -> np.ndarray:
    """Return an integer label map as an int64 numpy array with a leading batch axis."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
        if not np.all(np.equal(np.mod(a, 1), 0)):
            raise ValueError(f"{name} must be an integer label map, got non-integer values of dtype {a.dtype}.")
    a = a.astype(np.int64)
    if a.ndim == 2:
        a = a[None]
    if a.ndim < 3:
        raise ValueError(f"{name} must have shape (B, H, W) or (H, W), got {a.shape}.")
    return a


def per_class_dice(pred: Any, target: Any, num_classes: int, include_background: bool = False) -> np.ndarray:
    """Return Dice per image and class, shape (B, K), NaN where the class is absent from both pred and target."""
    p, t = _labels(pred, "pred"), _labels(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred and target shapes differ: {p.shape} vs {t.shape}.")
    for name, a in (("pred", p), ("target", t)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"{name} has labels outside [0, {num_classes - 1}].")
    classes = range(0 if include_background else 1, num_classes)
    p = p.reshape(p.shape[0], -1)
    t = t.reshape(t.shape[0], -1)
    out = np.full((p.shape[0], len(classes)), np.nan)
    for k, c in enumerate(classes):
        pc, tc = p == c, t == c
        inter = (pc & tc).sum(1).astype(np.float64)
        total = (pc.sum(1) + tc.sum(1)).astype(np.float64)
        present = total > 0
        out[present, k] = 2.0 * inter[present] / total[present]
    return out


def mean_class_dice(pred: Any, target: Any, num_classes: int, include_background: bool = False) -> float:
    """Return the mean Dice over (image, class) pairs where the class is in the prediction or the target.

    ``pred`` and ``target`` are integer label maps (B, H, W) (or (H, W)) with labels in ``[0, num_classes)``;
    class 0 is background and skipped unless ``include_background``. Dice is computed per image and per class;
    a class absent from both the prediction and the target of an image is skipped (not counted as 1 or 0). If
    every pair is skipped (all empty) the prediction agrees perfectly and 1.0 is returned. Used for mask
    faithfulness: the Dice between a conditioning mask and a segmenter's prediction on the generated image.
    """
    scores = per_class_dice(pred, target, num_classes, include_background)
    valid = ~np.isnan(scores)
    if not valid.any():
        return 1.0
    return float(scores[valid].mean())
