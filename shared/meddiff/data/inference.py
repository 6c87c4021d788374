"""Pre- and postprocessing transforms of the bundles' inference configs, shared by MONAI Label and the bundles.

Orientation: MONAI's readers (``reverse_indexing=True``, their default and what MONAI Label's writer assumes) give
a 2D file as (C, X, Y) and a volume as (C, X, Y, Z). The networks were trained on row-major slices, (C, H, W) as
PIL and SimpleITK arrays hold them, so `RowMajord` reverses the spatial axes, (C, X, Y[, Z]) -> (C, [Z,] Y, X), and
`PlaneResized` resizes the last two axes (each slice) to the network's size and keeps the slice axis. Both are
invertible: `monai.transforms.Invertd` in the postprocessing brings the prediction back to the input's own grid
and axis order, so what is written lies on the input exactly (no transposition, same size and geometry).

Postprocessing: `MetaLiked` gives the prediction the input's metadata and applied transforms (a sampler starts
from noise, so its result carries none), which `Invertd` reads; `EnsembleSummaryd` turns N binary members into
their per-pixel frequency (the prediction) and keeps the members and the majority; `FileKindd` casts the prediction
to what the input's file kind stores (8-bit grey for PNG/JPEG/BMP/TIFF inputs, float32 in [0, 1] otherwise).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Resized, Transposed
from monai.utils import TraceKeys

from meddiff.metrics import majority_mask

__all__ = [
    "MetaLiked",
    "EnsembleSummaryd",
    "FileKindd",
    "GreyscaleChanneld",
    "PlaneResized",
    "RowMajord",
    "EIGHT_BIT_SUFFIXES",
]

EIGHT_BIT_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, PIL's "L" conversion


class RowMajord(Transposed):
    """Reverse the spatial axes, (C, X, Y[, Z]) -> (C, [Z,] Y, X): MONAI's reader order to row-major; invertible.

    Args:
        keys: the items to reorder.
        allow_missing_keys: skip absent keys.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, indices=None, allow_missing_keys=allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            self.transform.indices = [0, *range(d[key].ndim - 1, 0, -1)]
            d.update(super().__call__({key: d[key]}))
        return d


