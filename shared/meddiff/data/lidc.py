"""LIDC-IDRI nodule crops with several raters' masks: the seed's folder layout, a random-rater transform, crops.

Layout (the CIMD seed's, e.g. ``../shared/data/lidc_crops/data``)::

    <dataset_dir>/<split>/<id>/image_<n>.jpg          one CT crop, 8-bit grayscale
    <dataset_dir>/<split>/<id>/label0_.jpg ... labelR_.jpg   one mask per rater (an empty mask: no nodule marked)

The kind of each file is the text before its first ``_``; PNG/TIFF work as well as JPEG. A case folder with an
image but no masks, or masks but no image, is refused, and so is a broken symlink among the cases or their files.

Rater masks are binarised by this rule (`read_binary_mask`):
- a mask whose maximum is 0 or 1 is a 0/1 mask: foreground is 1;
- otherwise foreground is above half the range of its bit depth: ``> 127`` for 8-bit masks (0/255 JPEG masks:
  JPEG ringing makes ``> 0`` inflate the foreground by about half), ``> 32767`` for 16-bit ones;
- a mask whose maximum lies between 2 and that half (it would read as empty) is refused, as are masks with
  negative values, floating-point masks with values outside 0..1 (inside: foreground ``> 0.5``), and colour masks
  whose channels differ (equal channels: one is taken, alpha ignored).

Images map to [-1, 1] by their bit depth (8-bit / 255, 16-bit / 65535; see `meddiff.data.layouts`).
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Mapping
from pathlib import Path

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable
from scipy import ndimage, special
from tqdm import tqdm

from meddiff.data.errors import DataError
from meddiff.data.layouts import IMAGE_SUFFIXES, read_png_image
from meddiff.data.readers import folder_entries, read_mask_channel
from meddiff.data.slices import resize_image, resize_label
from meddiff.io import OutputExistsError, atomic_write, save_json

__all__ = [
    "RandRaterd",
    "crop_plane",
    "find_lidc_cases",
    "load_lidc_cases",
    "make_synthetic_lidc",
    "paste_plane",
    "read_binary_mask",
    "split_folder",
    "window_to_uint8",
]

SPLITS = {"train": "training", "training": "training", "test": "testing", "testing": "testing"}


def split_folder(dataset_dir: str | Path, split: str) -> Path:
    """The folder of `split` ("training"/"testing", or "train"/"test") under `dataset_dir` (or its ``data/``)."""
    root = Path(dataset_dir) if dataset_dir else None
    if root is None or not root.is_dir():
        raise DataError(f"dataset_dir {dataset_dir} does not exist: pass the folder that holds training/ and testing/.")
    name = SPLITS.get(split, split)
    for folder in (root / name, root / "data" / name):
        if folder.is_dir():
            return folder
    raise DataError(
        f"{root / name} does not exist: the LIDC layout is {root}/{name}/<id>/image_<n>.jpg with label0_.jpg ... "
        f"(the CIMD seed's); pass the folder holding {name}/ as dataset_dir, or choose another split."
    )


def _case_order(path: Path) -> tuple[int, str]:
    return (int(path.name), "") if path.name.isdigit() else (1 << 62, path.name)


def find_lidc_cases(dataset_dir: str | Path, split: str = "training", num_raters: int = 4) -> list[dict]:
    """List the cases of a split: {"image": path, "label": [rater mask paths], "name": case id}."""
    folder = split_folder(dataset_dir, split)
    cases = []
    for case in sorted((p for p in folder_entries(folder) if p.is_dir()), key=_case_order):
        kinds: dict[str, list[Path]] = {}
        for f in folder_entries(case, IMAGE_SUFFIXES):
            if f.is_file() and f.name.lower().endswith(IMAGE_SUFFIXES):
                kinds.setdefault(f.name.split("_")[0].lower(), []).append(f)
        images = kinds.get("image", [])
        has_labels = any(kind.startswith("label") for kind in kinds)
        if not images and has_labels:
            raise DataError(
                f"{case} holds rater masks but no image_<n> file: add the case's image, or remove the case folder."
            )
        if images and not has_labels:
            raise DataError(
                f"{case} holds {images[0].name} but no rater masks: add label0_.jpg ... label{num_raters - 1}_.jpg "
                "(an empty mask where a rater marked nothing), or remove the case folder."
            )
        if len(images) != 1:
            raise DataError(f"{case} holds {len(images)} image_* files: put exactly one image_<n>.jpg in each case.")
        labels = []
        for r in range(num_raters):
            found = kinds.get(f"label{r}", [])
            if len(found) != 1:
                raise DataError(
                    f"{case}/label{r}_.jpg is missing (found {len(found)}): every case needs the masks of all "
                    f"{num_raters} raters (an empty mask where a rater marked nothing), or set num_raters."
                )
            labels.append(str(found[0]))
        cases.append({"image": str(images[0]), "label": labels, "name": case.name})
    if not cases:
        raise DataError(f"no cases in {folder}: expected {folder}/<id>/image_<n>.jpg with label0_.jpg ... label3_.jpg.")
    return cases


def read_binary_mask(path: str | Path) -> np.ndarray:
    """Read a rater's mask as (H,W) bool by the module's binarisation rule (0/1 masks, else above half the range)."""
    array, mode = read_mask_channel(path, "save the rater's mask as one grey channel (0/255 or 0/1).")
    if array.dtype == bool:
        return array
    if array.dtype.kind == "f":
        if not (np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1):
            raise DataError(f"mask {path} is a floating-point mask with values outside 0..1: save it as 0/255 or 0/1.")
        return array > 0.5
    low, top = (int(array.min()), int(array.max())) if array.size else (0, 0)
    if low < 0:
        raise DataError(f"mask {path} holds negative values: save the rater's mask as 0/255 or 0/1.")
    if top <= 1:
        return array == 1
    bits = 8 if array.dtype.itemsize == 1 else 16 if mode.startswith("I;16") or top <= 65535 else 32
    half = (1 << (bits - 1)) - 1
    if top <= half:
        raise DataError(
            f"mask {path} has values 0..{top}: a {bits}-bit rater mask is 0/1 (foreground 1) or has its foreground "
            f"above {half}, so this one would read as empty; save it as 0/{(1 << bits) - 1} or 0/1."
        )
    return array > half


def load_lidc_cases(
    dataset_dir: str | Path,
    split: str = "training",
    img_size: int | None = 128,
    num_raters: int = 4,
    progress: bool = True,
) -> list[dict]:
    """Load a split as {"image" (1,S,S) in [-1,1], "label" (R,S,S) float {0,1}, "name", "image_file"} items."""
    items = []
    for case in tqdm(find_lidc_cases(dataset_dir, split, num_raters), desc=f"reading {split}", disable=not progress):
        image = read_png_image(case["image"], 1)
        masks = []
        for path in case["label"]:
            mask = read_binary_mask(path)
            if mask.shape != image.shape[1:]:
                raise DataError(
                    f"mask {path} is {mask.shape[0]}x{mask.shape[1]} but its image {case['image']} is "
                    f"{image.shape[1]}x{image.shape[2]}: every mask must have its image's size."
                )
            masks.append(mask)
        label = np.stack(masks).astype(np.int64)
        if img_size:
            image = resize_image(image, img_size)
            label = np.concatenate([resize_label(m[None], img_size) for m in label])
        items.append({**case, "image": image, "label": label.astype(np.float32), "image_file": case["image"]})
    return items


class RandRaterd(Randomizable, MapTransform):
    """Replace the raters' masks (R,H,W) under `keys` by one rater's mask (1,H,W), drawn anew at every call."""

    def __init__(self, keys: KeysCollection = "label", allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self._rater = 0

    def randomize(self, num_raters: int) -> None:
        """Draw which rater to use."""
        self._rater = int(self.R.randint(num_raters))

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            masks = d[key]
            self.randomize(masks.shape[0])
            d[key] = masks[self._rater : self._rater + 1]
        return d


def window_to_uint8(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Map Hounsfield units linearly from `window` (low, high) to 0..255 (clipped), as uint8."""
    low, high = float(window[0]), float(window[1])
    return np.round(np.clip((np.asarray(hu, np.float32) - low) / (high - low), 0.0, 1.0) * 255.0).astype(np.uint8)


