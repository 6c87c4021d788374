"""Polyp images and masks in the Kvasir-SEG / HyperKvasir layouts: find, check, read, split, and demo data.

Layouts accepted as ``dataset_dir`` (the same 1000 images and masks ship in both releases):
- Kvasir-SEG: ``<dir>/images/<id>.jpg`` with ``<dir>/masks/<id>.jpg`` (and ``kavsir_bboxes.json``);
- HyperKvasir ``segmented-images``: ``<dir>/images/`` or ``<dir>/masked-images/`` (the name the method's seed code
  reads) with ``<dir>/masks/`` (and ``bounding-boxes.json``); when both image folders exist, ``images/`` is read;
- either of them one folder down, e.g. ``<dir>/Kvasir-SEG/`` as in the official zip or ``<dir>/segmented-images/``.

Rules:
- folder names match in any case; files are ``.jpg``/``.jpeg``/``.png`` in any case, and names starting with
  ``.`` are skipped; an image and its mask share the stem (``a.jpg`` pairs with ``a.png``). Every image needs a mask
  and every mask an image; the bounding-box JSON is optional and not read;
- images are 8-bit (any PIL mode that converts to RGB); masks are 8-bit, one channel is read (the first of RGB,
  alpha ignored) and foreground is ``> 127``: Kvasir masks are RGB JPEGs whose artefacts give 0-8 and 247-255;
- a mask is refused when its size differs from its image's, when more than 1 % of its pixels lie strictly between
  32 and 223 (not a 0/255 mask), when it has no foreground, or when its foreground lies entirely outside the centre
  square that `read_pair` keeps (the method inpaints inside the polyp);
- a dataset is refused when its largest image has more than ``max_size_ratio**2`` times the area of its smallest.

Geometry and values (`read_pair`, `LoadPolypPaird`; the seed's ``center_crop_arr``): while the short side is at
least 2*S the image is halved with a BOX filter, then resized with BICUBIC so its short side is S, then the centre
S x S square is cut (offsets rounded down). The mask (0/255) goes through the same steps and is thresholded
``> 127`` again. Images come out channel-first (3, S, S) float32 in [-1, 1] (value / 127.5 - 1), masks (1, S, S)
float32 in {0, 1}; the joint tensor of `LoadPolypPaird` is (4, S, S): RGB, then the mask as -1/+1.
"""

from __future__ import annotations

import json
import math
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from scipy import ndimage, special
from tqdm import tqdm

from meddiff.data.errors import DataError
from meddiff.data.readers import check_file, files_by_stem, folder_entries, listing, read_image
from meddiff.errors import OptionError
from meddiff.io import OutputExistsError, atomic_write, save_json
from meddiff.options import Rule, parse

__all__ = [
    "IMAGE_FOLDERS",
    "POLYP_SUFFIXES",
    "LoadPolypPaird",
    "check_enough_pairs",
    "check_polyp_pairs",
    "find_polyp_pairs",
    "make_synthetic_polyps",
    "polyp_datalist",
    "read_pair",
    "split_pairs",
]

POLYP_SUFFIXES = (".jpg", ".jpeg", ".png")
IMAGE_FOLDERS = ("images", "masked-images")
MASK_FOLDER = "masks"
MASK_THRESHOLD = 127
GREY_LOW, GREY_HIGH = 32, 223
MAX_GREY_FRACTION = 0.01
_TEST_FRACTION = Rule("float", low=0.0, high=1.0, low_open=True, high_open=True, hint="the share held out for testing")
_NUM_CLUSTERS = Rule("int", low=1, hint="k of k-means")
_MAX_SIZE_RATIO = Rule("float", low=1.0, hint="largest over smallest image side")
_KEEP_LABEL = Rule("bool")
_NUM_CASES = Rule("int", low=1)
_DEMO_SIZE = Rule("int", low=32, high=4096)
_EXPECTED = (
    "expected images/ (or masked-images/) beside masks/, as in Kvasir-SEG or HyperKvasir's segmented-images/, in "
    "that folder or one folder down"
)


