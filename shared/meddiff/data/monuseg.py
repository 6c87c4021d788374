"""MoNuSeg 2018 nuclei data: find the layouts, read Aperio XML, rasterize instance maps, cut patches, write the seed's.

Layouts accepted as ``dataset_dir`` (folder names match in any case, ignoring spaces, ``_`` and ``-``):
- a release *training folder*: ``Tissue_Images/<id>.tif`` (or ``Tissue Images/``, or ``images/`` as the seed's scripts
  name it) beside ``Annotations/<id>.xml``; ``Binary_masks/`` and any other folder are ignored;
- a release *test folder*: ``<id>.tif`` beside ``<id>.xml`` in one folder;
- a *patch folder*, the seed's layout that ``data_prep/monuseg.py`` writes: ``images/<name>.png`` beside
  ``inst_masks/<name>.tif`` (integer instance ids, 0 background); ``bin_masks/`` is optional and not read;
- the folder holding one or two of these under any names (``MoNuSegTrainingData``, ``MoNuSegTestData``), or such a
  folder one level further down (``<dir>/patches_valid_inst_128x128_128x128/``). The shallowest level with a set wins.

Tiles are ``.tif``/``.tiff`` (``.png`` too inside ``Tissue_Images/``); a tile and its XML (or its instance map) share
the file stem, and every tile needs its XML and every XML its tile. Two sets are used as "training" and "testing" (by
their names, "test"/"train", else the release training folder trains and the release test folder tests); one set is
split by slide, the first ``ceil(test_fraction * n)`` slides of ``RandomState(split_seed).permutation(n)`` testing
(clamped to leave one slide on each side). One slide alone has its patches split the same way; its edge patches overlap
grid patches, so that split leaks a few pixels.

Patches (the seed's "valid" extraction of `extract_patches_monuseg.py`, window = step = S, no padding): the grid rows
``y0 = 0, S, 2S, ...`` while ``y0 + S <= H`` (columns alike) in row-major order, then, when ``(H - S) % S != 0``, one
more row of patches flush with the bottom edge (``y0 = H - S``), then, when ``(W - S) % S != 0``, one more column flush
with the right edge, then the bottom-right corner patch when both. A 1000 px tile gives 7 x 7 = 49 grid patches plus
7 + 7 + 1 edge patches = 64 for S = 128, indexed 000-063 as the seed. A patch is named ``<slide>_<idx:03d>``; a file of
a patch folder that is exactly S x S is one patch named by its stem (its slide is the stem without a trailing
``_<digits>``), a larger one is cut like a tile. A tile smaller than S is refused.

Aperio ImageScope XML (`read_annotation`): every ``<Region>`` is one nucleus; its ``<Vertices><Vertex X= Y=/>`` are
(x, y) = (column, row) pixel coordinates, possibly fractional. Regions with fewer than 3 vertices, with zero area, or
marked ``NegativeROA="1"`` (an exclusion region) are reported as problems (returned with the region's Id and logged),
never silently dropped. A vertex more than `EDGE_TOLERANCE` px outside the tile's pixel centres ``[0, W-1] x [0, H-1]``
is refused: outlines of nuclei cut by the tile border overshoot it (by up to 3.1 px in the five sample tiles checked),
while an XML made for another tile size or scale lies far outside.

Rasterization (`rasterize`): a pixel (row r, column c) belongs to a region when its centre, the point (x=c, y=r), lies
inside the polygon or on its outline (``skimage.draw.polygon``); the regions are painted in file order with ids 1..K,
so a pixel covered by several regions belongs to the **later** one in the file (the seed's painting order). Instance
maps are uint16 (at most 65535 regions per tile); binary masks are uint8 0/255 (the seed's ``bin_masks``).

Values (`read_patch`, `LoadNucleiPatchd`): images come out channel-first (3, S, S) float32 in [-1, 1]
(value / 127.5 - 1); instance maps (S, S) int32 with the ids present in the patch renumbered 1..n in increasing order
of their tile id (0 stays background). Tiles are 8-bit (any PIL mode that converts to RGB; alpha dropped).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import struct
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from scipy import ndimage
from tqdm import tqdm

from meddiff.data.errors import DataError
from meddiff.data.readers import check_file, files_by_stem, folder_entries, listing, read_image, unreadable
from meddiff.data.readers import stem as file_stem
from meddiff.errors import OptionError
from meddiff.io import OutputExistsError, StagedOutput, atomic_write, save_json, save_png
from meddiff.options import Rule, parse

__all__ = [
    "EDGE_TOLERANCE",
    "SPLIT_FOLDERS",
    "TILE_CACHE_SIZE",
    "LoadNucleiPatchd",
    "binary_mask",
    "check_monuseg",
    "make_synthetic_nuclei",
    "monuseg_datalist",
    "patch_boxes",
    "patch_folder_name",
    "prepare_monuseg",
    "rasterize",
    "read_annotation",
    "read_patch",
    "read_tile",
]

logger = logging.getLogger(__name__)

EDGE_TOLERANCE = 10.0
TILE_CACHE_SIZE = 16
SPLIT_FOLDERS = {"training": "MoNuSegTrainingData", "testing": "MoNuSegTestData"}
TILE_SUFFIXES = (".tif", ".tiff")
TRAINING_TILE_SUFFIXES = (".tif", ".tiff", ".png")
PATCH_SUFFIXES = (".png", ".tif", ".tiff")
LABEL_SUFFIXES = (".tif", ".tiff", ".png")
XML_SUFFIX = ".xml"
MAX_REGIONS = 65535
_TILE_FOLDERS = ("tissueimages", "images")
_ANNOTATION_FOLDER = "annotations"
_PATCH_IMAGES, _PATCH_LABELS = "images", "instmasks"
_DECODE_ERRORS = (OSError, EOFError, ValueError, SyntaxError, struct.error, zlib.error)
_EXPECTED = (
    "expected a MoNuSeg training folder (Tissue_Images/*.tif beside Annotations/*.xml), a test folder (<id>.tif beside "
    "<id>.xml), a patch folder (images/ beside inst_masks/), or a folder holding them (also one level down)"
)
_NUM_TRAIN = Rule("int", low=1, hint="synthetic training tiles")
_NUM_TEST = Rule("int", low=0, hint="synthetic test tiles; 0 leaves the test folder out")
_TILE_SIZE = Rule("int", low=64, high=4096, hint="the side of the synthetic tiles")
_BOOL = Rule("bool")


# ---------------------------------------------------------------- layouts


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name.lower())


def _subfolder(folder: Path, *names: str) -> Path | None:
    """The first sub-folder of `folder` whose normalised name is one of `names` (in the order given), or None."""
    folders = [p for p in folder_entries(folder) if p.is_dir() and not p.name.startswith(".")]
    for name in names:
        match = next((p for p in folders if _norm(p.name) == name), None)
        if match is not None:
            return match
    return None


def _files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """The files directly in `folder` whose names end with `suffixes` (any case), hidden ones skipped."""
    return [
        p
        for p in folder_entries(folder, suffixes)
        if p.name.lower().endswith(suffixes) and not p.name.startswith(".") and not p.is_dir()
    ]


@dataclass
class _Set:
    """One set of tiles or patches found in a dataset folder.

    Args:
        folder: the set's folder (its name may tell its role).
        kind: "release" (tiles with Aperio XML) or "labels" (images with instance-map files).
        images: the folder of the tiles or patch images.
        sources: the folder of the XML files or instance maps.
        image_suffixes: the image file endings read.
        source_suffixes: the XML or instance-map file endings read.
        flat: a release test folder (tiles and XML side by side).
    """

    folder: Path
    kind: str
    images: Path
    sources: Path
    image_suffixes: tuple[str, ...]
    source_suffixes: tuple[str, ...]
    flat: bool = False


def _detect(folder: Path) -> _Set | None:
    """The set `folder` holds, or None."""
    annotations = _subfolder(folder, _ANNOTATION_FOLDER)
    tiles = _subfolder(folder, *_TILE_FOLDERS)
    if annotations is not None and tiles is not None:
        return _Set(folder, "release", tiles, annotations, TRAINING_TILE_SUFFIXES, (XML_SUFFIX,))
    labels = _subfolder(folder, _PATCH_LABELS)
    images = _subfolder(folder, _PATCH_IMAGES)
    if labels is not None and images is not None:
        return _Set(folder, "labels", images, labels, PATCH_SUFFIXES, LABEL_SUFFIXES)
    if _files(folder, TILE_SUFFIXES) and _files(folder, (XML_SUFFIX,)):
        return _Set(folder, "release", folder, folder, TILE_SUFFIXES, (XML_SUFFIX,), flat=True)
    return None


def _role(found: _Set) -> str | None:
    name = _norm(found.folder.name)
    if "test" in name:
        return "testing"
    if "train" in name:
        return "training"
    if found.kind == "release":
        return "testing" if found.flat else "training"
    return None


def _subfolders(folder: Path) -> list[Path]:
    return [p for p in folder_entries(folder) if p.is_dir() and not p.name.startswith(".")]


def _find_sets(dataset_dir: str | Path | None) -> list[_Set]:
    """The sets of the shallowest level of `dataset_dir` (itself, its sub-folders, theirs) that holds any."""
    if not dataset_dir or not Path(dataset_dir).is_dir():
        state = "is not a folder" if dataset_dir and Path(dataset_dir).exists() else "does not exist"
        raise DataError(
            f"dataset_dir {dataset_dir} {state}: pass the MoNuSeg training folder, test folder, the folder holding "
            "them, or the patch folder that data_prep/monuseg.py writes."
        )
    root = Path(dataset_dir).resolve()
    found = _detect(root)
    if found is not None:
        return [found]
    level = _subfolders(root)
    for _ in range(2):
        sets = [s for s in (_detect(sub) for sub in level) if s is not None]
        if sets:
            return sets
        level = [deeper for sub in level for deeper in _subfolders(sub)]
    if _files(root, TILE_SUFFIXES):
        raise DataError(
            f"{root} holds .tif tiles but no Aperio .xml annotation beside them: add each tile's <id>.xml (the MoNuSeg "
            "test folder layout), or pass the folder with Tissue_Images/ and Annotations/."
        )
    raise DataError(f"{root} holds no MoNuSeg data: {_EXPECTED}; pass that folder as dataset_dir.")


def _pairs(found: _Set) -> list[dict]:
    """The set's {"image", "annotation"|"label"} pairs sorted by stem; unpaired files are refused."""
    images = files_by_stem(_files(found.images, found.image_suffixes), "tile")
    sources = files_by_stem(_files(found.sources, found.source_suffixes), "tile")
    key, what, suffix = (
        ("annotation", "Aperio XML", ".xml") if found.kind == "release" else ("label", "instance map", ".tif")
    )
    lonely_images = sorted(images.keys() - sources.keys())
    lonely_sources = sorted(sources.keys() - images.keys())
    problems = []
    if lonely_images:
        names = [images[s].name for s in lonely_images]
        problems.append(f"{len(names)} tile(s) in {found.images} have no {what} in {found.sources} ({listing(names)})")
    if lonely_sources:
        names = [sources[s].name for s in lonely_sources]
        problems.append(
            f"{len(names)} {what} file(s) in {found.sources} have no tile in {found.images} ({listing(names)})"
        )
    if problems:
        raise DataError(
            f"{'; '.join(problems)}: a tile and its {what} share a name (<id>.tif and <id>{suffix}); add the missing "
            "files, or remove the unpaired ones."
        )
    if not images:
        raise DataError(f"{found.images} holds no tiles: add the MoNuSeg tiles and their {what} files.")
    return [{"image": str(check_file(images[s])), key: str(check_file(sources[s]))} for s in sorted(images)]


