"""Binary mask morphology of the polyp method (methods.md section 1.5), with OpenCV's conventions, on scipy.ndimage.

The seed inpaints inside the target's polyp mask dilated with a 20x20 ellipse and cleans the final generated mask with
a 16x16 ellipse opening. These functions reproduce OpenCV's ``getStructuringElement(MORPH_ELLIPSE, (n, n))``,
``dilate`` and ``morphologyEx(MORPH_OPEN)`` with their default anchor and border without depending on OpenCV:

- ellipse: with r = c = n // 2 (integer halves), row i holds the columns c - dx .. c + dx (cut to 0 .. n - 1) with
  dx = round(c sqrt(1 - (i - r)^2 / r^2)) = round(sqrt(r^2 - (i - r)^2)) for |i - r| <= r (a square root of an
  integer is never a half-integer, so no tie arises). For even n the element is not symmetric:
  its first row is the single pixel (0, n // 2) and it has no matching last row.
- anchor: the element's pixel (n // 2, n // 2), for odd and even n alike.
- erosion: out(p) = min over the element's pixels k of in(p + k - anchor); dilation: the same with max. (OpenCV
  slides the element without reflecting it, so for an even, asymmetric ellipse this is not the textbook dilation
  by the element but by its reflection.)
- border: pixels outside the image are ignored (as if 1 for erosion, 0 for dilation: OpenCV's default
  ``morphologyDefaultBorderValue``), so an opening does not eat the mask where it touches the image edge.

scipy's ``binary_erosion`` computes the erosion above (centre n // 2, no reflection); the dilation is its dual,
``~erode(~mask)`` with the outside taken as 1, which keeps the same unreflected element and anchor.

Masks are 2-D numpy arrays of bool or of 0/1 numbers; the result has the input's dtype.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

__all__ = ["dilate", "ellipse", "erode", "open_mask"]


def ellipse(size: int) -> np.ndarray:
    """The (size, size) boolean elliptic structuring element of OpenCV's ``MORPH_ELLIPSE`` (module docstring)."""
    if isinstance(size, bool) or int(size) != size or int(size) < 1:
        raise ValueError(f"the ellipse size must be a positive integer, got {size!r}.")
    n = int(size)
    r = c = n // 2
    element = np.zeros((n, n), dtype=bool)
    for i in range(n):
        dy = i - r
        if abs(dy) > r:
            continue
        dx = round(math.sqrt(r * r - dy * dy))  # = c sqrt(1 - dy^2 / r^2) as r = c; never a tie
        element[i, max(c - dx, 0) : min(c + dx + 1, n)] = True
    return element


def _binary(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be a 2-D array, got shape {mask.shape}.")
    if mask.dtype == bool:
        return mask
    if not np.isin(mask, (0, 1)).all():
        raise ValueError("a mask must hold only 0 and 1 (or be boolean); threshold it first.")
    return mask.astype(bool)


def erode(mask: np.ndarray, size: int) -> np.ndarray:
    """OpenCV-style erosion of a binary `mask` by the `size` x `size` ellipse; the outside counts as foreground."""
    binary = _binary(mask)
    return ndimage.binary_erosion(binary, structure=ellipse(size), border_value=1).astype(np.asarray(mask).dtype)


def dilate(mask: np.ndarray, size: int = 20) -> np.ndarray:
    """OpenCV-style dilation of a binary `mask` by the `size` x `size` ellipse (the seed's inpainting region: 20)."""
    binary = _binary(mask)
    grown = ~ndimage.binary_erosion(~binary, structure=ellipse(size), border_value=1)
    return grown.astype(np.asarray(mask).dtype)


def open_mask(mask: np.ndarray, size: int = 16) -> np.ndarray:
    """OpenCV-style opening (erosion, then dilation) of a binary `mask` by the `size` x `size` ellipse (seed: 16)."""
    dtype = np.asarray(mask).dtype
    return dilate(erode(_binary(mask), size), size).astype(dtype)
