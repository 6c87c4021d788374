"""Polyp data: the Kvasir-SEG / HyperKvasir layouts, pair checks, the seed's crop geometry, demo data, the datalist."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from dicom_helpers import load_data_prep
from PIL import Image

from meddiff.data.errors import DataError
from meddiff.data.polyp import (
    LoadPolypPaird,
    check_enough_pairs,
    check_polyp_pairs,
    find_polyp_pairs,
    make_synthetic_polyps,
    polyp_datalist,
    read_pair,
    split_pairs,
)
from meddiff.errors import OptionError
from meddiff.io import OutputExistsError

REAL_KVASIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "kvasir_seg"

prep = load_data_prep("hyperkvasir")


def _mask(height: int = 32, width: int = 40) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : 3 * height // 4, width // 3 : 2 * width // 3] = 255
    return mask


def _write_pair(root: Path, name: str, image_folder: str = "images", mask: np.ndarray | None = None, **kw) -> None:
    """One pair: a random RGB image and an RGB 0/255 mask of its size (JPEG unless the names say otherwise)."""
    mask = _mask() if mask is None else mask
    image = np.random.default_rng(len(name)).integers(0, 256, (*mask.shape, 3), dtype=np.uint8)
    (root / image_folder).mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / image_folder / kw.get("image_name", f"{name}.jpg"))
    Image.fromarray(np.repeat(mask[..., None], 3, axis=2)).save(root / "masks" / kw.get("mask_name", f"{name}.png"))


def _kvasir(root: Path, names=("b", "a", "c")) -> Path:
    for name in names:
        _write_pair(root, name)
    (root / "kavsir_bboxes.json").write_text("{}")
    return root


def test_kvasir_layout_sorted_absolute_and_one_level_down(tmp_path):
    root = _kvasir(tmp_path / "Kvasir-SEG")
    pairs = find_polyp_pairs(root)
    assert [p["name"] for p in pairs] == ["a", "b", "c"]
    assert pairs[0] == {"name": "a", "image": str(root / "images" / "a.jpg"), "label": str(root / "masks" / "a.png")}
    assert all(Path(p["image"]).is_absolute() and Path(p["label"]).is_absolute() for p in pairs)
    assert find_polyp_pairs(tmp_path) == pairs  # the official zip's extra folder level


def test_hyperkvasir_layouts_extensions_and_hidden_files(tmp_path):
    seg = tmp_path / "hyper" / "segmented-images"
    _write_pair(seg, "x", "masked-images", image_name="x.JPG", mask_name="x.jpeg")
    _write_pair(seg, "y", "masked-images", image_name="y.png", mask_name="y.jpg")
    (seg / "bounding-boxes.json").write_text("{}")
    (seg / "masked-images" / "._x.JPG").write_bytes(b"\0\5")  # macOS metadata, skipped
    (seg / "masks" / "notes.txt").write_text("not an image")
    pairs = find_polyp_pairs(seg)
    assert [(Path(p["image"]).name, Path(p["label"]).name) for p in pairs] == [("x.JPG", "x.jpeg"), ("y.png", "y.jpg")]
    assert find_polyp_pairs(tmp_path / "hyper") == pairs
    check_polyp_pairs(pairs)
    # images/ (HyperKvasir's own name) works too, and is read when masked-images/ is there as well
    both = tmp_path / "both"
    _write_pair(both, "z", "images")
    (both / "masked-images").mkdir()
    Image.fromarray(_mask()).save(both / "masked-images" / "w.jpg")
    assert [p["name"] for p in find_polyp_pairs(both)] == ["z"]


def test_layout_errors_name_the_folder_and_what_is_expected(tmp_path):
    with pytest.raises(DataError, match="missing.*does not exist"):
        find_polyp_pairs(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty holds no polyp dataset.*masked-images/.*masks/"):
        find_polyp_pairs(tmp_path / "empty")
    (tmp_path / "only_masks" / "masks").mkdir(parents=True)
    with pytest.raises(DataError, match="only_masks/masks has no images/"):
        find_polyp_pairs(tmp_path / "only_masks")
    _kvasir(tmp_path / "two" / "Kvasir-SEG")
    _kvasir(tmp_path / "two" / "segmented-images")
    with pytest.raises(DataError, match="several polyp datasets.*Kvasir-SEG, segmented-images"):
        find_polyp_pairs(tmp_path / "two")
    (tmp_path / "nofiles" / "images").mkdir(parents=True)
    (tmp_path / "nofiles" / "masks").mkdir()
    with pytest.raises(DataError, match="hold no .jpg"):
        find_polyp_pairs(tmp_path / "nofiles")


def test_unpaired_files_are_named_and_counted(tmp_path):
    root = _kvasir(tmp_path / "d", names=("a", "b", "c", "d", "e", "f"))
    for name in ("c", "d", "e", "f"):
        (root / "masks" / f"{name}.png").unlink()
    with pytest.raises(DataError, match=r"4 image\(s\) in .*have no mask.*c.jpg, d.jpg, e.jpg \(\+1 more\).*add"):
        find_polyp_pairs(root)
    root = _kvasir(tmp_path / "e", names=("a", "b"))
    (root / "images" / "b.jpg").unlink()
    with pytest.raises(DataError, match=r"1 mask\(s\) in .*have no image .*\(b.png\).*remove the unpaired"):
        find_polyp_pairs(root)
    root = _kvasir(tmp_path / "f", names=("a",))
    Image.fromarray(_mask()).save(root / "masks" / "a.jpg")
    with pytest.raises(DataError, match="a.jpg and .*a.png have the same name"):
        find_polyp_pairs(root)


def test_unreadable_files_are_named(tmp_path):
    root = _kvasir(tmp_path / "d", names=("a", "b", "c", "d"))
    (root / "images" / "b.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="b.jpg is not a readable JPEG file.*empty"):
        find_polyp_pairs(root)
    data = (root / "images" / "a.jpg").read_bytes()
    (root / "images" / "b.jpg").write_bytes(data[: len(data) // 2])
    (root / "masks" / "c.png").write_bytes(b"not a png at all")
    pairs = find_polyp_pairs(root)
    with pytest.raises(DataError, match=r"b.jpg is not a readable JPEG.* 1 other pair\(s\) fail too: c.jpg"):
        check_polyp_pairs(pairs)
    with pytest.raises(DataError, match="c.png is not a readable PNG"):
        read_pair(pairs[2]["image"], pairs[2]["label"], 16)


def _bad_mask_case(tmp_path: Path, name: str, mask: np.ndarray) -> dict:
    root = _kvasir(tmp_path / name, names=("good",))
    _write_pair(root, name, mask=mask)
    return next(p for p in find_polyp_pairs(root) if p["name"] == name)


def test_mask_problems_name_the_file_and_fix(tmp_path):
    wrong_size = _bad_mask_case(tmp_path, "small", _mask(16, 20))
    Image.fromarray(np.zeros((32, 40, 3), np.uint8)).save(wrong_size["image"])
    grey = _mask()
    grey[:8] = 128  # a quarter of the pixels mid-grey
    empty = _mask()
    empty[:] = 6  # JPEG-like noise only
    outside = np.zeros((32, 40), np.uint8)
    outside[10:20, :3] = 255  # left of the centre 32x32 square (columns 4..35)
    cases = {
        "small": (wrong_size, "mask .*small.png is 20x16 but its image .*small.jpg is 40x32"),
        "grey": (_bad_mask_case(tmp_path, "grey", grey), "mask .*grey.png is not binary.*give 0/255 masks"),
        "empty": (_bad_mask_case(tmp_path, "empty", empty), "mask .*empty.png has values 0..6.*remove this pair"),
        "black": (_bad_mask_case(tmp_path, "black", 0 * empty), "mask .*black.png is empty.*remove this pair"),
        "zero_one": (_bad_mask_case(tmp_path, "zero_one", _mask() // 255), "zero_one.png has values 0..1.*as 0/255"),
        "outside": (_bad_mask_case(tmp_path, "outside", outside), "mask .*outside.png marks a polyp only outside"),
    }
    for item, message in cases.values():
        with pytest.raises(DataError, match=message):
            check_polyp_pairs([item])
        with pytest.raises(DataError, match=message):
            read_pair(item["image"], item["label"], 16)
    # JPEG ringing (values near 0 and 255) is fine; so is a little grey at the edges
    ringing = _mask()
    ringing[ringing == 0] = 8
    ringing[ringing == 255] = 247
    ringing[0, :5] = 100
    item = _bad_mask_case(tmp_path, "ringing", ringing)
    check_polyp_pairs([item])
    assert read_pair(item["image"], item["label"], 16)[1].sum() > 0


def test_wildly_different_sizes_name_smallest_and_largest(tmp_path):
    root = tmp_path / "d"
    _write_pair(root, "tiny", mask=_mask(20, 20))
    _write_pair(root, "mid", mask=_mask(60, 60))
    _write_pair(root, "huge", mask=_mask(90, 100))
    pairs = find_polyp_pairs(root)
    with pytest.raises(DataError, match=r"tiny.jpg is 20x20 and .*huge.jpg is 100x90.*22.5.*resize or remove"):
        check_polyp_pairs(pairs)
    check_polyp_pairs(pairs, max_size_ratio=5.0)


def test_enough_pairs_for_the_clusters(tmp_path):
    pairs = find_polyp_pairs(_kvasir(tmp_path / "tiny_set"))
    check_enough_pairs(pairs, 3, tmp_path / "tiny_set")
    with pytest.raises(DataError, match=r"tiny_set gives 3 .*--num_clusters 4: lower --num_clusters to at most 3"):
        check_enough_pairs(pairs, 4, tmp_path / "tiny_set")


def test_read_pair_geometry_is_the_seeds_centre_crop(tmp_path):
    # 64x32 with four 16-column stripes red, green, blue, white; S=16: one BOX halving to 32x16 (short side 32 >=
    # 2*16), no resize, then the centre 16 columns of the 32: green on the left half, blue on the right
    image = np.zeros((32, 64, 3), np.uint8)
    for stripe, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]):
        image[:, 16 * stripe : 16 * (stripe + 1)] = colour
    mask = np.zeros((32, 64), np.uint8)
    mask[:, 16:32] = 255  # the green stripe
    Image.fromarray(image).save(tmp_path / "img.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    rgb, label = read_pair(tmp_path / "img.png", tmp_path / "mask.png", 16)
    assert rgb.shape == (3, 16, 16) and rgb.dtype == np.float32 and label.shape == (1, 16, 16)
    np.testing.assert_array_equal(rgb[:, :, :8], np.array([-1.0, 1.0, -1.0])[:, None, None] * np.ones((3, 16, 8)))
    np.testing.assert_array_equal(rgb[:, :, 8:], np.array([-1.0, -1.0, 1.0])[:, None, None] * np.ones((3, 16, 8)))
    np.testing.assert_array_equal(label[0], np.repeat([[1.0] * 8 + [0.0] * 8], 16, axis=0))
    # a portrait image keeps its centre rows; a size needing the bicubic resize stays in range
    portrait = np.zeros((40, 20, 3), np.uint8)
    portrait[10:30] = 255
    Image.fromarray(portrait).save(tmp_path / "tall.png")
    Image.fromarray(np.full((40, 20), 255, np.uint8)).save(tmp_path / "tall_mask.png")
    rgb, label = read_pair(tmp_path / "tall.png", tmp_path / "tall_mask.png", 20)
    np.testing.assert_array_equal(rgb, np.ones((3, 20, 20), np.float32))
    rgb, label = read_pair(tmp_path / "tall.png", tmp_path / "tall_mask.png", 13)
    assert rgb.shape == (3, 13, 13) and -1 <= rgb.min() and rgb.max() <= 1 and (label == 1).all()


def test_load_transform_joint_tensor(tmp_path):
    root = _kvasir(tmp_path / "d")
    item = find_polyp_pairs(root)[0]
    out = LoadPolypPaird(img_size=16)(item)
    assert set(out) == {"name", "image", "image_file"} and out["name"] == "a" and out["image_file"] == item["image"]
    assert isinstance(out["image"], torch.Tensor) and out["image"].shape == (4, 16, 16)
    assert out["image"].dtype == torch.float32 and set(out["image"][3].unique().tolist()) == {-1.0, 1.0}
    kept = LoadPolypPaird(img_size=16, keep_label=True)(item)
    assert kept["label"].shape == (1, 16, 16) and torch.equal(kept["label"][0] * 2 - 1, kept["image"][3])
    assert item["image"].endswith(".jpg")  # the input item is left as it was


@pytest.mark.skipif(not REAL_KVASIR.is_dir(), reason="../shared/data/kvasir_seg is absent")
def test_real_kvasir_sample():
    pairs = find_polyp_pairs(REAL_KVASIR)  # holds Kvasir-SEG/ one level down
    assert len(pairs) == 40 and pairs == find_polyp_pairs(REAL_KVASIR / "Kvasir-SEG")
    assert pairs[0]["name"] == "cju0qkwl35piu0993l0dewei2"
    check_polyp_pairs(pairs)
    for item in pairs[::13]:
        raw = np.asarray(Image.open(item["label"]))[..., 0]
        assert ((raw > 32) & (raw < 223)).mean() < 0.01
        image, mask = read_pair(item["image"], item["label"], 64)
        assert image.shape == (3, 64, 64) and mask.shape == (1, 64, 64)
        assert -1 <= image.min() < 0 < image.max() <= 1 and set(np.unique(mask)) == {0.0, 1.0}
    split = polyp_datalist(REAL_KVASIR)
    assert len(split["training"]) == 32 and len(split["testing"]) == 8


def test_split_is_seeded_disjoint_and_the_seeds(tmp_path):
    pairs = [{"name": f"p{i:02d}"} for i in range(10)]
    split = split_pairs(pairs, 0.2, 0)
    assert len(split["testing"]) == 2 and len(split["training"]) == 8
    assert sorted(p["name"] for s in split.values() for p in s) == [p["name"] for p in pairs]
    assert split == split_pairs(pairs, 0.2, 0) and split != split_pairs(pairs, 0.2, 1)
    sklearn = pytest.importorskip("sklearn.model_selection")
    train, test = sklearn.train_test_split(pairs, test_size=0.2, random_state=0)
    assert sorted(p["name"] for p in test) == [p["name"] for p in split["testing"]]
    for bad in (0.0, 1.0, "half", True):
        with pytest.raises(OptionError, match="--test_fraction"):
            split_pairs(pairs, bad)
    assert split_pairs(pairs, "0.2", "0") == split
    with pytest.raises(OptionError, match="--num_clusters"):
        check_enough_pairs(pairs, 0, tmp_path)
    with pytest.raises(DataError, match="leaves none for training"):
        split_pairs(pairs[:1], 0.5)


def test_synthetic_polyps_deterministic_and_valid(tmp_path):
    first = make_synthetic_polyps(tmp_path / "a", num_cases=8, size=48, seed=3)
    second = make_synthetic_polyps(tmp_path / "b", num_cases=8, size=48, seed=3)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
    other = make_synthetic_polyps(tmp_path / "c", num_cases=8, size=48, seed=4)
    assert (other / files[0]).read_bytes() != (first / files[0]).read_bytes()
    pairs = find_polyp_pairs(first)
    assert len(pairs) == 8
    check_polyp_pairs(pairs)
    boxes = json.loads((first / "kavsir_bboxes.json").read_text())
    sizes = set()
    for item in pairs:
        with Image.open(item["image"]) as im, Image.open(item["label"]) as mask:
            assert im.mode == "RGB" and mask.mode == "RGB" and im.size == mask.size
            entry = boxes[item["name"]]
            assert (entry["width"], entry["height"]) == im.size and entry["bbox"][0]["label"] == "polyp"
            sizes.add(im.size)
            rgb, polyp = np.asarray(im, np.float32), np.asarray(mask)[..., 0] > 127
        assert rgb[..., 0].mean() > rgb[..., 2].mean()  # reddish mucosa
        assert rgb[0, 0].max() < 20 and rgb[polyp].mean() > rgb[~polyp & (rgb.max(-1) > 20)].mean()
    assert len(sizes) == 2  # every fourth case is 1.2x larger
    # the styles differ: the mean colours of cases 0 and 1 (different styles) are far apart
    means = [read_pair(p["image"], p["label"], 32)[0].mean(axis=(1, 2)) for p in pairs[:2]]
    assert np.abs(means[0] - means[1]).max() > 0.1
    assert make_synthetic_polyps(first, num_cases=8, size=48, seed=3) == first
    with pytest.raises(OutputExistsError):
        make_synthetic_polyps(first, num_cases=9, size=48, seed=3)


def test_data_prep_cli_writes_datalist_and_refuses_overwrite(tmp_path, capsys):
    data = make_synthetic_polyps(tmp_path / "syn", num_cases=10, size=40, seed=0)
    out = tmp_path / "lists" / "datalist.json"
    args = ["--dataset_dir", str(tmp_path), "--output", str(out), "--no_progress"]
    assert prep.main(args) == 0
    datalist = json.loads(out.read_text())
    assert len(datalist["training"]) == 8 and len(datalist["testing"]) == 2
    assert datalist == json.loads(json.dumps(polyp_datalist(data)))
    capsys.readouterr()
    assert prep.main(args + ["--test_fraction", "0.5"]) == 2
    assert "datalist.json already exists" in capsys.readouterr().err
    assert json.loads(out.read_text()) == datalist
    assert prep.main(args + ["--test_fraction", "0.5", "--overwrite"]) == 0
    assert len(json.loads(out.read_text())["testing"]) == 5
    (data / "masks" / "synthetic_polyp_004.jpg").unlink()
    capsys.readouterr()
    assert prep.main(["--dataset_dir", str(data), "--output", str(tmp_path / "new.json"), "--no_progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: 1 image(s)") and "synthetic_polyp_004.jpg" in err[0]
    assert not (tmp_path / "new.json").exists()
    assert prep.main(["--dataset_dir", str(data), "--output", str(tmp_path / "new.json"), "--test_fraction", "1"]) == 2
    assert "--test_fraction must be > 0 and < 1" in capsys.readouterr().err
