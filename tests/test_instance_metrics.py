"""meddiff.metrics.instances against hand-computed cases: matching, F1, AJI, AJI+, Dice and PQ."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meddiff.errors import OptionError, UserError
from meddiff.metrics import (
    aji,
    aji_plus,
    binary_dice,
    dataset_f1,
    instance_f1,
    match_instances,
    panoptic_quality,
)


def _grid(rows: str) -> np.ndarray:
    """An instance map from rows of digits ("." is background)."""
    return np.array([[0 if c == "." else int(c) for c in row] for row in rows.split()], dtype=np.int32)


# true: G1 (4 px, top left), G2 (4 px, middle right), G3 (2 px, bottom left)
BASIC_TRUE = _grid(
    """
    11....
    11....
    ...22.
    ...22.
    ......
    33....
    """
)
# pred: S1 = G1 plus one column (6 px); S2 = the lower row of G2 plus one pixel (3 px); S3 (2 px) overlaps nothing
BASIC_PRED = _grid(
    """
    111...
    111...
    ......
    ...222
    .....3
    .....3
    """
)


def test_basic_case_by_hand():
    # IoU(G1,S1) = 4/6 = 2/3 -> matched; IoU(G2,S2) = 2/(4+3-2) = 2/5 < 0.5 -> G2 FN and S2 FP;
    # G3 overlaps nothing -> FN; S3 -> FP. TP 1, FP 2, FN 2: F1 = 2/(2+2+2) = 1/3
    match = match_instances(BASIC_TRUE, BASIC_PRED)
    assert (match.tp, match.fp, match.fn) == (1, 2, 2)
    assert match.pairs == [(1, 1)] and match.ious == pytest.approx([2 / 3])
    assert instance_f1(BASIC_TRUE, BASIC_PRED) == pytest.approx(1 / 3)
    # at IoU >= 0.4 the pair (G2, S2) also matches: TP 2, FP 1, FN 1 -> F1 = 4/6
    assert instance_f1(BASIC_TRUE, BASIC_PRED, iou_threshold=0.4) == pytest.approx(2 / 3)
    # AJI: G1->S1 adds C 4, U 6; G2->S2 adds C 2, U 5; G3 overlaps nothing, U += 2; S3 unused, U += 2:
    # C = 6, U = 15 -> 0.4 (the pairing is already one-to-one, so AJI+ is the same)
    assert aji(BASIC_TRUE, BASIC_PRED) == pytest.approx(0.4)
    assert aji_plus(BASIC_TRUE, BASIC_PRED) == pytest.approx(0.4)
    # Dice: |T| = 10, |P| = 11, |T ∩ P| = 4 + 2 = 6 -> 12/21
    assert binary_dice(BASIC_TRUE, BASIC_PRED) == pytest.approx(12 / 21)
    # PQ (pairs at IoU > 0.5): only (G1, S1); RQ = 1/(1 + 1 + 1) = 1/3 = F1 at 0.5, SQ = 2/3, PQ = 2/9
    quality = panoptic_quality(BASIC_TRUE, BASIC_PRED)
    assert (quality["tp"], quality["fp"], quality["fn"]) == (1, 2, 2)
    assert quality["rq"] == pytest.approx(instance_f1(BASIC_TRUE, BASIC_PRED))
    assert quality["sq"] == pytest.approx(2 / 3) and quality["pq"] == pytest.approx(2 / 9)


def test_inputs_torch_channel_first_and_sparse_ids():
    relabelled = np.where(BASIC_PRED > 0, BASIC_PRED * 10 + 7, 0)  # ids 17, 27, 37
    true = torch.as_tensor(BASIC_TRUE)[None]  # (1, H, W) torch
    assert instance_f1(true, relabelled) == pytest.approx(1 / 3)
    assert match_instances(true, relabelled).pairs == [(1, 17)]
    assert aji(true.float(), torch.as_tensor(relabelled)) == pytest.approx(0.4)
    assert panoptic_quality(true, relabelled)["pq"] == pytest.approx(2 / 9)


# one 4x4 nucleus; the prediction cuts it into two exact halves of 8 px (IoU 8/16 = 0.5 each)
SPLIT_TRUE = _grid(
    """
    ......
    .1111.
    .1111.
    .1111.
    .1111.
    ......
    """
)
SPLIT_PRED = _grid(
    """
    ......
    .1122.
    .1122.
    .1122.
    .1122.
    ......
    """
)


def test_split_nucleus():
    # at IoU >= 0.5 both halves are candidates, one is matched: TP 1, FP 1, FN 0 -> F1 = 2/3
    match = match_instances(SPLIT_TRUE, SPLIT_PRED)
    assert (match.tp, match.fp, match.fn) == (1, 1, 0) and match.ious == pytest.approx([0.5])
    assert instance_f1(SPLIT_TRUE, SPLIT_PRED) == pytest.approx(2 / 3)
    assert instance_f1(SPLIT_TRUE, SPLIT_PRED, iou_threshold=0.6) == 0.0
    # MONAI pairs at IoU > 0.5 only: the exact tie is no pair there: TP 0, FP 2, FN 1 -> RQ = PQ = 0
    quality = panoptic_quality(SPLIT_TRUE, SPLIT_PRED)
    assert (quality["tp"], quality["fp"], quality["fn"]) == (0, 2, 1) and quality["pq"] == 0.0
    # AJI: G1 -> S1 (tie, lowest id): C 8, U 16; S2 unused: U += 8 -> 8/24; AJI+ pairs the same way
    assert aji(SPLIT_TRUE, SPLIT_PRED) == pytest.approx(1 / 3)
    assert aji_plus(SPLIT_TRUE, SPLIT_PRED) == pytest.approx(1 / 3)
    assert binary_dice(SPLIT_TRUE, SPLIT_PRED) == 1.0


def test_merged_prediction_aji_vs_aji_plus():
    true, pred = SPLIT_PRED, SPLIT_TRUE  # two 8 px nuclei, predicted as one 16 px object
    # F1: one of the two IoU-0.5 pairs: TP 1, FP 0, FN 1 -> 2/3
    assert instance_f1(true, pred) == pytest.approx(2 / 3)
    # AJI (Kumar): both nuclei pick S1: C = 8 + 8, U = 16 + 16 -> 0.5
    assert aji(true, pred) == pytest.approx(0.5)
    # AJI+: S1 pairs once (C 8, U 16), the other nucleus adds its 8 px to U -> 8/24
    assert aji_plus(true, pred) == pytest.approx(1 / 3)


def test_hungarian_matching_below_half_maximises_pairs():
    # one row of 20 px: G1 = cols 0-9, G2 = cols 10-19; S2 = cols 0-3, S1 = cols 4-13
    true = np.array([[1] * 10 + [2] * 10])
    pred = np.array([[2] * 4 + [1] * 10 + [0] * 6])
    # IoU(G1,S1) = 6/14, IoU(G2,S1) = 4/16 = 0.25 exactly, IoU(G1,S2) = 4/10. At 0.25 the greedy best pair
    # (G1,S1) would leave one pair; the assignment takes (G1,S2) and (G2,S1): TP 2, F1 1. The 0.25 pair counts (>=).
    match = match_instances(true, pred, iou_threshold=0.25)
    assert match.pairs == [(1, 2), (2, 1)] and match.ious == pytest.approx([0.4, 0.25])
    assert instance_f1(true, pred, iou_threshold=0.25) == 1.0
    # above 0.4 only (G1, S1) is left
    assert match_instances(true, pred, iou_threshold=0.41).pairs == [(1, 1)]


def test_empty_images():
    empty = np.zeros((4, 4), dtype=np.int64)
    one = empty.copy()
    one[1:3, 1:3] = 5
    assert instance_f1(empty, empty) == 1.0 and aji(empty, empty) == 1.0 and aji_plus(empty, empty) == 1.0
    assert binary_dice(empty, empty) == 1.0
    assert panoptic_quality(empty, empty) == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "tp": 0, "fp": 0, "fn": 0}
    for true, pred in ((empty, one), (one, empty)):
        assert instance_f1(true, pred) == 0.0 and aji(true, pred) == 0.0 and aji_plus(true, pred) == 0.0
        assert binary_dice(true, pred) == 0.0 and panoptic_quality(true, pred)["pq"] == 0.0
    assert instance_f1(one, one) == 1.0 and aji(one, one) == 1.0 and panoptic_quality(one, one)["pq"] == 1.0


def test_dataset_f1_sums_counts():
    # basic: TP 1, FP 2, FN 2; split: TP 1, FP 1, FN 0 -> TP 2, FP 3, FN 2: F1 = 4/9 (the per-image mean is 1/2)
    trues, preds = [BASIC_TRUE, SPLIT_TRUE], [BASIC_PRED, SPLIT_PRED]
    assert dataset_f1(trues, preds) == pytest.approx(4 / 9)
    assert dataset_f1([np.zeros((2, 2))], [np.zeros((2, 2))]) == 1.0


def test_bad_input_refused():
    with pytest.raises(UserError, match="one size"):
        instance_f1(np.zeros((4, 4), int), np.zeros((4, 5), int))
    with pytest.raises(UserError, match="negative"):
        aji(-np.ones((4, 4), int), np.zeros((4, 4), int))
    with pytest.raises(UserError, match="whole numbers"):
        binary_dice(np.full((4, 4), 0.5), np.zeros((4, 4)))
    with pytest.raises(UserError, match="one map"):
        panoptic_quality(np.zeros((2, 4, 4), int), np.zeros((2, 4, 4), int))
    with pytest.raises(OptionError, match="iou_threshold"):
        instance_f1(BASIC_TRUE, BASIC_PRED, iou_threshold=0)
    with pytest.raises(UserError, match="one per image"):
        dataset_f1([BASIC_TRUE], [])
