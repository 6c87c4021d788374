"""Tests for meddiff.dicom and the Duke-Breast-Cancer-MRI converter (data_prep/duke_breast_mri.py)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import nrrd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_helpers import dcentvfy_errors, dciodvfy_errors, dciodvfy_report, load_data_prep, write_series

from meddiff.dicom import (
    DicomSeriesError,
    find_series,
    label_on_image_grid,
    read_series,
    read_volume,
    sorted_source_datasets,
    write_like,
    write_seg,
    write_synthetic_series,
)
from meddiff.errors import UserError
from meddiff.io import OutputExistsError
from meddiff.provenance import make_provenance, read_provenance

ROOT = Path(__file__).resolve().parents[1]
PYDICOM_FILES = Path(pydicom.data.__file__).parent / "test_files"
CT5N = PYDICOM_FILES / "dicomdirtests/98892001/CT5N"
MR2 = PYDICOM_FILES / "dicomdirtests/98892003/MR2"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


duke = load_data_prep("duke_breast_mri")


def _ramp(shape=(4, 8, 8)) -> np.ndarray:
    return np.arange(np.prod(shape), dtype=np.int16).reshape(shape) * 3


# ---------------------------------------------------------------- (a) reading real and synthetic series


@pytest.mark.skipif(not CT5N.is_dir(), reason="pydicom test files not installed")
def test_read_series_pydicom_ct5n(tmp_path):
    image = read_series(CT5N)
    assert image.GetSize() == (16, 16, 5)
    assert np.allclose(image.GetSpacing(), (0.488, 0.488, 2.5), atol=1e-3)
    assert image.GetPixelID() == sitk.sitkFloat32
    # a non-DICOM file beside the series is skipped silently
    copy = tmp_path / "ct"
    shutil.copytree(CT5N, copy)
    (copy / "label.nii.gz").write_bytes(b"not dicom at all")
    assert [len(f) for f in find_series(copy).values()] == [5]
    assert read_series(copy).GetSize() == (16, 16, 5)


@pytest.mark.skipif(not MR2.is_dir(), reason="pydicom test files not installed")
def test_read_series_several_series():
    with pytest.raises(DicomSeriesError, match="several series") as err:
        read_series(MR2)
    assert "FAST LOCALIZER" in str(err.value) and "series_uid" in str(err.value)
    uid = next(iter(find_series(MR2)))
    assert read_series(MR2, series_uid=uid).GetDimension() == 3


def test_read_series_errors(tmp_path):
    with pytest.raises(DicomSeriesError, match="No DICOM files"):
        read_series(tmp_path)
    with pytest.raises(DicomSeriesError, match="does not exist"):
        read_series(tmp_path / "missing")
    with pytest.raises(ValueError, match="unknown extension"):
        (tmp_path / "x.png").write_bytes(b"")
        read_volume(tmp_path / "x.png")


def test_read_series_rescale_order_and_read_volume(tmp_path):
    pixels = _ramp()
    write_series(tmp_path / "ct", pixels, intercept=-1024.0)
    image = read_volume(tmp_path / "ct")
    assert image.GetSize() == (8, 8, 4)
    assert np.allclose(image.GetSpacing(), (0.7, 0.8, 2.0))
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), pixels - 1024.0)
    positions = [float(ds.ImagePositionPatient[2]) for ds in sorted_source_datasets(tmp_path / "ct")]
    assert positions == sorted(positions)
    write_like(pixels, image, tmp_path / "v.nrrd")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_volume(tmp_path / "v.nrrd")), pixels)
    with pytest.raises(OutputExistsError):
        write_like(pixels, image, tmp_path / "v.nrrd")
    with pytest.raises(ValueError, match="shape"):
        write_like(pixels[:2], image, tmp_path / "w.nii.gz")


# ---------------------------------------------------------------- (b) DICOM SEG


def test_write_seg_round_trip(tmp_path):
    import highdicom as hd

    source = tmp_path / "ct"
    series_uid = write_series(source, _ramp())
    nodule = np.zeros((4, 8, 8), dtype=bool)
    nodule[1:3, 2:5, 3:6] = True
    other = np.zeros((4, 8, 8), dtype=np.uint8)
    other[3, 0, 0] = 1
    out = tmp_path / "seg" / "pred.dcm"
    write_seg(
        {"nodule": nodule, "spot": other},
        source,
        out,
        algorithm_name="meddiff-test",
        algorithm_version="0.1",
        series_description="test seg",
    )
    ds = pydicom.dcmread(out)
    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY" and ds.SeriesDescription == "test seg"
    assert len(ds.SegmentSequence) == 2
    assert ds.SegmentSequence[0].SegmentLabel == "nodule" and ds.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
    assert ds.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "meddiff-test"
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid

    seg = hd.seg.segread(out)
    sources = [d.SOPInstanceUID for d in sorted_source_datasets(source)]
    pixels = seg.get_pixels_by_source_instance(sources, segment_numbers=[1, 2])
    np.testing.assert_array_equal(pixels[..., 0].astype(bool), nodule)
    np.testing.assert_array_equal(pixels[..., 1].astype(bool), other.astype(bool))

    with pytest.raises(OutputExistsError):
        write_seg({"nodule": nodule}, source, out, algorithm_name="a", algorithm_version="1", series_description="s")
    with pytest.raises(ValueError, match="shape"):
        write_seg(
            {"x": nodule[:2]},
            source,
            tmp_path / "b.dcm",
            algorithm_name="a",
            algorithm_version="1",
            series_description="s",
        )


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_test_series_and_seg_pass_dciodvfy(tmp_path, modality):
    """The synthetic source series is a valid CT/MR series, and the SEG written for it conforms to the SEG IOD."""
    source = tmp_path / "source"
    write_series(source, _ramp(), modality=modality, intercept=-1024.0 if modality == "CT" else 0.0)
    for path in sorted(source.iterdir()):
        assert dciodvfy_errors(path) == [], path.name
    nodule = np.zeros((4, 8, 8), dtype=bool)
    nodule[1:3, 2:5, 3:6] = True
    out = tmp_path / "seg.dcm"
    write_seg(
        {"nodule": nodule, "empty": np.zeros_like(nodule)},  # an empty segment is legal
        source,
        out,
        algorithm_name="meddiff-test",
        algorithm_version="0.1",
        series_description="test seg",
    )
    errors, warnings = dciodvfy_report(out)
    assert errors == [] and warnings == []
    assert dcentvfy_errors([*sorted(source.iterdir()), out]) == []  # same patient, study, frame of reference


@pytest.mark.skipif(not CT5N.is_dir(), reason="pydicom test files not installed")
def test_seg_and_synthetic_series_of_a_real_ct_pass_dciodvfy(tmp_path):
    """A scanner's series (pydicom's CT5N, GE LightSpeed; itself lacking Laterality) as the source."""
    seg = write_seg(
        {"all": np.ones((5, 16, 16), bool)},
        CT5N,
        tmp_path / "seg.dcm",
        algorithm_name="meddiff-test",
        algorithm_version="0.1",
        series_description="test seg",
    )
    assert dciodvfy_errors(seg) == []
    record = make_provenance("lidc_ddpm", "0.3.1", settings={"steps": 50}, seed=3)
    slices = np.random.default_rng(0).uniform(-1, 1, (5, 16, 16)).astype(np.float32)
    files = write_synthetic_series(slices, CT5N, tmp_path / "syn", provenance=record, output_range=(-1000.0, 400.0))
    for path in files:
        assert dciodvfy_errors(path) == [], path.name
    assert pydicom.dcmread(files[0]).Laterality == ""  # unknown: the source names neither laterality nor body part
    assert dcentvfy_errors([*sorted(CT5N.iterdir()), *files]) == []


# ---------------------------------------------------------------- (b2) synthetic images as a DICOM series


def _record(seed: int = 7) -> dict:
    return make_provenance("duke_breast_ddpm", "1.2.0", settings={"steps": 50, "guidance": 1.5}, seed=seed)


def test_write_synthetic_series_mr(tmp_path):
    source = tmp_path / "mr"
    write_series(source, _ramp(), modality="MR", intercept=0.0, description="ax dyn pre")
    sources = sorted_source_datasets(source)
    record = _record()
    slices = np.linspace(-1.2, 1.2, 4 * 8 * 8, dtype=np.float32).reshape(4, 8, 8)  # ends clipped to (-1, 1)
    files = write_synthetic_series(slices, source, tmp_path / "syn", provenance=record)
    assert [f.name for f in files] == ["IM0001.dcm", "IM0002.dcm", "IM0003.dcm", "IM0004.dcm"]
    series_uids = set()
    for path, src in zip(files, sources, strict=True):
        errors, warnings = dciodvfy_report(path)
        assert errors == [], path.name
        assert all("Unrecognized tag" in w for w in warnings)  # only the private provenance element
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4" and ds.Modality == "MR"
        assert ds.SyntheticData == "YES" and ds.BurnedInAnnotation == "NO"
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.PatientID == src.PatientID
        assert ds.FrameOfReferenceUID == src.FrameOfReferenceUID
        assert ds.SeriesInstanceUID != src.SeriesInstanceUID and ds.SOPInstanceUID != src.SOPInstanceUID
        assert list(ds.ImagePositionPatient) == list(src.ImagePositionPatient)
        assert list(ds.PixelSpacing) == list(src.PixelSpacing)
        for text in (ds.DerivationDescription, ds.ImageComments):
            assert "SYNTHETIC" in text and "duke_breast_ddpm" in text and "1.2.0" in text and "seed 7" in text
        equipment = ds.ContributingEquipmentSequence[0]
        assert equipment.Manufacturer == "meddiff" and equipment.ManufacturerModelName == "duke_breast_ddpm"
        assert ds.Manufacturer == "meddiff" and "meddiff 0.1.0" in list(ds.SoftwareVersions)
        assert ds.ScanningSequence == "RM" and "RepetitionTime" in ds and "RescaleSlope" not in ds
        assert read_provenance(path) == record
        series_uids.add(ds.SeriesInstanceUID)
    assert len(series_uids) == 1
    assert dcentvfy_errors([*sorted(source.iterdir()), *files]) == []

    image, reference = read_series(tmp_path / "syn"), read_series(source)
    assert image.GetSize() == reference.GetSize()
    assert np.allclose(image.GetOrigin(), reference.GetOrigin()) and np.allclose(image.GetSpacing(), (0.7, 0.8, 2))
    expected = np.round((np.clip(slices.astype(np.float64), -1, 1) + 1) / 2 * 4095)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), expected)


def test_write_synthetic_series_ct_rescale_and_subset(tmp_path):
    source = tmp_path / "ct"
    write_series(source, _ramp())
    sources = sorted_source_datasets(source)
    slices = np.array([[[0, 255]], [[128, 64]]], dtype=np.uint8).repeat(8, axis=1).repeat(4, axis=2)  # (2, 8, 8)
    records = [_record(seed=1), _record(seed=2)]
    files = write_synthetic_series(
        slices, source, tmp_path / "syn", provenance=records, slice_indices=[3, 1], output_range=(-1000.0, 530.0)
    )
    first, second = (pydicom.dcmread(f) for f in files)
    for path in files:
        assert dciodvfy_errors(path) == [], path.name
    # instance numbers follow slice position: the slice drawn on source slice 1 comes first
    assert list(first.ImagePositionPatient) == list(sources[1].ImagePositionPatient) and first.InstanceNumber == 1
    assert list(second.ImagePositionPatient) == list(sources[3].ImagePositionPatient)
    assert first.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and first.RescaleType == "HU"
    np.testing.assert_allclose(
        first.pixel_array * float(first.RescaleSlope) + float(first.RescaleIntercept),
        (slices[1] / 255.0 * 1530.0 - 1000.0),
        atol=1e-3,
    )
    assert read_provenance(files[0])["seed"] == 2 and read_provenance(files[1])["seed"] == 1
    assert "Laterality" not in first  # the source's body part (CHEST) is unpaired


def test_write_synthetic_series_in_a_staged_output(tmp_path):
    """Inside a `StagedOutput`, the series folder is one target: staged with the run, moved into place at the end."""
    from meddiff.io import StagedOutput

    source = tmp_path / "mr"
    write_series(source, _ramp(), modality="MR", intercept=0.0)
    out = tmp_path / "out"
    target = out / "case_1" / "synthetic_dicom"
    with StagedOutput(out, [target], [source]) as stage:
        staged = stage.path(target)
        files = write_synthetic_series(np.zeros((4, 8, 8), np.float32), source, staged, provenance=_record())
        assert all(f.parent == staged for f in files) and not target.exists()
    assert sorted(p.name for p in target.iterdir()) == ["IM0001.dcm", "IM0002.dcm", "IM0003.dcm", "IM0004.dcm"]
    assert sorted(p.name for p in out.iterdir()) == ["case_1"]
    with pytest.raises(UserError, match="synthetic_dicom"):  # a second run is refused before any work
        StagedOutput(out, [target], [source])


def test_write_synthetic_series_refusals(tmp_path):
    source = tmp_path / "ct"
    write_series(source, _ramp())
    slices = np.zeros((4, 8, 8), np.float32)
    record = _record()
    write_synthetic_series(slices, source, tmp_path / "syn", provenance=record, output_range=(-1000, 400))
    with pytest.raises(OutputExistsError, match="syn already exists") as err:
        write_synthetic_series(slices, source, tmp_path / "syn", provenance=record, output_range=(-1000, 400))
    assert "\n" not in str(err.value) and "new folder" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct", "syn"]  # no staging folder left behind
    with pytest.raises(ValueError, match="output_range"):
        write_synthetic_series(slices, source, tmp_path / "a", provenance=record)
    with pytest.raises(ValueError, match="resample"):
        write_synthetic_series(slices[:, :4], source, tmp_path / "a", provenance=record, output_range=(0, 1))
    with pytest.raises(ValueError, match="slice_indices"):
        write_synthetic_series(slices[:2], source, tmp_path / "a", provenance=record, output_range=(0, 1))
    with pytest.raises(ValueError, match="distinct"):
        write_synthetic_series(
            slices[:2], source, tmp_path / "a", provenance=record, slice_indices=[1, 1], output_range=(0, 1)
        )
    with pytest.raises(ValueError, match="NaN"):
        write_synthetic_series(slices + np.nan, source, tmp_path / "a", provenance=record, output_range=(0, 1))
    with pytest.raises(ValueError, match="int16"):
        write_synthetic_series(slices.astype(np.int16), source, tmp_path / "a", provenance=record, output_range=(0, 1))
    with pytest.raises(ValueError, match="make_provenance"):
        write_synthetic_series(slices, source, tmp_path / "a", provenance={"seed": 1}, output_range=(0, 1))
    mr = tmp_path / "mr"
    write_series(mr, _ramp(), modality="MR", intercept=0.0)
    with pytest.raises(ValueError, match="no rescale"):
        write_synthetic_series(slices, mr, tmp_path / "a", provenance=record, output_range=(0, 1))
    assert not (tmp_path / "a").exists()


# ---------------------------------------------------------------- (c) labels on the image grid


def _grid_image(size=(8, 6, 4), spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0)) -> sitk.Image:
    image = sitk.Image(list(size), sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def test_label_on_image_grid_identity_resample_and_errors():
    image = _grid_image()
    array = np.random.default_rng(0).integers(0, 4, size=(4, 6, 8)).astype(np.uint8)
    label = sitk.GetImageFromArray(array)
    label.CopyInformation(image)
    assert label_on_image_grid(label, image, "same.nrrd") is label

    flipped = sitk.GetImageFromArray(np.ascontiguousarray(array[:, :, ::-1]))  # same voxels, x axis reversed
    flipped.SetSpacing(image.GetSpacing())
    flipped.SetOrigin((7.0, 0.0, 0.0))
    flipped.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label_on_image_grid(flipped, image, "f.nrrd")), array)

    far = sitk.GetImageFromArray(array)
    far.SetOrigin((500.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="far.seg.nrrd"):
        label_on_image_grid(far, image, "far.seg.nrrd")

    layers = np.zeros((4, 6, 8, 2), dtype=np.uint8)
    layers[0, 0, 0, 0] = 1
    layers[1, 1, 1, 1] = 1
    layers[2, 2, 2] = 1  # both layers: the first wins
    vector = sitk.GetImageFromArray(layers, isVector=True)
    vector.CopyInformation(image)
    merged = sitk.GetArrayFromImage(label_on_image_grid(vector, image, "v.seg.nrrd"))
    assert (merged[0, 0, 0], merged[1, 1, 1], merged[2, 2, 2], merged[3, 3, 3]) == (1, 2, 1, 0)


# ---------------------------------------------------------------- (d) Duke-Breast-Cancer-MRI converter


def _write_slicer_nrrd(path: Path, zyx_or_layers: np.ndarray, reference: sitk.Image, segments: list[tuple]) -> None:
    """Write a 3D Slicer-style .seg.nrrd (LPS, (x,y,z) index order); layered data is (layer, Z, Y, X)."""
    direction = np.asarray(reference.GetDirection()).reshape(3, 3) * np.asarray(reference.GetSpacing())
    header = {"space": "left-posterior-superior", "space origin": np.asarray(reference.GetOrigin())}
    if zyx_or_layers.ndim == 4:
        data = np.transpose(zyx_or_layers, (0, 3, 2, 1))
        header["kinds"] = ["list", "domain", "domain", "domain"]
        header["space directions"] = np.vstack([np.full(3, np.nan), direction.T])
    else:
        data = np.transpose(zyx_or_layers, (2, 1, 0))
        header["kinds"] = ["domain"] * 3
        header["space directions"] = direction.T
    for i, (name, value, layer) in enumerate(segments):
        header.update({f"Segment{i}_Name": name, f"Segment{i}_LabelValue": str(value), f"Segment{i}_Layer": str(layer)})
    path.parent.mkdir(parents=True, exist_ok=True)
    nrrd.write(str(path), data.astype(np.uint8), header)


@pytest.fixture
def fake_release(tmp_path):
    """Two segmented patients (pre + post series), one without segmentation; returns roots and expected labels."""
    dicom_root, seg_root = tmp_path / "Duke-Breast-Cancer-MRI", tmp_path / "segmentations"
    breast = np.zeros((4, 8, 8), np.uint8)
    breast[:, 1:7, 1:7] = 1
    expected = {}
    for k, case in enumerate(["Breast_MRI_001", "Breast_MRI_002", "Breast_MRI_003"]):
        study = dicom_root / case / f"01-01-1990-NA-BREASTROUTINE DYNAMICS-{k}"
        write_series(
            study / "3.000000-ax dyn pre-1234",
            _ramp(),
            modality="MR",
            description="ax dyn pre",
            patient_id=case,
            intercept=0.0,
        )
        write_series(
            study / "4.000000-ax dyn 1st pass-5678",
            _ramp() + 7,
            modality="MR",
            description="ax dyn 1st pass",
            patient_id=case,
            intercept=0.0,
        )
        if case == "Breast_MRI_003":
            continue
        reference = read_series(study / "3.000000-ax dyn pre-1234")
        seg_dir = seg_root / case
        _write_slicer_nrrd(seg_dir / f"Segmentation_{case}_Breast.seg.nrrd", breast, reference, [("Breast", 1, 0)])
        vessels, fgt = np.zeros_like(breast, dtype=bool), np.zeros_like(breast, dtype=bool)
        vessels[1, 2:4, 2:4] = True
        fgt[2, 3:6, 3:6] = True
        fgt[1, 3, 3] = True  # overlaps a vessel voxel: FGT wins
        if k == 0:  # one layer, segments listed Dense first with swapped values
            dv = np.where(fgt, 1, np.where(vessels, 2, 0))
            _write_slicer_nrrd(
                seg_dir / f"Segmentation_{case}_Dense_and_Vessels.seg.nrrd",
                dv,
                reference,
                [("Dense", 1, 0), ("Vessels", 2, 0)],
            )
        else:  # two layers
            layers = np.stack([vessels * 1, fgt * 1])
            _write_slicer_nrrd(
                seg_dir / f"Segmentation_{case}_Dense_and_Vessels.seg.nrrd",
                layers,
                reference,
                [("Vessels", 1, 0), ("Dense", 1, 1)],
            )
        label = breast.copy()
        label[vessels] = 2
        label[fgt] = 3
        expected[case] = label
    return dicom_root, seg_root, expected


def test_duke_converter(fake_release, tmp_path, caplog):
    dicom_root, seg_root, expected = fake_release
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        assert duke.main(["--dicom_root", str(dicom_root), "--seg_root", str(seg_root), "--out", str(out)]) == 0
    assert "Breast_MRI_003" in caplog.text
    datalist = json.loads((out / "datalist.json").read_text())
    assert datalist == {
        "training": [
            {"image": "Breast_MRI_001/image", "label": "Breast_MRI_001/label.nii.gz"},
            {"image": "Breast_MRI_002/image", "label": "Breast_MRI_002/label.nii.gz"},
        ]
    }
    for case, label in expected.items():
        image = read_series(out / case / "image")
        assert len(os.listdir(out / case / "image")) == 4
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), _ramp())  # the pre series, not the post
        written = read_volume(out / case / "label.nii.gz")
        assert np.allclose(written.GetOrigin(), image.GetOrigin()) and np.allclose(written.GetSpacing(), (0.7, 0.8, 2))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(written), label)
        assert set(np.unique(label)) == {0, 1, 2, 3}

    with pytest.raises(OutputExistsError, match="datalist.json"):
        duke.convert(dicom_root, seg_root, out)
    assert duke.main(["--dicom_root", str(dicom_root), "--seg_root", str(seg_root), "--out", str(out)]) == 2
    assert len(duke.convert(dicom_root, seg_root, out, overwrite=True)) == 2


def test_duke_converter_errors(fake_release, tmp_path):
    dicom_root, seg_root, _ = fake_release
    study = next((dicom_root / "Breast_MRI_002").iterdir())
    write_series(study / "5.000000-ax t1 pre-999", _ramp(), modality="MR", description="Ax T1 PRE", intercept=0.0)
    with pytest.raises(DicomSeriesError, match="Several series") as err:
        duke.convert(dicom_root, seg_root, tmp_path / "out")
    assert "Breast_MRI_002" in str(err.value)
    assert not (tmp_path / "out").exists()  # nothing written before the error
    with pytest.raises(DicomSeriesError, match="No series"):
        duke.convert(dicom_root, seg_root, tmp_path / "out", series_regex="^sag")
    empty_segs = tmp_path / "no_segs"
    empty_segs.mkdir()
    with pytest.raises(DicomSeriesError, match="Nothing to convert"):
        duke.convert(dicom_root, empty_segs, tmp_path / "out")


def test_dense_vessel_values_without_header():
    values = np.zeros((2, 3, 4), np.uint8)
    values[0, 0, 0], values[1, 1, 1] = 1, 2
    image = sitk.GetImageFromArray(values)
    dv = duke.dense_vessel_labels(image, "dv.nrrd", vessel_value=1, fgt_value=2)
    assert (dv[0, 0, 0], dv[1, 1, 1], dv.sum()) == (2, 3, 5)
    swapped = duke.dense_vessel_labels(image, "dv.nrrd", vessel_value=2, fgt_value=1)
    assert (swapped[0, 0, 0], swapped[1, 1, 1]) == (3, 2)
    values[0, 2, 2] = 5
    with pytest.raises(ValueError, match=r"values \[5\]"):
        duke.dense_vessel_labels(sitk.GetImageFromArray(values), "dv.nrrd")


def test_seg_carries_the_provenance_record_and_still_passes_dciodvfy(tmp_path):
    from meddiff.provenance import make_provenance, read_provenance

    source = tmp_path / "source"
    write_series(source, _ramp())
    nodule = np.zeros((4, 8, 8), dtype=bool)
    nodule[1:3, 2:5, 3:6] = True
    record = make_provenance("lidc_ambiguous_segmentation", "0.3.0", settings={"num_samples": 8}, seed=4)
    out = write_seg(
        {"nodule": nodule}, source, tmp_path / "seg.dcm", algorithm_name="a", algorithm_version="1",
        series_description="s", provenance=record,
    )  # fmt: skip
    assert read_provenance(out) == record
    errors, _ = dciodvfy_report(out)
    assert errors == []
