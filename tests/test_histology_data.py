"""NCT-CRC-HE data: layouts, stratified splits, label fractions, bad input, tile values, demo data, data_prep."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_data
from dicom_helpers import load_data_prep
from PIL import Image

from meddiff.data.errors import DataError
from meddiff.data.histology import (
    NCT_CLASSES,
    LoadHistologyTiled,
    check_same_classes,
    histology_datalist,
    make_synthetic_histology,
    parse_classes,
    read_tile,
    stratified_subset,
)
from meddiff.errors import OptionError, UserError
from meddiff.io import OutputExistsError

prep = load_data_prep("nct_crc_he")


def _tile(path: Path, width: int = 8, height: int = 8, mode: str = "RGB", value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    array = np.full((height, width, channels), value, dtype=np.uint8).squeeze()
    Image.fromarray(array, mode=mode).save(path)
    return path


def _class_folders(root: Path, counts: dict[str, int], suffix: str = ".tif") -> Path:
    for name, count in counts.items():
        for index in range(count):
            _tile(root / name / f"{name}-{index:02d}{suffix}", value=index)
    return root


def _names(items) -> list[str]:
    return [item["name"] for item in items]


# ---------------------------------------------------------------- layouts


def test_class_folders_give_sorted_classes_labels_and_names(tmp_path):
    root = _class_folders(tmp_path / "data", {"TUM": 2, "ADI": 2, "LYM": 2})
    (root / "notes.csv").write_text("ignored")
    datalist = histology_datalist(root)
    assert datalist["classes"] == ["ADI", "LYM", "TUM"]
    items = datalist["training"] + datalist["testing"]
    assert sorted(_names(items)) == [f"{c}-{i:02d}" for c in ("ADI", "LYM", "TUM") for i in range(2)]
    for item in items:
        assert set(item) == {"image", "label", "class_name", "name"}
        assert item["label"] == ["ADI", "LYM", "TUM"].index(item["class_name"])
        assert Path(item["image"]).is_absolute() and Path(item["image"]).parent.name == item["class_name"]
    # 2 tiles per class, 0.2 * 2 = 0.4 -> max(1, round) = 1 testing tile per class, one stays for training
    assert len(datalist["training"]) == 3 and len(datalist["testing"]) == 3
    assert sorted(it["class_name"] for it in datalist["testing"]) == ["ADI", "LYM", "TUM"]
    assert _names(datalist["training"]) == sorted(_names(datalist["training"]))


def test_any_class_folder_names_are_allowed_without_classes(tmp_path):
    root = _class_folders(tmp_path / "generated", {"b_class": 2, "a_class": 3}, ".png")
    (root / "generation.json").write_text("{}")
    datalist = histology_datalist(root)
    assert datalist["classes"] == ["a_class", "b_class"]
    assert {it["label"] for it in datalist["training"] if it["class_name"] == "b_class"} == {1}


def test_zenodo_parent_with_both_sets_trains_on_100k_and_tests_on_7k(tmp_path):
    root = make_synthetic_histology(tmp_path / "syn", classes=("ADI", "TUM"), per_class=3, size=16, test_per_class=2)
    datalist = histology_datalist(root, test_fraction=0.5)  # ignored: the sets give the split
    assert datalist["classes"] == ["ADI", "TUM"]
    assert _names(datalist["training"]) == [f"{c}-SYN{i:03d}" for c in ("ADI", "TUM") for i in range(3)]
    assert _names(datalist["testing"]) == [f"{c}-VAL{i:03d}" for c in ("ADI", "TUM") for i in range(2)]
    assert all("NCT-CRC-HE-100K" in it["image"] for it in datalist["training"])
    assert all("CRC-VAL-HE-7K" in it["image"] for it in datalist["testing"])
    assert [it["label"] for it in datalist["testing"]] == [0, 0, 1, 1]


def test_zenodo_parent_with_one_set_is_split_and_nonorm_is_a_training_set(tmp_path):
    root = tmp_path / "zenodo"
    _class_folders(root / "NCT-CRC-HE-100K-NONORM", {"ADI": 5, "DEB": 5})
    (root / "__MACOSX").mkdir()
    datalist = histology_datalist(root, test_fraction=0.4)
    assert datalist["classes"] == ["ADI", "DEB"]
    assert len(datalist["training"]) == 6 and len(datalist["testing"]) == 4  # round(0.4 * 5) = 2 per class
    _class_folders(root / "NCT-CRC-HE-100K", {"ADI": 1})
    with pytest.raises(DataError, match=r"holds 2 Zenodo training sets \(NCT-CRC-HE-100K, NCT-CRC-HE-100K-NONORM\)"):
        histology_datalist(root)


def test_flat_files_take_the_class_from_the_prefix_and_one_level_down_works(tmp_path):
    flat = tmp_path / "wrapper" / "tiles"
    for name in ("MUC-TCGA-B", "ADI-TCGA-A", "ADI-TCGA-C", "MUC-TCGA-A2"):
        _tile(flat / f"{name}.png")
    for given in (flat, flat.parent):
        datalist = histology_datalist(given, test_fraction=0.5)
        assert datalist["classes"] == ["ADI", "MUC"]
        items = datalist["training"] + datalist["testing"]
        assert {it["name"]: it["label"] for it in items} == {
            "ADI-TCGA-A": 0,
            "ADI-TCGA-C": 0,
            "MUC-TCGA-A2": 1,
            "MUC-TCGA-B": 1,
        }
        assert len(datalist["testing"]) == 2 and {it["class_name"] for it in datalist["testing"]} == {"ADI", "MUC"}


def test_the_shared_nct_sample_reads_as_eight_classes():
    sample = shared_data("nct_crc_he", "data")
    datalist = histology_datalist(sample)
    assert datalist["classes"] == ["ADI", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"]  # BACK absent
    assert len(datalist["training"]) == 24 and len(datalist["testing"]) == 8  # 4 per class: 1 testing each
    assert {it["name"]: it["label"] for it in datalist["testing"]}.keys() <= {
        Path(p).stem for p in (sample / "CRC-VAL-HE-7K-png").iterdir()
    }
    assert read_tile(datalist["testing"][0]["image"], 256).shape == (3, 256, 256)
    again = histology_datalist(sample / "CRC-VAL-HE-7K-png")
    assert again == datalist


def test_unlabelled_lists_every_tile_recursively_by_relative_name(tmp_path):
    root = tmp_path / "pretrain"
    for rel in ("a/x.png", "a/deep/y.tif", "b/x.jpg", "z.tiff", ".hidden/q.png", "a/readme.txt"):
        path = root / rel
        if rel.endswith(".txt"):
            path.write_text("no tile")
        else:
            _tile(path)
    datalist = histology_datalist(root, labelled=False, test_fraction=0.25)
    items = datalist["training"] + datalist["testing"]
    assert sorted(_names(items)) == ["a/deep/y", "a/x", "b/x", "z"]
    assert datalist["classes"] == [] and all(set(it) == {"image", "name"} for it in items)
    assert len(datalist["testing"]) == 1  # round(0.25 * 4) = 1
    with pytest.raises(OptionError, match="labelled data only"):
        histology_datalist(root, labelled=False, label_fraction=0.5)
    _tile(root / "a" / "x.tif")
    with pytest.raises(DataError, match=r"x.png and .*x.tif have the same name"):
        histology_datalist(root, labelled=False)


# ---------------------------------------------------------------- splits and label fractions


def _split_by_hand(names: list[str], group: str, fraction: float, seed: int) -> set[str]:
    import zlib

    n = len(names)
    count = min(max(1, math.floor(fraction * n + 0.5)), n - 1)
    order = np.random.default_rng([seed, zlib.crc32(group.encode()), 0]).permutation(n)
    return {sorted(names)[i] for i in order[:count]}


def test_the_split_is_stratified_seeded_and_keeps_a_training_tile_per_class(tmp_path):
    root = _class_folders(tmp_path / "data", {"ADI": 5, "DEB": 1, "LYM": 2, "TUM": 4})
    datalist = histology_datalist(root, test_fraction=0.3, split_seed=7)
    testing = {
        c: sorted(it["name"] for it in datalist["testing"] if it["class_name"] == c) for c in datalist["classes"]
    }
    # ADI: round(1.5) = 2; DEB: 1 tile -> 0; LYM: round(0.6) = 1 (clamped to n - 1 = 1); TUM: round(1.2) = 1
    assert {c: len(v) for c, v in testing.items()} == {"ADI": 2, "DEB": 0, "LYM": 1, "TUM": 1}
    for name, count in {"ADI": 5, "LYM": 2, "TUM": 4}.items():
        assert set(testing[name]) == _split_by_hand([f"{name}-{i:02d}" for i in range(count)], name, 0.3, 7)
    assert histology_datalist(root, test_fraction=0.3, split_seed=7) == datalist
    other = histology_datalist(root, test_fraction=0.3, split_seed=8)
    assert len(other["testing"]) == 4 and other["testing"] != datalist["testing"]
    adi = {it["name"] for it in other["testing"] if it["class_name"] == "ADI"}
    assert adi == _split_by_hand([f"ADI-{i:02d}" for i in range(5)], "ADI", 0.3, 8)
    # a class added leaves the others' split unchanged
    _class_folders(root, {"STR": 3})
    grown = histology_datalist(root, test_fraction=0.3, split_seed=7)
    assert [it for it in grown["testing"] if it["class_name"] == "ADI"] == [
        it for it in datalist["testing"] if it["class_name"] == "ADI"
    ]


def test_label_fraction_keeps_a_stratified_share_of_training_only(tmp_path):
    root = tmp_path / "zenodo"
    _class_folders(root / "NCT-CRC-HE-100K", {"ADI": 10, "TUM": 1})
    _class_folders(root / "CRC-VAL-HE-7K", {"ADI": 3, "TUM": 3}, ".png")
    (root / "CRC-VAL-HE-7K").rename(root / "CRC-VAL-HE-7K-png")
    for name in ("ADI", "TUM"):
        for path in (root / "CRC-VAL-HE-7K-png" / name).iterdir():
            path.rename(path.with_name("val-" + path.name))
    full = histology_datalist(root)
    quarter = histology_datalist(root, label_fraction=0.25, label_seed=3)
    counts = {c: sum(it["class_name"] == c for it in quarter["training"]) for c in ("ADI", "TUM")}
    assert counts == {"ADI": 3, "TUM": 1}  # round(2.5) = 3 (half up); at least 1
    assert quarter["testing"] == full["testing"] and len(quarter["testing"]) == 6
    assert {it["name"] for it in quarter["training"]} < {it["name"] for it in full["training"]}
    assert quarter == histology_datalist(root, label_fraction=0.25, label_seed=3)
    tenth = stratified_subset(full["training"], 0.1, seed=3)
    assert {it["name"] for it in tenth} <= {it["name"] for it in quarter["training"]}  # nested for one seed
    assert [it["class_name"] for it in tenth] == ["ADI", "TUM"]
    with pytest.raises(OptionError, match="--label_fraction must be > 0 and <= 1"):
        histology_datalist(root, label_fraction=0)


# ---------------------------------------------------------------- classes and bad input


def test_given_classes_refuse_unknown_folders_and_classes_without_tiles(tmp_path):
    root = _class_folders(tmp_path / "data", {"ADI": 2, "XYZ": 2})
    with pytest.raises(DataError) as err:
        histology_datalist(root, classes=["ADI", "TUM"])
    assert (
        str(err.value) == f"unknown class 'XYZ' (folder {root / 'XYZ'}): add it to --classes, or move the folder out."
    )
    (root / "XYZ").rename(tmp_path / "XYZ")
    with pytest.raises(DataError) as err:
        histology_datalist(root, classes="ADI,TUM")
    assert str(err.value) == (
        f"class 'TUM' of --classes has no training tiles (expected {root / 'TUM'}): add its tiles, or drop it from "
        "--classes."
    )
    _class_folders(root, {"TUM": 2})
    assert histology_datalist(root, classes=["TUM", "ADI"])["classes"] == ["ADI", "TUM"]


def test_flat_prefixes_must_be_nct_classes_or_given(tmp_path):
    root = tmp_path / "flat"
    _tile(root / "ADI-1.png")
    _tile(root / "FOO-2.png")
    with pytest.raises(DataError, match=r"FOO-2.png has the prefix 'FOO', not an NCT-CRC-HE class \(ADI, BACK,"):
        histology_datalist(root)
    with pytest.raises(DataError, match=r"unknown class 'FOO' \(file .*FOO-2.png\): add it to --classes"):
        histology_datalist(root, classes=["ADI"])
    assert histology_datalist(root, classes=["ADI", "FOO"], test_fraction=0.5)["classes"] == ["ADI", "FOO"]
    _tile(root / "nolabel.png")
    (root / "FOO-2.png").unlink()
    with pytest.raises(DataError, match=r"nolabel.png has no class prefix \(<CLASS>-<name>\)"):
        histology_datalist(root)


def test_bad_folders_are_refused_with_the_file_and_the_fix(tmp_path):
    with pytest.raises(DataError) as err:
        histology_datalist(tmp_path / "missing")
    assert str(err.value).startswith(f"dataset_dir {tmp_path / 'missing'} does not exist: pass the folder")
    root = _class_folders(tmp_path / "data", {"ADI": 2, "DEB": 2})
    (root / "LYM").mkdir()
    with pytest.raises(DataError) as err:
        histology_datalist(root)
    assert str(err.value) == f"class folder {root / 'LYM'} is empty: add its tiles, or remove the folder."
    (root / "LYM" / "labels.csv").write_text("x")
    with pytest.raises(DataError, match=r"class folder .*LYM holds no tiles \(.tif, .tiff, .png, .jpg, .jpeg\)"):
        histology_datalist(root)
    (root / "LYM" / "labels.csv").unlink()
    (root / "LYM").rmdir()
    _tile(root / "stray.png")
    with pytest.raises(DataError, match=r"holds both tiles \(stray.png\) and sub-folders \(ADI, DEB\)"):
        histology_datalist(root)
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    (empty / "b").mkdir()
    with pytest.raises(DataError, match="class folder .*a is empty"):
        histology_datalist(empty)
    with pytest.raises(DataError, match="holds no tiles"):
        histology_datalist(empty / "a")
    with pytest.raises(DataError, match="at any depth"):
        histology_datalist(empty, labelled=False)


def test_a_folder_above_the_tiles_is_refused_with_where_the_tiles_lie(tmp_path):
    # the team sample's root: Datafiles/CRC100K/test.csv beside data/CRC-VAL-HE-7K-png/<CLASS>-<name>.png
    root = tmp_path / "nct_crc_he"
    (root / "Datafiles" / "CRC100K").mkdir(parents=True)
    (root / "Datafiles" / "CRC100K" / "test.csv").write_text("x")
    flat = root / "data" / "CRC-VAL-HE-7K-png"
    flat.mkdir(parents=True)
    for name in ("ADI-1.png", "DEB-1.png"):
        _tile(flat / name)
    with pytest.raises(DataError) as err:
        histology_datalist(root)
    assert str(err.value).endswith(
        f"'Datafiles' is no NCT-CRC-HE class and tiles lie in {flat}: if those are your data, pass that folder as "
        "dataset_dir."
    )
    assert histology_datalist(flat)["classes"] == ["ADI", "DEB"]
    # a real class folder with tiles one level down keeps the plain fix: the hint is for folders that are no class
    nested = _class_folders(tmp_path / "nested", {"ADI": 2})
    (nested / "LYM" / "patient1").mkdir(parents=True)
    _tile(nested / "LYM" / "patient1" / "a.png")
    with pytest.raises(DataError) as err:
        histology_datalist(nested)
    assert str(err.value).endswith("add its tiles directly in it, or remove the folder.")


def test_bad_tiles_are_refused_with_the_file_and_the_fix(tmp_path):
    root = _class_folders(tmp_path / "data", {"ADI": 2, "DEB": 2})
    grey = _tile(root / "DEB" / "DEB-grey.png", mode="L")
    with pytest.raises(DataError) as err:
        histology_datalist(root)
    assert str(err.value) == (
        f"{grey} is a L image, not 8-bit RGB: convert it to 8-bit RGB (e.g. PIL's image.convert('RGB')), or remove it."
    )
    _tile(grey, mode="RGBA")
    with pytest.raises(DataError, match="is a RGBA image, not 8-bit RGB"):
        histology_datalist(root)
    Image.fromarray(np.zeros((8, 8), np.uint16)).save(grey)
    with pytest.raises(DataError, match=r"is a I;16\S* image, not 8-bit RGB"):
        histology_datalist(root)
    grey.write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"DEB-grey.png is not a readable PNG file \(.*\): replace or remove it."):
        histology_datalist(root)
    grey.write_bytes(b"")
    with pytest.raises(DataError, match=r"DEB-grey.png is not a readable PNG file \(empty file, 0 bytes\)"):
        histology_datalist(root)
    big = _tile(grey, width=10, height=6)
    with pytest.raises(DataError) as err:
        histology_datalist(root)
    assert str(err.value) == (
        f"tiles of 2 different sizes ({root / 'ADI' / 'ADI-00.tif'} is 8x8, {big} is 10x6): resize them to one size, "
        "or keep tiles of one size in the dataset folder."
    )
    big.unlink()
    _tile(root / "ADI" / "DEB-00.png")
    with pytest.raises(DataError, match=r"ADI/DEB-00.png and .*DEB/DEB-00.tif have the same name: keep one"):
        histology_datalist(root)


def test_a_tile_truncated_past_its_header_is_refused_by_the_check_before_any_work(tmp_path):
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for name in ("ADI-a", "ADI-b", "TUM-a", "TUM-b", "TUM-c"):
        path = root / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    for name in ("TUM-b", "TUM-c"):
        cut = root / f"{name}.png"
        cut.write_bytes(cut.read_bytes()[:200])  # the header (size, mode) intact, the pixels cut
        with Image.open(cut) as im:
            assert im.size == (32, 32) and im.mode == "RGB"
    with pytest.raises(DataError, match=r"TUM-b.png is not a readable PNG file \(.*\): replace or remove it.$"):
        histology_datalist(root, test_fraction=0.5)  # the first bad tile in name order, whichever thread decoded it


def test_check_same_classes_lists_both(tmp_path):
    check_same_classes(["ADI", "TUM"], ("ADI", "TUM"), "here", "fix it.")
    with pytest.raises(UserError) as err:
        check_same_classes(["ADI", "BACK", "TUM"], ["ADI", "TUM"], "classifier a.pt vs datalist b.json", "retrain.")
    assert str(err.value) == (
        "classifier a.pt vs datalist b.json: the class lists differ (missing BACK): expected ['ADI', 'BACK', 'TUM'] "
        "(3), found ['ADI', 'TUM'] (2): retrain."
    )
    with pytest.raises(DataError, match=r"same names in another order"):
        check_same_classes(["ADI", "TUM"], ["TUM", "ADI"], "w", "f")


def test_parse_classes():
    assert parse_classes(None) is None
    assert parse_classes("ADI, DEB") == ["ADI", "DEB"] == parse_classes('["ADI", "DEB"]')
    assert parse_classes(("TUM",)) == ["TUM"]
    for bad, message in ((["ADI", "ADI"], "more than once"), ([], "must list class names"), (["a/b"], "folder names")):
        with pytest.raises(OptionError, match=message):
            parse_classes(bad)


# ---------------------------------------------------------------- tile values


def test_read_tile_crops_and_resizes_by_hand(tmp_path):
    # a 4 x 2 (width x height) image: red = column * 40, green = row * 100, blue = 255
    rgb = np.zeros((2, 4, 3), np.uint8)
    rgb[..., 0] = np.array([0, 40, 80, 120])[None, :]
    rgb[..., 1] = np.array([0, 100])[:, None]
    rgb[..., 2] = 255
    path = tmp_path / "ADI-x.png"
    Image.fromarray(rgb).save(path)
    # shorter side already 2: no resampling, centre crop = columns 1, 2
    tile = read_tile(path, 2)
    assert tile.dtype == np.float32 and tile.shape == (3, 2, 2)
    np.testing.assert_allclose(tile[0], np.array([[40, 80], [40, 80]]) / 127.5 - 1, atol=1e-6)
    np.testing.assert_allclose(tile[1], np.array([[0, 0], [100, 100]]) / 127.5 - 1, atol=1e-6)
    np.testing.assert_allclose(tile[2], np.ones((2, 2)), atol=1e-6)
    # upscaled x2 to 8 x 4 (half-pixel bilinear: x_in = (x_out + 0.5) / 2 - 0.5, clamped), centre crop columns 2..5
    tile = read_tile(path, 4)
    # red along a row: columns 2..5 sample x_in = 0.75, 1.25, 1.75, 2.25 -> 30, 50, 70, 90
    np.testing.assert_allclose(tile[0], np.tile([30, 50, 70, 90], (4, 1)) / 127.5 - 1, atol=1e-5)
    # green down a column: rows sample y_in = 0 (clamped), 0.25, 0.75, 1 (clamped) -> 0, 25, 75, 100
    np.testing.assert_allclose(tile[1], np.tile([[0], [25], [75], [100]], (1, 4)) / 127.5 - 1, atol=1e-5)
    # the transform keeps the other keys and gives a tensor
    out = LoadHistologyTiled(keys="image", image_size=2)({"image": str(path), "label": 3, "name": "ADI-x"})
    assert isinstance(out["image"], torch.Tensor) and out["label"] == 3 and out["name"] == "ADI-x"
    np.testing.assert_allclose(out["image"].numpy(), read_tile(path, 2))
    with pytest.raises(DataError, match="not a tile path"):
        LoadHistologyTiled(image_size=2)({"image": np.zeros(3)})
    with pytest.raises(OptionError, match="--image_size must be >= 2"):
        LoadHistologyTiled(image_size=1)
    Image.fromarray(rgb[..., 0]).save(path)
    with pytest.raises(DataError, match="is a L image, not 8-bit RGB"):
        read_tile(path, 2)


# ---------------------------------------------------------------- demo data and data_prep


def test_synthetic_histology_is_deterministic_and_classes_differ(tmp_path):
    root = make_synthetic_histology(tmp_path / "a", per_class=6, size=32, seed=4, test_per_class=2)
    assert isinstance(root, str)
    names = sorted(p.name for p in (Path(root) / "NCT-CRC-HE-100K" / "LYM").iterdir())
    assert names == [f"LYM-SYN{i:03d}.tif" for i in range(6)]
    assert sorted(p.name for p in (Path(root) / "CRC-VAL-HE-7K" / "TUM").iterdir()) == [
        "TUM-VAL000.tif",
        "TUM-VAL001.tif",
    ]
    datalist = histology_datalist(root)
    assert datalist["classes"] == ["ADI", "DEB", "LYM", "TUM"]
    assert len(datalist["training"]) == 24 and len(datalist["testing"]) == 8
    # a nearest-mean-colour classifier separates the classes on the test tiles
    means = {
        c: np.mean(
            [read_tile(it["image"], 32).mean(axis=(1, 2)) for it in datalist["training"] if it["class_name"] == c], 0
        )
        for c in datalist["classes"]
    }
    for item in datalist["testing"]:
        colour = read_tile(item["image"], 32).mean(axis=(1, 2))
        assert min(means, key=lambda c: np.abs(means[c] - colour).sum()) == item["class_name"]
    again = make_synthetic_histology(tmp_path / "b", per_class=6, size=32, seed=4, test_per_class=2)
    for rel in ("NCT-CRC-HE-100K/ADI/ADI-SYN005.tif", "CRC-VAL-HE-7K/DEB/DEB-VAL001.tif"):
        assert (Path(root) / rel).read_bytes() == (Path(again) / rel).read_bytes()
    other = make_synthetic_histology(tmp_path / "c", per_class=6, size=32, seed=5, test_per_class=2)
    assert (Path(root) / "NCT-CRC-HE-100K/ADI/ADI-SYN005.tif").read_bytes() != (
        Path(other) / "NCT-CRC-HE-100K/ADI/ADI-SYN005.tif"
    ).read_bytes()
    assert make_synthetic_histology(tmp_path / "a", per_class=6, size=32, seed=4, test_per_class=2) == root
    with pytest.raises(OutputExistsError):
        make_synthetic_histology(tmp_path / "a", per_class=7, size=32, seed=4, test_per_class=2)
    with pytest.raises(OptionError, match="must be among ADI, BACK"):
        make_synthetic_histology(tmp_path / "d", classes=("ADI", "XYZ"))
    only_train = make_synthetic_histology(
        tmp_path / "e", classes=NCT_CLASSES[:2], per_class=2, size=16, test_per_class=0
    )
    assert not (Path(only_train) / "CRC-VAL-HE-7K").exists()
    assert len(histology_datalist(only_train)["testing"]) == 2  # split: 1 of 2 per class


def test_data_prep_writes_the_datalist_and_refuses_to_overwrite(tmp_path, capsys):
    data = make_synthetic_histology(tmp_path / "syn", classes=("ADI", "LYM"), per_class=4, size=16, test_per_class=0)
    out = tmp_path / "out"
    args = ["--dataset_dir", data, "--output_dir", str(out), "--label_fraction", "0.5", "--no_progress"]
    assert prep.main(args) == 0
    assert "wrote" in capsys.readouterr().out
    datalist = json.loads((out / "datalist.json").read_text())
    assert datalist == json.loads(json.dumps(histology_datalist(data, label_fraction=0.5)))
    assert Path(datalist["training"][0]["image"]).is_absolute()
    report = json.loads((out / "report.json").read_text())
    # 4 per class: round(0.8) = 1 testing; 3 training, round(1.5) = 2 kept
    assert report["counts"] == {"training": {"ADI": 2, "LYM": 2}, "testing": {"ADI": 1, "LYM": 1}}
    assert report["num_tiles"] == {"training": 4, "testing": 2} and report["tile_size"] == [16, 16]
    assert report["layout"] == "zenodo NCT-CRC-HE-100K/ (classes), split"
    assert report["options"]["label_fraction"] == 0.5 and report["classes"] == ["ADI", "LYM"]
    assert prep.main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert prep.main(args + ["--overwrite"]) == 0
    inside = Path(data) / "lists"
    assert prep.main(["--dataset_dir", data, "--output_dir", str(inside)]) == 2
    assert "is inside the input" in capsys.readouterr().err
    assert not inside.exists()
    bad = Path(data) / "NCT-CRC-HE-100K" / "ADI" / "ADI-SYN000.tif"
    bad.write_bytes(b"")
    fresh = tmp_path / "fresh"
    capsys.readouterr()
    assert prep.main(["--dataset_dir", data, "--output_dir", str(fresh)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "ADI-SYN000.tif is not a readable TIFF file (empty file" in err[-1]
    assert not fresh.exists()
    unlabelled = tmp_path / "pre"
    assert prep.main(["--dataset_dir", str(Path(data) / "NCT-CRC-HE-100K" / "LYM"), "--output_dir", str(unlabelled),
                      "--labelled", "false", "--no_progress"]) == 0  # fmt: skip
    report = json.loads((unlabelled / "report.json").read_text())
    assert report["counts"] == {"training": {"all": 3}, "testing": {"all": 1}} and report["classes"] == []
