"""Find image/mask pairs in the three supported layouts and load them as validated 2D slices.

Layouts:
- ``png``: the seed's layout, ``img_dir/<split>/*.png`` with masks ``seg_dir/all/<split>/<same name>``;
- ``msd``: the Medical Segmentation Decathlon layout, ``dataset_dir/imagesTr/*.nii.gz`` with
  ``dataset_dir/labelsTr/<same name>`` (``imagesTs``/``labelsTs`` for the test split);
- ``pairs``: flat folders ``dataset_dir/images/*.png`` with ``dataset_dir/masks/<same name>`` (what generation writes);
- ``dicom``: ``dataset_dir/<case>/image/`` (one DICOM series) with ``dataset_dir/<case>/label.{nii.gz,nrrd,seg.nrrd}``,
  or a ``dataset_dir/datalist.json`` listing such pairs (as written by ``data_prep/duke_breast_mri.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from meddiff.data.errors import DataError
from meddiff.data.slices import resize_image, resize_label, volume_to_slices

__all__ = [
    "IMAGE_SUFFIXES",
    "VOLUME_SUFFIXES",
    "check_finite",
    "check_label",
    "detect_layout",
    "file_stem",
    "find_pairs",
    "list_files",
    "load_slices",
    "read_png_image",
    "read_png_mask",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
_MSD_SPLIT = {"train": "Tr", "training": "Tr", "test": "Ts", "testing": "Ts"}
_LABEL_NAMES = ("label.nii.gz", "label.nii", "label.seg.nrrd", "label.nrrd")


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
    """The files directly in `folder` whose names end with one of `suffixes` (any case), sorted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(suffixes))


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
    """List {"image", "label", "name"} pairs of a layout and split; every listed file exists."""
    if layout in ("png", "pairs"):
        if layout == "png":
            images_dir, masks_dir = Path(img_dir) / split, Path(seg_dir) / "all" / split
        else:
            images_dir, masks_dir = Path(dataset_dir) / "images", Path(dataset_dir) / "masks"
        for folder in (images_dir, masks_dir):
            if not folder.is_dir():
                raise DataError(
                    f"{folder} does not exist: PNG data needs img_dir/{split}/ and seg_dir/all/{split}/, "
                    "or images/ and masks/."
                )
        pairs = []
        for image in list_files(images_dir, IMAGE_SUFFIXES):
            mask = masks_dir / image.name
            if not mask.is_file():
                raise DataError(f"mask {mask} for image {image} is missing: add it, or remove the image.")
            pairs.append({"image": str(image), "label": str(mask), "name": file_stem(image)})
    elif layout == "msd":
        tag = _MSD_SPLIT.get(split, "Tr")
        root = Path(dataset_dir)
        images_dir, labels_dir = root / f"images{tag}", root / f"labels{tag}"
        if not labels_dir.is_dir():
            raise DataError(f"{labels_dir} does not exist: the NIfTI layout needs images{tag}/ and labels{tag}/.")
        pairs = []
        for label in list_files(labels_dir, VOLUME_SUFFIXES):
            image = images_dir / label.name
            pairs.append(
                {"image": str(image) if image.is_file() else None, "label": str(label), "name": file_stem(label)}
            )
            if split in ("train", "training") and not image.is_file():
                raise DataError(f"image {image} for label {label} is missing: add it, or remove the label.")
    elif layout == "dicom":
        pairs = _dicom_pairs(Path(dataset_dir), split)
    else:
        raise DataError(f"unknown layout {layout!r}: use png, pairs, msd or dicom.")
    return pairs


def _dicom_pairs(root: Path, split: str) -> list[dict]:
    datalist = root / "datalist.json"
    if datalist.is_file():
        key = "testing" if split in ("test", "testing") else "training"
        entries = json.loads(datalist.read_text()).get(key, [])
        pairs = [
            {"image": str(root / e["image"]), "label": str(root / e["label"]), "name": Path(e["image"]).parent.name}
            for e in entries
        ]
    else:
        pairs = []
        for case in sorted(p for p in root.iterdir() if (p / "image").is_dir()):
            labels = [case / n for n in _LABEL_NAMES if (case / n).is_file()]
            if not labels:
                raise DataError(f"{case} has no segmentation: add {case}/label.nii.gz (or label.nrrd) for its series.")
            pairs.append({"image": str(case / "image"), "label": str(labels[0]), "name": case.name})
    for p in pairs:
        for key in ("image", "label"):
            if not Path(p[key]).exists():
                raise DataError(f"{p[key]} listed for case {p['name']} is missing: add it or fix the datalist.")
    return pairs


