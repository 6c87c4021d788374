"""The 6-channel nuclei condition of the SDM nuclei method (methods.md sections 4.3 and 4.4), from instance maps.

Conventions:
- an instance map is an integer numpy array (H, W): 0 = background, every other value one nucleus (ids need not be
  contiguous); images are float (3, H, W) RGB in [-1, 1]; maps are channel-first float32 numpy arrays;
- the condition is float32 (6, H, W), in the seed's channel order (methods.md 4.3):
  ``[hv_x, hv_y, colour_r, colour_g, colour_b, edges]``; `HV_EDGE_CHANNELS` = (0, 1, 5) are the structure channels
  (what ``--drop_hvb_only`` nulls: pass it as ``ConditionDropoutPrepareBatch(drop_channels=HV_EDGE_CHANNELS)``),
  `COLOUR_CHANNELS` = (2, 3, 4) the appearance channels.

hv map (the horizontal/vertical distance maps of HoVer-Net, Graham et al. 2019, Med. Image Anal. 58:101563):
- instances with fewer than `min_size` pixels are removed first (skimage ``remove_small_objects(min_size=30)`` on a
  label image removes exactly the ids whose pixel count is < min_size);
- per remaining instance, with centre of mass (r_c, c_c) = the mean row and column of its pixels, rounded half up
  to whole pixels (R = floor(r_c + 0.5), C = floor(c_c + 0.5), as HoVer-Net's ``int(com + 0.5)``), each of its
  pixels (r, c) gets dx = c - C and dy = r - R;
- each side is normalised separately per instance and per axis: negative offsets divided by the largest negative
  magnitude (so they lie in [-1, 0)), positive ones by the largest positive offset (in (0, 1]); 0 stays 0; so a
  1x5 bar gives x = -1, -0.5, 0, 0.5, 1 and a 1x4 bar (centre 1.5 rounded to 2) gives x = -1, -0.5, 0, 1;
- background and removed instances are 0; channel 0 is x (horizontal), channel 1 is y (vertical).
HoVer-Net computes the offsets inside the instance's bounding box expanded by 2 px; offsets are differences of
coordinates, so the box changes nothing and is not needed here. Two deliberate differences from HoVer-Net's code:
its coordinate grid starts at 1 while its centre of mass is 0-based, which shifts every offset by +1 (its 1x5 bar
reads -1, 0, 1/3, 2/3, 1); here offsets are exact. And an instance whose pixels are disconnected keeps one id and
one centre here (HoVer-Net first splits mirror-padding artefacts into separate ids; MoNuSeg patches have none).

Edges (SDM's ``get_edges``): a pixel is 1 when one of its 4-neighbours holds a different id, 0 otherwise. Both
pixels of such a pair are marked, so the background pixels 4-adjacent to a nucleus are 1 as well as the nucleus'
own outer ring; pixels outside the image count as no neighbour. Edges are taken on the map as given (no
small-object removal).

Colour map: a random permutation of pixel positions of the appearance image, all channels moved together, which
keeps its colour histogram and destroys its structure. With ``preserve_nuclei`` (the seed's ``preserve_nuclei_col``)
nucleus pixels (id > 0 in the appearance image's own instance map) are permuted among nucleus positions and
background pixels among background positions.

Structure-appearance pairing (methods.md 4.4): properties per mask p = (area-weighted solidity
sum_k a_k s_k / sum_k a_k, total nuclear area sum_k a_k, median nuclear area), with a_k, s_k skimage ``regionprops``
area and solidity (all 0 for an empty mask). For structure i: D = |p - p_i| over all masks, each column clipped at
its own 85th percentile (numpy's linear interpolation) and MinMax-scaled to [0, 1] (a constant column becomes 0),
score = 0.5 D_median_area + 0.5 D_total_area (the seed computes solidity but does not score it, and each column
is scaled on its own, so `match_structures` skips the costly convex hulls and counts pixels instead); the
`num_similar` lowest scores other than i (ties by index) are candidates, and one is drawn uniformly by a numpy
Generator seeded once for the whole list. `shuffle_structures` is a seeded random permutation, not a derangement:
a structure may keep its own appearance.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable
from skimage.measure import regionprops

from meddiff.errors import UserError
from meddiff.options import Rule, parse

__all__ = [
    "COLOUR_CHANNELS",
    "HV_EDGE_CHANNELS",
    "NucleiConditiond",
    "condition_preview",
    "hv_map",
    "instance_edges",
    "match_structures",
    "nuclei_condition",
    "shuffle_pixels",
    "shuffle_structures",
    "structure_properties",
]

HV_EDGE_CHANNELS = (0, 1, 5)
COLOUR_CHANNELS = (2, 3, 4)

_MIN_SIZE = Rule("int", low=0, hint="nuclei smaller than this many pixels get no hv map; the seed uses 30")
_NUM_SIMILAR = Rule("int", low=1, hint="how many most similar structures an appearance is drawn from; the seed uses 20")
_PRESERVE_NUCLEI = Rule("bool")


def _instance_map(inst: Any) -> np.ndarray:
    inst = inst.detach().cpu().numpy() if isinstance(inst, torch.Tensor) else np.asarray(inst)
    if inst.ndim != 2:
        raise ValueError(f"an instance map must be 2-D (H, W), got shape {inst.shape}.")
    if inst.dtype == bool:
        return inst.astype(np.int64)
    if not np.issubdtype(inst.dtype, np.integer):
        raise ValueError(f"an instance map must hold integer ids, got dtype {inst.dtype}.")
    if inst.size and inst.min() < 0:
        raise ValueError("an instance map must hold ids >= 0 (0 = background).")
    return inst


def _image(image: Any, name: str = "image") -> np.ndarray:
    image = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"the {name} must be channel-first (C, H, W), got shape {image.shape}.")
    return image


def hv_map(inst: np.ndarray, min_size: int = 30) -> np.ndarray:
    """HoVer-Net's horizontal/vertical distance maps of `inst` (H, W): float32 (2, H, W) in [-1, 1] (see module)."""
    inst = _instance_map(inst)
    min_size = _MIN_SIZE("min_size", min_size)
    out = np.zeros((2, *inst.shape), dtype=np.float32)
    ids, compact, counts = np.unique(inst.ravel(), return_inverse=True, return_counts=True)
    keep = (ids > 0) & (counts >= min_size)
    pixel = keep[compact]
    if not pixel.any():
        return out
    label = compact[pixel]
    rows, cols = np.divmod(np.flatnonzero(pixel), inst.shape[1])
    num = len(ids)
    for channel, coords in ((0, cols), (1, rows)):
        centre = np.floor(np.bincount(label, weights=coords, minlength=num) / np.maximum(counts, 1) + 0.5)
        offset = coords - centre[label]
        lowest, highest = np.zeros(num), np.zeros(num)
        np.minimum.at(lowest, label, offset)
        np.maximum.at(highest, label, offset)
        scale = np.where(offset < 0, -lowest[label], highest[label])
        out[channel][pixel.reshape(inst.shape)] = np.divide(offset, scale, out=np.zeros_like(offset), where=scale > 0)
    return out


