"""NCT-CRC-HE colorectal H&E tiles (Kather et al. 2018) for HistoDiffusion: layouts, stratified splits, tile reading.

Layouts accepted as ``dataset_dir`` for labelled data (folder names of the Zenodo sets match in any case, ignoring
spaces, ``_`` and ``-``):
- *class folders*: ``<dir>/<CLASS>/<name>.tif`` (NCT-CRC-HE-100K, CRC-VAL-HE-7K as unzipped, or a generated folder);
  the class is the folder name (any name when `classes` is not given), other files (JSON, CSV) are ignored;
- *Zenodo parent*: ``<dir>/NCT-CRC-HE-100K/`` (or ``NCT-CRC-HE-100K-NONORM/``, not both) and/or
  ``<dir>/CRC-VAL-HE-7K/`` (a name starting so, e.g. ``CRC-VAL-HE-7K-png``), each in the class-folder or flat layout:
  both present, the first trains and the second tests; one alone is split;
- *flat*: ``<dir>/<CLASS>-<rest>.<ext>``, the class being the file-name prefix before the first ``-`` (the shared
  sample ``CRC-VAL-HE-7K-png/ADI-TCGA-EENSRDNW.png``); the prefix must be an `NCT_CLASSES` name, or one of `classes`;
- the folder holding one of these as its only sub-folder and no tile (one level down), unless that sub-folder is named
  as a class (of `classes`, else of `NCT_CLASSES`): then it is a class folder.
A folder holding both tiles and sub-folders is refused (which one is meant is unclear). Tiles are files ending with
`TILE_SUFFIXES` (any case); hidden files and folders are skipped.

Unlabelled data (``labelled=False``, pre-training): every tile under ``dataset_dir``, recursively; an item's name is
its path relative to ``dataset_dir`` without the suffix (``sub/dir/tile``), unique by construction.

Names: a labelled item's name is its file stem; two tiles with one stem anywhere in the data (training and testing
together) are refused, so names key per-tile outputs safely.

Classes: ``classes=None`` takes the class folders' names (or the flat prefixes) found, sorted. Given `classes`, a folder
or prefix outside them is refused, and so is a listed class without training tiles. Labels are the index of the class
in the sorted class list (``ADI 0, BACK 1, DEB 2, ...`` for all nine, the seed's `CLASS2IDX`); a class missing from the
data shifts the later labels, which `check_same_classes` guards against.

Split (one set): per class, the tiles sorted by name are permuted by ``numpy.random.default_rng([split_seed,
crc32(class), 0])`` and the first ``min(max(1, round(test_fraction * n)), n - 1)`` test (round half up), so a class
keeps at least one training tile and adding a class leaves the others' splits unchanged. Unlabelled tiles are split the
same way as one group. `label_fraction` keeps, per class, ``max(1, round(label_fraction * n))`` of the n training tiles
(``default_rng([label_seed, crc32(class), 1])``); testing is never reduced. Every list is sorted by name.

Checks (before any work, one line each naming the file and the fix): a missing ``dataset_dir``, an empty class folder,
a folder without tiles, an unreadable tile, a tile whose PIL mode is not 8-bit ``RGB`` (grey ``L``, ``RGBA``, ``P``,
16-bit ``I;16``...), tiles of different sizes. Every tile is decoded in full then (`read_image`, on a thread per
CPU), so a file truncated past its header is refused before training rather than in the middle of an epoch.

Values (`read_tile`): RGB, the shorter side resized to `image_size` (bilinear with antialiasing,
``torch.nn.functional.interpolate(mode="bilinear", antialias=True, align_corners=False)`` on the 0..255 values; no
resampling when it already has that size), the longer one to ``round(long * image_size / short)``, then the centre
``image_size`` square (offset ``(long - image_size) // 2``), as value / 127.5 - 1: float32 (3, S, S) in [-1, 1]. This is
the seed's ``SmallestMaxSize(256)`` + ``CenterCrop(256)`` (the NCT 224 px tiles are upscaled).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import zlib
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from scipy import ndimage
from tqdm import tqdm

from meddiff.data.errors import DataError
from meddiff.data.readers import files_by_stem, folder_entries, listing, read_image
from meddiff.data.readers import stem as file_stem
from meddiff.errors import OptionError
from meddiff.io import OutputExistsError, StagedOutput, atomic_write, save_json
from meddiff.options import Rule, parse

__all__ = [
    "NCT_CLASSES",
    "TILE_SUFFIXES",
    "LoadHistologyTiled",
    "check_same_classes",
    "histology_datalist",
    "make_synthetic_histology",
    "parse_classes",
    "prepare_nct_crc_he",
    "read_tile",
    "stratified_subset",
]

logger = logging.getLogger(__name__)

NCT_CLASSES = ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")
TILE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
ZENODO_TRAINING = ("NCT-CRC-HE-100K", "NCT-CRC-HE-100K-NONORM")
ZENODO_TESTING = "CRC-VAL-HE-7K"
_EXPECTED = (
    "class folders <dir>/<CLASS>/*.tif, the Zenodo NCT-CRC-HE-100K/ and/or CRC-VAL-HE-7K/ folders, or flat "
    "<dir>/<CLASS>-<name>.tif files"
)
_LABEL_FRACTION = Rule(
    "float", low=0.0, high=1.0, low_open=True, hint="the share of training tiles per class kept labelled; 1 keeps all"
)
_LABEL_SEED = Rule("int", low=0, high=2**63 - 1, hint="the seed of the labelled subset")
_IMAGE_SIZE = Rule("int", low=2, high=4096, hint="the side of the square tiles the model sees; the seed's is 256")
_PER_CLASS = Rule("int", low=1, hint="synthetic training tiles per class")
_TEST_PER_CLASS = Rule("int", low=0, hint="synthetic test tiles per class; 0 leaves CRC-VAL-HE-7K out")
_SYNTHETIC_SIZE = Rule("int", low=16, high=1024, hint="the side of the synthetic tiles")
_BOOL = Rule("bool")


# ---------------------------------------------------------------- options


def parse_classes(classes: object) -> list[str] | None:
    """`classes` as a list of unique class names, or None (take them from the data).

    Accepts a list or tuple of names, or one comma-separated string (``"ADI,DEB"``, as a command line gives it).

    Args:
        classes: the class names, or None.
    """
    if classes is None:
        return None
    if isinstance(classes, str):
        classes = [c for c in (part.strip() for part in classes.strip().strip("[]").split(",")) if c]
        classes = [c.strip("'\"") for c in classes]
    if not isinstance(classes, (list, tuple)) or not classes:
        raise OptionError(f'--classes must list class names, e.g. "ADI,DEB,LYM" or ["ADI", "DEB"], got {classes!r}.')
    names = []
    for name in classes:
        if not isinstance(name, str) or not name.strip() or re.search(r"[/\\]", name) or name.startswith("."):
            raise OptionError(f"--classes must hold folder names (no '/', not hidden), got {name!r} in {classes!r}.")
        names.append(name.strip())
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise OptionError(f"--classes lists {listing(repeated)} more than once: give each class once.")
    return names


def check_same_classes(expected: Sequence[str], found: Sequence[str], where: str, fix: str) -> None:
    """Refuse two class lists that differ (names or order: a label is an index into the list).

    Raises `DataError`: ``<where>: the class lists differ (missing ...; extra ...): expected [...] (n), found [...]
    (m): <fix>`` ("same names in another order" when only the order differs).

    Args:
        expected: the stored class list (e.g. a trained classifier's).
        found: the class list of the data at hand.
        where: what is compared, naming the files (e.g. ``"classifier models/classifier/model.pt vs datalist"``).
        fix: what to do, ending the message.
    """
    expected, found = [str(c) for c in expected], [str(c) for c in found]
    if expected != found:
        missing = [c for c in expected if c not in found]
        extra = [c for c in found if c not in expected]
        detail = []
        if missing:
            detail.append(f"missing {listing(missing)}")
        if extra:
            detail.append(f"extra {listing(extra)}")
        if not detail:
            detail.append("same names in another order")
        raise DataError(
            f"{where}: the class lists differ ({'; '.join(detail)}): expected {expected} ({len(expected)}), found "
            f"{found} ({len(found)}): {fix}"
        )


# ---------------------------------------------------------------- layouts


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name.lower())


def _is_tile(path: Path) -> bool:
    return path.name.lower().endswith(TILE_SUFFIXES) and not path.name.startswith(".") and not path.is_dir()


def _entries(folder: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """(sub-folders, tiles, other files) directly in `folder`, sorted, hidden entries skipped."""
    entries = [p for p in folder_entries(folder, TILE_SUFFIXES) if not p.name.startswith(".")]
    folders = [p for p in entries if p.is_dir()]
    tiles = [p for p in entries if _is_tile(p)]
    others = [p for p in entries if not p.is_dir() and not _is_tile(p)]
    return folders, tiles, others


@dataclass
class _Set:
    """One labelled set of tiles.

    Args:
        folder: the set's folder.
        kind: "classes" (``<folder>/<CLASS>/*``) or "flat" (``<folder>/<CLASS>-*``).
    """

    folder: Path
    kind: str


def _set_kind(folder: Path) -> str:
    """ "classes" or "flat" for a folder that holds one labelled set; refuses other folders."""
    folders, tiles, _ = _entries(folder)
    if tiles and folders:
        raise DataError(
            f"{folder} holds both tiles ({listing([p.name for p in tiles], 2)}) and sub-folders "
            f"({listing([p.name for p in folders], 2)}): keep class folders <CLASS>/ or flat <CLASS>-<name> files, "
            "not both (move the others out)."
        )
    if tiles:
        return "flat"
    if folders:
        return "classes"
    raise DataError(f"{folder} holds no tiles ({', '.join(TILE_SUFFIXES)}): expected {_EXPECTED}.")


def _zenodo_sets(folder: Path) -> dict[str, Path]:
    """The Zenodo set folders in `folder` by role ("training", "testing")."""
    folders, _, _ = _entries(folder)
    training = [p for p in folders if _norm(p.name) in {_norm(n) for n in ZENODO_TRAINING}]
    testing = [p for p in folders if _norm(p.name).startswith(_norm(ZENODO_TESTING))]
    for found, what in ((training, "training"), (testing, "testing")):
        if len(found) > 1:
            raise DataError(
                f"{folder} holds {len(found)} Zenodo {what} sets ({listing([p.name for p in found])}): keep one (move "
                "the others out), or pass one of them as dataset_dir."
            )
    roles = {}
    if training:
        roles["training"] = training[0]
    if testing:
        roles["testing"] = testing[0]
    return roles


def _check_dataset_dir(dataset_dir: str | os.PathLike | None) -> Path:
    if not dataset_dir or not Path(dataset_dir).is_dir():
        state = "is not a folder" if dataset_dir and Path(dataset_dir).exists() else "does not exist"
        raise DataError(f"dataset_dir {dataset_dir} {state}: pass the folder of the H&E tiles ({_EXPECTED}).")
    return Path(os.path.abspath(dataset_dir))


def _find_sets(root: Path, classes: Sequence[str] | None) -> tuple[str, dict[str, _Set]]:
    """(layout name, {"training": set[, "testing": set]} or {"all": set}) of a labelled dataset folder."""
    for level in range(2):
        zenodo = _zenodo_sets(root)
        if zenodo:
            sets = {role: _Set(folder, _set_kind(folder)) for role, folder in zenodo.items()}
            if len(sets) == 1:
                only = next(iter(sets.values()))
                return f"zenodo {only.folder.name}/ ({only.kind}), split", {"all": only}
            return f"zenodo {' + '.join(f'{r}={s.folder.name}/ ({s.kind})' for r, s in sets.items())}", sets
        folders, tiles, _ = _entries(root)
        if level == 0 and len(folders) == 1 and not tiles and folders[0].name not in (classes or NCT_CLASSES):
            root = folders[0]
            continue
        kind = _set_kind(root)
        return (kind if level == 0 else f"{kind} (in {root.name}/)"), {"all": _Set(root, kind)}
    raise AssertionError("unreachable")


def _elsewhere_hint(root: Path, name: str, allowed: Sequence[str] | None, depth: int = 3) -> str:
    """For a tile-less folder whose name is no class: where under `root` tiles lie, as a sentence ("" if nowhere)."""
    if name in (allowed if allowed is not None else NCT_CLASSES):
        return ""
    level = [root]
    for _ in range(depth):
        level = [sub for folder in level for sub in _entries(folder)[0]]
        for folder in level:
            if _entries(folder)[1] and folder.parent != root:
                return (
                    f" '{name}' is no NCT-CRC-HE class and tiles lie in {folder}: if those are your data, pass that "
                    "folder as dataset_dir."
                )
    return ""


def _tiles_of(found: _Set, classes: Sequence[str] | None) -> list[tuple[Path, str]]:
    """(tile, class name) of every tile of a labelled set, refusing unknown classes and empty folders."""
    allowed = list(classes) if classes is not None else None
    pairs: list[tuple[Path, str]] = []
    if found.kind == "classes":
        folders, _, _ = _entries(found.folder)
        for folder in folders:
            name = folder.name
            if allowed is not None and name not in allowed:
                raise DataError(
                    f"unknown class '{name}' (folder {folder}): add it to --classes, or move the folder out."
                )
            sub_folders, tiles, others = _entries(folder)
            if not tiles:
                if not sub_folders and not others:
                    raise DataError(f"class folder {folder} is empty: add its tiles, or remove the folder.")
                raise DataError(
                    f"class folder {folder} holds no tiles ({', '.join(TILE_SUFFIXES)}): add its tiles directly in it, "
                    f"or remove the folder.{_elsewhere_hint(found.folder, name, allowed)}"
                )
            pairs += [(tile, name) for tile in tiles]
        return pairs
    _, tiles, _ = _entries(found.folder)
    for tile in tiles:
        prefix = tile.name.split("-", 1)[0] if "-" in tile.name else None
        if prefix is None:
            raise DataError(
                f"{tile} has no class prefix (<CLASS>-<name>): name flat tiles <CLASS>-<name>{tile.suffix}, or put "
                "them in class folders <CLASS>/."
            )
        if allowed is not None and prefix not in allowed:
            raise DataError(f"unknown class '{prefix}' (file {tile}): add it to --classes, or move the file out.")
        if allowed is None and prefix not in NCT_CLASSES:
            raise DataError(
                f"{tile} has the prefix '{prefix}', not an NCT-CRC-HE class ({', '.join(NCT_CLASSES)}): rename it "
                "<CLASS>-<name>, put the tiles in class folders <CLASS>/, or pass --classes."
            )
        pairs.append((tile, prefix))
    return pairs


def _all_tiles(root: Path) -> list[Path]:
    """Every tile under `root`, recursively, sorted; hidden entries skipped, symlinked folders visited once."""
    tiles: list[Path] = []
    seen: set[str] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in seen:
            continue
        seen.add(real)
        folders, found, _ = _entries(folder)
        tiles += found
        stack += reversed(folders)
    return sorted(tiles)


# ---------------------------------------------------------------- headers


def _decoded_size_and_mode(path: Path) -> tuple[tuple[int, int], str]:
    """A tile's ((width, height), PIL mode), decoding it in full (`read_image` refuses a truncated file)."""
    im = read_image(path)
    return (int(im.size[0]), int(im.size[1])), str(im.mode)


def _not_rgb(path: Path | str, mode: str) -> DataError:
    return DataError(
        f"{path} is a {mode} image, not 8-bit RGB: convert it to 8-bit RGB (e.g. PIL's image.convert('RGB')), or "
        "remove it."
    )


def _check_tiles(paths: Sequence[Path], progress: bool = False) -> tuple[int, int]:
    """Refuse unreadable (truncated included), non-RGB and mixed-size tiles; return the tiles' (height, width).

    The first bad tile in `paths`' order is the one named, whatever order the threads decode in.
    """
    sizes: dict[tuple[int, int], Path] = {}
    pool = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)))
    try:
        decoded = pool.map(_decoded_size_and_mode, paths)
        for path, (size, mode) in tqdm(
            zip(paths, decoded), total=len(paths), desc="checking tiles", disable=not progress
        ):
            if mode != "RGB":
                raise _not_rgb(path, mode)
            sizes.setdefault(size, path)
    finally:
        pool.shutdown(cancel_futures=True)  # a bad tile stops the check without decoding the rest
    if len(sizes) > 1:
        shown = [f"{path} is {w}x{h}" for (w, h), path in list(sizes.items())[:3]]
        raise DataError(
            f"tiles of {len(sizes)} different sizes ({', '.join(shown)}): resize them to one size, or keep tiles of "
            "one size in the dataset folder."
        )
    (width, height) = next(iter(sizes))
    return height, width


# ---------------------------------------------------------------- splits


def _share(fraction: float, n: int) -> int:
    """max(1, round(fraction * n)), rounding half up."""
    return max(1, math.floor(fraction * n + 0.5))


def _rng(seed: int, group: str, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(group.encode("utf-8")), stream])


def _by_name(items: Iterable[dict]) -> list[dict]:
    return sorted(items, key=lambda item: item["name"])


def _split_group(items: list[dict], group: str, test_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    items = _by_name(items)
    n = len(items)
    num_test = min(_share(test_fraction, n), n - 1)
    order = _rng(seed, group, 0).permutation(n)
    testing = {int(i) for i in order[:num_test]}
    return [it for i, it in enumerate(items) if i not in testing], [it for i, it in enumerate(items) if i in testing]


def stratified_subset(items: Sequence[Mapping], fraction: float, seed: int = 0) -> list[dict]:
    """A share of labelled items per class: ``max(1, round(fraction * n))`` of each class's n items, sorted by name.

    The items of a class (sorted by name) are permuted by ``numpy.random.default_rng([seed, crc32(class_name), 1])``
    and the first ones kept, so a smaller fraction with the same seed keeps a subset of a larger one's items.

    Args:
        items: labelled datalist items ("name", "class_name").
        fraction: the share kept per class, in (0, 1].
        seed: the seed of the choice.
    """
    fraction = _LABEL_FRACTION("label_fraction", fraction)
    seed = _LABEL_SEED("label_seed", seed)
    groups: dict[str, list[dict]] = {}
    for item in items:
        groups.setdefault(str(item["class_name"]), []).append(dict(item))
    kept: list[dict] = []
    for name, group in groups.items():
        group = _by_name(group)
        order = _rng(seed, name, 1).permutation(len(group))
        kept += [group[int(i)] for i in order[: _share(fraction, len(group))]]
    return _by_name(kept)


# ---------------------------------------------------------------- the datalist


def _labelled(
    root: Path,
    classes: list[str] | None,
    test_fraction: float,
    split_seed: int,
    label_fraction: float,
    label_seed: int,
    progress: bool,
) -> tuple[dict, dict]:
    layout, sets = _find_sets(root, classes)
    found = {role: _tiles_of(s, classes) for role, s in sets.items()}
    train_role = "training" if "training" in found else "all"
    train_classes = sorted({name for _, name in found[train_role]})
    class_list = sorted(classes) if classes is not None else train_classes
    for name in class_list:
        if name not in train_classes:
            where = sets[train_role]
            expected = where.folder / name if where.kind == "classes" else where.folder / f"{name}-<name>.tif"
            raise DataError(
                f"class '{name}' of --classes has no training tiles (expected {expected}): add its tiles, or drop it "
                "from --classes."
            )
    if "testing" in found:
        for tile, name in found["testing"]:
            if name not in class_list:
                raise DataError(
                    f"class '{name}' (tile {tile}) is in the testing set {sets['testing'].folder} but not in the "
                    f"training set {sets['training'].folder}: add its training tiles, or move it out."
                )
        missing = sorted(set(class_list) - {name for _, name in found["testing"]})
        if missing:
            logger.warning("%s has no testing tiles of %s", sets["testing"].folder, listing(missing))
    all_paths = [tile for pairs in found.values() for tile, _ in pairs]
    files_by_stem(all_paths, "tile")
    height, width = _check_tiles(all_paths, progress)

    def items(pairs: list[tuple[Path, str]]) -> list[dict]:
        return [
            {"image": str(tile), "label": class_list.index(name), "class_name": name, "name": file_stem(tile)}
            for tile, name in pairs
        ]

    if train_role == "all":
        training, testing = [], []
        every = items(found["all"])
        for name in class_list:
            group = [it for it in every if it["class_name"] == name]
            train, test = _split_group(group, name, test_fraction, split_seed)
            training += train
            testing += test
    else:
        training, testing = items(found["training"]), items(found["testing"])
    if label_fraction < 1:
        training = stratified_subset(training, label_fraction, label_seed)
    datalist = {"training": _by_name(training), "testing": _by_name(testing), "classes": class_list}
    info = {"layout": layout, "tile_size": [height, width], "sets": {r: str(s.folder) for r, s in sets.items()}}
    return datalist, info


def _unlabelled(root: Path, test_fraction: float, split_seed: int, progress: bool) -> tuple[dict, dict]:
    tiles = _all_tiles(root)
    if not tiles:
        raise DataError(f"{root} holds no tiles ({', '.join(TILE_SUFFIXES)}) at any depth: add the tiles.")
    height, width = _check_tiles(tiles, progress)
    items = []
    for tile in tiles:
        relative = tile.relative_to(root)
        items.append({"image": str(tile), "name": str(relative.with_name(file_stem(relative))).replace(os.sep, "/")})
    counts = Counter(it["name"] for it in items)
    repeated = sorted(name for name, count in counts.items() if count > 1)
    if repeated:
        # only <name>.png beside <name>.tif: files_by_stem names the two files
        files_by_stem([Path(it["image"]) for it in items if it["name"] == repeated[0]], "tile")
    training, testing = _split_group(items, "unlabelled", test_fraction, split_seed) if len(items) > 1 else (items, [])
    datalist = {"training": training, "testing": testing, "classes": []}
    return datalist, {"layout": "unlabelled (recursive)", "tile_size": [height, width], "sets": {"all": str(root)}}


def _histology(
    dataset_dir: str | os.PathLike,
    classes: object = None,
    labelled: bool = True,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    label_fraction: float = 1.0,
    label_seed: int = 0,
    progress: bool = False,
) -> tuple[dict, dict]:
    classes = parse_classes(classes)
    labelled = _BOOL("labelled", labelled)
    test_fraction = parse("test_fraction", test_fraction)
    split_seed = parse("split_seed", split_seed)
    label_fraction = _LABEL_FRACTION("label_fraction", label_fraction)
    label_seed = _LABEL_SEED("label_seed", label_seed)
    progress = _BOOL("progress", progress)
    if not labelled and (classes is not None or label_fraction != 1):
        raise OptionError(
            "--classes and --label_fraction apply to labelled data only: leave them out with --labelled false."
        )
    root = _check_dataset_dir(dataset_dir)
    if labelled:
        return _labelled(root, classes, test_fraction, split_seed, label_fraction, label_seed, progress)
    return _unlabelled(root, test_fraction, split_seed, progress)


def histology_datalist(
    dataset_dir: str | os.PathLike,
    classes: Sequence[str] | str | None = None,
    labelled: bool = True,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    label_fraction: float = 1.0,
    label_seed: int = 0,
) -> dict:
    """The dataset's tiles as ``{"training": [...], "testing": [...], "classes": [names]}``, each list sorted by name.

    Labelled items are ``{"image": absolute path, "label": index in "classes", "class_name", "name": file stem}``;
    unlabelled ones ``{"image", "name": relative path without suffix}`` with ``"classes": []``. Layouts, names, split
    and checks: see the module docstring. Only tile headers are read.

    Args:
        dataset_dir: the folder of tiles (module docstring).
        classes: the class names the data must hold (any order; labels follow the sorted list), or None for the class
            folders (flat prefixes) found.
        labelled: False for pre-training: every tile under `dataset_dir`, no labels.
        test_fraction: the share of each class held out when the data has one set, in (0, 1).
        split_seed: the seed of that split.
        label_fraction: the share of each class's training tiles kept, in (0, 1]; testing is not reduced.
        label_seed: the seed of that choice.
    """
    datalist, _ = _histology(dataset_dir, classes, labelled, test_fraction, split_seed, label_fraction, label_seed)
    return datalist


# ---------------------------------------------------------------- reading tiles


def read_tile(path: str | os.PathLike, image_size: int = 256) -> np.ndarray:
    """One tile as float32 (3, S, S) in [-1, 1]: shorter side resized to S, centre crop (module docstring).

    Args:
        path: an 8-bit RGB PNG/JPEG/TIFF tile.
        image_size: the side S.
    """
    size = _IMAGE_SIZE("image_size", image_size)
    im = read_image(path)
    if im.mode != "RGB":
        raise _not_rgb(path, im.mode)
    rgb = np.asarray(im, dtype=np.float32)
    height, width = rgb.shape[:2]
    tensor = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))
    short, long = min(height, width), max(height, width)
    if short != size:
        new_long = max(size, math.floor(long * size / short + 0.5))
        shape = (size, new_long) if height <= width else (new_long, size)
        tensor = torch.nn.functional.interpolate(
            tensor[None], size=shape, mode="bilinear", antialias=True, align_corners=False
        )[0]
    top, left = (tensor.shape[1] - size) // 2, (tensor.shape[2] - size) // 2
    tensor = tensor[:, top : top + size, left : left + size].clamp(0, 255)
    return np.ascontiguousarray((tensor / 127.5 - 1.0).numpy(), dtype=np.float32)


class LoadHistologyTiled(MapTransform):
    """Replace each key's tile path by the tile as a float32 (3, S, S) tensor in [-1, 1] (see `read_tile`).

    Other keys of the item (label, class_name, name) are kept.

    Args:
        keys: the keys holding tile paths.
        image_size: the side S (the seed's 256: the 224 px NCT tiles are upscaled, then centre-cropped).
        allow_missing_keys: skip keys the item lacks.
    """

    def __init__(
        self, keys: KeysCollection = ("image",), image_size: int = 256, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_size = _IMAGE_SIZE("image_size", image_size)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if not isinstance(value, (str, os.PathLike)):
                raise DataError(
                    f"item {d.get('name', '')} key {key!r} is {type(value).__name__}, not a tile path: build the "
                    "datalist with histology_datalist or data_prep/nct_crc_he.py."
                )
            d[key] = torch.from_numpy(read_tile(value, self.image_size))
        return d


# ---------------------------------------------------------------- data_prep


def prepare_nct_crc_he(
    dataset_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    classes: Sequence[str] | str | None = None,
    labelled: bool = True,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    label_fraction: float = 1.0,
    label_seed: int = 0,
    overwrite: bool = False,
    progress: bool = False,
) -> dict:
    """Write ``<output_dir>/datalist.json`` and ``report.json`` for a folder of H&E tiles; return the report.

    ``datalist.json`` is `histology_datalist`'s dict (absolute paths). ``report.json``: ``{"dataset_dir", "layout",
    "sets", "tile_size": [H, W], "classes", "counts": {split: {class: n}}, "num_tiles": {split: n}, "options"}``
    (unlabelled: counts under ``"all"``). Existing outputs are refused unless `overwrite`; `output_dir` may not be
    inside `dataset_dir`. Nothing is written when a check fails.

    Args:
        dataset_dir: the folder of tiles (module docstring of `meddiff.data.histology`).
        output_dir: the folder to write, outside `dataset_dir`.
        classes: the class names the data must hold, or None to take them from the data.
        labelled: False to list every tile under `dataset_dir` without labels (pre-training).
        test_fraction: the share of each class held out when the data has one set.
        split_seed: the seed of that split.
        label_fraction: the share of each class's training tiles kept.
        label_seed: the seed of that choice.
        overwrite: replace existing outputs.
        progress: show progress bars.
    """
    overwrite = _BOOL("overwrite", overwrite)
    progress = _BOOL("progress", progress)
    root = _check_dataset_dir(dataset_dir)
    out = Path(os.path.abspath(output_dir))
    datalist_file, report_file = out / "datalist.json", out / "report.json"
    staged = StagedOutput(out, [report_file], inputs=[root], overwrite=overwrite, manifest=datalist_file)
    datalist, info = _histology(
        root, classes, labelled, test_fraction, split_seed, label_fraction, label_seed, progress=progress
    )
    counts: dict[str, dict[str, int]] = {}
    for split in ("training", "testing"):
        per_class: dict[str, int] = {}
        for item in datalist[split]:
            key = item.get("class_name", "all")
            per_class[key] = per_class.get(key, 0) + 1
        counts[split] = dict(sorted(per_class.items()))
    report = {
        "dataset_dir": str(root),
        **info,
        "classes": datalist["classes"],
        "counts": counts,
        "num_tiles": {split: len(datalist[split]) for split in ("training", "testing")},
        "options": {
            "classes": parse_classes(classes),
            "labelled": _BOOL("labelled", labelled),
            "test_fraction": parse("test_fraction", test_fraction),
            "split_seed": parse("split_seed", split_seed),
            "label_fraction": _LABEL_FRACTION("label_fraction", label_fraction),
            "label_seed": _LABEL_SEED("label_seed", label_seed),
        },
    }
    with staged as stage:
        save_json(report, stage.path(report_file), overwrite=True)
        save_json(datalist, stage.path(datalist_file), overwrite=True)
    return report


# ---------------------------------------------------------------- built-in demo data

# per class: background RGB, blob RGB, blobs per 64x64 px, blob radius range (px), blob elongation (minor/major)
_STYLES = {
    "ADI": ((0.97, 0.95, 0.96), (0.88, 0.62, 0.78), 3, (1.0, 1.5), 1.0),  # fat: white, thin pink membranes
    "BACK": ((0.90, 0.90, 0.90), (0.80, 0.80, 0.82), 1, (1.0, 2.0), 1.0),  # background: grey, empty
    "DEB": ((0.86, 0.55, 0.68), (0.40, 0.20, 0.45), 40, (0.6, 1.2), 1.0),  # debris: pink, fine dark fragments
    "LYM": ((0.78, 0.62, 0.82), (0.22, 0.12, 0.45), 70, (1.6, 2.4), 1.0),  # lymphocytes: dense small dark round
    "MUC": ((0.78, 0.80, 0.92), (0.65, 0.60, 0.85), 4, (2.0, 4.0), 0.8),  # mucus: pale blue, smooth
    "MUS": ((0.90, 0.40, 0.52), (0.55, 0.25, 0.50), 12, (4.0, 7.0), 0.2),  # muscle: red, long thin nuclei
    "NORM": ((0.88, 0.60, 0.78), (0.45, 0.25, 0.60), 18, (2.5, 3.5), 0.6),  # normal mucosa: regular glands
    "STR": ((0.95, 0.78, 0.86), (0.50, 0.30, 0.60), 6, (3.0, 5.0), 0.3),  # stroma: pale pink, sparse spindles
    "TUM": ((0.62, 0.42, 0.72), (0.30, 0.15, 0.48), 30, (3.5, 5.5), 0.8),  # tumour: purple, large crowded nuclei
}


def _synthetic_tile(rng: np.random.Generator, name: str, size: int) -> np.ndarray:
    background, blob, density, (r_lo, r_hi), ratio = _STYLES[name]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    mask = np.zeros((size, size))
    for _ in range(max(1, round(density * (size / 64) ** 2))):
        cx, cy = rng.uniform(0, size, 2)
        a = rng.uniform(r_lo, r_hi) * size / 64
        b = a * ratio
        angle = rng.uniform(0, np.pi)
        u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
        v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
        mask = np.maximum(mask, (u / a) ** 2 + (v / max(b, 0.5)) ** 2 <= 1)
    mask = ndimage.gaussian_filter(mask, 0.5)
    texture = ndimage.gaussian_filter(rng.standard_normal((size, size)), 2.0)
    texture /= max(float(texture.std()), 1e-6)
    image = np.asarray(background) * (1 + 0.03 * texture[..., None]) * (1 - mask[..., None])
    image += np.asarray(blob) * mask[..., None]
    image += 0.015 * rng.standard_normal(image.shape)
    return np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)


def make_synthetic_histology(
    out_dir: str | os.PathLike,
    classes: Sequence[str] = ("ADI", "DEB", "LYM", "TUM"),
    per_class: int = 12,
    size: int = 64,
    seed: int = 0,
    test_per_class: int = 4,
) -> str:
    """Write built-in demo tiles in the Zenodo layout and return the folder (str).

    ``<out>/NCT-CRC-HE-100K/<CLASS>/<CLASS>-SYN<iii>.tif`` (`per_class` per class) and
    ``<out>/CRC-VAL-HE-7K/<CLASS>/<CLASS>-VAL<iii>.tif`` (`test_per_class`; left out when 0), RGB TIFF (LZW). Each
    class has its own look (background colour, blob colour, number, size and elongation: white fat with few
    membranes, dense small dark lymphocytes, crowded large purple tumour nuclei, ...), so a tiny classifier separates
    them. The same arguments give the same bytes; calling again with them reuses the data (``synthetic_histology.json``
    records them), other data in `out_dir` is never overwritten.

    Args:
        out_dir: the dataset folder to write.
        classes: NCT-CRC-HE class names (of `NCT_CLASSES`).
        per_class: training tiles per class.
        size: the side of the square tiles in pixels.
        seed: the seed of the numpy Generator that draws everything.
        test_per_class: test tiles per class (0 for none).
    """
    from PIL import Image

    names = parse_classes(classes)
    unknown = [c for c in names if c not in NCT_CLASSES]
    if unknown:
        raise OptionError(
            f"--classes for synthetic tiles must be among {', '.join(NCT_CLASSES)}, got {listing(unknown)}."
        )
    per_class, test_per_class = _PER_CLASS("per_class", per_class), _TEST_PER_CLASS("test_per_class", test_per_class)
    size, seed = _SYNTHETIC_SIZE("size", size), parse("seed", seed)
    root = Path(out_dir)
    params = {"classes": names, "per_class": per_class, "size": size, "seed": seed, "test_per_class": test_per_class}
    manifest = root / "synthetic_histology.json"
    if manifest.is_file():
        if json.loads(manifest.read_text()) == params:
            return str(root)
        raise OutputExistsError(
            f"{root} already holds synthetic histology tiles made with {manifest.read_text().strip()}: choose another "
            "folder, or remove it."
        )
    rng = np.random.default_rng(seed)
    for folder, tag, count in ((ZENODO_TRAINING[0], "SYN", per_class), (ZENODO_TESTING, "VAL", test_per_class)):
        for name in names:
            for index in range(count):
                image = _synthetic_tile(rng, name, size)
                path = root / folder / name / f"{name}-{tag}{index:03d}.tif"
                atomic_write(
                    path,
                    lambda tmp, a=image: Image.fromarray(a).save(tmp, format="TIFF", compression="tiff_lzw"),
                    overwrite=False,
                )
    save_json(params, manifest, overwrite=False)
    return str(root)