def read_png_image(path: str, num_img_channels: int) -> np.ndarray:
    """Read an image file as (C,H,W) float32 in [-1, 1]."""
    from PIL import Image

    with Image.open(path) as im:
        array = np.asarray(im.convert("L" if num_img_channels == 1 else "RGB"), dtype=np.float32)
    array = array[None] if array.ndim == 2 else np.moveaxis(array, -1, 0)
    return array / 127.5 - 1.0


def read_png_mask(path: str) -> np.ndarray:
    """Read an integer class mask as (1,H,W) int64; colour masks must hold equal channels."""
    from PIL import Image

    with Image.open(path) as im:
        array = np.asarray(im)
    if array.ndim == 3:
        if not (array == array[..., :1]).all():
            raise DataError(f"mask {path} is a colour image: save class indices 0..N-1 in one channel.")
        array = array[..., 0]
    return array[None].astype(np.int64)


def check_label(label: np.ndarray, num_classes: int, path: str) -> None:
    values = np.unique(label)
    bad = values[(values < 0) | (values >= num_classes)]
    if bad.size:
        raise DataError(
            f"mask {path} holds class values {bad.tolist()[:5]} outside 0..{num_classes - 1}: relabel it, or set "
            f"num_classes to at least {int(values.max()) + 1}."
        )


def check_finite(array: np.ndarray, path: str) -> None:
    if not np.isfinite(array).all():
        raise DataError(f"image {path} contains NaN or infinite values: fix or remove the file.")


def _voxels(path: str, image: object) -> np.ndarray:
    """The (Z,Y,X) voxel array of a volume; NIfTI is read with nibabel because ITK silently turns NaN into 0."""
    import SimpleITK as sitk

    if path.lower().endswith((".nii", ".nii.gz")):
        import nibabel as nib

        return np.asarray(nib.load(path).dataobj).T
    return sitk.GetArrayFromImage(image)


def _read_volume_pair(pair: dict, layout: str) -> tuple[np.ndarray | None, np.ndarray]:
    from meddiff.dicom import label_on_image_grid, read_volume

    label_img = read_volume(pair["label"])
    if pair["image"] is None:
        return None, _voxels(pair["label"], label_img)
    image_img = read_volume(pair["image"])
    if layout == "dicom":
        label_img = label_on_image_grid(label_img, image_img, pair["label"])
        label = _voxels("", label_img)
    elif image_img.GetSize() != label_img.GetSize():
        raise DataError(
            f"label {pair['label']} has size {label_img.GetSize()} but image {pair['image']} has "
            f"{image_img.GetSize()}: they must share one voxel grid."
        )
    else:
        label = _voxels(pair["label"], label_img)
    return _voxels(pair["image"], image_img).astype(np.float32), label


def load_slices(
    layout: str,
    *,
    num_classes: int,
    img_size: int,
    dataset_dir: str | None = None,
    img_dir: str | None = None,
    seg_dir: str | None = None,
    split: str = "train",
    num_img_channels: int = 1,
    min_foreground_fraction: float = 0.0,
    progress: bool = True,
) -> list[dict]:
    """Load every pair of a split as validated 2D slices {"image" (C,S,S) in [-1,1], "label" (1,S,S), "name"}."""
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
            check_finite(image, pair["image"])
            check_label(label, num_classes, pair["label"])
            item = {
                "image": resize_image(image, img_size),
                "label": resize_label(label, img_size),
                "name": pair["name"],
            }
            slices.append(item)
            continue
        image, label = _read_volume_pair(pair, layout)
        check_label(label, num_classes, pair["label"])
        if image is None:
            raise DataError(f"image for {pair['label']} is missing: training and evaluation need images.")
        check_finite(image, pair["image"])
        slices.extend(volume_to_slices(image, label, pair["name"], img_size, min_foreground_fraction))
    if not slices:
        raise DataError(
            f"all {split} slices were skipped as empty (min_foreground_fraction={min_foreground_fraction}): "
            "check that the labels hold foreground, or lower min_foreground_fraction."
        )
    return slices