def instance_edges(inst: np.ndarray) -> np.ndarray:
    """1 where a 4-neighbour holds a different id (both sides of each change), else 0: float32 (1, H, W)."""
    inst = _instance_map(inst)
    edge = np.zeros(inst.shape, dtype=bool)
    across = inst[:, 1:] != inst[:, :-1]
    edge[:, 1:] |= across
    edge[:, :-1] |= across
    down = inst[1:, :] != inst[:-1, :]
    edge[1:, :] |= down
    edge[:-1, :] |= down
    return edge[None].astype(np.float32)


def shuffle_pixels(image: np.ndarray, rng: np.random.Generator, inst: np.ndarray | None = None) -> np.ndarray:
    """`image` (C, H, W) with its pixel positions randomly permuted, all channels together (module docstring).

    With `inst` (H, W), the image's own instance map, nucleus pixels are permuted only among nucleus positions and
    background pixels among background positions.
    """
    image = _image(image)
    flat = image.reshape(image.shape[0], -1)
    if inst is None:
        return flat[:, rng.permutation(flat.shape[1])].reshape(image.shape)
    inst = _instance_map(inst)
    if inst.shape != image.shape[1:]:
        raise ValueError(f"the instance map {inst.shape} and the image {image.shape} differ in size.")
    order = np.arange(flat.shape[1])
    for part in (np.flatnonzero(inst.ravel() > 0), np.flatnonzero(inst.ravel() == 0)):
        order[part] = part[rng.permutation(len(part))]
    return flat[:, order].reshape(image.shape)


