"""Sample grids as PNG: conditioning masks beside generated images, or images beside ensembles.

Conventions: tiles are (H,W,3) uint8; every tile of a grid is upscaled by one whole factor with nearest-neighbour
interpolation until it is at least `min_tile` pixels high (a 32 px sample becomes 128 px, pixels stay square and
sharp); `column_labels` are written above their columns in a header row.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

from meddiff.io import save_png, to_uint8

__all__ = ["label_to_rgb", "save_grid", "to_rgb_tile", "upscale"]

_PALETTE = np.array(
    [[0, 0, 0], [255, 255, 255], [230, 25, 75], [0, 130, 200], [60, 180, 75], [255, 225, 25], [145, 30, 180]],
    dtype=np.uint8,
)
_BACKGROUND, _TEXT = 64, 255


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


def upscale(tile: np.ndarray, factor: int) -> np.ndarray:
    """Repeat every pixel of an (H,W,...) tile `factor` times along both axes (nearest neighbour)."""
    return tile if factor == 1 else np.repeat(np.repeat(tile, factor, axis=0), factor, axis=1)


def _header(labels: Sequence[str], width: int, pad: int, ncols: int, total_width: int) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    size = max(10, min(16, width // 8))
    font = ImageFont.load_default(size=size)
    height = size + 2 * pad + 4
    image = Image.new("RGB", (total_width, height), (_BACKGROUND,) * 3)
    draw = ImageDraw.Draw(image)
    for j, label in enumerate(labels[:ncols]):
        text = str(label)
        while text and draw.textlength(text, font=font) > width:
            text = text[:-1]
        x = pad + j * (width + pad) + (width - draw.textlength(text, font=font)) / 2
        draw.text((x, pad + 2), text, fill=(_TEXT,) * 3, font=font)
    return np.asarray(image)


def save_grid(
    rows: Sequence[Sequence[np.ndarray]],
    path: str | os.PathLike,
    column_labels: Sequence[str] | None = None,
    min_tile: int = 128,
    pad: int = 2,
    provenance: dict | None = None,
) -> None:
    """Write rows of equally sized (H,W,3) uint8 tiles as one PNG grid, overwriting an earlier grid.

    Args:
        rows: the tiles, row by row; rows may be shorter than the longest.
        path: the PNG file to write.
        column_labels: a caption per column, written above it.
        min_tile: tiles are upscaled by a whole factor (nearest) until at least this many pixels high.
        pad: pixels between tiles.
        provenance: a `meddiff.provenance` record the PNG carries (the grid shows synthetic images).
    """
    height, width = rows[0][0].shape[:2]
    factor = max(1, math.ceil(min_tile / max(height, 1)))
    height, width = height * factor, width * factor
    ncols = max(len(r) for r in rows)
    grid = np.full(((height + pad) * len(rows) + pad, (width + pad) * ncols + pad, 3), _BACKGROUND, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            y, x = pad + i * (height + pad), pad + j * (width + pad)
            grid[y : y + height, x : x + width] = upscale(tile, factor)
    if column_labels:
        grid = np.concatenate([_header(column_labels, width, pad, ncols, grid.shape[1]), grid], axis=0)
    save_png(grid, path, overwrite=True, provenance=provenance)