def _child(folder: Path, name: str) -> Path | None:
    """The sub-folder of `folder` called `name` in any case, or None."""
    exact = folder / name
    if exact.is_dir():
        return exact
    return next((p for p in sorted(folder.iterdir()) if p.name.lower() == name and p.is_dir()), None)


def _layout(folder: Path) -> tuple[Path, Path] | None:
    """The (images, masks) folders when `folder` holds a polyp layout, else None."""
    masks = _child(folder, MASK_FOLDER)
    images = next((f for f in (_child(folder, name) for name in IMAGE_FOLDERS) if f is not None), None)
    return (images, masks) if images is not None and masks is not None else None


def _find_layout(dataset_dir: str | Path | None) -> tuple[Path, Path]:
    if not dataset_dir or not Path(dataset_dir).is_dir():
        raise DataError(
            f"dataset_dir {dataset_dir} does not exist: pass the Kvasir-SEG folder (images/ + masks/) or HyperKvasir's "
            "segmented-images/ folder."
        )
    root = Path(dataset_dir).resolve()
    found = _layout(root)
    if found is not None:
        return found
    below = [(sub, _layout(sub)) for sub in sorted(root.iterdir()) if sub.is_dir() and not sub.name.startswith(".")]
    below = [(sub, layout) for sub, layout in below if layout is not None]
    if len(below) > 1:
        raise DataError(
            f"{root} holds several polyp datasets ({', '.join(sub.name for sub, _ in below)}): pass one of them as "
            "dataset_dir."
        )
    if below:
        return below[0][1]
    if _child(root, MASK_FOLDER) is not None:
        raise DataError(
            f"{root / MASK_FOLDER} has no images/ (or masked-images/) folder beside it: add the images there, or pass "
            "the folder that holds both."
        )
    raise DataError(f"{root} holds no polyp dataset: {_EXPECTED}; pass the folder that holds them as dataset_dir.")


def _by_stem(folder: Path) -> dict[str, Path]:
    """The image files directly in `folder` by stem; two files with one stem are refused."""
    paths = folder_entries(folder, POLYP_SUFFIXES)
    return files_by_stem(
        (p for p in paths if not p.name.startswith(".") and p.name.lower().endswith(POLYP_SUFFIXES) and not p.is_dir()),
        "image id",
    )


def find_polyp_pairs(dataset_dir: str | Path) -> list[dict]:
    """List the dataset's pairs as {"name": id, "image": absolute path, "label": absolute path}, sorted by name.

    Args:
        dataset_dir: a Kvasir-SEG or HyperKvasir segmented-images folder, or the folder holding one of them (see the
            module docstring). Missing folders, unpaired files and empty or unopenable files are refused here; the
            pixels are checked by `check_polyp_pairs`.
    """
    images_dir, masks_dir = _find_layout(dataset_dir)
    images, masks = _by_stem(images_dir), _by_stem(masks_dir)
    if not images and not masks:
        raise DataError(
            f"{images_dir} and {masks_dir} hold no .jpg/.jpeg/.png files: add the polyp images and their masks."
        )
    no_mask = sorted(images.keys() - masks.keys())
    no_image = sorted(masks.keys() - images.keys())
    problems = []
    if no_mask:
        names = [images[s].name for s in no_mask]
        problems.append(f"{len(no_mask)} image(s) in {images_dir} have no mask in {masks_dir} ({listing(names)})")
    if no_image:
        names = [masks[s].name for s in no_image]
        problems.append(f"{len(no_image)} mask(s) in {masks_dir} have no image in {images_dir} ({listing(names)})")
    if problems:
        raise DataError(
            f"{'; '.join(problems)}: an image and its mask share a name; add the missing masks (or images), or remove "
            "the unpaired files."
        )
    pairs = []
    for stem in sorted(images):
        pairs.append({"name": stem, "image": str(check_file(images[stem])), "label": str(check_file(masks[stem]))})
    return pairs


