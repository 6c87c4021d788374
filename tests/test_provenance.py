"""Tests for meddiff.provenance: the record, its checksum, and its round trips through PNG, NIfTI, NRRD/MHA, DICOM."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from dicom_helpers import write_series
from PIL import Image

from meddiff import __version__, provenance
from meddiff.data.errors import DataError
from meddiff.dicom import write_like, write_synthetic_series
from meddiff.errors import UserError
from meddiff.io import OutputExistsError, save_png
from meddiff.provenance import (
    NIFTI_ECODE,
    PNG_KEY,
    check_provenance,
    embed_nifti_provenance,
    make_provenance,
    provenance_json,
    provenance_summary,
    read_provenance,
    weights_sha256,
)


@pytest.fixture
def weights(tmp_path) -> Path:
    path = tmp_path / "model.pt"
    path.write_bytes(np.random.default_rng(0).bytes(3 * (1 << 20) + 17))  # more than one read block
    return path


@pytest.fixture
def record(weights) -> dict:
    settings = {
        "steps": np.int64(50),
        "guidance": np.float32(1.5),
        "img_size": (64, 64),
        "classes": np.array([1, 2]),
        "data": Path("/data/lidc"),
        "name": "Größe",  # non-ASCII: stored escaped
    }
    created = dt.datetime(2026, 1, 2, 3, 4, 5, 678, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    return make_provenance("lidc_ddpm", "0.3.1", weights=weights, settings=settings, seed=np.int64(7), created=created)


# ---------------------------------------------------------------- the record


def test_record_fields_and_checksum(record, weights):
    assert record["model"] == "lidc_ddpm" and record["model_version"] == "0.3.1"
    assert record["weights"] == "model.pt"  # the name only, no folder
    assert record["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert record["seed"] == 7 and type(record["seed"]) is int
    assert record["settings"] == {
        "steps": 50,
        "guidance": 1.5,
        "img_size": [64, 64],
        "classes": [1, 2],
        "data": "/data/lidc",
        "name": "Größe",
    }
    assert record["meddiff_version"] == __version__ and record["synthetic"] is True
    assert record["created_utc"] == "2026-01-02T01:04:05Z"
    assert check_provenance(record) == record
    bare = make_provenance("m", "1")
    assert bare["weights"] is None and bare["weights_sha256"] is None and bare["seed"] is None
    assert bare["created_utc"].endswith("Z") and bare["settings"] == {}


def test_record_is_json_stable(record):
    text = provenance_json(record)
    assert json.loads(text) == record
    assert provenance_json(json.loads(text)) == text
    assert text.isascii() and "\n" not in text and ": " not in text
    assert list(json.loads(text)) == sorted(record)


def test_checksum_is_cached_by_path_mtime_and_size(tmp_path, monkeypatch):
    path = tmp_path / "w.pt"
    path.write_bytes(b"first")
    assert weights_sha256(path) == hashlib.sha256(b"first").hexdigest()
    opened = []
    real_open = open
    monkeypatch.setattr(provenance, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k), raising=False)
    assert weights_sha256(path) == hashlib.sha256(b"first").hexdigest()
    assert opened == []  # cached: the file was not read again
    stat = path.stat()
    path.write_bytes(b"other")  # same size; a new mtime
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert weights_sha256(path) == hashlib.sha256(b"other").hexdigest() and len(opened) == 1


def test_record_refusals(tmp_path):
    with pytest.raises(UserError, match=r"missing\.pt does not exist"):
        make_provenance("m", "1", weights=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="setting 'bad'.*NaN"):
        make_provenance("m", "1", settings={"bad": float("nan")})
    with pytest.raises(ValueError, match="setting 'obj'"):
        make_provenance("m", "1", settings={"obj": object()})
    with pytest.raises(ValueError, match="seed"):
        make_provenance("m", "1", seed=1.5)
    with pytest.raises(ValueError, match="model must be"):
        make_provenance("", "1")
    with pytest.raises(ValueError, match="timezone-aware"):
        make_provenance("m", "1", created=dt.datetime(2026, 1, 1))
    with pytest.raises(ValueError, match="not a meddiff provenance record"):
        check_provenance({"steps": 50})
    broken = make_provenance("m", "1")
    broken["seed"] = "7"
    with pytest.raises(ValueError, match=r"wrong type: \['seed'\]"):
        provenance_json(broken)


def test_summary_names_model_version_weights_and_seed(record):
    summary = provenance_summary(record)
    assert summary.startswith("SYNTHETIC") and "lidc_ddpm" in summary and "0.3.1" in summary
    assert "model.pt" in summary and record["weights_sha256"] in summary and "seed 7" in summary


# ---------------------------------------------------------------- PNG


def test_png_round_trip(tmp_path, record):
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8)
    path = save_png(pixels, tmp_path / "a.png", provenance=record)
    assert read_provenance(path) == record
    with Image.open(path) as image:
        assert json.loads(image.text[PNG_KEY]) == record
        np.testing.assert_array_equal(np.asarray(image), pixels)
    assert read_provenance(save_png(pixels, tmp_path / "plain.png")) is None
    with pytest.raises(OutputExistsError):
        save_png(pixels, path, provenance=record)


# ---------------------------------------------------------------- NIfTI, NRRD, MetaImage


def _reference(shape=(3, 4, 5)) -> tuple[np.ndarray, sitk.Image]:
    array = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    reference = sitk.GetImageFromArray(array)
    reference.SetSpacing((0.7, 0.8, 2.5))
    reference.SetOrigin((-10.0, 5.0, 30.0))
    reference.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, -1))
    return array, reference


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_volume_round_trip(tmp_path, record, suffix):
    array, reference = _reference()
    plain = write_like(array, reference, tmp_path / f"plain{suffix}")
    path = write_like(array, reference, tmp_path / f"v{suffix}", provenance=record)
    assert read_provenance(path) == record
    assert read_provenance(plain) is None
    image, before = sitk.ReadImage(str(path)), sitk.ReadImage(str(plain))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), array)
    assert image.GetOrigin() == before.GetOrigin() and image.GetDirection() == before.GetDirection()
    assert image.GetSpacing() == before.GetSpacing()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model.pt", f"plain{suffix}", f"v{suffix}"])
    if suffix.startswith(".nii"):
        loaded = nib.load(path)  # the extension is a standard one: nibabel reads it
        (extension,) = loaded.header.extensions
        assert extension.get_code() == NIFTI_ECODE
        assert json.loads(extension.get_content().rstrip(b"\0")) == record
        np.testing.assert_array_equal(np.asarray(loaded.dataobj), np.asarray(nib.load(plain).dataobj))
        raw = Path(path).read_bytes() if suffix == ".nii" else None
        if raw is not None:
            assert struct.unpack_from("<f", raw, 108)[0] % 16 == 0  # vox_offset stays 16-byte aligned


def test_nifti_keeps_other_extensions_and_replaces_an_old_record(tmp_path, record):
    image = nib.Nifti1Image(np.arange(24, dtype=np.int16).reshape(2, 3, 4), np.eye(4))
    image.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"a comment of another tool"))
    path = tmp_path / "x.nii.gz"
    nib.save(image, path)
    embed_nifti_provenance(path, make_provenance("old", "0"))
    embed_nifti_provenance(path, record)
    loaded = nib.load(path)
    contents = [e.get_content().rstrip(b"\0") for e in loaded.header.extensions]
    assert contents[0] == b"a comment of another tool" and len(contents) == 2
    assert read_provenance(path) == record
    np.testing.assert_array_equal(np.asarray(loaded.dataobj), np.arange(24).reshape(2, 3, 4))


def test_nifti2_round_trip(tmp_path, record):
    data = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    path = tmp_path / "x.nii"
    nib.save(nib.Nifti2Image(data, np.diag([2.0, 3.0, 4.0, 1.0])), path)
    embed_nifti_provenance(path, record)
    assert read_provenance(path) == record
    loaded = nib.load(path)
    assert isinstance(loaded, nib.Nifti2Image) and len(loaded.header.extensions) == 1
    np.testing.assert_array_equal(np.asarray(loaded.dataobj), data)


# ---------------------------------------------------------------- DICOM, and files without a record


def test_dicom_round_trip(tmp_path, record):
    write_series(tmp_path / "mr", np.zeros((2, 4, 4), np.int16), modality="MR", intercept=0.0)
    slices = np.zeros((2, 4, 4), np.float32)
    files = write_synthetic_series(slices, tmp_path / "mr", tmp_path / "syn", provenance=record)
    assert [read_provenance(f) for f in files] == [record, record]
    assert read_provenance(sorted((tmp_path / "mr").iterdir())[0]) is None  # a DICOM file without a record


def test_read_provenance_refusals(tmp_path):
    with pytest.raises(DataError, match=r"nothing\.png does not exist"):
        read_provenance(tmp_path / "nothing.png")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match=r"cannot read provenance from .*notes\.txt"):
        read_provenance(tmp_path / "notes.txt")
    array, reference = _reference()
    good = write_like(array, reference, tmp_path / "v.nii.gz")
    (tmp_path / "cut.nii.gz").write_bytes(good.read_bytes()[:40])
    with pytest.raises(DataError, match=r"cut\.nii\.gz is not a readable NIfTI file"):
        read_provenance(tmp_path / "cut.nii.gz")
