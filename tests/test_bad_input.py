"""Bad input stops a run before training starts, with a message naming the file and the fix."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from meddiff.data import DataError, load_slices
from meddiff.demo import bundles_dir, run_bundle

BUNDLE = bundles_dir() / "breast_mri_seg_guided_generation"


def write_pngs(root: Path, masks: dict[str, np.ndarray], image_size: tuple[int, int] = (16, 16)) -> tuple[Path, Path]:
    """Write a seed-layout PNG dataset with one image per mask."""
    img_dir, seg_dir = root / "img", root / "seg"
    (img_dir / "train").mkdir(parents=True)
    (seg_dir / "all" / "train").mkdir(parents=True)
    for name, mask in masks.items():
        Image.fromarray(np.full(image_size, 100, dtype=np.uint8)).save(img_dir / "train" / name)
        Image.fromarray(mask.astype(np.uint8)).save(seg_dir / "all" / "train" / name)
    return img_dir, seg_dir


def load_png(img_dir: Path, seg_dir: Path) -> list[dict]:
    """Load the PNG layout as the bundle does."""
    return load_slices("auto", img_dir=str(img_dir), seg_dir=str(seg_dir), num_classes=4, img_size=16, progress=False)


def test_missing_mask_names_the_file(tmp_path: Path) -> None:
    img_dir, seg_dir = write_pngs(tmp_path, {"a.png": np.zeros((16, 16))})
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(img_dir / "train" / "b.png")
    with pytest.raises(DataError, match=r"b\.png.*missing"):
        load_png(img_dir, seg_dir)


def test_size_mismatch(tmp_path: Path) -> None:
    img_dir, seg_dir = write_pngs(tmp_path, {"a.png": np.zeros((12, 12))})
    with pytest.raises(DataError, match=r"a\.png.*must have their image's size"):
        load_png(img_dir, seg_dir)


def test_class_values_out_of_range(tmp_path: Path) -> None:
    mask = np.zeros((16, 16))
    mask[2:4, 2:4] = 7
    img_dir, seg_dir = write_pngs(tmp_path, {"a.png": mask})
    with pytest.raises(DataError, match=r"a\.png holds class values \[7\] outside 0\.\.3.*num_classes to at least 8"):
        load_png(img_dir, seg_dir)


def test_empty_dataset(tmp_path: Path) -> None:
    img_dir, seg_dir = write_pngs(tmp_path, {})
    with pytest.raises(DataError, match="no train images found"):
        load_png(img_dir, seg_dir)


def write_msd(root: Path, image: np.ndarray, label: np.ndarray) -> Path:
    """Write one NIfTI pair in the MSD layout."""
    for sub, array in (("imagesTr", image), ("labelsTr", label)):
        (root / sub).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(array, np.eye(4)), root / sub / "case.nii.gz")
    return root


def test_nan_in_volume(tmp_path: Path) -> None:
    image = np.ones((16, 16, 4), np.float32)
    image[3, 3, 1] = np.nan
    label = np.ones((16, 16, 4), np.uint8)
    root = write_msd(tmp_path, image, label)
    with pytest.raises(DataError, match=r"imagesTr/case\.nii\.gz contains NaN"):
        load_slices("auto", dataset_dir=str(root), num_classes=4, img_size=16, progress=False)


def test_all_slices_empty(tmp_path: Path) -> None:
    root = write_msd(tmp_path, np.ones((16, 16, 4), np.float32), np.zeros((16, 16, 4), np.uint8))
    with pytest.raises(DataError, match="skipped as empty"):
        load_slices("auto", dataset_dir=str(root), num_classes=4, img_size=16, progress=False)


def test_volume_size_mismatch(tmp_path: Path) -> None:
    root = write_msd(tmp_path, np.ones((16, 16, 4), np.float32), np.ones((16, 16, 5), np.uint8))
    with pytest.raises(DataError, match=r"labelsTr/case\.nii\.gz has size .* must share one voxel grid"):
        load_slices("auto", dataset_dir=str(root), num_classes=4, img_size=16, progress=False)


def test_dicom_folder_with_several_series(tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    from meddiff.dicom import DicomSeriesError

    ct_small = get_testdata_file("CT_small.dcm", download=False)
    mr2 = Path(ct_small).parent / "dicomdirtests" / "98892003" / "MR2" if ct_small else None
    if mr2 is None or not mr2.is_dir():
        pytest.skip("pydicom's bundled dicomdirtests are not installed")
    case = tmp_path / "case0"
    (case / "image").mkdir(parents=True)
    for f in mr2.iterdir():
        (case / "image" / f.name).write_bytes(f.read_bytes())
    nib.save(nib.Nifti1Image(np.ones((4, 4, 1), np.uint8), np.eye(4)), case / "label.nii.gz")
    with pytest.raises(DicomSeriesError, match="several series"):
        load_slices("auto", dataset_dir=str(tmp_path), num_classes=2, img_size=16, progress=False)


def test_training_stops_before_work_on_bad_input(tmp_path: Path) -> None:
    mask = np.zeros((16, 16))
    mask[0, 0] = 9
    img_dir, seg_dir = write_pngs(tmp_path / "data", {"a.png": mask})
    with pytest.raises(RuntimeError) as info:
        run_bundle(
            BUNDLE,
            "training",
            ["train.json"],
            bundle_root=str(tmp_path),
            img_dir=str(img_dir),
            seg_dir=str(seg_dir),
            img_size=16,
            num_classes=4,
        )
    assert "outside 0..3" in repr(info.value.__cause__) or "outside 0..3" in str(info.value)
    assert not (tmp_path / "models").exists()


def test_unknown_layout(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no known layout"):
        load_slices("auto", dataset_dir=str(tmp_path), num_classes=4, img_size=16, progress=False)
