"""`meddiff.nuclei` against hand-computed maps: hv offsets, edges, pixel shuffles, structure pairing, preview."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from meddiff import nuclei
from meddiff.errors import OptionError, UserError
from meddiff.nuclei import (
    COLOUR_CHANNELS,
    HV_EDGE_CHANNELS,
    NucleiConditiond,
    condition_preview,
    hv_map,
    instance_edges,
    match_structures,
    nuclei_condition,
    shuffle_pixels,
    shuffle_structures,
    structure_properties,
)


def test_hv_bar_of_five():
    inst = np.zeros((3, 7), dtype=np.int32)
    inst[1, 1:6] = 4
    hv = hv_map(inst, min_size=1)
    assert hv.dtype == np.float32 and hv.shape == (2, 3, 7)
    np.testing.assert_allclose(hv[0, 1], [0, -1, -0.5, 0, 0.5, 1, 0])
    assert not hv[0, [0, 2]].any() and not hv[1].any()  # background 0; a one-row bar has no vertical offset


def test_hv_square_and_rounding():
    inst = np.zeros((4, 4), dtype=np.uint16)
    inst[1:4, 1:4] = 1
    hv = hv_map(inst, min_size=0)
    np.testing.assert_allclose(hv[0, 1:, 1:], [[-1, 0, 1]] * 3)
    np.testing.assert_allclose(hv[1, 1:, 1:], [[-1] * 3, [0] * 3, [1] * 3])
    # a 2x2 square: centre (0.5, 0.5) rounds half up to (1, 1), so offsets -1, 0 and no positive side
    hv = hv_map(np.ones((2, 2), dtype=np.int64), min_size=0)
    np.testing.assert_allclose(hv[0], [[-1, 0], [-1, 0]])
    np.testing.assert_allclose(hv[1], [[-1, -1], [0, 0]])
    # a 1x4 bar: centre 1.5 -> 2, offsets -2, -1, 0, 1: each side by its own extreme
    np.testing.assert_allclose(hv_map(np.ones((1, 4), dtype=int), min_size=0)[0, 0], [-1, -0.5, 0, 1])


def test_hv_two_touching_instances_are_separate():
    inst = np.zeros((3, 8), dtype=np.int32)
    inst[1, 0:5] = 7  # bar of five
    inst[0:3, 5:8] = 1000  # 3x3 square right next to it
    hv = hv_map(inst, min_size=1)
    np.testing.assert_allclose(hv[0, 1], [-1, -0.5, 0, 0.5, 1, -1, 0, 1])
    np.testing.assert_allclose(hv[0, 0], [0, 0, 0, 0, 0, -1, 0, 1])
    np.testing.assert_allclose(hv[1, :, 5:], [[-1] * 3, [0] * 3, [1] * 3])
    assert not hv[1, :, :5].any()


def test_hv_small_instances_removed():
    inst = np.zeros((6, 14), dtype=np.int32)
    inst[0:5, 0:6] = 1  # 30 px: kept (the seed removes objects with fewer than 30 px)
    inst[0:5, 7:13] = 2
    inst[0, 7] = 0  # 29 px: removed
    hv = hv_map(inst)
    # 5x6 block: centre (2, 2.5) -> (2, 3); x offsets -3..2, y offsets -2..2
    np.testing.assert_allclose(hv[0, 0, :6], [-1, -2 / 3, -1 / 3, 0, 0.5, 1], rtol=1e-6)
    np.testing.assert_allclose(hv[1, :5, 0], [-1, -0.5, 0, 0.5, 1])
    assert not hv[:, :, 6:].any()
    assert hv.min() >= -1 and hv.max() <= 1
    assert not hv_map(np.zeros((3, 3), dtype=int)).any()


def test_hv_refuses_bad_maps():
    with pytest.raises(ValueError, match="integer"):
        hv_map(np.zeros((3, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="2-D"):
        hv_map(np.zeros((1, 3, 3), dtype=int))
    with pytest.raises(OptionError, match="min_size"):
        hv_map(np.zeros((3, 3), dtype=int), min_size=-1)


def test_edges_mark_both_sides_of_each_change():
    inst = np.zeros((4, 4), dtype=np.int32)
    inst[1:3, 1:3] = 5
    edges = instance_edges(inst)
    assert edges.dtype == np.float32 and edges.shape == (1, 4, 4)
    expected = np.array([[0, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 0]], dtype=np.float32)
    np.testing.assert_array_equal(edges[0], expected)  # diagonal-only background corners stay 0
    touching = np.array([[1, 1, 2, 2, 2]])
    np.testing.assert_array_equal(instance_edges(touching)[0], [[0, 1, 1, 0, 0]])
    assert not instance_edges(np.full((3, 3), 2)).any()


def test_shuffle_pixels_moves_whole_pixels():
    rng = np.random.default_rng(0)
    index = np.arange(64, dtype=np.float32).reshape(8, 8) / 64
    image = np.stack([index, -index, index**2])
    shuffled = shuffle_pixels(image, rng)
    assert shuffled.shape == image.shape and not np.array_equal(shuffled, image)
    # every output pixel is one input pixel with its three channels together, each used once
    k = np.rint(shuffled[0] * 64).astype(int)
    np.testing.assert_array_equal(np.sort(k.ravel()), np.arange(64))
    np.testing.assert_allclose(shuffled, image.reshape(3, -1)[:, k.ravel()].reshape(3, 8, 8))
    np.testing.assert_array_equal(
        shuffle_pixels(image, np.random.default_rng(5)), shuffle_pixels(image, np.random.default_rng(5))
    )


def test_shuffle_pixels_preserve_nuclei():
    inst = np.zeros((8, 8), dtype=np.int32)
    inst[2:5, 2:6] = 1
    inst[6:8, 0:3] = 2
    image = np.where(inst > 0, 0.5, -0.5)[None].repeat(3, 0) + np.arange(64).reshape(8, 8) / 1000
    shuffled = shuffle_pixels(image, np.random.default_rng(1), inst=inst)
    assert (shuffled[:, inst > 0] > 0).all() and (shuffled[:, inst == 0] < 0).all()
    assert not np.array_equal(shuffled, image)
    np.testing.assert_allclose(np.sort(shuffled[0, inst > 0]), np.sort(image[0, inst > 0]))


def test_nuclei_condition_channel_order():
    inst = np.zeros((8, 8), dtype=np.int32)
    inst[1:4, 1:4] = 1
    inst[5:8, 4:8] = 2
    image = np.linspace(-1, 1, 3 * 64, dtype=np.float32).reshape(3, 8, 8)
    condition = nuclei_condition(inst, image, np.random.default_rng(0), min_size=1)
    assert condition.dtype == np.float32 and condition.shape == (6, 8, 8)
    np.testing.assert_array_equal(condition[[0, 1]], hv_map(inst, min_size=1))
    np.testing.assert_array_equal(condition[5], instance_edges(inst)[0])
    np.testing.assert_array_equal(condition[2:5], shuffle_pixels(image, np.random.default_rng(0)))
    assert HV_EDGE_CHANNELS == (0, 1, 5) and COLOUR_CHANNELS == (2, 3, 4)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        nuclei_condition(inst, image * 255, np.random.default_rng(0))
    with pytest.raises(ValueError, match="appearance image"):
        nuclei_condition(inst, image[:, :4], np.random.default_rng(0))


def test_nuclei_conditiond_torch_and_seeded():
    label = torch.zeros(1, 8, 8, dtype=torch.int32)
    label[0, 2:6, 2:6] = 3
    image = torch.linspace(-1, 1, 3 * 64).reshape(3, 8, 8)
    sample = {"label": MetaTensor(label), "image": image, "name": "a"}
    transform = NucleiConditiond(min_size=1).set_random_state(seed=3)
    out = transform(sample)
    condition = out["condition"]
    assert isinstance(condition, torch.Tensor) and condition.dtype == torch.float32 and condition.shape == (6, 8, 8)
    assert out["name"] == "a" and out["label"] is sample["label"]
    np.testing.assert_array_equal(condition[:2].numpy(), hv_map(label[0].numpy(), min_size=1))
    np.testing.assert_array_equal(condition[5].numpy(), instance_edges(label[0].numpy())[0])
    np.testing.assert_allclose(np.sort(condition[2].numpy().ravel()), np.sort(image[0].numpy().ravel()))
    again = NucleiConditiond(min_size=1).set_random_state(seed=3)(sample)["condition"]
    torch.testing.assert_close(condition.as_tensor(), again.as_tensor())
    second = transform(sample)["condition"]  # the next draw of the same transform differs
    assert not torch.equal(second[2:5].as_tensor(), condition[2:5].as_tensor())
    preserved = NucleiConditiond(min_size=1, preserve_nuclei=True).set_random_state(seed=0)(
        {"label": label, "image": torch.where(label > 0, 0.5, -0.5).repeat(3, 1, 1)}
    )["condition"]
    assert (preserved[2:5, label[0] > 0] == 0.5).all() and (preserved[2:5, label[0] == 0] == -0.5).all()


def test_structure_properties():
    inst = np.zeros((6, 10), dtype=np.int32)
    inst[0:3, 0] = 1
    inst[0:3, 4] = 1  # two bars with one id: area 6, convex hull 3x5 = 15 px, solidity 0.4
    inst[3:6, 6:9] = 2  # 3x3 square: area 9, solidity 1
    solidity, total, median = structure_properties(inst)
    assert solidity == pytest.approx((6 * 0.4 + 9 * 1) / 15)
    assert (total, median) == (15, 7.5)
    assert nuclei._areas(inst) == (total, median)  # what match_structures scores, without convex hulls
    assert structure_properties(np.zeros((4, 4), dtype=int)) == (0.0, 0.0, 0.0)


def squares(sides: list[int]) -> list[np.ndarray]:
    maps = []
    for side in sides:
        inst = np.zeros((12, 12), dtype=np.int32)
        inst[:side, :side] = 1
        maps.append(inst)
    return maps


def test_match_structures_picks_among_nearest():
    maps = squares([6, 7, 8, 9, 10, 11])  # areas 36, 49, 64, 81, 100, 121
    # one nucleus each, so the score ranks by |area - area_i|; the two nearest by hand:
    nearest = {0: {1, 2}, 1: {0, 2}, 2: {1, 3}, 3: {2, 4}, 4: {3, 5}, 5: {3, 4}}
    seen = {i: set() for i in nearest}
    for seed in range(20):
        matches = match_structures(maps, num_similar=2, seed=seed)
        for i, j in enumerate(matches):
            assert j in nearest[i]
            seen[i].add(j)
    assert seen == nearest  # the pick among the candidates is random, both get drawn
    assert match_structures(maps, num_similar=2, seed=7) == match_structures(maps, num_similar=2, seed=7)
    wide = match_structures(maps, num_similar=20, seed=0)
    assert all(j != i and 0 <= j < 6 for i, j in enumerate(wide))
    assert match_structures(maps[:2], seed=0) == [1, 0]


def test_match_structures_refuses():
    with pytest.raises(UserError, match="at least 2 structures"):
        match_structures(squares([6]))
    with pytest.raises(OptionError, match="num_similar"):
        match_structures(squares([6, 7]), num_similar=0)


def test_shuffle_structures():
    order = shuffle_structures(10)
    assert sorted(order) == list(range(10)) and order == shuffle_structures(10, seed=42)
    assert order != list(range(10)) and order != shuffle_structures(10, seed=1)
    assert shuffle_structures(0) == []


def test_condition_preview():
    condition = np.zeros((6, 2, 3), dtype=np.float32)
    condition[0, 0, 0], condition[1, 0, 0] = -1.0, 1.0
    condition[0, 0, 1] = 0.5
    condition[5, 1, 2] = 1.0
    condition[2:5] = 0.3  # colour channels are not shown
    picture = condition_preview(condition)
    assert picture.dtype == np.uint8 and picture.shape == (2, 3, 3)
    np.testing.assert_array_equal(picture[0, 0], [0, 255, 0])
    np.testing.assert_array_equal(picture[0, 1], [191, 128, 0])  # round(127.5 * 1.5) = 191
    np.testing.assert_array_equal(picture[1, 0], [128, 128, 0])
    np.testing.assert_array_equal(picture[1, 2], [255, 255, 255])
    with pytest.raises(ValueError, match="6 channels"):
        condition_preview(condition[:3])