def _crop_origin(centre: tuple[float, float], size: int, step: tuple[float, float]) -> np.ndarray:
    """Plane coordinates of a crop's first pixel; on the pixel grid when the step is 1, so crops copy pixels."""
    origin = np.asarray(centre, np.float64) - (size - 1) / 2.0 * np.asarray(step, np.float64)
    return np.where(np.asarray(step) == 1.0, np.round(origin), origin)


def crop_plane(
    plane: np.ndarray,
    centre: tuple[float, float],
    size: int,
    step: tuple[float, float] = (1.0, 1.0),
    order: int = 1,
    cval: float = 0.0,
) -> np.ndarray:
    """A (size,size) crop of a 2D array centred on (row, col), sampled every `step` (row, col) pixels.

    A step of 1 copies pixels; another step resamples (e.g. target spacing / pixel spacing). Samples outside the
    array take `cval`; `order` 1 is bilinear (images), 0 nearest neighbour (masks).
    """
    origin = _crop_origin(centre, size, step)
    rows, cols = np.meshgrid(
        origin[0] + np.arange(size) * step[0], origin[1] + np.arange(size) * step[1], indexing="ij"
    )
    return ndimage.map_coordinates(plane, [rows, cols], order=order, mode="constant", cval=cval)


def paste_plane(
    crops: np.ndarray, shape: tuple[int, int], centre: tuple[float, float], size: int, step: tuple[float, float]
) -> np.ndarray:
    """Put (N,S,S) crops taken by `crop_plane(plane, centre, size, step)` back on the plane's (H,W) grid.

    The crops may have been resized to S != size. Nearest neighbour; pixels outside the crop are 0.
    """
    origin, scale = _crop_origin(centre, size, step), crops.shape[-1] / size
    rows, cols = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    u = ((rows - origin[0]) / step[0] + 0.5) * scale - 0.5
    v = ((cols - origin[1]) / step[1] + 0.5) * scale - 0.5
    inside = (u > -0.5) & (u < crops.shape[-2] - 0.5) & (v > -0.5) & (v < crops.shape[-1] - 0.5)
    ui = np.clip(np.floor(u + 0.5), 0, crops.shape[-2] - 1).astype(int)
    vi = np.clip(np.floor(v + 0.5), 0, crops.shape[-1] - 1).astype(int)
    return np.where(inside[None], crops[:, ui, vi], 0).astype(crops.dtype)