def _read_rgb(path: str | Path):  # -> PIL.Image.Image
    im = read_image(path)
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        raise DataError(f"{path} is a {im.mode} image, not 8-bit: save the polyp images as 8-bit RGB JPEG or PNG.")
    return im if im.mode == "RGB" else im.convert("RGB")


def _read_mask(path: str | Path) -> np.ndarray:
    """A mask file's first channel (H, W) uint8, alpha ignored."""
    im = read_image(path)
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        raise DataError(f"mask {path} is a {im.mode} image, not 8-bit: save the masks as 8-bit 0/255 images.")
    if im.mode in ("1", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):
        im = im.convert("L")
    array = np.asarray(im)
    return array[..., 0] if array.ndim == 3 else array


def _centre_square(width: int, height: int) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) box of the centre square `read_pair` keeps, in the original pixels."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def _check_mask(mask: np.ndarray, size: tuple[int, int], image_file: str | Path, label_file: str | Path) -> np.ndarray:
    """Apply the module's mask rules to a raw mask channel of an image of `size` (w, h); return it as bool."""
    if mask.shape != (size[1], size[0]):
        raise DataError(
            f"mask {label_file} is {mask.shape[1]}x{mask.shape[0]} but its image {image_file} is {size[0]}x{size[1]} "
            "(width x height): give every mask its image's size."
        )
    grey = float(np.count_nonzero((mask > GREY_LOW) & (mask < GREY_HIGH))) / max(mask.size, 1)
    if grey > MAX_GREY_FRACTION:
        raise DataError(
            f"mask {label_file} is not binary: {grey:.1%} of its pixels lie between {GREY_LOW} and {GREY_HIGH} (at "
            f"most {MAX_GREY_FRACTION:.0%} may): give 0/255 masks (polyp 255)."
        )
    foreground = mask > MASK_THRESHOLD
    if not foreground.any() and mask.max() > 0:
        raise DataError(
            f"mask {label_file} has values 0..{mask.max()}, none above {MASK_THRESHOLD}, so it marks no polyp: save a "
            f"0/1 (or 0/N) mask as 0/255 (polyp 255); a mask of no polyp cannot be used (the method inpaints inside "
            f"the polyp), so remove this pair ({image_file} and its mask)."
        )
    if not foreground.any():
        raise DataError(
            f"mask {label_file} is empty (no pixel above {MASK_THRESHOLD}): the method inpaints inside the polyp "
            f"mask, so remove this pair ({image_file} and its mask)."
        )
    left, top, right, bottom = _centre_square(*size)
    if not foreground[top:bottom, left:right].any():
        raise DataError(
            f"mask {label_file} marks a polyp only outside the centre square that is kept (columns {left}-{right - 1}, "
            f"rows {top}-{bottom - 1}): remove this pair ({image_file} and its mask), or crop the image around the "
            "polyp."
        )
    return foreground