# ---------------------------------------------------------------- patches and the datalist


def patch_boxes(height: int, width: int, patch_size: int) -> list[tuple[int, int]]:
    """The (y0, x0) corners of the seed's "valid" patches of a `height` x `width` tile, in the seed's order.

    The full-step grid row-major, then the bottom-edge row, the right-edge column and the corner (module docstring).

    Args:
        height: the tile's rows.
        width: the tile's columns.
        patch_size: the side S of the square patches (window = step = S); at most min(height, width).
    """
    if patch_size > min(height, width):
        raise ValueError(f"a {width}x{height} tile has no {patch_size}x{patch_size} patch")
    rows = list(range(0, height - patch_size + 1, patch_size))
    cols = list(range(0, width - patch_size + 1, patch_size))
    boxes = [(y0, x0) for y0 in rows for x0 in cols]
    bottom = height - patch_size if (height - patch_size) % patch_size else None
    right = width - patch_size if (width - patch_size) % patch_size else None
    if bottom is not None:
        boxes += [(bottom, x0) for x0 in cols]
    if right is not None:
        boxes += [(y0, right) for y0 in rows]
    if bottom is not None and right is not None:
        boxes.append((bottom, right))
    return boxes


def _image_size(path: str | Path) -> tuple[int, int]:
    """A PNG/TIFF file's (height, width) from its header (the pixels are decoded by the checks)."""
    from PIL import Image

    path = check_file(path)
    try:
        with Image.open(path) as im:
            width, height = im.size
    except Image.DecompressionBombError as err:
        raise unreadable(path, f"too many pixels: {err}") from err
    except _DECODE_ERRORS as err:
        raise unreadable(path, err) from err
    return height, width


