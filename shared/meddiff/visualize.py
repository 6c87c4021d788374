"""Sample grids as PNG: conditioning masks beside generated images, or images beside ensembles."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from meddiff.io import save_png, to_uint8

__all__ = ["label_to_rgb", "save_grid", "to_rgb_tile"]

_PALETTE = np.array(
    [[0, 0, 0], [255, 255, 255], [230, 25, 75], [0, 130, 200], [60, 180, 75], [255, 225, 25], [145, 30, 180]],
    dtype=np.uint8,
)


def label_to_rgb(label: np.ndarray) -> np.ndarray:
    """Colour an integer label map (H,W) with a fixed palette (0 black, 1 white, 2 red, 3 blue, ...)."""
    label = np.asarray(label).astype(np.int64)
    return _PALETTE[np.clip(label, 0, len(_PALETTE) - 1)]


def to_rgb_tile(array: np.ndarray, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """A (C,H,W) or (H,W) image as a (H,W,3) uint8 tile."""
    array = np.asarray(array)
    if array.ndim == 3:
        array = array[0] if array.shape[0] == 1 else np.moveaxis(array[:3], 0, -1)
    tile = to_uint8(array, value_range)
    return np.repeat(tile[..., None], 3, axis=-1) if tile.ndim == 2 else tile


def save_grid(rows: Sequence[Sequence[np.ndarray]], path: str | os.PathLike, pad: int = 2) -> None:
    """Write rows of equally sized (H,W,3) uint8 tiles as one PNG grid, overwriting an earlier grid."""
    height, width = rows[0][0].shape[:2]
    ncols = max(len(r) for r in rows)
    grid = np.full(((height + pad) * len(rows) + pad, (width + pad) * ncols + pad, 3), 64, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            y, x = pad + i * (height + pad), pad + j * (width + pad)
            grid[y : y + height, x : x + width] = tile
    save_png(grid, path, overwrite=True)