def _centre_crop_resize(im, img_size: int):  # PIL.Image -> PIL.Image
    """The seed's centre_crop_arr: BOX halving while the short side is >= 2*S, BICUBIC to short side S, centre crop."""
    from PIL import Image

    while min(im.size) >= 2 * img_size:
        im = im.resize((im.width // 2, im.height // 2), resample=Image.BOX)
    scale = img_size / min(im.size)
    im = im.resize((round(im.width * scale), round(im.height * scale)), resample=Image.BICUBIC)
    left, top = (im.width - img_size) // 2, (im.height - img_size) // 2
    return im.crop((left, top, left + img_size, top + img_size))


def read_pair(image_file: str | Path, label_file: str | Path, img_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Read one pair as (image (3, S, S) float32 in [-1, 1], mask (1, S, S) float32 in {0, 1}), S = `img_size`.

    Args:
        image_file: the polyp image (8-bit JPEG/PNG).
        label_file: its mask (0/255, foreground ``> 127``); refused when it breaks a rule of the module docstring.
        img_size: the side S of the square output (centre crop, then resize, as the module docstring says).
    """
    from PIL import Image

    img_size = parse("img_size", img_size)
    im = _read_rgb(image_file)
    foreground = _check_mask(_read_mask(label_file), im.size, image_file, label_file)
    image = np.asarray(_centre_crop_resize(im, img_size), dtype=np.float32) / 127.5 - 1.0
    mask_im = Image.fromarray(foreground.astype(np.uint8) * 255)
    mask = np.asarray(_centre_crop_resize(mask_im, img_size)) > MASK_THRESHOLD
    if not mask.any():
        raise DataError(
            f"mask {label_file} marks a polyp too small to survive resizing to {img_size}x{img_size}: remove this "
            f"pair ({image_file} and its mask), or use a larger img_size."
        )
    return np.ascontiguousarray(image.transpose(2, 0, 1)), mask[None].astype(np.float32)


def _check_pair(item: Mapping) -> tuple[int, int]:
    """Run the per-pair checks on one {"image", "label"} item; return the image size (w, h)."""
    im = _read_rgb(item["image"])
    _check_mask(_read_mask(item["label"]), im.size, item["image"], item["label"])
    return im.size


def check_polyp_pairs(items: Sequence[Mapping], max_size_ratio: float = 4.0, progress: bool = False) -> None:
    """Read every pair once and refuse the problems of the module docstring, naming the file(s) and the fix.

    Every pair is checked before raising: the error gives the first problem and names the other failing pairs.

    Args:
        items: {"image", "label"} pairs, e.g. from `find_polyp_pairs`.
        max_size_ratio: the largest image may have at most ``max_size_ratio**2`` times the area of the smallest.
        progress: show a progress bar.
    """
    max_size_ratio = _MAX_SIZE_RATIO("max_size_ratio", max_size_ratio)
    sizes: list[tuple[int, int]] = []
    first: DataError | None = None
    failed: list[str] = []
    for item in tqdm(items, desc="checking pairs", disable=not progress):
        try:
            sizes.append(_check_pair(item))
        except DataError as err:
            first = first or err
            failed.append(Path(item["image"]).name)
    if first is not None:
        others = failed[1:]
        more = f" {len(others)} other pair(s) fail too: {listing(others)}." if others else ""
        raise DataError(f"{first}{more}") from first
    if not sizes:
        return
    areas = [w * h for w, h in sizes]
    small, large = int(np.argmin(areas)), int(np.argmax(areas))
    if areas[large] > max_size_ratio**2 * areas[small]:
        raise DataError(
            f"images of wildly different sizes: {items[small]['image']} is {sizes[small][0]}x{sizes[small][1]} and "
            f"{items[large]['image']} is {sizes[large][0]}x{sizes[large][1]}, an area ratio of "
            f"{areas[large] / areas[small]:.1f} (at most {max_size_ratio:g}**2 = {max_size_ratio**2:g}): resize or "
            "remove the outliers, or raise --max_size_ratio."
        )


def check_enough_pairs(items: Sequence, num_clusters: int, dataset_dir: str | Path) -> None:
    """Refuse fewer pairs than k-means clusters.

    Args:
        items: the dataset's pairs.
        num_clusters: the number of k-means clusters to fit.
        dataset_dir: the folder the pairs came from (named in the error).
    """
    num_clusters = _NUM_CLUSTERS("num_clusters", num_clusters)
    if len(items) < num_clusters:
        raise DataError(
            f"{dataset_dir} gives {len(items)} image/mask pair(s) to cluster, fewer than --num_clusters "
            f"{num_clusters}: lower --num_clusters to at most {len(items)}, or add images."
        )


def split_pairs(pairs: Sequence[dict], test_fraction: float = 0.2, seed: int = 0) -> dict[str, list[dict]]:
    """Split name-sorted pairs into {"training": [...], "testing": [...]} (each in the given order), reproducibly.

    The testing pairs are the first ``ceil(test_fraction * n)`` of ``RandomState(seed).permutation(n)``: the same
    partition as scikit-learn's ``train_test_split(pairs, test_size=test_fraction, random_state=seed)``, which the
    seed's downstream code uses with 0.2 and 0.

    Args:
        pairs: the pairs to split, e.g. from `find_polyp_pairs`.
        test_fraction: the share of pairs held out for testing, in (0, 1).
        seed: the seed of the permutation (taken modulo 2**32).
    """
    fraction = _TEST_FRACTION("test_fraction", test_fraction)
    seed = parse("seed", seed)
    num_test = math.ceil(fraction * len(pairs))
    if num_test >= len(pairs) > 0:
        raise DataError(
            f"a test fraction of {fraction:g} of {len(pairs)} pair(s) leaves none for training: add images or lower "
            "--test_fraction."
        )
    order = np.random.RandomState(seed % 2**32).permutation(len(pairs))
    testing = {int(i) for i in order[:num_test]}
    return {
        "training": [p for i, p in enumerate(pairs) if i not in testing],
        "testing": [p for i, p in enumerate(pairs) if i in testing],
    }


def polyp_datalist(dataset_dir: str | Path, test_fraction: float = 0.2, seed: int = 0) -> dict[str, list[dict]]:
    """The dataset's pairs (`find_polyp_pairs`) split by `split_pairs` into "training" and "testing", sorted by name.

    Args:
        dataset_dir: the dataset folder (see `find_polyp_pairs`).
        test_fraction: the share of pairs held out for testing, in (0, 1).
        seed: the seed of the split (0, with 0.2, is the seed's downstream split).
    """
    split_pairs([], test_fraction, seed)  # refuse bad options before listing files
    return split_pairs(find_polyp_pairs(dataset_dir), test_fraction, seed)


class LoadPolypPaird(MapTransform):
    """Replace an item's image path by the seed's joint (4, S, S) float32 tensor: RGB in [-1, 1], mask as -1/+1.

    The label path is dropped, or replaced by the mask (1, S, S) float32 in {0, 1} when `keep_label`; other keys
    (the name) are kept, and the image's path is stored under "image_file".

    Args:
        keys: the image key and the mask key, in that order.
        img_size: the side S of the square output (centre crop, then resize; see the module docstring).
        keep_label: keep the mask under the mask key instead of dropping it.
    """

    def __init__(
        self, keys: KeysCollection = ("image", "label"), img_size: int = 256, keep_label: bool = False
    ) -> None:
        super().__init__(keys)
        if len(self.keys) != 2:
            raise OptionError(f"LoadPolypPaird keys must name the image and the mask keys, got {keys!r}.")
        self.img_size = parse("img_size", img_size)
        self.keep_label = _KEEP_LABEL("keep_label", keep_label)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        image_key, label_key = self.keys
        image_file, label_file = d[image_key], d[label_key]
        image, mask = read_pair(image_file, label_file, self.img_size)
        d[image_key] = torch.from_numpy(np.concatenate([image, mask * 2.0 - 1.0]))
        d["image_file"] = str(image_file)
        if self.keep_label:
            d[label_key] = torch.from_numpy(mask)
        else:
            del d[label_key]
        return d


# ---------------------------------------------------------------- built-in demo data

# mucosa colour (RGB in 0..1), light strength, vignette strength: distinct groups for k-means to find
_STYLES = (
    ((0.80, 0.40, 0.38), 1.00, 0.50),
    ((0.62, 0.20, 0.17), 0.85, 0.75),
    ((0.84, 0.55, 0.33), 1.05, 0.40),
    ((0.70, 0.40, 0.52), 0.90, 0.60),
)
_POLYP_TINT = np.array([0.96, 0.72, 0.64])


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise scaled to unit standard deviation."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    return noise / max(float(noise.std()), 1e-6)


def _polyp(
    rng: np.random.Generator, u: np.ndarray, v: np.ndarray, cx: float, cy: float, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """One wobbly elliptical polyp in half-height units: its normalised radius map and dome height (0..1)."""
    a = radius
    b = radius * rng.uniform(0.65, 1.0)
    theta = rng.uniform(0, np.pi)
    du, dv = u - cx, v - cy
    x = du * np.cos(theta) + dv * np.sin(theta)
    y = -du * np.sin(theta) + dv * np.cos(theta)
    angle = np.arctan2(y, x)
    wobble = 1 + sum(rng.uniform(0, 0.07) * np.cos(k * angle + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    dist = np.hypot(x / a, y / b) / wobble
    return dist, np.sqrt(np.clip(1 - dist**2, 0, 1))


def _synthetic_polyp_image(
    rng: np.random.Generator, style: int, height: int, width: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """One endoscopy-like RGB image (uint8) and each polyp's mask (bool)."""
    base, light, vignette = _STYLES[style]
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    u, v = (xx - width / 2) / (height / 2), (yy - height / 2) / (height / 2)  # half-height units, centre 0
    lx, ly = rng.uniform(-0.3, 0.3, 2)
    glow = np.clip(1 - vignette * ((u - lx) ** 2 + (v - ly) ** 2) / 2, 0.12, 1) * light
    fold_angle = rng.uniform(0, np.pi)
    folds = np.sin(rng.uniform(3, 7) * (u * np.cos(fold_angle) + v * np.sin(fold_angle)) + rng.uniform(0, 6.3))
    shade = glow * (
        1 + 0.07 * _smooth_noise(rng, (height, width), height / 10) + 0.03 * _smooth_noise(rng, u.shape, 1.2)
    )
    shade *= 1 + 0.06 * folds
    vessels = np.exp(-((_smooth_noise(rng, u.shape, height / 18) / 0.08) ** 2))
    image = np.asarray(base)[None, None] * shade[..., None] * (1 - 0.18 * vessels[..., None] * [0.4, 1, 1])
    if rng.random() < 0.6:  # the dark lumen further down the bowel
        angle, reach, spread = rng.uniform(0, 2 * np.pi), rng.uniform(0.6, 1.0), rng.uniform(0.2, 0.4)
        hole = np.exp(-((u - reach * np.cos(angle)) ** 2 + (v - reach * np.sin(angle)) ** 2) / (2 * spread**2))
        image *= 1 - 0.85 * hole[..., None]
    masks = []
    half_side = min(width, height) / height  # the centre square, in half-height units
    for _ in range(2 if rng.random() < 0.2 else 1):
        radius = rng.uniform(0.15, 0.55)
        reach = max(half_side - 1.3 * radius, 0.0)
        cx, cy = rng.uniform(-reach, reach), rng.uniform(-reach, reach)
        dist, dome = _polyp(rng, u, v, cx, cy, radius)
        tint = _POLYP_TINT * rng.uniform(0.9, 1.05) * 0.35 + np.asarray(base) * 0.65
        bumps = 0.07 * _smooth_noise(rng, u.shape, rng.uniform(1.5, 3.0))
        lit = glow * (0.9 + 0.35 * dome + bumps)
        glare = np.exp(-((u - cx + 0.3 * radius) ** 2 + (v - cy + 0.3 * radius) ** 2) / (2 * (0.12 * radius) ** 2))
        polyp = tint[None, None] * lit[..., None] + 0.6 * glare[..., None] * (dist < 1)[..., None]
        alpha = special.expit((1 - dist) * 14)[..., None]
        rim = np.clip(1 - 0.25 * np.exp(-(((dist - 1.1) / 0.1) ** 2)), 0, 1)[..., None]
        image = image * rim * (1 - alpha) + polyp * alpha
        masks.append(dist < 1)
    for _ in range(rng.integers(2, 6)):  # specular glare on the wet mucosa
        gx, gy = rng.uniform(-1.2, 1.2), rng.uniform(-0.9, 0.9)
        image += 0.7 * np.exp(-((u - gx) ** 2 + (v - gy) ** 2) / (2 * rng.uniform(0.01, 0.03) ** 2))[..., None]
    image += 0.012 * rng.standard_normal(image.shape)
    corners = np.abs(u) / (width / height) + np.abs(v) > 1.6
    image[corners] = 0.02
    masks = [m & ~corners for m in masks]
    return np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8), masks


def _bbox(mask: np.ndarray) -> dict:
    rows, cols = np.nonzero(mask)
    return {
        "label": "polyp",
        "xmin": int(cols.min()),
        "ymin": int(rows.min()),
        "xmax": int(cols.max()),
        "ymax": int(rows.max()),
    }


def make_synthetic_polyps(out_dir: str | Path, num_cases: int = 24, size: int = 128, seed: int = 0) -> Path:
    """Write built-in demo data in the Kvasir-SEG release layout and return its folder.

    ``<out_dir>/images/<id>.jpg`` (RGB), ``<out_dir>/masks/<id>.jpg`` (RGB 0/255 JPEG, like the real masks) and
    ``kavsir_bboxes.json`` ({id: {"height", "width", "bbox": [{"label", "xmin", "ymin", "xmax", "ymax"}]}}). Each image
    is reddish mucosa (vignette, smooth shading, folds, faint vessels, glare, black corners) with one polyp, sometimes
    two: brighter, paler, bumpy wobbly ellipses of varied size and place inside the centre square. The cases cycle
    through 4 colour/lighting styles, so clustering finds structure. Images are ``size`` high and about 1.18x as wide;
    every fourth is 1.2x larger. The same arguments give the same bytes; calling it again with them reuses the data,
    and other data already in `out_dir` is never overwritten.

    Args:
        out_dir: the dataset folder to write.
        num_cases: how many image/mask pairs.
        size: the height of the ordinary images in pixels (at least 32).
        seed: the seed of the numpy Generator that draws everything.
    """
    from PIL import Image

    num_cases, size = _NUM_CASES("num_cases", num_cases), _DEMO_SIZE("size", size)
    seed = parse("seed", seed)
    root = Path(out_dir)
    params = {"num_cases": num_cases, "size": size, "seed": seed}
    manifest = root / "synthetic_polyps.json"
    if manifest.is_file():
        if json.loads(manifest.read_text()) == params:
            return root
        raise OutputExistsError(
            f"{root} already holds synthetic polyp data made with {manifest.read_text().strip()}: choose another "
            "folder, or remove it."
        )
    rng = np.random.default_rng(seed)
    boxes = {}
    for index in range(num_cases):
        scale = 1.2 if index % 4 == 3 else 1.0
        height = round(size * scale)
        width = round(height * 1.18)
        image, masks = _synthetic_polyp_image(rng, index % len(_STYLES), height, width)
        name = f"synthetic_polyp_{index:03d}"
        union = np.logical_or.reduce(masks)
        mask_rgb = np.repeat(union[..., None].astype(np.uint8) * 255, 3, axis=2)
        for folder, array in (("images", image), ("masks", mask_rgb)):
            atomic_write(
                root / folder / f"{name}.jpg",
                lambda tmp, a=array: Image.fromarray(a).save(tmp, format="JPEG", quality=90),
                overwrite=False,
            )
        boxes[name] = {"height": height, "width": width, "bbox": [_bbox(m) for m in masks if m.any()]}
    save_json(boxes, root / "kavsir_bboxes.json", overwrite=False)
    save_json(params, manifest, overwrite=False)
    return root
