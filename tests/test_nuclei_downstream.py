"""The nuclei downstream test: HoVerNet targets, the size-free padded HoVerNet, post-processing and the comparison.

Torch runs single-threaded here (a shared 2-core machine); HoVerNet is ResNet50-sized, so the comparison runs on
16x16 patches, one epoch, one batch per run.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from monai.networks.nets import HoVerNet

import meddiff.evaluation.nuclei as nuclei_module
from meddiff.errors import OptionError, UserError
from meddiff.evaluation import (
    NUCLEI_METRICS,
    PaddedHoVerNet,
    hovernet_targets,
    nuclei_scores,
    nuclei_segmentation_comparison,
    predict_instances,
)
from meddiff.metrics import instance_f1, match_instances

NP, HV = "nucleus_prediction", "horizontal_vertical"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_targets_by_hand():
    inst = np.zeros((4, 7), dtype=np.int32)
    inst[1, 1:6] = 3  # a 1x5 bar: centre column 3, x offsets -2..2 -> -1, -0.5, 0, 0.5, 1; y 0 (one row)
    targets = hovernet_targets(torch.as_tensor(inst)[None], min_size=0)
    nucleus = np.zeros((4, 7), dtype=np.float32)
    nucleus[1, 1:6] = 1
    np.testing.assert_array_equal(targets[NP].numpy(), np.stack([1 - nucleus, nucleus]))
    expected_x = np.zeros((4, 7), dtype=np.float32)
    expected_x[1, 1:6] = [-1, -0.5, 0, 0.5, 1]
    np.testing.assert_allclose(targets[HV][0].numpy(), expected_x)
    np.testing.assert_array_equal(targets[HV][1].numpy(), 0)
    assert targets[NP].dtype == targets[HV].dtype == torch.float32
    # the seed's min_size 30: the 5 px bar stays a nucleus in NP but gets no hv target
    small = hovernet_targets(inst)
    np.testing.assert_array_equal(small[NP].numpy(), targets[NP].numpy())
    assert not small[HV].any()


def test_padded_hovernet_sizes_weights_and_skips():
    torch.manual_seed(0)
    network = PaddedHoVerNet().eval()
    HoVerNet(mode="fast", decoder_padding=True).load_state_dict(network.state_dict())  # MONAI's layers, unchanged
    with torch.no_grad():
        for size in ((16, 16), (24, 16)):
            output = network(torch.randn(1, 3, *size))
            assert set(output) == {NP, HV}
            assert output[NP].shape == output[HV].shape == (1, 2, *size)
        with pytest.raises(ValueError, match="multiples of 8"):
            network(torch.randn(1, 3, 20, 20))
        # zero the encoder below full resolution: the deeper features and the bottleneck are then all 0, so only the
        # full-resolution skip carries the image to the output (MONAI's padded decoder drops that skip and would
        # give the same output for every image)
        for module in (*network.res_blocks[1:], network.bottleneck):
            for parameter in module.parameters():
                parameter.zero_()
        a, b = network(torch.randn(1, 3, 16, 16)), network(torch.randn(1, 3, 16, 16))
    assert not torch.allclose(a[NP], b[NP]) and not torch.allclose(a[HV], b[HV])


class Oracle(torch.nn.Module):
    """Returns confident NP logits and exact hv maps of given instance maps (or a flattened variant)."""

    def __init__(self, insts: list[np.ndarray], flat_hv: bool = False, no_nuclei: bool = False) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.insts, self.flat_hv, self.no_nuclei = insts, flat_hv, no_nuclei

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        targets = [hovernet_targets(inst, min_size=0) for inst in self.insts[: len(x)]]
        nucleus = torch.stack([t[NP] for t in targets])
        if self.no_nuclei:
            nucleus = torch.stack([torch.ones_like(nucleus[:, 0]), torch.zeros_like(nucleus[:, 1])], 1)
        hover = torch.stack([t[HV] for t in targets])
        return {NP: 10 * (2 * nucleus - 1), HV: torch.zeros_like(hover) if self.flat_hv else hover}


def test_predict_instances_separates_touching_nuclei():
    inst = np.zeros((32, 32), dtype=np.int32)
    inst[4:12, 4:12], inst[4:12, 12:20], inst[20:28, 6:14] = 1, 2, 3  # 1 and 2 touch
    images = [torch.zeros(3, 32, 32)]
    # exact hv maps in MONAI's channel order (x, y): the watershed separates the touching pair
    predicted = predict_instances(Oracle([inst]), images)[0]
    assert predicted.shape == (32, 32) and predicted.dtype == np.int32
    assert instance_f1(inst, predicted) == 1.0 and match_instances(inst, predicted).ious == pytest.approx([1, 1, 1])
    # a constant hv map (MONAI refuses it): connected components, so the touching pair merges into one object of
    # IoU 0.5 with each nucleus: TP 2 (square 3 and one half), FN 1 -> F1 4/5
    merged = predict_instances(Oracle([inst], flat_hv=True), images)[0]
    assert len(np.unique(merged)) == 3 and instance_f1(inst, merged) == pytest.approx(0.8)
    assert not predict_instances(Oracle([inst], no_nuclei=True), images)[0].any()


def _item(rng: np.random.Generator, size: int = 16, marker: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    inst = np.zeros((size, size), dtype=np.int32)
    for k in range(1, 4):
        r, c = rng.integers(0, size - 5, 2)
        inst[r : r + 5, c : c + 5] = k
    image = rng.uniform(-1, 1, (3, size, size)).astype(np.float32)
    image[:, inst > 0] = -0.8
    if marker is not None:
        image[0, 0, 0] = marker  # identifies the item in a training set
    return image, inst


@pytest.fixture(scope="module")
def tiny_sets():
    rng = np.random.default_rng(0)
    real = [_item(rng, marker=10.0 + i) for i in range(2)]
    synthetic = [_item(rng, marker=20.0 + i) for i in range(4)]
    # the test items as meddiff.data.monuseg.LoadNucleiPatchd returns them
    test = [{"image": torch.as_tensor(x), "label": torch.as_tensor(y)[None]} for x, y in (_item(rng) for _ in range(2))]
    return real, synthetic, test


def test_comparison_end_to_end(tiny_sets, tmp_path, monkeypatch):
    real, synthetic, test = tiny_sets
    trained: dict[int, list[list[float]]] = {}
    original = nuclei_module.train_hovernet

    def recording(items, **kwargs):
        trained.setdefault(kwargs["seed"], []).append(sorted(float(image[0, 0, 0]) for image, _ in items))
        return original(items, **kwargs)

    monkeypatch.setattr(nuclei_module, "train_hovernet", recording)
    output = tmp_path / "nuclei.json"
    weights = [1.0, 1.0, 0.0, 1.0]  # synthetic item 2 (marker 22) is never drawn
    result = nuclei_segmentation_comparison(
        real,
        synthetic,
        test,
        ratios=(1, 2),
        seeds=(0, 1),
        synthetic_weights=weights,
        epochs=1,
        batch_size=8,
        output_file=str(output),
        progress=False,
    )
    assert set(result["arms"]) == {"real", "real+1x", "real+2x"}
    assert set(result["differences"]) == {"real+1x", "real+2x"}
    for arm in result["arms"].values():
        assert set(arm["per_seed"]) == {"0", "1"}
        for scores in arm["per_seed"].values():
            assert sorted(scores) == sorted(NUCLEI_METRICS)
            assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in scores.values())
        assert all(math.isfinite(arm["mean"][m]["mean"]) and arm["mean"][m]["n"] == 2 for m in NUCLEI_METRICS)
    # real+2x asks for 4 synthetic items but only 3 have weight > 0
    assert result["settings"]["num_synthetic"] == {
        "real+1x": {"requested": 2, "used": 2},
        "real+2x": {"requested": 4, "used": 3},
    }
    # per seed: real alone, then nested synthetic subsets that never hold the weight-0 item
    for seed in (0, 1):
        real_arm, one, two = trained[seed]
        assert real_arm == [10.0, 11.0]
        assert len(one) == 4 and set(real_arm) < set(one) < set(two) and len(two) == 5
        assert 22.0 not in two
    assert json.loads(output.read_text())["arms"].keys() == result["arms"].keys()


def test_nuclei_scores_by_hand():
    true = np.zeros((6, 6), dtype=np.int32)
    true[0:2, 0:2] = 1
    pred = np.zeros((6, 6), dtype=np.int32)
    pred[0:2, 0:3] = 4  # IoU 4/6 with nucleus 1
    empty = np.zeros((6, 6), dtype=np.int32)
    scores = nuclei_scores([true, empty], [pred, empty])
    # image 1: F1 1, AJI 4/6, Dice 8/10, PQ = SQ = 2/3 (RQ 1); image 2 (both empty): all 1
    assert scores["f1"] == 1.0 and scores["dataset_f1"] == 1.0 and scores["rq"] == 1.0
    assert scores["aji"] == pytest.approx((2 / 3 + 1) / 2) and scores["aji_plus"] == pytest.approx((2 / 3 + 1) / 2)
    assert scores["dice"] == pytest.approx((0.8 + 1) / 2)
    assert scores["pq"] == pytest.approx((2 / 3 + 1) / 2) and scores["sq"] == pytest.approx((2 / 3 + 1) / 2)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"ratios": [0]}, OptionError, "ratios"),
        ({"ratios": [1, 1]}, OptionError, "distinct ratios"),
        ({"seeds": [0, 0]}, OptionError, "distinct seeds"),
        ({"epochs": 0}, OptionError, "num_epochs"),
        ({"synthetic_weights": [1.0, 1.0]}, OptionError, "one per item"),
        ({"synthetic_weights": [1.0, -1.0, 1.0, 1.0]}, OptionError, ">= 0"),
        ({"synthetic_weights": [0.0, 0.0, 0.0, 0.0]}, OptionError, "not all 0"),
        ({"synthetic": []}, UserError, "synthetic items are empty"),
        ({"test": []}, UserError, "test items are empty"),
        ({"size": 20}, UserError, "multiples of 8"),
        ({"mixed": True}, UserError, "mixes image shapes"),
        ({"float_inst": True}, UserError, "whole numbers"),
        ({"real": "patches/"}, UserError, "list of"),
    ],
)
def test_bad_options_refused_before_training(tiny_sets, monkeypatch, change, error, match):
    def never(*args, **kwargs):
        raise AssertionError("training started before the input was checked")

    monkeypatch.setattr(nuclei_module, "train_hovernet", never)
    real, synthetic, test = tiny_sets
    rng = np.random.default_rng(1)
    change = dict(change)
    size = change.pop("size", None)
    if size is not None:
        real, synthetic, test = ([_item(rng, size=size) for _ in range(n)] for n in (2, 4, 2))
    if change.pop("mixed", False):
        real = [real[0], _item(rng, size=24)]
    if change.pop("float_inst", False):
        real = [(real[0][0], real[0][1] + 0.5), real[1]]
    arguments = {"real": real, "synthetic": synthetic, "test": test, "ratios": (1,), "seeds": (0,), "epochs": 1}
    arguments.update(change)
    with pytest.raises(error, match=match):
        nuclei_segmentation_comparison(**arguments, progress=False)