def _slide_of(stem: str) -> str:
    match = re.fullmatch(r"(.+)_\d+", stem)
    return match.group(1) if match else stem


def _set_items(found: _Set, patch_size: int) -> list[dict]:
    """The patch items of one set, in tile order then patch order."""
    items = []
    for pair in _pairs(found):
        height, width = _image_size(pair["image"])
        if min(height, width) < patch_size:
            raise DataError(
                f"{pair['image']} is {width}x{height}, smaller than --patch_size {patch_size}: lower --patch_size to "
                f"at most {min(height, width)}, or remove this tile."
            )
        stem = file_stem(Path(pair["image"]))
        if found.kind == "labels" and (height, width) == (patch_size, patch_size):
            items.append({"name": stem, "slide": _slide_of(stem), **pair, "box": [0, 0, patch_size]})
            continue
        for idx, (y0, x0) in enumerate(patch_boxes(height, width, patch_size)):
            items.append({"name": f"{stem}_{idx:03d}", "slide": stem, **pair, "box": [y0, x0, patch_size]})
    return items


def _num_test(fraction: float, n: int) -> int:
    return min(max(math.ceil(fraction * n), 1), n - 1)


def _split_one(items: list[dict], where: Path, test_fraction: float, seed: int) -> dict[str, list[dict]]:
    slides = sorted({item["slide"] for item in items})
    if len(slides) >= 2:
        order = np.random.RandomState(seed % 2**32).permutation(len(slides))
        testing = {slides[i] for i in order[: _num_test(test_fraction, len(slides))]}
        return {
            "training": [it for it in items if it["slide"] not in testing],
            "testing": [it for it in items if it["slide"] in testing],
        }
    if len(items) < 2:
        raise DataError(
            f"{where} gives one patch of one slide, too few to split into training and testing: add tiles, or lower "
            "--patch_size."
        )
    order = np.random.RandomState(seed % 2**32).permutation(len(items))
    testing_idx = {int(i) for i in order[: _num_test(test_fraction, len(items))]}
    return {
        "training": [it for i, it in enumerate(items) if i not in testing_idx],
        "testing": [it for i, it in enumerate(items) if i in testing_idx],
    }


def _by_name(items: list[dict]) -> list[dict]:
    return sorted(items, key=lambda item: item["name"])


def monuseg_datalist(
    dataset_dir: str | Path, patch_size: int = 128, test_fraction: float = 0.2, split_seed: int = 0
) -> dict[str, list[dict]]:
    """The dataset's patch items split into {"training": [...], "testing": [...]}, each sorted by name.

    An item is ``{"name": "<slide>_<idx:03d>", "slide", "image": tile or patch file, "annotation": Aperio XML (release
    layout) or "label": instance-map file (patch layout), "box": [y0, x0, S]}`` with absolute paths; the patch is rows
    ``y0:y0+S``, columns ``x0:x0+S`` of the image. Only file headers are read here: `check_monuseg` reads the pixels
    and the XML.

    Args:
        dataset_dir: a MoNuSeg folder in one of the layouts of the module docstring.
        patch_size: the side S of the patches (the seed's 128).
        test_fraction: the share of slides held out for testing when the data has one set only, in (0, 1).
        split_seed: the seed of that split.
    """
    patch_size = parse("patch_size", patch_size)
    test_fraction = parse("test_fraction", test_fraction)
    split_seed = parse("split_seed", split_seed)
    sets = _find_sets(dataset_dir)
    if len(sets) > 2:
        raise DataError(
            f"{sets[0].folder.parent} holds {len(sets)} MoNuSeg sets ({listing([s.folder.name for s in sets])}): pass "
            "a folder holding one training and one test set, or one set."
        )
    items = [_set_items(s, patch_size) for s in sets]
    if len(sets) == 1:
        split = _split_one(items[0], sets[0].folder, test_fraction, split_seed)
        return {key: _by_name(value) for key, value in split.items()}
    roles = [_role(s) for s in sets]
    if sorted(r or "" for r in roles) != ["testing", "training"]:
        raise DataError(
            f"cannot tell which of {sets[0].folder} and {sets[1].folder} is the training set: name them "
            f"{SPLIT_FOLDERS['training']} and {SPLIT_FOLDERS['testing']}, or pass one of them."
        )
    if all(s.kind == "release" for s in sets):
        shared = sorted({it["slide"] for it in items[0]} & {it["slide"] for it in items[1]})
        if shared:
            raise DataError(
                f"{len(shared)} slide(s) are in both {sets[0].folder} and {sets[1].folder} ({listing(shared)}): a "
                "slide in both sets leaks test data into training; remove it from one of them."
            )
    by_role = dict(zip(roles, items))
    return {role: _by_name(by_role[role]) for role in ("training", "testing")}


# ---------------------------------------------------------------- Aperio XML and rasterization