def nuclei_condition(
    inst: np.ndarray,
    appearance: np.ndarray,
    rng: np.random.Generator,
    preserve_nuclei: bool = False,
    appearance_inst: np.ndarray | None = None,
    min_size: int = 30,
) -> np.ndarray:
    """The SDM nuclei condition, float32 (6, H, W) = [hv_map(inst) (2), shuffled appearance (3), edges(inst) (1)].

    `inst` (H, W) gives the structure, `appearance` (3, H, W) in [-1, 1] the colours (another patch's image when
    structures and appearances are paired). `appearance_inst` is the appearance image's own instance map, used
    only with `preserve_nuclei` (default: `inst`, i.e. the appearance is the structure's own image).
    """
    inst = _instance_map(inst)
    appearance = _image(appearance, "appearance image")
    if appearance.shape != (3, *inst.shape):
        raise ValueError(f"the appearance image must be (3, {inst.shape[0]}, {inst.shape[1]}), got {appearance.shape}.")
    if appearance.size and (appearance.min() < -1.0 - 1e-4 or appearance.max() > 1.0 + 1e-4):
        raise ValueError("the appearance image must be scaled to [-1, 1] first.")
    mask = None
    if _PRESERVE_NUCLEI("preserve_nuclei", preserve_nuclei):
        mask = inst if appearance_inst is None else appearance_inst
    colour = shuffle_pixels(appearance, rng, inst=mask)
    return np.concatenate([hv_map(inst, min_size), colour.astype(np.float32), instance_edges(inst)], axis=0)


class NucleiConditiond(Randomizable, MapTransform):
    """Store `nuclei_condition` of a sample's instance map and image under `condition_key` (torch float32 (6, H, W)).

    The label is (1, H, W) or (H, W) integer instance ids, the image (3, H, W) float in [-1, 1] (numpy or torch);
    a MetaTensor label passes its metadata on to the condition. The pixel permutation is drawn from the transform's
    random state (`set_random_state`), so a seeded transform gives the same condition for the same sample.

    Args:
        label_key: key of the instance map that gives the structure (hv and edge channels).
        appearance_key: key of the image whose shuffled pixels give the colour channels.
        condition_key: key the condition is stored under.
        preserve_nuclei: shuffle nucleus and background pixels separately (the seed's ``preserve_nuclei_col``).
        appearance_label_key: key of the appearance image's own instance map for `preserve_nuclei` when it is not
            the structure's (None: `label_key`).
        min_size: nuclei with fewer pixels get no hv map (the seed's 30).
        allow_missing_keys: skip samples that lack the keys instead of raising.
    """

    def __init__(
        self,
        label_key: str = "label",
        appearance_key: str = "image",
        condition_key: str = "condition",
        preserve_nuclei: bool = False,
        appearance_label_key: str | None = None,
        min_size: int = 30,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, (label_key, appearance_key), allow_missing_keys)
        self.label_key, self.appearance_key, self.condition_key = label_key, appearance_key, condition_key
        self.preserve_nuclei = _PRESERVE_NUCLEI("preserve_nuclei", preserve_nuclei)
        self.appearance_label_key = appearance_label_key
        self.min_size = _MIN_SIZE("min_size", min_size)
        self._seed = 0

    def randomize(self, data: Any = None) -> None:
        """Draw the seed of this sample's pixel permutation from the transform's random state."""
        self._seed = int(self.R.randint(np.iinfo(np.int32).max))

    @staticmethod
    def _label(value: Any) -> np.ndarray:
        label = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if label.ndim == 3 and label.shape[0] == 1:
            label = label[0]
        return label

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        if self.label_key not in d or self.appearance_key not in d:
            if self.allow_missing_keys:
                return d
            missing = self.label_key if self.label_key not in d else self.appearance_key
            raise KeyError(f"NucleiConditiond: the sample has no {missing!r} key.")
        self.randomize()
        appearance_inst = None
        if self.preserve_nuclei and self.appearance_label_key is not None:
            appearance_inst = self._label(d[self.appearance_label_key])
        condition = nuclei_condition(
            self._label(d[self.label_key]),
            d[self.appearance_key],
            np.random.default_rng(self._seed),
            preserve_nuclei=self.preserve_nuclei,
            appearance_inst=appearance_inst,
            min_size=self.min_size,
        )
        out = torch.from_numpy(condition)
        if isinstance(d[self.label_key], MetaTensor):
            out = MetaTensor(out)
            out.copy_meta_from(d[self.label_key])
        d[self.condition_key] = out
        return d


