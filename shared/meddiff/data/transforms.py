"""Mask encoding for segmentation-guided generation, and random class ablation.

Encoding (one channel per foreground class, background implicit):
- channel ``k-1`` is 1 where the mask holds class ``k`` and 0 elsewhere;
- an *ablated* (absent, unspecified) class has its whole channel set to ``ABSENT_VALUE`` (-1).

So "this pixel is background" (all channels 0 there, every class specified) differs from "class k was not
given" (channel k is -1): the network can tell a removed class from background. The seed code instead stores
``k/255`` in one channel, where a removed class is indistinguishable from background and class contrast is tiny.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable

ABSENT_VALUE = -1.0

__all__ = ["ABSENT_VALUE", "EncodeMaskd", "RandClassAblationd", "decode_mask", "encode_mask"]


def encode_mask(
    label: np.ndarray | torch.Tensor, num_classes: int, ablated_classes: Iterable[int] = ()
) -> torch.Tensor:
    """Encode an integer mask (H,W) or (1, *spatial) with classes 0..num_classes-1 as (num_classes-1, *spatial)."""
    label_t = torch.as_tensor(np.asarray(label) if not isinstance(label, torch.Tensor) else label)
    if label_t.ndim >= 3:
        if label_t.shape[0] != 1:
            raise ValueError(f"a mask to encode has one channel; got shape {tuple(label_t.shape)}.")
        label_t = label_t[0]
    classes = torch.arange(1, num_classes, device=label_t.device).view(-1, *([1] * label_t.ndim))
    encoded = (label_t.long().unsqueeze(0) == classes).float()
    for k in ablated_classes:
        if not 1 <= int(k) < num_classes:
            raise ValueError(f"ablated class {k} is not a foreground class in 1..{num_classes - 1}")
        encoded[int(k) - 1] = ABSENT_VALUE
    return encoded


def decode_mask(encoded: torch.Tensor) -> torch.Tensor:
    """Invert `encode_mask` on (C-1,H,W) or (B,C-1,H,W): integer labels, ablated classes read as background."""
    present = (encoded > 0.5).float()
    index = torch.arange(1, encoded.shape[-3] + 1, device=encoded.device, dtype=torch.float32).view(-1, 1, 1)
    return (present * index).amax(dim=-3).long()


class EncodeMaskd(MapTransform):
    """Encode the integer mask under `keys` into the channel encoding, stored under `output_key`."""

    def __init__(
        self,
        keys: KeysCollection,
        num_classes: int,
        output_key: str = "mask",
        ablated_classes: Sequence[int] = (),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.num_classes, self.output_key, self.ablated_classes = num_classes, output_key, tuple(ablated_classes)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            encoded = encode_mask(d[key], self.num_classes, self.ablated_classes)
            if isinstance(d[key], MetaTensor):  # keeps the mask's metadata and transforms, for Invertd
                encoded = MetaTensor(encoded)
                encoded.copy_meta_from(d[key])
            d[self.output_key] = encoded
        return d


class RandClassAblationd(Randomizable, MapTransform):
    """Per sample, mark each foreground class channel absent with probability `prob` (Konz et al. 2024, ablation).

    Each of the 2^(C-1) subsets of removed classes is equally likely at `prob=0.5`, as in the paper; unlike the
    seed code, the draw is per sample (not one draw per batch) and is never repeated during sampling.
    """

    def __init__(self, keys: KeysCollection, prob: float = 0.5, allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.prob = prob
        self._drop: np.ndarray | None = None

    def randomize(self, num_channels: int) -> None:
        """Draw which channels to ablate."""
        self._drop = self.R.random_sample(num_channels) < self.prob

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            encoded = torch.as_tensor(d[key]).clone()
            self.randomize(encoded.shape[0])
            encoded[torch.from_numpy(self._drop)] = ABSENT_VALUE
            d[key] = encoded
        return d