def _local(tag: object) -> str:
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def _polygon_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _parse_regions(
    xml_file: str | Path, shape: tuple[int, int], tolerance: float = EDGE_TOLERANCE
) -> tuple[list[str], list[np.ndarray], list[dict]]:
    """The usable regions' Ids and polygons, and the problems of the others (see `read_annotation`)."""
    path = check_file(xml_file, "Aperio XML")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise unreadable(path, err, "Aperio XML") from err
    height, width = int(shape[0]), int(shape[1])
    regions = list(root.iter("Region")) or [el for el in root.iter() if _local(el.tag) == "Region"]
    if not regions:
        raise DataError(
            f"{path} has no <Region> element, so no nucleus outline (not an Aperio ImageScope annotation?): give each "
            "tile the MoNuSeg XML with its nuclei outlines, or remove the tile and this file."
        )
    ids, polygons, problems = [], [], []
    for index, region in enumerate(regions):
        region_id = region.get("Id") or f"#{index + 1}"
        vertices = []
        found = list(region.iter("Vertex")) or [el for el in region.iter() if _local(el.tag) == "Vertex"]
        for vertex in found:
            raw_x, raw_y = vertex.get("X"), vertex.get("Y")
            try:
                x, y = float(raw_x), float(raw_y)
            except (TypeError, ValueError):
                x = y = math.nan
            if not (math.isfinite(x) and math.isfinite(y)):
                raise DataError(
                    f"{path} region {region_id} has a vertex with X={raw_x!r} Y={raw_y!r}, not finite numbers: fix or "
                    "remove that region."
                )
            vertices.append((x, y))
        points = np.asarray(vertices, dtype=np.float64).reshape(-1, 2)
        if region.get("NegativeROA", "0").strip() == "1":
            problems.append({"region": region_id, "reason": "exclusion region (NegativeROA=1), not a nucleus"})
        elif len(points) < 3:
            problems.append({"region": region_id, "reason": f"fewer than 3 vertices ({len(points)})"})
        elif _polygon_area(points) <= 1e-9:
            problems.append({"region": region_id, "reason": "zero area (its vertices lie on one line)"})
        else:
            outside = (
                (points[:, 0] < -tolerance)
                | (points[:, 0] > width - 1 + tolerance)
                | (points[:, 1] < -tolerance)
                | (points[:, 1] > height - 1 + tolerance)
            )
            if outside.any():
                x, y = points[int(np.argmax(outside))]
                raise DataError(
                    f"{path} region {region_id} has a vertex at (x={x:g}, y={y:g}), more than {tolerance:g} px outside "
                    f"its {width}x{height} tile (x in 0..{width - 1}, y in 0..{height - 1}): this XML belongs to "
                    "another tile or another scale; pair each tile with its own XML."
                )
            ids.append(region_id)
            polygons.append(points)
    for problem in problems:
        logger.warning("%s: region %s skipped: %s", path, problem["region"], problem["reason"])
    if not polygons:
        raise DataError(
            f"{path} has no usable nucleus region ({len(regions)} <Region> element(s), all degenerate: "
            f"{problems[0]['reason']}, ...): give the tile its MoNuSeg XML with nuclei outlines, or remove the tile "
            "and this file."
        )
    if len(polygons) > MAX_REGIONS:
        raise DataError(
            f"{path} has {len(polygons)} regions, more than the {MAX_REGIONS} ids of a uint16 instance map: split the "
            "tile into smaller tiles with their own XML."
        )
    return ids, polygons, problems


def read_annotation(xml_file: str | Path, shape: tuple[int, int]) -> tuple[list[np.ndarray], list[dict]]:
    """Read an Aperio ImageScope XML: (usable regions as float64 (K, 2) (x, y) polygons in file order, problems).

    Each problem is ``{"region": <Region Id>, "reason": ...}`` for a region that is skipped: fewer than 3 vertices,
    zero area, or an exclusion region; each is also logged as a warning. Refused with `DataError` (naming the file and
    the fix): XML that does not parse, a non-numeric vertex, a vertex more than `EDGE_TOLERANCE` px outside the tile,
    no usable region, more regions than a uint16 map holds. Only ElementTree parses the file: nothing is evaluated
    and no external entity is fetched.

    Args:
        xml_file: the tile's ``<id>.xml``.
        shape: the tile's (height, width) in pixels, against which the vertices are checked.
    """
    _, polygons, problems = _parse_regions(xml_file, shape)
    return polygons, problems


