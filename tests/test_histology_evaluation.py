"""Histology augmentation evaluation: macro F1 by hand, the classification comparison, the evaluation on tiny data.

Torch runs single-threaded here (as in test_downstream.py); FID uses a TorchScript mean-colour network so the
features are cheap and known.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from meddiff.centroid_filter import filter_generated, read_kept
from meddiff.data.histology import histology_datalist, make_synthetic_histology
from meddiff.errors import OptionError, UserError
from meddiff.evaluation.downstream import classification_comparison, macro_f1, make_classifier
from meddiff.evaluation.histology import evaluate_histology_augmentation, fid_entry, guidance_rates, summary
from meddiff.features import ImageFeatures
from meddiff.io import OutputExistsError
from meddiff.metrics.fid import frechet_inception_distance

CLASSES = ["ADI", "TUM"]
TINY = dict(
    downstream_seeds=(0,), downstream_epochs=2, downstream_batch_size=4, downstream_learning_rate=1e-2,
    downstream_network="small_cnn", device="cpu", progress=False,
)  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mean_colour(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("net") / "mean_colour.pt"
    torch.jit.script(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())).save(str(path))
    return path


def write_generation(folder: Path, items: list[dict], swap: bool = False) -> Path:
    """A HistologyWriter-like folder holding copies of real tiles; `swap` gives each the other class as intended."""
    entries = []
    for item in items:
        cls = CLASSES[1 - item["label"]] if swap else item["class_name"]
        name = f"{cls}-SYN-{item['name']}"
        path = folder / cls / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(item["image"]) as im:
            im.convert("RGB").save(path)
        entries.append({"name": name, "class_name": cls, "label": CLASSES.index(cls), "file": f"{cls}/{name}.png"})
    record = {"kind": "histology", "settings": {}, "classes": CLASSES, "items": entries}
    (folder / "generation.json").write_text(json.dumps(record))
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("histo")
    dataset = make_synthetic_histology(root / "data", classes=CLASSES, per_class=4, size=32, test_per_class=2)
    datalist = histology_datalist(dataset)
    assert datalist["classes"] == CLASSES and len(datalist["training"]) == 8 and len(datalist["testing"]) == 4
    guided = write_generation(root / "guided", datalist["training"])
    unguided = write_generation(root / "unguided", datalist["training"][:6], swap=True)
    return {"root": root, "datalist": datalist, "guided": guided, "unguided": unguided}


# ---------------------------------------------------------------------------------------------- metrics by hand


def test_macro_f1_by_hand_with_a_class_never_predicted() -> None:
    # class 0: TP 1, FP 0, FN 1 -> 2/3; class 1: TP 2, FP 2, FN 0 -> 4/6; class 2 never predicted: 0
    targets, predicted = torch.tensor([0, 0, 1, 1, 2]), torch.tensor([0, 1, 1, 1, 1])
    assert macro_f1(predicted, targets) == pytest.approx(4 / 9)
    logits = torch.nn.functional.one_hot(predicted, 4).float()  # class 3 in neither: not averaged
    assert macro_f1(logits, targets) == pytest.approx(4 / 9)
    # a predicted class absent from the targets counts (F1 0): class 0 2/3, class 1 0
    assert macro_f1(torch.tensor([0, 1]), torch.tensor([0, 0])) == pytest.approx(1 / 3)
    sklearn = pytest.importorskip("sklearn.metrics")
    assert macro_f1(predicted, targets) == pytest.approx(
        sklearn.f1_score(targets.numpy(), predicted.numpy(), average="macro", zero_division=0)
    )


def test_guidance_rates_and_fid_entries_by_hand() -> None:
    rates = guidance_rates([0, 1, 1, 1, 0], [0, 0, 1, 1, 1], CLASSES)
    assert rates == {
        "overall": 0.6,
        "num_images": 5,
        "per_class": {
            "ADI": {"rate": 0.5, "num_images": 2, "predicted": {"ADI": 1, "TUM": 1}},
            "TUM": {"rate": 2 / 3, "num_images": 3, "predicted": {"ADI": 1, "TUM": 2}},
        },
    }
    assert guidance_rates([0], [0], CLASSES)["per_class"]["TUM"]["rate"] is None
    one = fid_entry(np.zeros((3, 2)), np.zeros((1, 2)))
    reason = "FID needs at least 2 tiles on each side, got 1 and 3 real"
    assert one == {"fid": None, "num_images": 1, "num_real": 3, "reason": reason}
    # two points each, shifted by (3, 4): |mu_r - mu_f|^2 = 25 and equal covariances
    real = np.array([[0.0, 0.0], [1.0, 1.0]])
    assert fid_entry(real, real + [3.0, 4.0])["fid"] == pytest.approx(25.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------- classification


def separable(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of noise whose class is the sign of their mean: 0 dark, 1 bright."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = 0.1 * torch.randn(n, 3, 16, 16, generator=g) + (labels.float() - 0.5)[:, None, None, None]
    return images, labels


def test_classification_comparison_writes_every_arm_and_calls_the_hook(tmp_path: Path) -> None:
    calls = []
    out = tmp_path / "cls.json"
    arms = {"real": separable(8, 1), "real+synthetic": separable(12, 2)}
    settings = dict(num_classes=2, epochs=2, batch_size=4, learning_rate=1e-2, network="small_cnn", progress=False)
    result = classification_comparison(
        arms, separable(6, 3), (0, 1), output_file=str(out), on_trained=lambda a, s, n: calls.append((a, s)), **settings
    )
    assert calls == [("real", 0), ("real", 1), ("real+synthetic", 0), ("real+synthetic", 1)]
    stored = json.loads(out.read_text())
    assert sorted(stored) == ["arms", "confidence", "differences", "reference", "settings"]
    assert sorted(stored["arms"]["real"]["per_seed"]["0"]) == ["accuracy", "macro_f1"]
    assert sorted(stored["differences"]) == ["real+synthetic"]
    assert stored["settings"]["num_train"] == {"real": 8, "real+synthetic": 12}
    assert stored["settings"]["num_test"] == 6 and stored["settings"]["image_shape"] == [3, 16, 16]
    for scores in result["arms"]["real"]["per_seed"].values():
        assert 0.0 <= scores["macro_f1"] <= 1.0 and scores["accuracy"] in {k / 6 for k in range(7)}
    with pytest.raises(OutputExistsError):
        classification_comparison(arms, separable(6, 3), (0,), output_file=str(out), **settings)
    bad = {"real": (separable(4, 1)[0], torch.tensor([0, 1, 2, 1]))}
    with pytest.raises(UserError, match="labels range over 0..2 but --num_classes is 2"):
        classification_comparison(bad, separable(6, 3), (0,), **settings)
    with pytest.raises(OptionError, match="--network vit_s16 needs an image side divisible by 16"):
        make_classifier("vit_s16", 3, 2, (24, 24))


# ---------------------------------------------------------------------------------------------- the evaluation


def test_evaluation_end_to_end(data: dict, mean_colour: Path, tmp_path: Path) -> None:
    train, test = data["datalist"]["training"], data["datalist"]["testing"]
    filter_file = tmp_path / "scores.json"
    filter_generated(data["guided"], train, filter_file, image_size=32, feature_weights=mean_colour, progress=False)
    kept = read_kept(filter_file, data["guided"])
    metrics_file = tmp_path / "metrics.json"
    metrics = evaluate_histology_augmentation(
        train, test, data["guided"], metrics_file, image_size=32, filter_file=filter_file,
        unguided_dir=data["unguided"], label_fractions=(0.5, 1.0), feature_weights=mean_colour, **TINY,
    )  # fmt: skip
    assert json.loads(metrics_file.read_text()) == json.loads(json.dumps(metrics))
    assert sorted(metrics) == sorted(
        [
            "classes", "image_size", "num_generated", "num_kept", "num_unguided", "num_real_training", "num_real_test",
            "generated_dir", "filter_file", "unguided_dir", "fid", "guidance", "downstream", "settings", "verdict",
        ]
    )  # fmt: skip
    assert (metrics["num_generated"], metrics["num_kept"], metrics["num_unguided"]) == (8, len(kept), 6)
    # FID: the generated tiles are copies of the training tiles, so the overall FID is 0 and equals the direct value
    features = ImageFeatures(mean_colour)
    real_f = features.extract(np.stack([_tile(i["image"]) for i in train]))
    assert metrics["fid"]["guided"]["overall"]["fid"] == pytest.approx(frechet_inception_distance(real_f, real_f))
    assert metrics["fid"]["guided"]["overall"]["fid"] == pytest.approx(0.0, abs=1e-6)
    assert sorted(metrics["fid"]["guided"]["per_class"]) == CLASSES
    assert metrics["fid"]["real_test"]["num_images"] == 4 and metrics["fid"]["unguided"]["overall"]["num_images"] == 6
    # guidance: every generated tile is assigned one class
    g = metrics["guidance"]
    assert sum(sum(v["predicted"].values()) for v in g["guided"]["per_class"].values()) == 8
    assert g["chance"] == 0.5
    assert g["unguided"]["num_images"] == 6 and g["kept"]["num_images"] == len(kept)
    assert g["classifier"]["trained_for"] == "downstream"
    full = metrics["downstream"]["1"]
    assert g["classifier"]["test_accuracy"] == full["arms"]["real"]["per_seed"]["0"]["accuracy"]
    assert sorted(metrics["downstream"]) == ["0.5", "1"]
    half = metrics["downstream"]["0.5"]
    assert (half["num_real"], half["num_synthetic"]) == (4, len(kept))
    assert half["settings"]["num_train"] == {"real": 4, "real+synthetic": 4 + len(kept)}
    assert full["settings"]["num_train"] == {"real": 8, "real+synthetic": 8 + len(kept)}
    text = summary(metrics)
    assert "8 generated tiles of 2 classes" in text and "label fraction 0.5 (4 real" in text
    assert text.splitlines()[-1] == metrics["verdict"]

    # without fraction 1.0 the check's classifier is trained on its own: the same seed and data give the same one
    again = evaluate_histology_augmentation(
        train, test, data["guided"], tmp_path / "m2.json", image_size=32, unguided_dir=data["unguided"],
        label_fractions=(0.5,), feature_weights=mean_colour, **TINY,
    )  # fmt: skip
    assert again["guidance"]["classifier"]["trained_for"] == "guidance check"
    assert again["guidance"]["classifier"]["test_accuracy"] == g["classifier"]["test_accuracy"]
    assert again["guidance"]["guided"] == g["guided"] and again["guidance"]["unguided"] == g["unguided"]
    assert again["num_kept"] == 8 and again["fid"]["kept"] is None and again["guidance"]["kept"] is None
    with pytest.raises(OutputExistsError):
        evaluate_histology_augmentation(train, test, data["guided"], metrics_file, image_size=32, **TINY)


def test_unguided_rate_is_the_complement_on_swapped_copies(data: dict, mean_colour: Path, tmp_path: Path) -> None:
    train, test = data["datalist"]["training"], data["datalist"]["testing"]
    swapped_all = write_generation(tmp_path / "swapped", train, swap=True)
    metrics = evaluate_histology_augmentation(
        train, test, data["guided"], tmp_path / "m.json", image_size=32, unguided_dir=swapped_all,
        label_fractions=(1.0,), feature_weights=mean_colour, **TINY,
    )  # fmt: skip
    g = metrics["guidance"]
    # two classes, the same images: every tile the classifier puts in its guided class misses its swapped one
    assert g["unguided"]["overall"] == pytest.approx(1.0 - g["guided"]["overall"])
    for c, other in zip(CLASSES, reversed(CLASSES)):
        assert g["unguided"]["per_class"][other]["predicted"][c] == g["guided"]["per_class"][c]["predicted"][c]


def test_evaluation_refuses_other_classes_and_missing_test_tiles(data: dict, tmp_path: Path) -> None:
    from meddiff.data.errors import DataError

    train = data["datalist"]["training"]
    with pytest.raises(DataError, match="no real test tiles"):
        evaluate_histology_augmentation(train, [], data["guided"], tmp_path / "m.json", image_size=32, **TINY)
    other = [dict(i, class_name="LYM") if i["label"] == 1 else i for i in train]
    with pytest.raises(DataError, match="the class lists differ"):
        evaluate_histology_augmentation(
            other, data["datalist"]["testing"], data["guided"], tmp_path / "m.json", image_size=32, **TINY
        )
    assert not (tmp_path / "m.json").exists()


def _tile(path: str) -> np.ndarray:
    from meddiff.data.histology import read_tile

    return read_tile(path, 32)


def _guidance(guided: float, n_guided: int, unguided: float | None, n_unguided: int, accuracy: float, k: int) -> dict:
    ung = None if unguided is None else {"overall": unguided, "num_images": n_unguided}
    return {
        "guidance": {
            "chance": 1 / k,
            "classifier": {"test_accuracy": accuracy},
            "guided": {"overall": guided, "num_images": n_guided},
            "unguided": ung,
        }
    }


def test_verdict_needs_the_guided_rate_two_standard_errors_above_its_baseline() -> None:
    from meddiff.evaluation.histology import histology_verdict

    # 0.25 vs 0.125 of 32 each: SE = sqrt(.25 * .75 / 32 + .125 * .875 / 32) = 0.0968, 2 SE = 0.194 > 0.125
    text = histology_verdict(_guidance(0.25, 32, 0.125, 32, 1.0, 8))
    assert text.startswith("not shown yet") and "(0.10)" in text
    # 0.75 vs 0.125 of 16 each: SE = 0.135, the difference 0.625 > 2 SE
    assert histology_verdict(_guidance(0.75, 16, 0.125, 16, 1.0, 4)).startswith("guidance works")
    # against chance 0.25 with 40 guided: SE = sqrt(.5 * .5 / 40) = 0.079, 0.25 > 0.158
    assert histology_verdict(_guidance(0.5, 40, None, 0, 1.0, 4)).startswith("guidance works")
    assert histology_verdict(_guidance(0.4, 10, None, 0, 1.0, 4)).startswith("not shown yet")  # 0.15 < 2 x 0.155
    assert histology_verdict(_guidance(0.1, 16, 0.2, 16, 1.0, 4)).startswith("undertrained")
    assert histology_verdict(_guidance(0.9, 16, 0.1, 16, 0.25, 4)).startswith("no verdict")
