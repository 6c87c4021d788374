"""Find image/mask pairs in the supported layouts and load them as validated 2D slices.

Layouts:
- ``png``: the seed's layout, ``img_dir/<split>/*.png`` with masks ``seg_dir/all/<split>/<same name>``;
- ``msd``: the Medical Segmentation Decathlon layout, ``dataset_dir/imagesTr/*.nii.gz`` with
  ``dataset_dir/labelsTr/<same name>`` (``imagesTs``/``labelsTs`` for the test split);
- ``pairs``: flat folders ``dataset_dir/images/*.png`` with ``dataset_dir/masks/<same name>`` (what generation writes);
- ``dicom``: ``dataset_dir/<case>/image/`` (one DICOM series) with ``dataset_dir/<case>/label.{nii.gz,nrrd,seg.nrrd}``,
  or a ``dataset_dir/datalist.json`` listing such pairs (as written by ``data_prep/duke_breast_mri.py``).

Rules:
- splits: ``train``/``training`` and ``test``/``testing``, nothing else (no ``val``); the png layout reads the folder
  named by the split. The msd, pairs and dicom layouts refuse any other name, and msd and dicom-with-datalist refuse
  a split the dataset does not hold: msd reads a split from ``labelsTr/`` or ``labelsTs/`` (with its ``images*/``)
  and never substitutes one for the other; a ``datalist.json`` needs a ``"training"`` or ``"testing"`` list. The
  error names the folder (or datalist), the split asked for and the splits the dataset has. ``pairs``, and
  ``dicom`` without a datalist, have no splits: both names read every pair;
- every image needs a mask of the same name and every mask an image, in both directions; the error lists the
  orphans. The one exception: the msd test split without ``imagesTs/`` lists labels alone (generation reads
  labels only; loading slices still needs the images);
- an msd label and its image share one voxel grid: same size, and spacing, origin and direction equal within
  1e-3 (relative to the spacing for spacing and origin); otherwise both files and both values are named;
- 2D images map to [-1, 1] by their bit depth: 8-bit (any PIL mode but the ones below) as value / 255, 16-bit
  (``I;16*``, or ``I`` with values in 0..65535) as value / 65535; other 32-bit integer and floating-point images
  are refused. Volumes are scaled per volume between the 0.5 and 99.5 percentiles;
- masks hold class indices: finite, whole, non-negative numbers (0.5 is refused, not floored), below
  ``num_classes`` when it is given; a colour mask must have equal colour channels (one is taken, alpha ignored);
- every file is read in full before any work starts, with the checks of `meddiff.data.readers` (broken symlinks,
  empty or mislabelled files, declared sizes).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from meddiff.data.errors import DataError
from meddiff.data.readers import folder_entries, listing, read_image, read_mask_channel
from meddiff.data.slices import resize_image, resize_label, volume_to_slices

__all__ = [
    "IMAGE_SUFFIXES",
    "SPLITS",
    "VOLUME_SUFFIXES",
    "check_finite",
    "check_label",
    "check_num_classes",
    "detect_layout",
    "file_stem",
    "find_pairs",
    "list_files",
    "load_slices",
    "msd_split_folders",
    "read_png_image",
    "read_png_mask",
]

logger = logging.getLogger("meddiff.data")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
SPLITS = {"train": "Tr", "training": "Tr", "test": "Ts", "testing": "Ts"}
_SPLIT_CHOICES = "train (or training) or test (or testing)"
_DATALIST_KEYS = {"Tr": "training", "Ts": "testing"}
_LABEL_NAMES = ("label.nii.gz", "label.nii", "label.seg.nrrd", "label.nrrd")
_GRID_TOL = 1e-3
_SHOWN = 5


def detect_layout(dataset_dir: str | None = None, img_dir: str | None = None, seg_dir: str | None = None) -> str:
    """Return "png", "msd" or "dicom" from the folders given, or raise DataError saying what was expected."""
    if img_dir:
        if not seg_dir:
            raise DataError(f"img_dir={img_dir} was given without seg_dir: pass the mask folder as --seg_dir.")
        return "png"
    if not dataset_dir:
        raise DataError("No data given: pass --dataset_dir (NIfTI or DICOM layout) or --img_dir and --seg_dir (PNG).")
    root = Path(dataset_dir)
    if not root.is_dir():
        raise DataError(f"dataset_dir {root} does not exist.")
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return "pairs"
    if (root / "imagesTr").is_dir() or (root / "labelsTs").is_dir() or (root / "imagesTs").is_dir():
        return "msd"
    if (root / "datalist.json").is_file() or any((p / "image").is_dir() for p in root.iterdir() if p.is_dir()):
        return "dicom"
    raise DataError(
        f"{root} is in no known layout: expected imagesTr/ + labelsTr/ (NIfTI), <case>/image/ + <case>/label.nii.gz "
        "(DICOM), or pass --img_dir and --seg_dir for PNG files."
    )


def list_files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """The files directly in `folder` whose names end with one of `suffixes` (any case), sorted.

    A broken symlink with such a name is refused rather than skipped.
    """
    return [p for p in folder_entries(folder, suffixes) if p.is_file() and p.name.lower().endswith(suffixes)]


def _held(present: list[tuple[str, str]], none: str) -> str:
    """The splits a dataset holds, for messages, from (split, where) pairs; `none` when it holds none."""
    if len(present) == 1:
        return f"only the {present[0][0]} split {present[0][1]}"
    return f"the {' and '.join(f'{name} {where}' for name, where in present)} splits" if present else none


def _splits_held(layout: str, root: Path) -> str:
    """The splits the dataset at `root` holds in `layout`, for messages."""
    if layout == "msd":
        splits = (("train", "Tr"), ("test", "Ts"))
        present = [(name, f"(labels{tag}/)") for name, tag in splits if (root / f"labels{tag}").is_dir()]
        return _held(present, "neither labelsTr/ nor labelsTs/")
    if layout == "dicom" and (root / "datalist.json").is_file():
        try:
            keys = json.loads((root / "datalist.json").read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            return "an unreadable datalist.json"
        keys = keys if isinstance(keys, dict) else {}
        splits = (("train", "training"), ("test", "testing"))
        present = [(name, f'("{key}" in datalist.json)') for name, key in splits if key in keys]
        return _held(present, 'a datalist.json with neither a "training" nor a "testing" list')
    if layout == "dicom":
        return "no datalist.json, so no splits: train and test both read every <case>/ folder"
    return "no split folders: train and test both read images/ and masks/"


def _split_tag(split: str, layout: str, root: Path) -> str:
    """The folder suffix ("Tr"/"Ts") of a split name; a name outside SPLITS is a DataError."""
    if split not in SPLITS:
        raise DataError(
            f"split {split!r} is not one the {layout} layout has: use {_SPLIT_CHOICES}; {root} has "
            f"{_splits_held(layout, root)}."
        )
    return SPLITS[split]


def msd_split_folders(dataset_dir: str | Path, split: str) -> tuple[Path, Path]:
    """The (``images*/``, ``labels*/``) folders of `split` in an msd dataset; the labels folder exists.

    A split name outside SPLITS, or a split whose labels folder is absent, is a DataError naming `dataset_dir`, the
    split and the splits the dataset has: one split is never read in place of another.
    """
    root = Path(dataset_dir)
    tag = _split_tag(split, "msd", root)
    images_dir, labels_dir = root / f"images{tag}", root / f"labels{tag}"
    if not labels_dir.is_dir():
        raise DataError(
            f"split {split!r} is absent from {root}: there is no labels{tag}/, and {root} has "
            f"{_splits_held('msd', root)}; choose a split it has, or add labels{tag}/ (and images{tag}/)."
        )
    return images_dir, labels_dir


def _check_pairing(
    images: list[Path], masks: list[Path], images_dir: Path, masks_dir: Path, words: tuple[str, str] = ("image", "mask")
) -> None:
    """Refuse images without a mask of the same name and masks without an image, listing both kinds of orphan."""
    image_names, mask_names = {p.name for p in images}, {p.name for p in masks}
    no_mask = sorted(image_names - mask_names)
    no_image = sorted(mask_names - image_names)
    problems = []
    if no_mask:
        problems.append(
            f"{len(no_mask)} {words[0]}(s) in {images_dir} have no {words[1]} in {masks_dir} "
            f"({listing(no_mask, _SHOWN)})"
        )
    if no_image:
        problems.append(
            f"{len(no_image)} {words[1]}(s) in {masks_dir} have no {words[0]} in {images_dir} "
            f"({listing(no_image, _SHOWN)})"
        )
    if problems:
        raise DataError(
            f"{'; '.join(problems)}: every {words[0]} needs a {words[1]} of the same name and every {words[1]} an "
            f"{words[0]}; add the missing files, or remove the unpaired ones."
        )


def file_stem(path: Path) -> str:
    name = path.name
    for suffix in VOLUME_SUFFIXES + IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def find_pairs(
    layout: str,
    dataset_dir: str | None = None,
    img_dir: str | None = None,
    seg_dir: str | None = None,
    split: str = "train",
) -> list[dict]:
    """List {"image", "label", "name"} pairs of a layout and split; every listed file exists and has its partner.

    Only the msd test split without ``imagesTs/`` gives pairs whose "image" is None.
    """
    if layout in ("png", "pairs"):
        if layout == "png":
            images_dir, masks_dir = Path(img_dir) / split, Path(seg_dir) / "all" / split
        else:
            _split_tag(split, layout, Path(dataset_dir))
            images_dir, masks_dir = Path(dataset_dir) / "images", Path(dataset_dir) / "masks"
        for folder in (images_dir, masks_dir):
            if not folder.is_dir():
                raise DataError(
                    f"{folder} does not exist: PNG data needs img_dir/{split}/ and seg_dir/all/{split}/, "
                    "or images/ and masks/."
                )
        images, masks = list_files(images_dir, IMAGE_SUFFIXES), list_files(masks_dir, IMAGE_SUFFIXES)
        _check_pairing(images, masks, images_dir, masks_dir)
        return [{"image": str(p), "label": str(masks_dir / p.name), "name": file_stem(p)} for p in images]
    if layout == "msd":
        images_dir, labels_dir = msd_split_folders(dataset_dir, split)
        labels = list_files(labels_dir, VOLUME_SUFFIXES)
        if not images_dir.is_dir():
            if SPLITS[split] == "Tr":
                raise DataError(f"{images_dir} does not exist: the training split needs imagesTr/ beside labelsTr/.")
            return [{"image": None, "label": str(p), "name": file_stem(p)} for p in labels]
        _check_pairing(list_files(images_dir, VOLUME_SUFFIXES), labels, images_dir, labels_dir, ("image", "label"))
        return [{"image": str(images_dir / p.name), "label": str(p), "name": file_stem(p)} for p in labels]
    if layout == "dicom":
        return dicom_pairs(Path(dataset_dir), split)
    raise DataError(f"unknown layout {layout!r}: use png, pairs, msd or dicom.")


def dicom_pairs(root: Path, split: str) -> list[dict]:
    tag = _split_tag(split, "dicom", root)
    datalist = root / "datalist.json"
    if datalist.is_file():
        return _datalist_pairs(root, datalist, split, _DATALIST_KEYS[tag])
    pairs, no_label, no_image = [], [], []
    for case in folder_entries(root):
        if not case.is_dir():
            continue
        labels = [case / n for n in _LABEL_NAMES if (case / n).is_file()]
        has_image = (case / "image").is_dir()
        if has_image and labels:
            pairs.append({"image": str(case / "image"), "label": str(labels[0]), "name": case.name})
        elif has_image:
            no_label.append(case.name)
        elif labels:
            no_image.append(case.name)
    problems = []
    if no_label:
        problems.append(
            f"{len(no_label)} case(s) have image/ but no label.nii.gz (or label.nrrd) ({listing(no_label, _SHOWN)})"
        )
    if no_image:
        problems.append(
            f"{len(no_image)} case(s) have a label but no image/ series folder ({listing(no_image, _SHOWN)})"
        )
    if problems:
        raise DataError(
            f"{root}: {'; '.join(problems)}: every <case>/ needs image/ (one DICOM series) and label.nii.gz (or "
            "label.nrrd); add the missing ones, or remove those cases."
        )
    return pairs


def _datalist_pairs(root: Path, datalist: Path, split: str, key: str) -> list[dict]:
    try:
        content = json.loads(datalist.read_text())
        if not isinstance(content, dict):
            raise ValueError(f"it holds a {type(content).__name__}, not an object")
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DataError(
            f"{datalist} is not a readable datalist ({' '.join(str(err).split())}): write it as "
            '{"training": [{"image": ..., "label": ...}, ...]}, or remove it.'
        ) from err
    if key not in content:
        raise DataError(
            f"split {split!r} is absent from {datalist}: it has no {key!r} list, and {root} has "
            f"{_splits_held('dicom', root)}; choose a split it has, or add a {key!r} list."
        )
    entries = content[key]
    pairs, missing = [], []
    for i, entry in enumerate(entries if isinstance(entries, list) else [entries]):
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("image"), str)
            or not isinstance(entry.get("label"), str)
        ):
            raise DataError(
                f'{datalist} entry {i} of {key!r} is {entry!r}: each entry needs an "image" and a "label" path.'
            )
        pair = {
            "image": str(root / entry["image"]),
            "label": str(root / entry["label"]),
            "name": Path(entry["image"]).parent.name,
        }
        missing += [pair[k] for k in ("image", "label") if not Path(pair[k]).exists()]
        pairs.append(pair)
    if missing:
        raise DataError(
            f"{datalist} lists {len(missing)} missing file(s) or folder(s): {listing(missing, _SHOWN)}: add them, or "
            "fix the datalist."
        )
    return pairs


def read_png_image(path: str, num_img_channels: int) -> np.ndarray:
    """Read an image file as (C,H,W) float32 in [-1, 1]: 8-bit / 255, 16-bit / 65535 (see the module rules)."""
    im = read_image(path)
    if im.mode.startswith("I;16") or im.mode == "I":
        array = np.asarray(im).astype(np.float32)
        if im.mode == "I" and array.size and (array.min() < 0 or array.max() > 65535):
            raise DataError(
                f"image {path} is a 32-bit integer image with values {int(array.min())}..{int(array.max())}: save it "
                "as an 8- or 16-bit image."
            )
        array = np.repeat(array[None], num_img_channels, axis=0) / 65535.0
    elif im.mode in ("F", "I;32", "I;32B", "I;32L", "F;32", "F;64"):
        raise DataError(f"image {path} holds floating-point or 32-bit pixels: save it as an 8- or 16-bit image.")
    else:
        array = np.asarray(im.convert("L" if num_img_channels == 1 else "RGB"), dtype=np.float32)
        array = (array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)) / 255.0
    return (array * 2.0 - 1.0).astype(np.float32)


def read_png_mask(path: str) -> np.ndarray:
    """Read an integer class mask as (1,H,W) int64; colour masks must hold equal channels (alpha is ignored)."""
    array, _ = read_mask_channel(path, "save class indices 0..N-1 in one channel.")
    return check_label(array[None], None, path)


def _class_range_error(path: str, bad: list, num_classes: int, at_least: int) -> DataError:
    return DataError(
        f"mask {path} holds class values {bad} outside 0..{num_classes - 1}: relabel it, or set num_classes to at "
        f"least {at_least} (or leave --num_classes out to take it from the data)."
    )


def check_label(label: np.ndarray, num_classes: int | None, path: str) -> np.ndarray:
    """Check that a mask holds class indices (finite, whole, >= 0, < `num_classes` if given); return it as int64."""
    label = np.asarray(label)
    if label.dtype.kind == "f":
        if not np.isfinite(label).all():
            raise DataError(f"mask {path} holds NaN or infinite values: save class indices 0..N-1 as whole numbers.")
        fractional = label != np.round(label)
        if fractional.any():
            values = np.unique(label[fractional])[:_SHOWN].tolist()
            raise DataError(
                f"mask {path} holds non-integer values {values}: save class indices 0..N-1 as whole numbers (an "
                "interpolated or smoothed label? resample labels with nearest neighbour)."
            )
    elif label.dtype.kind not in "biu":
        raise DataError(f"mask {path} holds {label.dtype} values: save class indices 0..N-1 as integers.")
    values = np.unique(label).astype(np.int64)
    if num_classes is None:
        negative = values[values < 0]
        if negative.size:
            raise DataError(
                f"mask {path} holds negative class values {negative[:10].tolist()}: relabel it with classes 0..N-1."
            )
    else:
        bad = values[(values < 0) | (values >= num_classes)]
        if bad.size:
            raise _class_range_error(path, bad[:10].tolist(), num_classes, max(int(values.max()) + 1, 2))
    return label.astype(np.int64)


def check_num_classes(slices: list[dict], num_classes: int | None) -> int:
    """The number of classes: `num_classes` checked against every slice's label, or, if None, found in the labels.

    With None it is the largest class value + 1 (at least 2), logged at INFO level. Slices keep the class values of
    their label files (`resize_label` is nearest neighbour), so a refusal names the slice's "label_file".
    """
    tops = [int(np.max(s["label"])) if np.size(s["label"]) else 0 for s in slices]
    top = max(tops, default=0)
    for s in slices:
        check_label(s["label"], None, s.get("label_file", s.get("name")))
    if num_classes is None:
        num_classes = max(top + 1, 2)
        logger.info("num_classes=%d, found in the training labels (class values 0..%d)", num_classes, top)
        return num_classes
    for s, slice_top in zip(slices, tops):
        if slice_top >= num_classes:
            values = np.unique(s["label"])
            bad = values[values >= num_classes][:10].tolist()
            raise _class_range_error(s.get("label_file", s.get("name")), bad, num_classes, top + 1)
    return num_classes


def check_finite(array: np.ndarray, path: str) -> None:
    if not np.isfinite(array).all():
        raise DataError(f"image {path} contains NaN or infinite values: fix or remove the file.")


def _geometry_error(pair: dict, what: str, label_value: tuple, image_value: tuple) -> DataError:
    def fmt(values: tuple) -> str:
        return "(" + ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values) + ")"

    return DataError(
        f"label {pair['label']} has {what} {fmt(label_value)} but image {pair['image']} has {fmt(image_value)}: "
        "they must share one voxel grid (resample the label onto its image with nearest neighbour)."
    )


def _rounded(values: tuple) -> tuple:
    return tuple(round(float(v), 4) + 0.0 for v in values)  # + 0.0 turns -0.0 into 0.0


def _check_same_grid(label, image, pair: dict) -> None:  # SimpleITK readers or images
    """Refuse a label whose size, spacing, origin or direction differ from its image's (see the module rules)."""
    if tuple(label.GetSize()) != tuple(image.GetSize()):
        raise _geometry_error(pair, "size", tuple(label.GetSize()), tuple(image.GetSize()))
    spacing = np.asarray(image.GetSpacing(), float)
    tol = _GRID_TOL * np.abs(spacing)
    checks = (
        ("spacing", label.GetSpacing(), image.GetSpacing(), tol),
        ("origin", label.GetOrigin(), image.GetOrigin(), np.full_like(spacing, tol.min())),
        ("direction", label.GetDirection(), image.GetDirection(), _GRID_TOL),
    )
    for what, a, b, tolerance in checks:
        if np.any(np.abs(np.asarray(a, float) - np.asarray(b, float)) > tolerance):
            raise _geometry_error(pair, what, _rounded(a), _rounded(b))