def rasterize(polygons: Sequence[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Paint (x, y) polygons into a uint16 (H, W) instance map: region k gets id k (1-based, in the given order).

    A pixel (r, c) is in a polygon when its centre (x=c, y=r) lies inside it or on its outline
    (``skimage.draw.polygon``); parts outside the map are clipped. Later polygons overwrite earlier ones, so a pixel
    covered by several regions belongs to the last of them. An id whose pixels are all overwritten, or whose polygon
    holds no pixel centre, is absent from the map.

    Args:
        polygons: (K_i, 2) arrays of (x, y) = (column, row) vertex coordinates, fractional allowed.
        shape: the map's (height, width).
    """
    from skimage.draw import polygon as fill_polygon

    if len(polygons) > MAX_REGIONS:
        raise ValueError(f"{len(polygons)} polygons do not fit the {MAX_REGIONS} ids of a uint16 map")
    inst = np.zeros((int(shape[0]), int(shape[1])), dtype=np.uint16)
    for index, points in enumerate(polygons, start=1):
        points = np.asarray(points, dtype=np.float64)
        rows, cols = fill_polygon(points[:, 1], points[:, 0], inst.shape)
        inst[rows, cols] = index
    return inst


def binary_mask(inst: np.ndarray) -> np.ndarray:
    """The seed's binary mask of an instance map: uint8 (H, W), 255 where any nucleus is, else 0.

    Args:
        inst: an (H, W) integer instance map, 0 background.
    """
    return (np.asarray(inst) > 0).astype(np.uint8) * 255


# ---------------------------------------------------------------- reading tiles and patches


def _read_rgb(path: str | Path) -> np.ndarray:
    """An 8-bit image file as (H, W, 3) uint8."""
    im = read_image(path)
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        raise DataError(f"{path} is a {im.mode} image, not 8-bit: save the H&E tiles as 8-bit RGB TIFF or PNG.")
    return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))


def _read_label(path: str | Path) -> np.ndarray:
    """An instance-map file as (H, W) int32 ids, 0 background; colour, negative or 0/255 binary maps are refused."""
    im = read_image(path)
    array = np.asarray(im)
    fix = "save instance maps as one-channel uint16 TIFF, one id per nucleus and 0 background (data_prep/monuseg.py)"
    if array.ndim == 3:
        if not (array == array[..., :1]).all():
            raise DataError(f"instance map {path} is a colour image ({im.mode}): {fix}.")
        array = array[..., 0]
    if array.dtype.kind == "b":
        raise DataError(f"instance map {path} is a 1-bit mask, not instance ids: {fix}.")
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array) & (array == np.round(array))):
            raise DataError(f"instance map {path} holds non-integer values: {fix}.")
    if array.size and array.min() < 0:
        raise DataError(f"instance map {path} holds negative ids (down to {array.min():g}): {fix}.")
    if array.size and array.max() > np.iinfo(np.int32).max:
        raise DataError(f"instance map {path} holds ids above {np.iinfo(np.int32).max}: {fix}.")
    array = array.astype(np.int32)
    if set(np.unique(array).tolist()) == {0, 255} and ndimage.label(array > 0)[1] > 1:
        raise DataError(
            f"instance map {path} is a 0/255 binary mask with separate nuclei under one id (a bin_masks file?): {fix}."
        )
    return array


def _stamp(path: str | Path) -> tuple[int, int]:
    stat = check_file(path).stat()
    return stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=TILE_CACHE_SIZE)
def _load(
    image_file: str, image_stamp: tuple, source_file: str, source_stamp: tuple, kind: str
) -> tuple[np.ndarray, np.ndarray, dict]:
    """(rgb (H, W, 3) uint8, inst (H, W), summary) of a tile and its XML or instance map; arrays read-only."""
    rgb = _read_rgb(image_file)
    shape = rgb.shape[:2]
    if kind == "annotation":
        ids, polygons, problems = _parse_regions(source_file, shape)
        inst = rasterize(polygons, shape)
        present = np.zeros(len(polygons) + 1, dtype=bool)
        present[np.unique(inst)] = True
        empty = [ids[k - 1] for k in range(1, len(polygons) + 1) if not present[k]]
        summary = {"regions": len(polygons), "degenerate": problems, "empty": empty}
    else:
        inst = _read_label(source_file)
        if inst.shape != shape:
            raise DataError(
                f"instance map {source_file} is {inst.shape[1]}x{inst.shape[0]} but its image {image_file} is "
                f"{shape[1]}x{shape[0]} (width x height): give every instance map its image's size."
            )
        summary = {"regions": int(np.count_nonzero(np.unique(inst)))}
    summary["size"] = [int(shape[0]), int(shape[1])]
    rgb.setflags(write=False)
    inst.setflags(write=False)
    return rgb, inst, summary


def _source(item: Mapping) -> tuple[str, str]:
    """The (key, file) of an item's nuclei: its "annotation" XML or its "label" instance map."""
    for key in ("annotation", "label"):
        if item.get(key) is not None:
            return key, str(item[key])
    raise DataError(
        f"item {item.get('name', item.get('image'))} has neither an 'annotation' (Aperio XML) nor a 'label' (instance "
        "map): rebuild the datalist with monuseg_datalist or data_prep/monuseg.py."
    )


def _load_item(item: Mapping) -> tuple[np.ndarray, np.ndarray, dict]:
    key, source = _source(item)
    image = str(item["image"])
    return _load(image, _stamp(image), source, _stamp(source), key)


def read_tile(item: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """The whole tile of an item: (RGB (H, W, 3) uint8, instance map (H, W)), read-only and cached.

    The instance map is uint16 (rasterized from the XML, ids 1..K in file order) or int32 (read from a label file).
    The last `TILE_CACHE_SIZE` tiles are kept, keyed by path, modification time and size, so a changed file is read
    again.

    Args:
        item: a datalist item with "image" and "annotation" or "label" (see `monuseg_datalist`).
    """
    rgb, inst, _ = _load_item(item)
    return rgb, inst


def _box(item: Mapping, shape: tuple[int, int]) -> tuple[int, int, int]:
    box = item.get("box")
    if box is None:
        if shape[0] != shape[1]:
            raise DataError(
                f"item {item['image']} has no 'box' and is {shape[1]}x{shape[0]}, not square: give it a "
                '"box": [y0, x0, size], or rebuild the datalist with monuseg_datalist.'
            )
        return 0, 0, int(shape[0])
    try:
        y0, x0, size = (int(v) for v in box)
    except (TypeError, ValueError) as err:
        raise DataError(f"item {item['image']} has box {box!r}: it must be [y0, x0, size].") from err
    if size < 1 or y0 < 0 or x0 < 0 or y0 + size > shape[0] or x0 + size > shape[1]:
        raise DataError(
            f"item {item.get('name', '')} box {list(box)} lies outside its {shape[1]}x{shape[0]} image "
            f"{item['image']}: rebuild the datalist (the tile changed since it was written)."
        )
    return y0, x0, size


def _renumber(inst: np.ndarray) -> np.ndarray:
    """Ids renumbered 1..n in increasing order of the old ids; 0 stays 0."""
    ids, inverse = np.unique(inst, return_inverse=True)
    inverse = inverse.reshape(inst.shape)
    return (inverse + (0 if ids[0] == 0 else 1)).astype(np.int32)


def read_patch(item: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """One patch: (image (3, S, S) float32 in [-1, 1], instance map (S, S) int32 with ids 1..n, 0 background).

    Args:
        item: a datalist item (see `monuseg_datalist`): "image", "annotation" or "label", and "box" [y0, x0, S]
            (without a box, the whole square image is the patch).
    """
    rgb, inst, _ = _load_item(item)
    y0, x0, size = _box(item, rgb.shape[:2])
    image = rgb[y0 : y0 + size, x0 : x0 + size].astype(np.float32) / 127.5 - 1.0
    labels = _renumber(inst[y0 : y0 + size, x0 : x0 + size])
    return np.ascontiguousarray(image.transpose(2, 0, 1)), labels


def check_monuseg(items: Sequence[Mapping], progress: bool = False) -> dict[str, dict]:
    """Read every tile and XML (or instance map) of `items` once and refuse any problem, before any long work.

    Every source is checked before raising: the error gives the first problem and names the other failing tiles.
    Returns a summary per tile, keyed by the tile's file stem: ``{"image", "annotation" | "label", "size": [H, W],
    "regions": K, "degenerate": [{"region", "reason"}], "empty": [Region Ids with no pixel left]}`` (the last two for
    XML only; "empty" regions hold no pixel centre or are covered by later regions).

    Args:
        items: datalist items (from `monuseg_datalist`, any split).
        progress: show a progress bar.
    """
    progress = _BOOL("progress", progress)
    sources: dict[tuple[str, str], list[Mapping]] = {}
    for item in items:
        sources.setdefault((str(item["image"]), _source(item)[1]), []).append(item)
    summary: dict[str, dict] = {}
    first: DataError | None = None
    failed: list[str] = []
    for (image, source), group in tqdm(sources.items(), desc="checking tiles", disable=not progress):
        try:
            rgb, _, info = _load_item(group[0])
            for item in group:
                _box(item, rgb.shape[:2])
        except DataError as err:
            first = first or err
            failed.append(Path(image).name)
            continue
        key = _source(group[0])[0]
        summary[file_stem(Path(image))] = {"image": image, key: source, **info}
    if first is not None:
        others = failed[1:]
        more = f" {len(others)} other tile(s) fail too: {listing(others)}." if others else ""
        raise DataError(f"{first}{more}") from first
    return summary


class LoadNucleiPatchd(MapTransform):
    """Replace an item's image path by its patch (3, S, S) float32 in [-1, 1] and set its (1, S, S) int32 instance map.

    The instance ids of the patch are renumbered 1..n (0 background), see `read_patch`; every other key of the item
    (name, slide, box, the annotation path) is kept as it is.

    Args:
        keys: the image key and the instance-map key, in that order; the map is read from the item's "annotation"
            XML or "label" file and stored under the second key.
    """

    def __init__(self, keys: KeysCollection = ("image", "label")) -> None:
        super().__init__(keys, allow_missing_keys=True)
        if len(self.keys) != 2:
            raise OptionError(f"LoadNucleiPatchd keys must name the image and the instance-map keys, got {keys!r}.")

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        image_key, label_key = self.keys
        source = {key: d[key] for key in ("name", "annotation", "box") if d.get(key) is not None}
        source["image"] = d[image_key]
        if isinstance(d.get(label_key), (str, os.PathLike)):
            source["label"] = d[label_key]
        image, inst = read_patch(source)
        d[image_key] = torch.from_numpy(image)
        d[label_key] = torch.from_numpy(inst[None])
        return d


# ---------------------------------------------------------------- writing the seed's layout


def patch_folder_name(patch_size: int) -> str:
    """The seed's patch folder name: ``patches_valid_inst_<S>x<S>_<S>x<S>`` (window and step)."""
    size = parse("patch_size", patch_size)
    return f"patches_valid_inst_{size}x{size}_{size}x{size}"


def _write_tiff(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="TIFF", compression="tiff_lzw"))


def prepare_monuseg(
    dataset_dir: str | Path,
    output_dir: str | Path,
    patch_size: int = 128,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    overwrite: bool = False,
    progress: bool = False,
) -> dict:
    """Write the seed's layout from a MoNuSeg folder and return the report; nothing is written when anything fails.

    Output (``<S>`` = `patch_size`; the split folders are ``MoNuSegTrainingData`` and ``MoNuSegTestData``):
    - ``<split>/bin_masks/<slide>.png`` (0/255) and ``<split>/inst_masks/<slide>.tif`` (uint16) per XML-annotated
      tile, whole;
    - ``patches_valid_inst_<S>x<S>_<S>x<S>/<split>/{images/*.png, bin_masks/*.png, inst_masks/*.tif}`` named
      ``<slide>_<idx:03d>``; the patch instance maps keep the tile's ids (the region's place in the XML);
    - ``report.json``: the options, patch counts, and per tile its size, regions, degenerate and empty regions;
    - ``datalist.json``: {"training", "testing"} items of the written patches, as `monuseg_datalist` reads them back.
    Existing outputs are refused (unless `overwrite`) and every tile is checked before anything is written.

    Args:
        dataset_dir: a MoNuSeg folder (module docstring).
        output_dir: the folder to write (outside `dataset_dir`).
        patch_size: the side S of the patches.
        test_fraction: the share of slides held out when the data has one set only.
        split_seed: the seed of that split.
        overwrite: replace existing outputs.
        progress: show progress bars.
    """
    patch_size = parse("patch_size", patch_size)
    overwrite, progress = _BOOL("overwrite", overwrite), _BOOL("progress", progress)
    datalist = monuseg_datalist(dataset_dir, patch_size, test_fraction, split_seed)
    out = Path(os.path.abspath(output_dir))
    patch_root = out / patch_folder_name(patch_size)
    plan: list[tuple[str, dict, Path]] = []  # (split, item, its folder)
    tiles: dict[str, tuple[dict, Path]] = {}  # XML-annotated tile stem -> (an item of it, its whole-tile folder)
    for split, items in datalist.items():
        for item in items:
            plan.append((split, item, patch_root / SPLIT_FOLDERS[split]))
            if "annotation" in item:
                tiles.setdefault(file_stem(Path(item["image"])), (item, out / SPLIT_FOLDERS[split]))

    def patch_files(item: Mapping, folder: Path) -> tuple[Path, Path, Path]:
        name = item["name"]
        return (
            folder / "images" / f"{name}.png",
            folder / "bin_masks" / f"{name}.png",
            folder / "inst_masks" / f"{name}.tif",
        )

    def tile_files(stem: str, folder: Path) -> tuple[Path, Path]:
        return folder / "bin_masks" / f"{stem}.png", folder / "inst_masks" / f"{stem}.tif"

    report_file, datalist_file = out / "report.json", out / "datalist.json"
    targets = [f for _, item, folder in plan for f in patch_files(item, folder)]
    targets += [f for stem, (_, folder) in tiles.items() for f in tile_files(stem, folder)] + [report_file]
    staged = StagedOutput(out, targets, inputs=[dataset_dir], overwrite=overwrite, manifest=datalist_file)
    summary = check_monuseg([it for split in datalist.values() for it in split], progress=progress)
    written: dict[str, list[dict]] = {split: [] for split in datalist}
    for info in summary.values():
        info.update(patches=0, splits=[])
    with staged as stage:
        for stem, (item, folder) in tiles.items():
            bin_file, inst_file = tile_files(stem, folder)
            _, inst = read_tile(item)
            save_png(binary_mask(inst), stage.path(bin_file), overwrite=True)
            _write_tiff(np.asarray(inst, dtype=np.uint16), stage.path(inst_file))
        for split, item, folder in tqdm(plan, desc="writing patches", disable=not progress):
            image_file, bin_file, inst_file = patch_files(item, folder)
            rgb, inst = read_tile(item)
            y0, x0, size = _box(item, rgb.shape[:2])
            crop = inst[y0 : y0 + size, x0 : x0 + size]
            crop = crop.astype(np.uint16 if crop.max(initial=0) <= MAX_REGIONS else np.int32)
            save_png(np.ascontiguousarray(rgb[y0 : y0 + size, x0 : x0 + size]), stage.path(image_file), True)
            save_png(binary_mask(crop), stage.path(bin_file), overwrite=True)
            _write_tiff(crop, stage.path(inst_file))
            written[split].append(
                {"name": item["name"], "slide": item["slide"], "image": str(image_file), "label": str(inst_file)}
                | {"box": [0, 0, size]}
            )
            info = summary[file_stem(Path(item["image"]))]
            info["patches"] += 1
            info["splits"] = sorted({*info["splits"], split})
        report = {
            "dataset_dir": str(Path(dataset_dir).resolve()),
            "patch_size": patch_size,
            "test_fraction": parse("test_fraction", test_fraction),
            "split_seed": parse("split_seed", split_seed),
            "patch_dir": str(patch_root),
            "num_patches": {split: len(items) for split, items in written.items()},
            "num_degenerate": sum(len(info.get("degenerate", [])) for info in summary.values()),
            "tiles": summary,
        }
        save_json(report, stage.path(report_file), overwrite=True)
        save_json({k: _by_name(v) for k, v in written.items()}, stage.path(datalist_file), overwrite=True)
    return report


# ---------------------------------------------------------------- built-in demo data

_STROMA = np.array([0.92, 0.66, 0.79])
_LUMEN = np.array([0.97, 0.93, 0.96])
_CYTOPLASM = np.array([0.80, 0.55, 0.76])
_NUCLEUS = np.array([0.34, 0.21, 0.52])
# kind: semi-major axis range (px), minor/major ratio range, brightness range, share of the nuclei
_NUCLEUS_KINDS = (
    ((3.0, 4.5), (0.80, 1.00), (0.70, 0.90), 0.35),  # lymphocytes: small, round, dark
    ((5.5, 9.0), (0.60, 0.90), (0.95, 1.35), 0.45),  # epithelial / tumour: large, paler, vesicular
    ((6.0, 10.0), (0.25, 0.40), (0.80, 1.05), 0.20),  # fibroblasts: thin, elongated
)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float | tuple) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    return noise / max(float(noise.std()), 1e-6)


def _nuclei(rng: np.random.Generator, size: int) -> list[tuple[float, float, float, float, float, int]]:
    """(cx, cy, a, b, angle, kind) ellipses covering 12-24 % of the tile, in clusters, some touching."""
    target = rng.uniform(0.12, 0.24) * size * size
    clusters = rng.uniform(0, size - 1, (int(rng.integers(2, 5)), 2))
    shares = np.array([k[3] for k in _NUCLEUS_KINDS])
    placed: list[tuple[float, float, float, float, float, int]] = []
    centres = np.zeros((0, 2))
    radii = np.zeros(0)
    area = 0.0
    for _ in range(6000):
        if area >= target:
            break
        kind = int(rng.choice(len(_NUCLEUS_KINDS), p=shares / shares.sum()))
        (a_lo, a_hi), (r_lo, r_hi), _, _ = _NUCLEUS_KINDS[kind]
        a = rng.uniform(a_lo, a_hi)
        b = a * rng.uniform(r_lo, r_hi)
        if rng.random() < 0.6:
            centre = clusters[rng.integers(len(clusters))] + rng.normal(0, size / 7, 2)
        else:
            centre = rng.uniform(0, size - 1, 2)
        if not (0 <= centre[0] <= size - 1 and 0 <= centre[1] <= size - 1):
            continue
        reach = (a + b) / 2
        if len(centres) and np.any(np.hypot(*(centres - centre).T) < 0.9 * (radii + reach)):
            continue
        placed.append((float(centre[0]), float(centre[1]), a, b, rng.uniform(0, np.pi), kind))
        centres = np.vstack([centres, centre])
        radii = np.append(radii, reach)
        area += np.pi * a * b
    return placed


def _outline(rng: np.random.Generator, nucleus: tuple, size: int) -> np.ndarray:
    """A wobbly fractional (x, y) polygon around an ellipse, clipped to 1.5 px beyond the tile."""
    cx, cy, a, b, angle, _ = nucleus
    count = max(12, math.ceil(2 * np.pi * a / 1.5))
    t = (np.arange(count) + rng.uniform(-0.3, 0.3, count)) * 2 * np.pi / count
    wobble = 1 + sum(rng.uniform(0, 0.06) * np.cos(k * t + rng.uniform(0, 2 * np.pi)) for k in (2, 3))
    x, y = a * wobble * np.cos(t), b * wobble * np.sin(t)
    points = np.stack([cx + x * np.cos(angle) - y * np.sin(angle), cy + x * np.sin(angle) + y * np.cos(angle)], 1)
    return np.round(np.clip(points, -1.5, size - 1 + 1.5), 2)


def _synthetic_tile(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """One H&E-looking RGB tile (uint8) and its nuclei outlines, painted from the same rasterization as the reader's."""
    nuclei = _nuclei(rng, size)
    polygons = [_outline(rng, n, size) for n in nuclei]
    inst = rasterize(polygons, (size, size))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    direction = rng.uniform(0, np.pi)
    along = xx * np.cos(direction) + yy * np.sin(direction)
    fibres = np.sin(along * rng.uniform(0.25, 0.45) + 2.5 * _smooth_noise(rng, (size, size), 6))
    shade = 1 + 0.05 * fibres + 0.04 * _smooth_noise(rng, (size, size), 5) + 0.02 * _smooth_noise(rng, (size, size), 1)
    tissue = _STROMA * shade[..., None]
    lumen = 1 / (1 + np.exp(-(_smooth_noise(rng, (size, size), size / 8) - 1.3) * 6))
    tissue = tissue * (1 - lumen[..., None]) + _LUMEN * lumen[..., None]
    nucleus_mask = inst > 0
    halo = np.exp(-ndimage.distance_transform_edt(~nucleus_mask) / 3.0) * (~nucleus_mask)
    tissue = tissue * (1 - 0.4 * halo[..., None]) + _CYTOPLASM * 0.4 * halo[..., None]
    colours = np.ones((len(polygons) + 1, 3))
    for k, nucleus in enumerate(nuclei, start=1):
        low, high = _NUCLEUS_KINDS[nucleus[5]][2]
        tint = 1 + rng.normal(0, 0.04, 3)
        colours[k] = np.clip(_NUCLEUS * rng.uniform(low, high) * tint, 0, 1)
    depth = ndimage.distance_transform_edt(nucleus_mask)
    chromatin = 1 + 0.10 * _smooth_noise(rng, (size, size), 0.8) - 0.12 * np.exp(-depth / 1.5)
    nuclei_rgb = colours[inst] * chromatin[..., None]
    image = np.where(nucleus_mask[..., None], nuclei_rgb, tissue)
    image = ndimage.gaussian_filter(image, (0.6, 0.6, 0)) * rng.uniform(0.95, 1.05, 3)
    image += 0.012 * rng.standard_normal(image.shape)
    return np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8), polygons


def _aperio_xml(polygons: Sequence[np.ndarray]) -> bytes:
    """An Aperio ImageScope XML with one Region per polygon (Ids 1..K), vertices as written by ImageScope."""
    root = ET.Element("Annotations", MicronsPerPixel="0.252000")
    annotation = ET.SubElement(root, "Annotation", Id="1", Name="", Type="4", LineColor="65280", Visible="1")
    ET.SubElement(annotation, "Attributes")
    regions = ET.SubElement(annotation, "Regions")
    ET.SubElement(regions, "RegionAttributeHeaders")
    for index, points in enumerate(polygons, start=1):
        region = ET.SubElement(regions, "Region", Id=str(index), Type="0", NegativeROA="0", DisplayId=str(index))
        ET.SubElement(region, "Attributes")
        vertices = ET.SubElement(region, "Vertices")
        for x, y in points:
            ET.SubElement(vertices, "Vertex", X=f"{x:.2f}", Y=f"{y:.2f}")
    ET.SubElement(annotation, "Plots")
    ET.indent(root, "\t")
    return ET.tostring(root, encoding="utf-8", xml_declaration=False) + b"\n"


def make_synthetic_nuclei(
    out_dir: str | Path, num_train: int = 4, num_test: int = 2, size: int = 256, seed: int = 0
) -> Path:
    """Write built-in demo data in the MoNuSeg release layout and return its folder.

    ``MoNuSegTrainingData/Tissue_Images/<id>.tif`` with ``MoNuSegTrainingData/Annotations/<id>.xml``, and
    ``MoNuSegTestData/<id>.tif`` beside ``<id>.xml`` (left out when `num_test` is 0). Tiles are RGB TIFF (LZW): pink
    fibrous stroma with pale gaps, purple elliptical nuclei of three kinds (small dark round lymphocytes, large pale
    epithelial nuclei, thin fibroblasts) of varied size and shade, in clusters where some touch, with chromatin texture
    and a darker rim. The XML outlines are the nuclei's fractional polygons and the pixels are painted from their
    rasterization, so reading the data back gives the nuclei that were drawn. The same arguments give the same
    bytes; calling again with them reuses the data, other data in `out_dir` is never overwritten.

    Args:
        out_dir: the dataset folder to write.
        num_train: how many training tiles.
        num_test: how many test tiles (0 for none).
        size: the side of the square tiles in pixels.
        seed: the seed of the numpy Generator that draws everything.
    """
    from PIL import Image

    num_train, num_test = _NUM_TRAIN("num_train", num_train), _NUM_TEST("num_test", num_test)
    size, seed = _TILE_SIZE("size", size), parse("seed", seed)
    root = Path(out_dir)
    params = {"num_train": num_train, "num_test": num_test, "size": size, "seed": seed}
    manifest = root / "synthetic_nuclei.json"
    if manifest.is_file():
        if json.loads(manifest.read_text()) == params:
            return root
        raise OutputExistsError(
            f"{root} already holds synthetic nuclei data made with {manifest.read_text().strip()}: choose another "
            "folder, or remove it."
        )
    rng = np.random.default_rng(seed)
    for split, count in (("train", num_train), ("test", num_test)):
        for index in range(count):
            image, polygons = _synthetic_tile(rng, size)
            name = f"synthetic-{split}-{index:03d}"
            if split == "train":
                tile = root / SPLIT_FOLDERS["training"] / "Tissue_Images" / f"{name}.tif"
                xml = root / SPLIT_FOLDERS["training"] / "Annotations" / f"{name}.xml"
            else:
                tile = root / SPLIT_FOLDERS["testing"] / f"{name}.tif"
                xml = tile.with_suffix(XML_SUFFIX)
            atomic_write(
                tile,
                lambda tmp, a=image: Image.fromarray(a).save(tmp, format="TIFF", compression="tiff_lzw"),
                overwrite=False,
            )
            text = _aperio_xml(polygons)
            atomic_write(xml, lambda tmp, t=text: Path(tmp).write_bytes(t), overwrite=False)
    save_json(params, manifest, overwrite=False)
    return root