def _blob(rng: np.random.RandomState, size: int, yy: np.ndarray, xx: np.ndarray) -> tuple[np.ndarray, float]:
    """A soft, irregular nodule (values in [0,1]) and its radius in pixels."""
    cy, cx = size / 2 + rng.uniform(-size / 10, size / 10, 2)
    radius = rng.uniform(size / 40, size / 11)
    angle = np.arctan2(yy - cy, xx - cx)
    wobble = 1 + sum(rng.uniform(0, 0.15) * np.cos(k * angle + rng.uniform(0, 6.3)) for k in (2, 3, 5))
    dist = np.hypot(yy - cy, xx - cx) / (radius * wobble)
    return special.expit((1.0 - dist) * 6.0), radius


def _synthetic_case(rng: np.random.RandomState, size: int, num_raters: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """One CT-like crop (uint8) and its raters' masks (bool): dark lung, vessels, chest wall, a soft nodule."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    image = 15.0 + 25.0 * ndimage.gaussian_filter(rng.randn(size, size), 2.0)
    for _ in range(rng.randint(2, 5)):  # vessels: blurred bright lines
        p0, p1 = rng.uniform(0, size, 2), rng.uniform(0, size, 2)
        t = np.linspace(0, 1, 4 * size)[:, None]
        pts = np.clip((p0 + t * (p1 - p0)).astype(int), 0, size - 1)
        line = np.zeros((size, size))
        line[pts[:, 0], pts[:, 1]] = 1.0
        image += 60.0 * np.clip(ndimage.gaussian_filter(line, rng.uniform(0.7, 1.5)) * 3, 0, 1)
    if rng.rand() < 0.5:  # chest wall on one side
        side = np.array([yy, xx, size - 1 - yy, size - 1 - xx])[rng.randint(4)]
        image += 75.0 * special.expit(rng.uniform(0.05, 0.2) * size - side)
    nodule, radius = _blob(rng, size, yy, xx)
    faint = rng.rand() < 0.25
    image += (35.0 if faint else 75.0) * nodule + rng.randn(size, size) * 3.0
    masks = []
    for _ in range(num_raters):
        level = rng.uniform(0.2, 0.8)
        mask = ndimage.shift(nodule, rng.uniform(-1, 1, 2), order=1) > level
        if rng.rand() < (0.5 if faint else 0.08) or radius < size / 30 and rng.rand() < 0.5:
            mask[:] = False  # this rater marked no nodule
        masks.append(mask)
    return np.clip(image, 0, 255).astype(np.uint8), masks


def make_synthetic_lidc(
    output_dir: str | Path, num_train: int = 16, num_test: int = 4, size: int = 128, seed: int = 0, num_raters: int = 4
) -> Path:
    """Write built-in demo data in the seed's layout (JPEG, like the seed) and return the dataset folder.

    Each case is a CT-like crop (dark lung, bright vessels, sometimes a chest wall) with a soft irregular nodule;
    the raters' masks threshold that nodule at different levels with a sub-pixel shift, and some raters (most, for
    faint or tiny nodules) mark nothing. Calling it again with the same arguments reuses the data; other data
    already in `output_dir` is never overwritten.
    """
    from PIL import Image

    root = Path(output_dir)
    params = {"num_train": num_train, "num_test": num_test, "size": size, "seed": seed, "num_raters": num_raters}
    manifest = root / "synthetic_lidc.json"
    if manifest.is_file():
        if json.loads(manifest.read_text()) == params:
            return root
        raise OutputExistsError(f"{root} already holds synthetic LIDC data made with {manifest.read_text().strip()}.")
    rng = np.random.RandomState(seed)
    case_id = 0
    for split, count in (("training", num_train), ("testing", num_test)):
        for _ in range(count):
            image, masks = _synthetic_case(rng, size, num_raters)
            folder = root / split / str(case_id)
            arrays = {
                f"image_{case_id}.jpg": image,
                **{f"label{r}_.jpg": m.astype(np.uint8) * 255 for r, m in enumerate(masks)},
            }
            for name, array in arrays.items():
                atomic_write(
                    folder / name,
                    lambda tmp, a=array: Image.fromarray(a).save(tmp, format="JPEG", quality=95),
                    overwrite=False,
                )
            case_id += 1
    save_json(params, manifest, overwrite=False)
    return root
