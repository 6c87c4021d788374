"""The downstream comparison: Student-t intervals, paired differences, and small trainings that must learn.

Torch runs single-threaded here: on a shared 2-core machine two threads contend and a 32x32 UNet++ step takes
seconds instead of milliseconds. The thread count is restored after the module.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.losses import DiceLoss

from meddiff.errors import OptionError, UserError
from meddiff.evaluation import (
    accuracy,
    arm_datasets,
    compare_arms,
    evaluate_mask_conditioned_generation,
    mean_ci,
    random_flips,
    segment,
    segmentation_comparison,
    train_and_score,
)
from meddiff.io import OutputExistsError
from meddiff.metrics import dice, iou

TINY_FEATURES = (4, 4, 8, 8, 16, 4)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sign_task(n: int, seed: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of Gaussian noise whose mask is where the image is positive: a 1x1 convolution can learn it."""
    x = torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(seed))
    return x, (x > 0).float()


def items(pair: tuple[torch.Tensor, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(zip(*pair))


def tiny_comparison(**overrides):
    real, synthetic, test = sign_task(8, 2, 32), sign_task(8, 3, 32), sign_task(6, 4, 32)
    settings = (
        dict(seeds=(0, 1), epochs=2, batch_size=4, learning_rate=1e-2, features=TINY_FEATURES, progress=False)
        | overrides
    )
    return segmentation_comparison(arm_datasets(real, synthetic), test, **settings)


# ---------------------------------------------------------------------------------------------- statistics


def test_package_keeps_the_generation_evaluation_api() -> None:
    import meddiff

    assert callable(evaluate_mask_conditioned_generation) and callable(segment)
    assert meddiff.evaluation.evaluate_mask_conditioned_generation is evaluate_mask_conditioned_generation


def test_mean_ci_matches_a_hand_computed_interval() -> None:
    # values 1..4: mean 2.5, s = sqrt(5/3) = 1.290994, t_{0.975, 3} = 3.182446, half width 3.182446 * s / 2
    ci = mean_ci([1, 2, 3, 4])
    half = 3.182446 * 1.290994 / 2
    assert ci["n"] == 4
    assert ci["mean"] == pytest.approx(2.5)
    assert ci["std"] == pytest.approx(1.290994, abs=1e-6)
    assert half == pytest.approx(2.054, abs=1e-3)
    assert ci["low"] == pytest.approx(2.5 - half, abs=1e-5)
    assert ci["high"] == pytest.approx(2.5 + half, abs=1e-5)
    wider = mean_ci([1, 2, 3, 4], confidence=0.99)
    assert wider["low"] < ci["low"] and wider["high"] > ci["high"]


def test_mean_ci_of_one_value_has_no_interval_and_of_equal_values_a_point() -> None:
    one = mean_ci([0.7])
    assert one["mean"] == 0.7 and one["n"] == 1
    assert math.isnan(one["low"]) and math.isnan(one["high"]) and math.isnan(one["std"])
    same = mean_ci([0.5, 0.5, 0.5])
    assert same["low"] == same["mean"] == same["high"] == 0.5 and same["std"] == 0.0


def test_compare_arms_pairs_differences_by_seed() -> None:
    scores = {
        "real": {0: {"dice": 0.70, "iou": 0.50}, 1: {"dice": 0.80, "iou": 0.60}, 2: {"dice": 0.60, "iou": 0.40}},
        # seeds listed in another order: pairing is by seed, not by position
        "synthetic": {2: {"dice": 0.70, "iou": 0.45}, 0: {"dice": 0.75, "iou": 0.55}, 1: {"dice": 0.90, "iou": 0.70}},
    }
    result = compare_arms(scores)
    assert result["reference"] == "real" and set(result["differences"]) == {"synthetic"}
    diff = result["differences"]["synthetic"]["dice"]
    # per seed: 0.05, 0.10, 0.10 -> mean 0.083333, s = 0.028868, half width t_{0.975,2} * s / sqrt(3)
    assert diff["per_seed"] == pytest.approx({"0": 0.05, "1": 0.10, "2": 0.10})
    assert diff["mean"] == pytest.approx(0.25 / 3)
    assert diff["std"] == pytest.approx(0.0288675, abs=1e-6)
    half = 4.302653 * 0.0288675 / math.sqrt(3)
    assert (diff["low"], diff["high"]) == pytest.approx((0.25 / 3 - half, 0.25 / 3 + half), abs=1e-5)
    assert result["differences"]["synthetic"]["iou"]["mean"] == pytest.approx(0.2 / 3)
    assert result["arms"]["real"]["mean"]["dice"]["mean"] == pytest.approx(0.7)
    assert set(result["arms"]["synthetic"]["per_seed"]) == {"0", "1", "2"}
    assert json.loads(json.dumps(result)) == result


def test_compare_arms_refuses_unpaired_or_mismatched_scores() -> None:
    real = {0: {"dice": 0.7}, 1: {"dice": 0.8}}
    with pytest.raises(UserError, match="arm 'synthetic' was run on seeds .* same seeds"):
        compare_arms({"real": real, "synthetic": {0: {"dice": 0.7}}})
    with pytest.raises(UserError, match="arm 'synthetic' seed 1 has metrics .* same metrics"):
        compare_arms({"real": real, "synthetic": {0: {"dice": 0.7}, 1: {"iou": 0.8}}})
    with pytest.raises(UserError, match="arm 'synthetic' has no scored seeds"):
        compare_arms({"real": real, "synthetic": {}})
    with pytest.raises(OptionError, match="--reference 'baseline' is not one of the arms"):
        compare_arms({"real": real}, reference="baseline")
    with pytest.raises(OptionError, match="--confidence"):
        mean_ci([1, 2], confidence=95)
    with pytest.raises(UserError, match="no values"):
        mean_ci([])


# ---------------------------------------------------------------------------------------------- training


def test_train_and_score_learns_a_trivial_task_and_repeats_for_a_seed() -> None:
    train, test = items(sign_task(16, 0)), items(sign_task(8, 1))
    settings = dict(
        loss=DiceLoss(sigmoid=True),
        metrics={"dice": dice, "iou": iou},
        epochs=8,
        batch_size=4,
        learning_rate=0.3,
        postprocess=torch.sigmoid,
        augment=random_flips,
        progress=False,
    )
    state = torch.get_rng_state()
    first = train_and_score(train, test, lambda: torch.nn.Conv2d(1, 1, 1), 0, **settings)
    assert torch.equal(torch.get_rng_state(), state), "the caller's random state must be left as it was"
    second = train_and_score(train, test, lambda: torch.nn.Conv2d(1, 1, 1), 0, **settings)
    other = train_and_score(train, test, lambda: torch.nn.Conv2d(1, 1, 1), 1, **settings)
    assert first["dice"] > 0.8 and first["iou"] > 0.6
    assert first == second
    assert other != first


def test_train_and_score_serves_classification() -> None:
    # class = which of two channels is brighter; targets are 0-d class indices, metric accuracy
    g = torch.Generator().manual_seed(0)
    images = torch.randn(48, 2, 4, 4, generator=g)
    labels = (images[:, 1].mean((1, 2)) > images[:, 0].mean((1, 2))).long()
    data = list(zip(images, labels))

    def make_network() -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(2, 2))

    def macro_recall(predictions: torch.Tensor, targets: torch.Tensor) -> float:
        chosen = predictions.argmax(1)
        return float(np.mean([(chosen[targets == k] == k).float().mean() for k in (0, 1)]))

    scores = train_and_score(
        data[:32],
        data[32:],
        make_network,
        0,
        loss=torch.nn.CrossEntropyLoss(),
        metrics={"accuracy": accuracy},
        dataset_metrics={"macro_recall": macro_recall},
        epochs=15,
        batch_size=8,
        learning_rate=0.1,
        progress=False,
    )
    assert scores["accuracy"] > 0.8 and scores["macro_recall"] > 0.7


def test_random_flips_move_masks_with_images() -> None:
    images = torch.arange(2 * 16, dtype=torch.float32).reshape(2, 1, 4, 4)
    flipped, masks = random_flips(images, images.clone(), torch.Generator().manual_seed(0))
    assert torch.equal(flipped, masks) and not torch.equal(flipped, images)
    _, labels = random_flips(images, torch.tensor([0, 1]), torch.Generator().manual_seed(0))
    assert labels.tolist() == [0, 1]


# ---------------------------------------------------------------------------------------------- segmentation


def test_segmentation_comparison_reports_every_arm_with_ordered_intervals(tmp_path: Path) -> None:
    out = tmp_path / "downstream.json"
    result = tiny_comparison(output_file=str(out))
    assert set(result["arms"]) == {"real", "synthetic", "real+synthetic"}
    assert set(result["differences"]) == {"synthetic", "real+synthetic"}
    for arm in result["arms"].values():
        assert set(arm["per_seed"]) == {"0", "1"}
        for metric in ("dice", "iou"):
            ci = arm["mean"][metric]
            assert ci["low"] <= ci["mean"] <= ci["high"] and 0.0 <= ci["mean"] <= 1.0 and ci["n"] == 2
    for diff in result["differences"].values():
        for metric in ("dice", "iou"):
            assert diff[metric]["low"] <= diff[metric]["mean"] <= diff[metric]["high"]
    settings = result["settings"]
    assert settings["num_train"] == {"real": 8, "synthetic": 8, "real+synthetic": 16}
    assert settings["features"] == list(TINY_FEATURES) and settings["seeds"] == [0, 1]
    assert "BasicUNetPlusPlus" in settings["network"] and "imagenet" in settings["paper_network"]
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    with pytest.raises(OutputExistsError):
        tiny_comparison(output_file=str(out))


def test_segmentation_comparison_refuses_bad_arms_naming_them() -> None:
    real, test = sign_task(4, 0, 32), sign_task(2, 1, 32)
    empty = (torch.zeros(0, 1, 32, 32), torch.zeros(0, 1, 32, 32))
    cases = [
        ({"real": real, "synthetic": empty}, test, "arm 'synthetic' has no images"),
        ({"real": (real[0], real[1][:3])}, test, "arm 'real' has 4 images but 3 masks: give exactly one mask"),
        ({"real": (real[0], real[1][..., :16])}, test, r"arm 'real' images are \(32, 32\) but its masks"),
        ({"real": sign_task(4, 0, 64)}, test, r"arm 'real' images are \(1, 64, 64\) but the test images"),
        ({"real": real}, empty, "the test set has no images"),
        ({"real": sign_task(4, 0, 16)}, sign_task(2, 1, 16), "at least 32x32"),
        ({}, test, "no training arms given"),
    ]
    for arms, test_set, message in cases:
        with pytest.raises(UserError, match=message):
            segmentation_comparison(arms, test_set, epochs=1, features=TINY_FEATURES, progress=False)
    with pytest.raises(OptionError, match="--loss"):
        segmentation_comparison({"real": real}, test, loss="focal", progress=False)
    with pytest.raises(OptionError, match="--features"):
        segmentation_comparison({"real": real}, test, features=(4, 4), progress=False)
    with pytest.raises(OptionError, match="--seeds must list distinct seeds"):
        segmentation_comparison({"real": real}, test, seeds=(0, 0), progress=False)
    with pytest.raises(UserError, match="real and synthetic images have shapes"):
        arm_datasets(real, sign_task(4, 0, 64))
    with pytest.raises(UserError, match="train_items is empty"):
        train_and_score([], items(test), torch.nn.Identity, 0, loss=DiceLoss(), metrics={"dice": dice}, epochs=1)
