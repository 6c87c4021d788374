"""Atomic writers for everything the bundles produce: JSON, PNG, NIfTI, torch checkpoints."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meddiff.errors import UserError

__all__ = [
    "OutputExistsError",
    "atomic_write",
    "check_new_output",
    "save_json",
    "save_png",
    "save_torch",
    "load_torch",
]


class OutputExistsError(UserError, FileExistsError):
    """Raised when a write would replace a file that already exists."""


def check_new_output(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Return `path` as a Path, raising `OutputExistsError` if it exists and `overwrite` is False."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(
            f"{path} already exists and would be overwritten. Choose another output_dir, remove the file, "
            "or pass overwrite=True (--overwrite true) to replace it."
        )
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any], overwrite: bool = True) -> Path:
    """Call `write(tmp_path)` on a temporary file beside `path`, then rename it onto `path` in one step."""
    path = check_new_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)  # keep e.g. ".nii.gz" so writers pick the right format
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_json(obj: Any, path: str | os.PathLike, overwrite: bool = True) -> Path:
    """Write `obj` as indented JSON atomically."""

    def _write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
            f.write("\n")

    return atomic_write(path, _write, overwrite)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj)} to JSON")


def to_uint8(image: np.ndarray | torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """Map an array from `value_range` to uint8 0..255, clipping outside values."""
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().numpy()
    lo, hi = value_range
    scaled = (np.asarray(image, dtype=np.float32) - lo) / (hi - lo)
    return (np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def save_png(array: np.ndarray, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a (H,W), (H,W,3) or channel-first (C,H,W) uint8 array as PNG atomically."""
    from PIL import Image

    array = np.asarray(array)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype != np.uint8:
        raise ValueError(f"save_png expects uint8, got {array.dtype} for {path}")
    return atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"), overwrite)


def save_torch(obj: Any, path: str | os.PathLike) -> Path:
    """`torch.save` atomically (a crash never leaves a truncated checkpoint)."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp), overwrite=True)


def load_torch(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint with `weights_only=True` (no pickled code is ever executed)."""
    return torch.load(path, map_location=map_location, weights_only=True)
