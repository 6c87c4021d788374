"""Input checks of the readers: orphans, geometry, masks, unreadable files, symlinks, huge headers, corrupt data,
splits, and num_classes taken from the data. Each error is one `DataError` line naming the file and the fix."""

from __future__ import annotations

import gzip
import logging
import re
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import shared_data
from dicom_helpers import write_series
from PIL import Image

from meddiff.data import DataError, check_num_classes, load_slices
from meddiff.data.layouts import find_pairs, read_png_image, read_png_mask
from meddiff.data.lidc import find_lidc_cases, load_lidc_cases, read_binary_mask
from meddiff.dicom import DicomSeriesError, read_series, read_volume
from meddiff.generation import find_condition_masks


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _png_layout(root: Path, images: list[str], masks: list[str]) -> tuple[Path, Path]:
    for name in images:
        _png(root / "img" / "train" / name, np.full((8, 8), 100, np.uint8))
    for name in masks:
        _png(root / "seg" / "all" / "train" / name, np.ones((8, 8), np.uint8))
    return root / "img", root / "seg"


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), path)
    return path


def _msd(root: Path, names: list[str], sub: str = "imagesTr") -> None:
    for name in names:
        _nifti(root / sub / name, np.ones((8, 8, 3), np.float32))


def _load(**kwargs) -> list[dict]:
    return load_slices("auto", img_size=8, progress=False, **kwargs)


# ---------------------------------------------------------------- 1. orphans


def test_png_orphans_both_ways_are_listed(tmp_path):
    img_dir, seg_dir = _png_layout(tmp_path, ["a.png", "b.png"], ["a.png"] + [f"m{i}.png" for i in range(7)])
    with pytest.raises(DataError) as err:
        find_pairs("png", img_dir=str(img_dir), seg_dir=str(seg_dir))
    message = str(err.value)
    assert "1 image(s)" in message and "b.png" in message
    assert "7 mask(s)" in message and "m0.png, m1.png, m2.png, m3.png, m4.png (+2 more)" in message
    assert "\n" not in message