class PlaneResized(Resized):
    """Resize the last two axes (each slice) to `spatial_size` x `spatial_size`, keeping any slice axis; invertible.

    Args:
        keys: the items to resize.
        spatial_size: side of the square slice.
        mode: interpolation per key ("bilinear" for images, "nearest-exact" for labels).
        anti_aliasing: smooth before downsampling, per key (off for labels).
        inverse_mode: interpolation when inverting (None: the forward mode); a generated image brought back onto a
            mask's grid wants "bilinear" although the mask was resized with nearest neighbours.
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        spatial_size: int,
        mode: str | Sequence[str] = "bilinear",
        anti_aliasing: bool | Sequence[bool] = False,
        inverse_mode: str | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, (spatial_size, spatial_size), mode=mode, anti_aliasing=anti_aliasing,
                         allow_missing_keys=allow_missing_keys)  # fmt: skip
        self.side, self.inverse_mode = int(spatial_size), inverse_mode

    def __call__(self, data: Mapping[Hashable, Any], lazy: bool | None = None) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            self.resizer.spatial_size = (-1,) * (d[key].ndim - 3) + (self.side, self.side)
            break
        return super().__call__(d, lazy=lazy)

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        if self.inverse_mode is not None:
            for key in self.key_iterator(dict(data)):
                info = self.get_most_recent_transform(data, key, check=False)[TraceKeys.EXTRA_INFO]
                linear = self.inverse_mode in ("linear", "bilinear", "bicubic", "trilinear")
                info["mode"], info["align_corners"] = self.inverse_mode, False if linear else TraceKeys.NONE
        return super().inverse(data)


class GreyscaleChanneld(MapTransform):
    """Make a (C, ...) image one grey channel: equal RGB(A) channels exactly, others by ITU-R 601 luma (PIL's "L").

    Args:
        keys: the images.
        allow_missing_keys: skip absent keys.
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if image.shape[0] in (3, 4) and bool((image[1:3] == image[:1]).all()):
                d[key] = image[:1]  # a grey image (or class mask) saved as RGB(A): exact, alpha ignored
            elif image.shape[0] in (3, 4):
                weights = torch.as_tensor(LUMA, dtype=torch.float32).view(3, *([1] * (image.ndim - 1)))
                grey = (torch.as_tensor(image[:3]).float() * weights).sum(0, keepdim=True)
                d[key] = MetaTensor(grey, meta=getattr(image, "meta", None)) if isinstance(image, MetaTensor) else grey
            elif image.shape[0] != 1:
                raise ValueError(f"{key} has {image.shape[0]} channels: expected a grey, RGB or RGBA image.")
        return d


class MetaLiked(MapTransform):
    """Give each prediction the metadata and applied transforms of `source_key` (the preprocessed input).

    Args:
        keys: the predictions.
        source_key: the item whose metadata they take (``image``).
    """

    def __init__(self, keys: KeysCollection, source_key: str = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.source_key = source_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        source = d[self.source_key]
        for key in self.key_iterator(d):
            pred = MetaTensor(torch.as_tensor(d[key].as_tensor() if isinstance(d[key], MetaTensor) else d[key]))
            if isinstance(source, MetaTensor):
                pred.copy_meta_from(source)
            d[key] = pred
        return d


class EnsembleSummaryd(MapTransform):
    """N binary members (N, ...) under `keys` -> their frequency (1, ...) in [0, 1]; the members and majority kept.

    Args:
        keys: the ensemble predictions.
        members_key: where the members go (uint8 0/1, (N, ...)).
        majority_key: where the majority (`meddiff.metrics.majority_mask`: strictly more than half of the members)
            goes (uint8, (1, ...)).
        threshold: a member marks a pixel where its value is above this (members interpolated back to the input's
            grid with nearest neighbours stay 0/1).
    """

    def __init__(
        self,
        keys: KeysCollection,
        members_key: str = "members",
        majority_key: str = "majority",
        threshold: float = 0.5,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.members_key, self.majority_key, self.threshold = members_key, majority_key, threshold

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            members = torch.as_tensor(d[key]) > self.threshold
            frequency = members.float().mean(dim=0, keepdim=True)
            d[self.members_key] = members.to(torch.uint8)
            d[self.majority_key] = torch.from_numpy(majority_mask(members.cpu().numpy()))[None]
            meta = d[key].meta if isinstance(d[key], MetaTensor) else None
            d[key] = MetaTensor(frequency, meta=meta) if meta is not None else frequency
        return d


def _source_name(data: Mapping[Hashable, Any], source_key: str) -> str:
    source = data.get(source_key)
    meta = getattr(source, "meta", None) or data.get(f"{source_key}_meta_dict") or {}
    name = meta.get("filename_or_obj", "") if isinstance(meta, Mapping) else ""
    return str(name[0] if isinstance(name, list | tuple) and name else name)


class FileKindd(MapTransform):
    """Cast the prediction to what the input's file kind stores: 8-bit for PNG/JPEG/BMP/TIFF, float32 otherwise.

    `value_range` maps linearly to 0..255 (rounded) for 8-bit outputs and to [0, 1] for float32 ones, clipped.

    Args:
        keys: the predictions.
        source_key: the input item whose file name decides (``image``).
        value_range: the prediction's range (``[0, 1]`` for a frequency map, ``[-1, 1]`` for a generated image).
    """

    def __init__(
        self,
        keys: KeysCollection,
        source_key: str = "image",
        value_range: Sequence[float] = (0.0, 1.0),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.source_key, self.value_range = source_key, (float(value_range[0]), float(value_range[1]))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        eight_bit = _source_name(d, self.source_key).lower().endswith(EIGHT_BIT_SUFFIXES)
        low, high = self.value_range
        for key in self.key_iterator(d):
            pred = d[key]
            unit = ((torch.as_tensor(pred).float() - low) / (high - low)).clamp(0.0, 1.0)
            d[key] = (unit * 255.0).round().to(torch.uint8) if eight_bit else unit
            if isinstance(pred, MetaTensor) and not isinstance(d[key], MetaTensor):
                d[key] = MetaTensor(d[key], meta=pred.meta)
        return d


def as_numpy(value: Any) -> np.ndarray:
    """A tensor or array as a plain numpy array."""
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
