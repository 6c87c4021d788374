"""MoNuSeg data: Aperio XML, rasterization rules, layouts and splits, patches, bad input, demo data, data_prep."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_data
from dicom_helpers import load_data_prep
from PIL import Image

from meddiff.data.errors import DataError
from meddiff.data.monuseg import (
    LoadNucleiPatchd,
    binary_mask,
    check_monuseg,
    make_synthetic_nuclei,
    monuseg_datalist,
    patch_boxes,
    rasterize,
    read_annotation,
    read_patch,
    read_tile,
)
from meddiff.errors import OptionError
from meddiff.io import OutputExistsError

prep = load_data_prep("monuseg")

SQUARE = [(1, 1), (4, 1), (4, 4), (1, 4)]


def _xml(path: Path, regions, negative: tuple = ()) -> Path:
    """An Aperio ImageScope XML with one <Region> per vertex list (Ids 1..K), as the release writes it."""
    lines = ['<Annotations MicronsPerPixel="0.252000">', '<Annotation Id="1">', "<Regions>"]
    for index, vertices in enumerate(regions, start=1):
        flag = "1" if index in negative else "0"
        lines.append(f'<Region Id="{index}" Type="0" NegativeROA="{flag}"><Attributes/><Vertices>')
        lines += [f'<Vertex X="{x}" Y="{y}"/>' for x, y in vertices]
        lines.append("</Vertices></Region>")
    lines += ["</Regions>", "<Plots/>", "</Annotation>", "</Annotations>"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def _tile(path: Path, height: int = 32, width: int = 32, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, format="TIFF")
    return path


def _nuclei(k: int = 3) -> list[list[tuple[float, float]]]:
    return [[(2 + 8 * i, 2), (6 + 8 * i, 2), (6 + 8 * i, 6), (2 + 8 * i, 6)] for i in range(k)]


def _training(root: Path, names=("b", "a"), size: int = 32, tiles: str = "Tissue_Images") -> Path:
    for seed, name in enumerate(names):
        _tile(root / tiles / f"{name}.tif", size, size, seed)
        _xml(root / "Annotations" / f"{name}.xml", _nuclei())
    (root / "Binary_masks").mkdir(exist_ok=True)
    return root


def _test(root: Path, names=("t1",), size: int = 32) -> Path:
    for seed, name in enumerate(names):
        _tile(root / f"{name}.tif", size, size, seed + 10)
        _xml(root / f"{name}.xml", _nuclei())
    return root


def _grid(shape, polygons) -> np.ndarray:
    return rasterize([np.asarray(p, float) for p in polygons], shape)


# ---------------------------------------------------------------- rasterization and XML


def test_square_polygon_fills_pixel_centres_inside_or_on_the_outline():
    inst = _grid((7, 7), [SQUARE])
    expected = np.zeros((7, 7), np.uint16)
    expected[1:5, 1:5] = 1
    assert inst.dtype == np.uint16 and np.array_equal(inst, expected)
    wide = _grid((6, 8), [[(2, 1), (5, 1), (5, 3), (2, 3)]])  # x = columns 2..5, y = rows 1..3
    assert np.argwhere(wide).min(0).tolist() == [1, 2] and np.argwhere(wide).max(0).tolist() == [3, 5]
    assert np.array_equal(binary_mask(inst), expected.astype(np.uint8) * 255)


def test_fractional_vertices_round_by_pixel_centres(tmp_path):
    inst = _grid((7, 7), [[(1.5, 1.5), (4.5, 1.5), (4.5, 4.5), (1.5, 4.5)]])
    assert np.argwhere(inst).min(0).tolist() == [2, 2] and np.argwhere(inst).max(0).tolist() == [4, 4]
    xml = _xml(tmp_path / "f.xml", [[(0.6, 0.6), (3.4, 0.6), (3.4, 2.4), (0.6, 2.4)]])
    polygons, problems = read_annotation(xml, (8, 8))
    assert problems == [] and polygons[0].dtype == np.float64 and polygons[0][1].tolist() == [3.4, 0.6]
    filled = rasterize(polygons, (8, 8))
    assert sorted(map(tuple, np.argwhere(filled))) == [(r, c) for r in (1, 2) for c in (1, 2, 3)]


def test_overlaps_go_to_the_later_region_and_hidden_regions_are_reported(tmp_path):
    first, second = [(0, 0), (4, 0), (4, 4), (0, 4)], [(3, 3), (6, 3), (6, 6), (3, 6)]
    inst = _grid((8, 8), [first, second])
    assert inst[3, 3] == 2 and inst[4, 4] == 2 and inst[2, 2] == 1 and inst[0, 4] == 1
    assert _grid((8, 8), [second, first])[3, 3] == 2  # order decides, not size
    inner = [(1, 1), (2, 1), (2, 2), (1, 2)]
    _tile(tmp_path / "t.tif", 16, 16)
    _xml(tmp_path / "t.xml", [inner, first, second])  # region 1 lies under region 2
    item = {"image": str(tmp_path / "t.tif"), "annotation": str(tmp_path / "t.xml"), "box": [0, 0, 16]}
    summary = check_monuseg([item])["t"]
    assert summary["regions"] == 3 and summary["empty"] == ["1"] and summary["size"] == [16, 16]
    assert set(np.unique(read_tile(item)[1]).tolist()) == {0, 2, 3}


def test_degenerate_regions_are_reported_with_their_ids_not_dropped_silently(tmp_path, caplog):
    regions = [SQUARE, [(1, 1), (3, 3)], [(1, 1), (2, 2), (3, 3)], [(5, 5), (7, 5), (7, 7)], SQUARE]
    xml = _xml(tmp_path / "d.xml", regions, negative=(5,))
    with caplog.at_level(logging.WARNING, logger="meddiff.data.monuseg"):
        polygons, problems = read_annotation(xml, (10, 10))
    assert len(polygons) == 2 and polygons[1][0].tolist() == [5.0, 5.0]
    assert [p["region"] for p in problems] == ["2", "3", "5"]
    assert "fewer than 3 vertices (2)" in problems[0]["reason"] and "zero area" in problems[1]["reason"]
    assert "NegativeROA" in problems[2]["reason"]
    assert sum("region 3 skipped" in r.getMessage() and str(xml) in r.getMessage() for r in caplog.records) == 1
    _tile(tmp_path / "d.tif", 10, 10)
    summary = check_monuseg([{"image": str(tmp_path / "d.tif"), "annotation": str(xml), "box": [0, 0, 8]}])
    assert summary["d"]["regions"] == 2 and summary["d"]["degenerate"] == problems


@pytest.mark.parametrize(
    "text, message",
    [
        ("<Annotations><Region>", "is not a readable Aperio XML file"),
        ("<Annotations><Annotation/></Annotations>", "has no <Region> element"),
        ('<Annotations><Region Id="7"><Vertex X="1" Y="1"/></Region></Annotations>', "no usable nucleus region"),
        ('<Annotations><Region Id="4"><Vertex X="a" Y="1"/></Region></Annotations>', "region 4 has a vertex"),
    ],
)
def test_bad_xml_is_refused_naming_the_file(tmp_path, text, message):
    xml = tmp_path / "bad.xml"
    xml.write_text(text)
    with pytest.raises(DataError, match=message) as err:
        read_annotation(xml, (32, 32))
    assert str(xml) in str(err.value) and len(str(err.value).splitlines()) == 1


def test_coordinates_outside_the_tile_are_refused_beyond_the_tolerance(tmp_path):
    near = _xml(tmp_path / "near.xml", [[(-3, 0), (34.5, 0), (34.5, 10)]])  # the release overshoots by up to 3 px
    assert len(read_annotation(near, (32, 32))[0]) == 1
    far = _xml(tmp_path / "far.xml", [SQUARE, [(10, 10), (60, 10), (60, 20)]])
    with pytest.raises(DataError, match=r"region 2 has a vertex at \(x=60, y=10\).*32x32 tile") as err:
        read_annotation(far, (32, 32))
    assert str(far) in str(err.value)


def test_unpaired_tiles_and_xml_are_refused(tmp_path):
    train = _training(tmp_path / "train", names=("a", "b", "c"))
    (train / "Annotations" / "b.xml").unlink()
    with pytest.raises(DataError, match=r"1 tile\(s\) in .*Tissue_Images have no Aperio XML .*\(b.tif\)"):
        monuseg_datalist(train)
    test = _test(tmp_path / "test", names=("x", "y"))
    (test / "y.tif").unlink()
    with pytest.raises(DataError, match=r"1 Aperio XML file\(s\) in .*test have no tile .*\(y.xml\)"):
        monuseg_datalist(test)
    with pytest.raises(DataError, match="holds .tif tiles but no Aperio .xml"):
        monuseg_datalist(_tile(tmp_path / "tiles" / "z.tif").parent)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no MoNuSeg data"):
        monuseg_datalist(tmp_path / "empty")


def test_small_tiles_bad_options_and_bad_boxes_are_refused(tmp_path):
    root = _test(tmp_path / "MoNuSegTestData", names=("p", "q"), size=32)
    with pytest.raises(
        DataError, match=r"p.tif is 32x32, smaller than --patch_size 64: lower --patch_size to at most 32"
    ):
        monuseg_datalist(root, patch_size=64)
    with pytest.raises(OptionError, match="--test_fraction"):
        monuseg_datalist(root, patch_size=16, test_fraction=1)
    item = dict(monuseg_datalist(root, patch_size=16)["training"][0], box=[20, 0, 16])
    with pytest.raises(DataError, match="lies outside its 32x32 image"):
        read_patch(item)
    (root / "q.xml").write_text("<Annotations><Region>")
    items = monuseg_datalist(root, patch_size=16)
    with pytest.raises(DataError, match=r"q.xml is not a readable Aperio XML file"):
        check_monuseg(items["training"] + items["testing"])


# ---------------------------------------------------------------- layouts, patches, splits


def test_patch_boxes_follow_the_seeds_valid_extraction():
    boxes = patch_boxes(1000, 1000, 128)
    assert len(boxes) == 64 and boxes[:8] == [(0, 0), (0, 128), (0, 256), (0, 384), (0, 512), (0, 640), (0, 768)] + [
        (128, 0)
    ]
    assert boxes[48] == (768, 768) and boxes[49] == (872, 0) and boxes[56] == (0, 872) and boxes[63] == (872, 872)
    assert patch_boxes(256, 256, 128) == [(0, 0), (0, 128), (128, 0), (128, 128)]
    assert patch_boxes(40, 70, 32) == [(0, 0), (0, 32), (8, 0), (8, 32), (0, 38), (8, 38)]


def test_training_test_and_parent_layouts(tmp_path):
    train = _training(tmp_path / "data" / "MoNuSeg 2018 Training Data", tiles="Tissue Images")
    test = _test(tmp_path / "data" / "MoNuSegTestData", names=("t1", "t2"))
    both = monuseg_datalist(tmp_path / "data", patch_size=16)
    assert [it["name"] for it in both["training"]] == [f"{s}_{i:03d}" for s in "ab" for i in range(4)]
    assert [it["name"] for it in both["testing"]] == [f"t{s}_{i:03d}" for s in "12" for i in range(4)]
    first = both["training"][1]
    assert first == {
        "name": "a_001",
        "slide": "a",
        "image": str(train / "Tissue Images" / "a.tif"),
        "annotation": str(train / "Annotations" / "a.xml"),
        "box": [0, 16, 16],
    }
    assert monuseg_datalist(tmp_path, patch_size=16) == both  # one level further down
    alone = monuseg_datalist(test, patch_size=16)
    assert {it["slide"] for it in alone["training"]} | {it["slide"] for it in alone["testing"]} == {"t1", "t2"}
    assert len(alone["training"]) == len(alone["testing"]) == 4
    named = tmp_path / "custom"
    _training(named / "first")
    _test(named / "second")
    by_kind = monuseg_datalist(named, patch_size=16)
    assert {it["slide"] for it in by_kind["training"]} == {"a", "b"} and by_kind["testing"][0]["slide"] == "t1"


def test_single_set_split_by_slide_and_single_slide_split_by_patch(tmp_path):
    train = _training(tmp_path / "MoNuSegTrainingData", names=tuple("abcdefghij"))
    split = monuseg_datalist(train, patch_size=16, test_fraction=0.2, split_seed=3)
    testing = {it["slide"] for it in split["testing"]}
    assert len(testing) == 2 and not testing & {it["slide"] for it in split["training"]}
    assert split == monuseg_datalist(train, patch_size=16, test_fraction=0.2, split_seed=3)
    assert len({it["slide"] for it in monuseg_datalist(train, 16, 0.99)["training"]}) == 1  # one slide kept
    one = _test(tmp_path / "one", names=("s",))
    single = monuseg_datalist(one, patch_size=16, test_fraction=0.5)
    assert len(single["training"]) == len(single["testing"]) == 2
    with pytest.raises(DataError, match="one patch of one slide"):
        monuseg_datalist(one, patch_size=32)


def test_ambiguous_and_leaking_sets_are_refused(tmp_path):
    _training(tmp_path / "x" / "first")
    _training(tmp_path / "x" / "second")
    with pytest.raises(DataError, match="cannot tell which of .* is the training set"):
        monuseg_datalist(tmp_path / "x", patch_size=16)
    _training(tmp_path / "y" / "train")
    _test(tmp_path / "y" / "test", names=("a",))
    with pytest.raises(DataError, match=r"1 slide\(s\) are in both .* \(a\)"):
        monuseg_datalist(tmp_path / "y", patch_size=16)


def test_patch_layout_items_and_read_patch_values(tmp_path):
    folder = tmp_path / "patches" / "MoNuSegTrainingData"
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 0, 255, 51
    inst = np.zeros((32, 32), np.uint16)
    inst[2:5, 2:5], inst[8:12, 8:12] = 300, 7
    for name in ("s1_000", "s1_001", "s2_000"):
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "inst_masks").mkdir(exist_ok=True)
        Image.fromarray(rgb).save(folder / "images" / f"{name}.png")
        Image.fromarray(inst).save(folder / "inst_masks" / f"{name}.tif")
    _test(tmp_path / "patches" / "MoNuSegTestData", names=("t",), size=32)
    items = monuseg_datalist(tmp_path / "patches", patch_size=32)
    assert [it["name"] for it in items["training"]] == ["s1_000", "s1_001", "s2_000"]
    assert items["training"][0] == {
        "name": "s1_000",
        "slide": "s1",
        "image": str(folder / "images" / "s1_000.png"),
        "label": str(folder / "inst_masks" / "s1_000.tif"),
        "box": [0, 0, 32],
    }
    image, labels = read_patch(items["training"][0])
    assert image.shape == (3, 32, 32) and image.dtype == np.float32 and labels.dtype == np.int32
    assert np.allclose(image[:, 0, 0], [-1.0, 1.0, 51 / 127.5 - 1])
    assert labels[3, 3] == 2 and labels[9, 9] == 1 and labels[0, 0] == 0 and labels.max() == 2  # 7 -> 1, 300 -> 2
    cut = monuseg_datalist(tmp_path / "patches", patch_size=16)["training"]
    assert [it["name"] for it in cut[:4]] == ["s1_000_000", "s1_000_001", "s1_000_002", "s1_000_003"]
    assert cut[0]["slide"] == "s1_000" and cut[3]["box"] == [16, 16, 16]
    out = LoadNucleiPatchd()(dict(items["training"][1], extra=5))
    assert out["image"].dtype == torch.float32 and tuple(out["image"].shape) == (3, 32, 32)
    assert out["label"].dtype == torch.int32 and tuple(out["label"].shape) == (1, 32, 32)
    assert out["extra"] == 5 and out["name"] == "s1_001" and out["box"] == [0, 0, 32]
    release = LoadNucleiPatchd()(items["testing"][0])
    assert "label" in release and release["annotation"].endswith("t.xml") and int(release["label"].max()) == 3
    Image.fromarray((inst > 0).astype(np.uint8) * 255).save(folder / "inst_masks" / "s2_000.tif")
    with pytest.raises(DataError, match=r"s2_000.tif is a 0/255 binary mask"):
        check_monuseg(items["training"])


def test_read_patch_crops_the_rasterized_tile(tmp_path):
    _tile(tmp_path / "t.tif", 32, 48)
    _xml(tmp_path / "t.xml", [[(20, 2), (23, 2), (23, 5), (20, 5)], [(40, 20), (44, 20), (44, 24), (40, 24)]])
    item = {"image": str(tmp_path / "t.tif"), "annotation": str(tmp_path / "t.xml"), "box": [16, 32, 16]}
    image, labels = read_patch(item)
    rgb = np.asarray(Image.open(tmp_path / "t.tif"))
    assert np.allclose(image, rgb[16:32, 32:48].transpose(2, 0, 1) / 127.5 - 1, atol=1e-6)
    assert np.array_equal(np.argwhere(labels == 1).min(0), [4, 8]) and labels.max() == 1  # region 2 -> id 1
    first, _ = read_patch(dict(item, box=[0, 16, 16]))
    assert first.shape == (3, 16, 16)
    _xml(tmp_path / "t.xml", [SQUARE])  # a changed file is read again, not served from the cache
    assert read_patch(item)[1].max() == 0 and read_tile(item)[1].max() == 1


# ---------------------------------------------------------------- real sample data


def test_real_sample_tiles_counts_and_patches():
    root = shared_data("monuseg", "datasets")
    counts = {"B0-5710": 359, "HT-8564": 249, "HC-7209": 325, "ZF-A9R5": 475, "69-7764": 441}
    datalist = monuseg_datalist(root)
    assert len(datalist["training"]) == 64 and len(datalist["testing"]) == 4 * 64  # 49 grid + 15 edge patches
    assert datalist["training"][63]["box"] == [872, 872, 128]
    tiles = sorted({(it["image"], it["annotation"]) for split in datalist.values() for it in split})
    for _, xml in tiles:
        polygons, problems = read_annotation(xml, (1000, 1000))
        key = next(k for k in counts if k in Path(xml).name)
        assert len(polygons) + len(problems) == counts[key] and problems == []
    train = datalist["training"]
    rgb, inst = read_tile(train[0])
    assert rgb.shape == (1000, 1000, 3) and inst.dtype == np.uint16 and int(inst.max()) == 359
    theirs = np.asarray(Image.open(root / "MoNuSegTrainingData" / "Binary_masks" / "TCGA-B0-5710-01Z-00-DX1.png")) > 0
    ours = inst > 0
    assert (ours & theirs).sum() / (ours | theirs).sum() > 0.85  # their masks are slightly thinner (SOURCE.md)
    image, labels = read_patch(train[27])
    assert labels.max() == len(np.unique(inst[384:512, 768:896])) - 1


# ---------------------------------------------------------------- demo data and data_prep


def test_synthetic_nuclei_read_back_as_drawn_and_are_deterministic(tmp_path):
    root = make_synthetic_nuclei(tmp_path / "a", num_train=2, num_test=1, size=128, seed=5)
    datalist = monuseg_datalist(root, patch_size=64)
    assert len(datalist["training"]) == 8 and len(datalist["testing"]) == 4
    summary = check_monuseg(datalist["training"] + datalist["testing"])
    assert set(summary) == {"synthetic-train-000", "synthetic-train-001", "synthetic-test-000"}
    for info in summary.values():
        assert info["regions"] >= 15 and info["degenerate"] == []
    for item in (datalist["training"][0], datalist["testing"][0]):
        rgb, inst = read_tile(item)
        dark = rgb.astype(float).mean(axis=2) < 0.6 * 255
        ours = inst > 0
        assert 0.08 < ours.mean() < 0.35 and (dark & ours).sum() / (dark | ours).sum() > 0.8
        assert rgb[..., 0][~ours].mean() > rgb[..., 1][~ours].mean() + 20  # pink stroma: red over green
        assert rgb[..., 2][ours].mean() > rgb[..., 1][ours].mean() + 20  # purple nuclei: blue over green
    polygons, _ = read_annotation(Path(datalist["testing"][0]["annotation"]), (128, 128))
    assert any((p != np.round(p)).any() for p in polygons)  # fractional outlines
    again = make_synthetic_nuclei(tmp_path / "b", num_train=2, num_test=1, size=128, seed=5)
    for name in ("MoNuSegTestData/synthetic-test-000.tif", "MoNuSegTrainingData/Annotations/synthetic-train-001.xml"):
        assert (root / name).read_bytes() == (again / name).read_bytes()
    assert make_synthetic_nuclei(root, num_train=2, num_test=1, size=128, seed=5) == root
    with pytest.raises(OutputExistsError):
        make_synthetic_nuclei(root, num_train=3, num_test=1, size=128, seed=5)


def test_data_prep_writes_the_seed_layout_and_refuses_to_overwrite(tmp_path, capsys):
    data = make_synthetic_nuclei(tmp_path / "syn", num_train=2, num_test=1, size=96, seed=1)
    out = tmp_path / "out"
    args = ["--dataset_dir", str(data), "--output_dir", str(out), "--patch_size", "64", "--no_progress"]
    assert prep.main(args) == 0
    patches = out / "patches_valid_inst_64x64_64x64"
    names = sorted(p.name for p in (patches / "MoNuSegTrainingData" / "images").iterdir())
    assert names == [f"synthetic-train-00{t}_00{i}.png" for t in "01" for i in range(4)]
    inst = np.asarray(Image.open(patches / "MoNuSegTestData" / "inst_masks" / "synthetic-test-000_003.tif"))
    whole = np.asarray(Image.open(out / "MoNuSegTestData" / "inst_masks" / "synthetic-test-000.tif"))
    assert inst.dtype == np.uint16 and whole.shape == (96, 96) and np.array_equal(inst, whole[32:96, 32:96])
    binary = np.asarray(Image.open(out / "MoNuSegTrainingData" / "bin_masks" / "synthetic-train-000.png"))
    assert set(np.unique(binary).tolist()) == {0, 255}
    datalist = json.loads((out / "datalist.json").read_text())
    assert datalist == json.loads(json.dumps(monuseg_datalist(patches, patch_size=64)))
    report = json.loads((out / "report.json").read_text())
    assert report["num_patches"] == {"training": 8, "testing": 4} and report["tiles"]["synthetic-test-000"]["patches"]
    original = monuseg_datalist(data, patch_size=64)["testing"][3]
    assert np.array_equal(read_patch(original)[1], read_patch(datalist["testing"][3])[1])
    assert np.allclose(read_patch(original)[0], read_patch(datalist["testing"][3])[0])
    capsys.readouterr()
    assert prep.main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert prep.main(args + ["--overwrite"]) == 0
    (data / "MoNuSegTestData" / "synthetic-test-000.xml").write_text("<Annotations>")
    capsys.readouterr()
    fresh = tmp_path / "fresh"
    assert prep.main(["--dataset_dir", str(data), "--output_dir", str(fresh), "--patch_size", "64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "synthetic-test-000.xml is not a readable Aperio XML" in err[-1]
    assert not fresh.exists()