def structure_properties(inst: np.ndarray) -> tuple[float, float, float]:
    """(area-weighted solidity, total nuclear area, median nuclear area) of `inst` by regionprops; 0s if empty."""
    regions = regionprops(_instance_map(inst))
    if not regions:
        return 0.0, 0.0, 0.0
    area = np.array([r.area for r in regions], dtype=np.float64)
    solidity = np.array([r.solidity for r in regions], dtype=np.float64)
    return float((area * solidity).sum() / area.sum()), float(area.sum()), float(np.median(area))


def _areas(inst: np.ndarray) -> tuple[float, float]:
    """(total, median) nuclear area of `inst`: the scored columns of `structure_properties`, without convex hulls."""
    ids, counts = np.unique(_instance_map(inst), return_counts=True)
    area = counts[ids > 0]
    return (float(area.sum()), float(np.median(area))) if len(area) else (0.0, 0.0)


def match_structures(inst_maps: Sequence[np.ndarray], num_similar: int = 20, seed: int = 0) -> list[int]:
    """For each structure i, the index j != i of the mask whose image supplies its colours (module docstring)."""
    num_similar, seed = _NUM_SIMILAR("num_similar", num_similar), parse("seed", seed)
    n = len(inst_maps)
    if n < 2:
        raise UserError(
            f"structure-appearance pairing needs at least 2 structures (instance maps), got {n}: "
            "give more patches or turn the pairing off."
        )
    props = np.array([_areas(m) for m in inst_maps], dtype=np.float64)
    rng = np.random.default_rng(seed)
    matches = []
    for i in range(n):
        diff = np.abs(props - props[i])
        diff = np.minimum(diff, np.percentile(diff, 85, axis=0))
        low, span = diff.min(axis=0), np.ptp(diff, axis=0)
        scaled = np.divide(diff - low, span, out=np.zeros_like(diff), where=span > 0)
        score = 0.5 * scaled[:, 1] + 0.5 * scaled[:, 0]
        order = np.argsort(score, kind="stable")
        candidates = order[order != i][:num_similar]
        matches.append(int(candidates[rng.integers(len(candidates))]))
    return matches


def shuffle_structures(n: int, seed: int = 42) -> list[int]:
    """A seeded random permutation of range(n) (the seed's ``--shuffle_masks``); not a derangement."""
    n, seed = Rule("int", low=0)("num_structures", n), parse("seed", seed)
    return [int(j) for j in np.random.default_rng(seed).permutation(n)]


def condition_preview(condition: np.ndarray) -> np.ndarray:
    """A uint8 (H, W, 3) picture of a (6, H, W) condition: red = hv x, green = hv y, blue 0, edges white.

    Red and green are round(127.5 (1 + v)) of the hv channels, so background (hv 0) is olive (128, 128, 0), a nucleus
    shades from dark (top left) to yellow (bottom right), and edge pixels (channel 5 > 0.5) are (255, 255, 255).
    The colour channels are not shown (they are a shuffle with no structure to see).
    """
    condition = _image(condition, "condition")
    if condition.shape[0] != 6:
        raise ValueError(f"a nuclei condition has 6 channels, got shape {condition.shape}.")
    picture = np.zeros((*condition.shape[1:], 3), dtype=np.uint8)
    picture[..., :2] = np.clip(np.rint(127.5 * (1.0 + np.moveaxis(condition[:2], 0, -1))), 0, 255)
    picture[condition[5] > 0.5] = 255
    return picture