def test_pairs_layout_mask_without_image(tmp_path):
    _png(tmp_path / "images" / "a.png", np.zeros((8, 8), np.uint8))
    _png(tmp_path / "masks" / "a.png", np.zeros((8, 8), np.uint8))
    _png(tmp_path / "masks" / "extra.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match=r"1 mask\(s\) in .*masks have no image .*\(extra\.png\)"):
        find_pairs("pairs", dataset_dir=str(tmp_path))


def test_msd_orphans(tmp_path):
    for sub in ("imagesTr", "labelsTr"):
        _msd(tmp_path, ["a.nii.gz"], sub)
    _msd(tmp_path, ["lonely.nii.gz"], "imagesTr")
    with pytest.raises(DataError, match=r"1 image\(s\) in .*imagesTr have no label .*lonely\.nii\.gz"):
        find_pairs("msd", dataset_dir=str(tmp_path))
    # test split: labels alone are fine (generation reads labels only) ...
    _msd(tmp_path, ["a.nii.gz", "b.nii.gz"], "labelsTs")
    assert [p["image"] for p in find_pairs("msd", dataset_dir=str(tmp_path), split="test")] == [None, None]
    # ... but an image without its label is refused once imagesTs exists
    _msd(tmp_path, ["a.nii.gz", "b.nii.gz", "c.nii.gz"], "imagesTs")
    with pytest.raises(DataError, match=r"imagesTs have no label .*\(c\.nii\.gz\)"):
        find_pairs("msd", dataset_dir=str(tmp_path), split="test")


def test_dicom_orphans(tmp_path):
    (tmp_path / "case0" / "image").mkdir(parents=True)
    _nifti(tmp_path / "case0" / "label.nii.gz", np.ones((4, 4, 2), np.uint8))
    _nifti(tmp_path / "case1" / "label.nii.gz", np.ones((4, 4, 2), np.uint8))
    with pytest.raises(DataError, match=r"1 case\(s\) have a label but no image/ series folder \(case1\)"):
        find_pairs("dicom", dataset_dir=str(tmp_path))
    (tmp_path / "datalist.json").write_text(
        '{"training": [{"image": "case0/image", "label": "case0/label.nii.gz"},'
        ' {"image": "case2/image", "label": "case2/label.nii.gz"}]}'
    )
    with pytest.raises(DataError, match=r"datalist\.json lists 2 missing .*case2/image, .*case2/label\.nii\.gz"):
        find_pairs("dicom", dataset_dir=str(tmp_path))


def test_lidc_case_with_image_only_or_masks_only(tmp_path):
    _png(tmp_path / "training" / "0" / "image_1.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match=r"training/0 holds image_1\.png but no rater masks"):
        find_lidc_cases(tmp_path, "training")
    shutil.rmtree(tmp_path / "training" / "0")
    for r in range(4):
        _png(tmp_path / "training" / "1" / f"label{r}_.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match=r"training/1 holds rater masks but no image_<n> file"):
        find_lidc_cases(tmp_path, "training")


# ---------------------------------------------------------------- 2. geometry


@pytest.mark.parametrize(
    ("what", "affine_change", "expected"),
    [
        ("spacing", lambda a: np.diag([1.0, 1.0, 2.5, 1.0]), r"spacing \(1, 1, 2\.5\) but image .* has \(1, 1, 2\)"),
        ("origin", lambda a: a + np.pad(np.array([[0, 0, 0, 5.0]]), ((0, 3), (0, 0))), r"origin \(-5, 0, 0\)"),
        ("direction", lambda a: np.diag([1.0, -1.0, 2.0, 1.0]), r"direction \(.*-1.*\) but image"),
    ],
)
def test_msd_geometry_disagreement_names_both_files(tmp_path, what, affine_change, expected):
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    _nifti(tmp_path / "imagesTr" / "c.nii.gz", np.ones((8, 8, 3), np.float32), affine)
    _nifti(tmp_path / "labelsTr" / "c.nii.gz", np.ones((8, 8, 3), np.uint8), affine_change(affine))
    with pytest.raises(DataError, match=rf"label .*labelsTr/c\.nii\.gz has {what} .*imagesTr/c\.nii\.gz") as err:
        _load(dataset_dir=str(tmp_path), num_classes=2)
    assert re.search(expected, str(err.value))


def test_msd_geometry_within_tolerance_is_accepted(tmp_path):
    _nifti(tmp_path / "imagesTr" / "c.nii.gz", np.ones((8, 8, 3), np.float32), np.diag([1.0, 1.0, 2.0, 1.0]))
    _nifti(tmp_path / "labelsTr" / "c.nii.gz", np.ones((8, 8, 3), np.uint8), np.diag([1.0, 1.0, 2.0005, 1.0]))
    assert len(_load(dataset_dir=str(tmp_path), num_classes=2)) == 3


# ---------------------------------------------------------------- 3. masks


def test_lidc_binarisation_rule(tmp_path):
    one_zero = np.zeros((8, 8), np.uint8)
    one_zero[2:4, 2:4] = 1
    assert read_binary_mask(_png(tmp_path / "a.png", one_zero)).sum() == 4  # a 0/1 mask
    ringing = one_zero * 250
    ringing[0, 0] = 6
    assert read_binary_mask(_png(tmp_path / "b.png", ringing)).sum() == 4  # 0/255 with JPEG ringing
    sixteen = one_zero.astype(np.uint16) * 65535
    assert read_binary_mask(_png(tmp_path / "c.png", sixteen)).sum() == 4
    with pytest.raises(DataError, match=r"d\.png has values 0\.\.3: .*read as empty"):
        read_binary_mask(_png(tmp_path / "d.png", one_zero * 3))
    colour = np.zeros((8, 8, 3), np.uint8)
    colour[1, 1] = (255, 0, 0)
    with pytest.raises(DataError, match=r"e\.png is a colour image whose channels differ"):
        read_binary_mask(_png(tmp_path / "e.png", colour))
    grey = np.repeat(ringing[..., None], 3, axis=2)
    assert read_binary_mask(_png(tmp_path / "f.png", grey)).sum() == 4


def test_lidc_case_with_0_1_masks_is_not_empty(tmp_path):
    mask = np.zeros((8, 8), np.uint8)
    mask[3:6, 3:6] = 1
    _png(tmp_path / "training" / "0" / "image_1.png", np.full((8, 8), 60, np.uint8))
    for r in range(4):
        _png(tmp_path / "training" / "0" / f"label{r}_.png", mask)
    items = load_lidc_cases(tmp_path, "training", img_size=None, progress=False)
    assert items[0]["label"].sum(axis=(1, 2)).tolist() == [9.0] * 4


def test_real_lidc_masks_unchanged_by_the_rule():
    root = shared_data("lidc_crops", "data")
    for case in find_lidc_cases(root, "testing"):
        for path in case["label"]:
            assert np.array_equal(read_binary_mask(path), np.asarray(Image.open(path)) > 127)


def test_rgb_class_mask_with_equal_channels_is_accepted(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[2:4, 2:4] = 2
    assert read_png_mask(str(_png(tmp_path / "m.png", rgb))).max() == 2


# ---------------------------------------------------------------- 4. unreadable files


@pytest.mark.parametrize("name", ["x.png", "case.nii.gz", "case.nrrd"])
def test_text_file_with_image_suffix(tmp_path, name):
    path = tmp_path / name
    path.write_text("this is not an image\n")
    reader = read_png_mask if name.endswith(".png") else read_volume
    kind = {"x.png": "PNG", "case.nii.gz": "NIfTI", "case.nrrd": "NRRD"}[name]
    with pytest.raises(DataError, match=rf"{name} is not a readable {kind} file \(.*\): replace or remove it"):
        reader(str(path))


def test_zero_byte_files(tmp_path):
    img_dir, seg_dir = _png_layout(tmp_path, ["a.png"], ["a.png"])
    (seg_dir / "all" / "train" / "a.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"a\.png is not a readable PNG file \(empty file, 0 bytes\)"):
        _load(img_dir=str(img_dir), seg_dir=str(seg_dir), num_classes=2)
    (tmp_path / "v.nii.gz").write_bytes(b"")
    with pytest.raises(DataError, match=r"v\.nii\.gz is not a readable NIfTI file \(empty file"):
        read_volume(tmp_path / "v.nii.gz")


def test_truncated_png_is_refused(tmp_path):
    path = _png(tmp_path / "t.png", np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(DataError, match=r"t\.png is not a readable PNG file"):
        read_png_image(str(path), 1)


# ---------------------------------------------------------------- 5. symlinks


def test_symlink_loop_and_dangling_link_in_data_folders(tmp_path):
    img_dir, seg_dir = _png_layout(tmp_path, ["a.png"], ["a.png"])
    loop = img_dir / "train" / "loop.png"
    loop.symlink_to(loop)
    with pytest.raises(DataError, match=r"loop\.png is a symlink loop"):
        _load(img_dir=str(img_dir), seg_dir=str(seg_dir), num_classes=2)
    loop.unlink()
    (seg_dir / "all" / "train" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(DataError, match=r"gone\.png is a dangling symlink \(-> .*nowhere\.png"):
        _load(img_dir=str(img_dir), seg_dir=str(seg_dir), num_classes=2)
    (tmp_path / "lidc" / "training").mkdir(parents=True)
    (tmp_path / "lidc" / "training" / "7").symlink_to(tmp_path / "missing_case")
    with pytest.raises(DataError, match=r"training/7 is a dangling symlink"):
        find_lidc_cases(tmp_path / "lidc", "training")


# ---------------------------------------------------------------- 6. huge headers


def test_huge_nifti_header_refused_before_allocating(tmp_path):
    header = nib.Nifti1Header()
    header.set_data_shape((1500, 1500, 1000))
    header.set_data_dtype(np.uint8)
    _msd(tmp_path, ["c.nii.gz"], "imagesTr")
    label = tmp_path / "labelsTr" / "c.nii.gz"
    label.parent.mkdir()
    label.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4))
    assert label.stat().st_size < 200
    start = time.perf_counter()
    with pytest.raises(DataError, match=r"labelsTr/c\.nii\.gz declares 1500x1500x1000 = 2250000000 voxels"):
        _load(dataset_dir=str(tmp_path), num_classes=2)
    assert time.perf_counter() - start < 1.0


def test_header_declaring_more_than_deflate_can_hold(tmp_path):
    header = nib.Nifti1Header()
    header.set_data_shape((1000, 1000, 100))
    (tmp_path / "v.nii.gz").write_bytes(gzip.compress(header.binaryblock + b"\0" * 4))
    with pytest.raises(DataError, match=r"v\.nii\.gz is not a readable NIfTI file \(header declares .* more than 1100"):
        read_volume(tmp_path / "v.nii.gz")
    (tmp_path / "v.nrrd").write_bytes(
        b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 1000 1000 100\nencoding: raw\n\n" + b"\0" * 100
    )
    with pytest.raises(DataError, match=r"v\.nrrd is not a readable NRRD file \(header declares .*truncated"):
        read_volume(tmp_path / "v.nrrd")


def test_decompression_bomb_png(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    path = _png(tmp_path / "big.png", np.zeros((64, 64), np.uint8))
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DataError, match=r"big\.png is not a readable PNG file \(too many pixels"):
        read_png_image(str(path), 1)


# ---------------------------------------------------------------- 7. corrupt data


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_truncated_volume_is_refused(tmp_path, suffix):
    array = np.random.default_rng(0).integers(0, 3, (16, 32, 32)).astype(np.int16)
    path = tmp_path / f"v{suffix}"
    if suffix.startswith(".nii"):
        _nifti(path, array.T)
    else:
        sitk.WriteImage(sitk.GetImageFromArray(array), str(path), True)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=re.escape(f"v{suffix} is not a readable")):
        read_volume(path)


def test_nifti_read_keeps_values_and_geometry(tmp_path):
    array = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    array[1, 2, 3] = np.nan
    affine = np.diag([0.5, 0.7, 2.0, 1.0])
    affine[:3, 3] = [10.0, -20.0, 5.0]
    path = _nifti(tmp_path / "v.nii.gz", array, affine)
    ours, itk = read_volume(path), sitk.ReadImage(str(path))
    assert ours.GetSize() == itk.GetSize() and ours.GetPixelID() == itk.GetPixelID()
    assert np.allclose(ours.GetOrigin(), itk.GetOrigin()) and np.allclose(ours.GetSpacing(), itk.GetSpacing())
    assert np.allclose(ours.GetDirection(), itk.GetDirection())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ours), array.T)  # NaN kept (ITK reads it as 0)


@pytest.mark.parametrize(
    ("value", "match"),
    [(0.5, r"non-integer values \[0\.5\]"), (np.nan, "NaN or infinite"), (np.inf, "NaN or infinite")],
)
def test_label_values_must_be_whole_finite_numbers(tmp_path, value, match):
    label = np.ones((8, 8, 3), np.float32)
    label[1, 1, 1] = value
    _msd(tmp_path, ["c.nii.gz"], "imagesTr")
    _nifti(tmp_path / "labelsTr" / "c.nii.gz", label)
    with pytest.raises(DataError, match=rf"mask .*labelsTr/c\.nii\.gz holds {match}"):
        _load(dataset_dir=str(tmp_path), num_classes=None)


def test_negative_label_refused_without_num_classes(tmp_path):
    label = np.ones((8, 8, 3), np.int16)
    label[0, 0, 0] = -1
    _msd(tmp_path, ["c.nii.gz"], "imagesTr")
    _nifti(tmp_path / "labelsTr" / "c.nii.gz", label)
    with pytest.raises(DataError, match=r"c\.nii\.gz holds negative class values \[-1\]"):
        _load(dataset_dir=str(tmp_path), num_classes=None)


def test_16_bit_images_scale_by_their_range(tmp_path):
    path = tmp_path / "i.png"
    Image.fromarray(np.array([[0, 30000], [65535, 1000]], np.uint16)).save(path)
    image = read_png_image(str(path), 1)
    np.testing.assert_allclose(image[0], np.array([[0, 30000], [65535, 1000]]) / 65535 * 2 - 1, atol=1e-6)
    assert read_png_image(str(path), 3).shape == (3, 2, 2)
    Image.fromarray(np.array([[0, 128]], np.uint8)).save(tmp_path / "e.png")
    np.testing.assert_allclose(read_png_image(str(tmp_path / "e.png"), 1)[0], [[-1.0, 128 / 255 * 2 - 1]], atol=1e-6)
    Image.fromarray(np.ones((2, 2), np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(DataError, match=r"f\.tif holds floating-point"):
        read_png_image(str(tmp_path / "f.tif"), 1)


def test_dicom_series_with_a_gap_is_refused(tmp_path):
    write_series(tmp_path / "ct", np.zeros((6, 4, 4), np.int16), spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 10.0))
    (tmp_path / "ct" / "IM0002.dcm").unlink()  # the slice at z = 16 (file names run opposite to position)
    with pytest.raises(DicomSeriesError, match=r"ct is not evenly spaced: .* 14\.00 and 18\.00 mm .* step of 4\.00"):
        read_series(tmp_path / "ct")


def test_dicom_slice_gdcm_cannot_read_is_refused(tmp_path):
    write_series(tmp_path / "ct", np.ones((4, 4, 4), np.int16))
    broken = tmp_path / "ct" / "IM0001.dcm"
    broken.write_bytes(broken.read_bytes()[:-10])
    with pytest.raises(DicomSeriesError, match=r"GDCM cannot read 1 file\(s\) of series .*\(IM0001\.dcm;"):
        read_series(tmp_path / "ct")


def test_non_dicom_files_in_a_series_folder_are_warned_about(tmp_path, caplog):
    write_series(tmp_path / "ct", np.ones((3, 4, 4), np.int16))
    (tmp_path / "ct" / "notes.txt").write_text("scanned on a Tuesday")
    with caplog.at_level(logging.WARNING, logger="meddiff.dicom"):
        assert read_series(tmp_path / "ct").GetSize() == (4, 4, 3)
    assert "ignoring 1 non-DICOM file(s)" in caplog.text and "notes.txt" in caplog.text
    (tmp_path / "ct" / "empty.dcm").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.dcm is not a readable DICOM file \(empty file"):
        read_series(tmp_path / "ct")


# ---------------------------------------------------------------- 8. splits


@pytest.mark.parametrize("layout", ["msd", "pairs", "dicom"])
def test_unknown_split_is_refused(tmp_path, layout):
    for sub in ("imagesTr", "labelsTr", "images", "masks"):
        (tmp_path / sub).mkdir()
    with pytest.raises(DataError, match=r"split 'val' is not one the .* layout has: use train .* or test") as err:
        find_pairs(layout, dataset_dir=str(tmp_path), split="val")
    assert f"; {tmp_path} has " in str(err.value)


def test_msd_split_it_lacks_is_refused_not_read_from_another(tmp_path):
    """Generation used to read labelsTr/ for split "val": a split the dataset lacks is refused wherever it is read."""
    for sub in ("imagesTr", "labelsTr"):
        _msd(tmp_path, ["a.nii.gz"], sub)
    root = re.escape(str(tmp_path))
    held = rf"{root} has only the train split \(labelsTr/\)"
    for split in ("val", "validation", "Train"):
        unknown = rf"split '{split}' is not one the msd layout has: use train .*; {held}\.$"
        with pytest.raises(DataError, match=unknown):
            find_pairs("msd", dataset_dir=str(tmp_path), split=split)
        with pytest.raises(DataError, match=unknown):
            find_condition_masks(dataset_dir=str(tmp_path), split=split)
    absent = rf"split 'test' is absent from {root}: there is no labelsTs/, and {held}; choose a split it has"
    with pytest.raises(DataError, match=absent):
        find_pairs("msd", dataset_dir=str(tmp_path), split="test")
    with pytest.raises(DataError, match=absent):
        find_condition_masks(dataset_dir=str(tmp_path), split="test")
    # the splits the dataset has read as before
    train = find_pairs("msd", dataset_dir=str(tmp_path), split="train")
    assert train == find_pairs("msd", dataset_dir=str(tmp_path), split="training") and train[0]["name"] == "a"
    assert find_condition_masks(dataset_dir=str(tmp_path), split="training")[1] == [tmp_path / "labelsTr" / "a.nii.gz"]
    _msd(tmp_path, ["b.nii.gz"], "labelsTs")
    assert [p["name"] for p in find_pairs("msd", dataset_dir=str(tmp_path), split="testing")] == ["b"]
    assert find_condition_masks(dataset_dir=str(tmp_path), split="test")[1] == [tmp_path / "labelsTs" / "b.nii.gz"]
    with pytest.raises(DataError, match=r"has the train \(labelsTr/\) and test \(labelsTs/\) splits\.$"):
        find_condition_masks(dataset_dir=str(tmp_path), split="val")


def test_dicom_datalist_without_the_split_is_refused(tmp_path):
    (tmp_path / "case0" / "image").mkdir(parents=True)
    _nifti(tmp_path / "case0" / "label.nii.gz", np.ones((4, 4, 2), np.uint8))
    (tmp_path / "datalist.json").write_text('{"training": [{"image": "case0/image", "label": "case0/label.nii.gz"}]}')
    assert [p["name"] for p in find_pairs("dicom", dataset_dir=str(tmp_path), split="training")] == ["case0"]
    with pytest.raises(
        DataError,
        match=r"split 'test' is absent from .*datalist\.json: it has no 'testing' list, and .* has only the train "
        r'split \("training" in datalist\.json\)',
    ):
        find_pairs("dicom", dataset_dir=str(tmp_path), split="test")


# ---------------------------------------------------------------- 9. num_classes from the data


def _class_pngs(root: Path, masks: dict[str, int]) -> tuple[Path, Path]:
    for name, top in masks.items():
        mask = np.zeros((8, 8), np.uint8)
        mask[:, : top + 1] = np.arange(top + 1)
        _png(root / "img" / "train" / name, np.full((8, 8), 90, np.uint8))
        _png(root / "seg" / "all" / "train" / name, mask)
    return root / "img", root / "seg"


def test_num_classes_found_in_the_data(tmp_path, caplog):
    img_dir, seg_dir = _class_pngs(tmp_path, {"a.png": 2, "b.png": 6})
    slices = _load(img_dir=str(img_dir), seg_dir=str(seg_dir), num_classes=None)
    assert [s["label_file"] for s in slices] == [str(seg_dir / "all" / "train" / n) for n in ("a.png", "b.png")]
    with caplog.at_level(logging.INFO, logger="meddiff.data"):
        assert check_num_classes(slices, None) == 7
    assert "num_classes=7, found in the training labels (class values 0..6)" in caplog.text
    assert check_num_classes(slices, 9) == 9
    with pytest.raises(DataError) as err:
        check_num_classes(slices, 4)
    assert str(err.value) == (
        f"mask {seg_dir / 'all' / 'train' / 'b.png'} holds class values [4, 5, 6] outside 0..3: relabel it, or set "
        "num_classes to at least 7 (or leave --num_classes out to take it from the data)."
    )
    background_only = [{"label": np.zeros((1, 8, 8), np.int64), "label_file": "z.png"}]
    assert check_num_classes(background_only, None) == 2


def test_volume_slices_carry_their_label_file(phantom_dir):
    slices = _load(dataset_dir=str(phantom_dir), num_classes=None)
    assert {Path(s["label_file"]).parent.name for s in slices} == {"labelsTr"}
    assert check_num_classes(slices, None) >= 2
