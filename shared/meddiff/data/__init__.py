"""Readers, layouts, validation and transforms for 2D slices with class masks."""

from meddiff.data.errors import DataError
from meddiff.data.layouts import check_num_classes, detect_layout, load_slices
from meddiff.data.transforms import (
    ABSENT_VALUE,
    EncodeMaskd,
    RandClassAblationd,
    decode_mask,
    encode_mask,
)

__all__ = [
    "ABSENT_VALUE",
    "DataError",
    "EncodeMaskd",
    "RandClassAblationd",
    "check_num_classes",
    "decode_mask",
    "detect_layout",
    "encode_mask",
    "load_slices",
]


def __getattr__(name: str) -> object:
    """Import `meddiff.data.<name>` submodules (e.g. `lidc`, `phantoms`) on first use, for bundle configs."""
    import importlib

    if name in ("histology", "inference", "lidc", "monuseg", "phantoms", "polyp", "readers", "slices"):
        return importlib.import_module(f"meddiff.data.{name}")
    raise AttributeError(f"module 'meddiff.data' has no attribute {name!r}")