def _read_volume_pair(pair: dict, layout: str) -> tuple[np.ndarray | None, np.ndarray]:
    """The (Z,Y,X) image (float32, None without an image) and label arrays of a pair, geometry checked first."""
    import SimpleITK as sitk

    from meddiff.data.readers import volume_information
    from meddiff.dicom import label_on_image_grid, read_volume

    if pair["image"] is not None and layout != "dicom":
        _check_same_grid(volume_information(pair["label"]), volume_information(pair["image"]), pair)
    label_img = read_volume(pair["label"])
    if label_img.GetDimension() != 3 and layout != "dicom":
        raise DataError(f"label {pair['label']} is {label_img.GetDimension()}D: the NIfTI layout needs 3D volumes.")
    if pair["image"] is None:
        return None, sitk.GetArrayFromImage(label_img)
    image_img = read_volume(pair["image"])
    if layout == "dicom":
        label_img = label_on_image_grid(label_img, image_img, pair["label"])
    return sitk.GetArrayFromImage(image_img).astype(np.float32), sitk.GetArrayFromImage(label_img)


def load_slices(
    layout: str,
    *,
    num_classes: int | None = None,
    img_size: int,
    dataset_dir: str | None = None,
    img_dir: str | None = None,
    seg_dir: str | None = None,
    split: str = "train",
    num_img_channels: int = 1,
    min_foreground_fraction: float = 0.0,
    progress: bool = True,
) -> list[dict]:
    """Load every pair of a split as validated 2D slices.

    Each slice is {"image" (C,S,S) in [-1,1], "label" (1,S,S) int64, "name", "label_file"}. Labels are checked to
    be class indices below `num_classes`; with None only the upper bound is left out (see `check_num_classes`).
    """
    if layout == "auto":
        layout = detect_layout(dataset_dir, img_dir, seg_dir)
    pairs = find_pairs(layout, dataset_dir, img_dir, seg_dir, split)
    if not pairs:
        where = img_dir if layout == "png" else dataset_dir
        raise DataError(f"no {split} images found in {where} ({layout} layout): check the path and the split name.")
    slices: list[dict] = []
    for pair in tqdm(pairs, desc=f"reading {split} data", disable=not progress, leave=False):
        if layout in ("png", "pairs"):
            image, label = read_png_image(pair["image"], num_img_channels), read_png_mask(pair["label"])
            if image.shape[-2:] != label.shape[-2:]:
                raise DataError(
                    f"mask {pair['label']} is {label.shape[-2:]} but image {pair['image']} is {image.shape[-2:]}: "
                    "masks must have their image's size."
                )
            check_label(label, num_classes, pair["label"])
            slices.append(
                {
                    "image": resize_image(image, img_size),
                    "label": resize_label(label, img_size),
                    "name": pair["name"],
                    "label_file": pair["label"],
                }
            )
            continue
        image, label = _read_volume_pair(pair, layout)
        label = check_label(label, num_classes, pair["label"])
        if image is None:
            raise DataError(f"image for {pair['label']} is missing: training and evaluation need images.")
        check_finite(image, pair["image"])
        for item in volume_to_slices(image, label, pair["name"], img_size, min_foreground_fraction):
            slices.append({**item, "label_file": pair["label"]})
    if not slices:
        raise DataError(
            f"all {split} slices were skipped as empty (min_foreground_fraction={min_foreground_fraction}): "
            "check that the labels hold foreground, or lower min_foreground_fraction."
        )
    return slices
