"""Mask encoding, class ablation, schedulers and seeded sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_diffusion_unet

from meddiff.data import ABSENT_VALUE, EncodeMaskd, RandClassAblationd, decode_mask, encode_mask
from meddiff.inferers import ConditionedSamplingInferer
from meddiff.schedulers import make_scheduler


def test_encoding_separates_background_from_absent_class() -> None:
    label = np.array([[0, 1], [2, 3]])
    full = encode_mask(label, num_classes=4)
    assert full.shape == (3, 2, 2)
    np.testing.assert_array_equal(full[0], [[0, 1], [0, 0]])
    np.testing.assert_array_equal(full[2], [[0, 0], [0, 1]])
    ablated = encode_mask(label, num_classes=4, ablated_classes=[2])
    assert (ablated[1] == ABSENT_VALUE).all()  # "vessels not given" is -1 everywhere ...
    np.testing.assert_array_equal(ablated[[0, 2]], full[[0, 2]])
    background_only = encode_mask(np.zeros((2, 2)), num_classes=4)
    assert not torch.equal(background_only[1], ablated[1])  # ... unlike "no vessels here" (0)
    np.testing.assert_array_equal(decode_mask(full), label)
    np.testing.assert_array_equal(decode_mask(ablated), [[0, 1], [0, 3]])
    with pytest.raises(ValueError, match="not a foreground class"):
        encode_mask(label, 4, ablated_classes=[0])


def test_random_ablation_is_per_sample_bernoulli() -> None:
    encoded = EncodeMaskd("label", num_classes=4)({"label": np.ones((1, 4, 4))})["mask"]
    assert RandClassAblationd("mask", prob=0.0)({"mask": encoded})["mask"].equal(encoded)
    assert (RandClassAblationd("mask", prob=1.0)({"mask": encoded})["mask"] == ABSENT_VALUE).all()
    transform = RandClassAblationd("mask", prob=0.5)
    transform.set_random_state(0)
    draws = np.array(
        [(transform({"mask": encoded})["mask"] == ABSENT_VALUE).flatten(1).all(1).numpy() for _ in range(400)]
    )
    assert abs(draws.mean() - 0.5) < 0.06  # each class removed with probability 1/2 ...
    subsets = {tuple(d) for d in draws}
    assert len(subsets) == 8  # ... and all 2^3 subsets occur, drawn per sample


def test_ddpm_full_chain_and_respaced() -> None:
    full = make_scheduler("ddpm", 1000)
    assert full.timesteps.tolist() == list(range(999, -1, -1)) and full.plan()[-1] == (0, -1)
    respaced = make_scheduler("ddpm", 10)
    assert respaced.timesteps.tolist() == list(range(999, -1, -100)) and respaced.plan()[-1] == (99, -1)
    ddim = make_scheduler("ddim", 4)
    assert ddim.timesteps.tolist() == [999, 749, 499, 249] and ddim.plan()[-1] == (249, -1)
    with pytest.raises(ValueError):
        make_scheduler("ddim", 0)


def test_ddim_is_deterministic_with_a_seed() -> None:
    net, cond = tiny_diffusion_unet(), encode_mask(np.eye(16, dtype=int) * 2, 4)[None].repeat(2, 1, 1, 1)
    inferer = ConditionedSamplingInferer(out_channels=1, num_inference_steps=5, seed=7)
    a, b = inferer(cond, net), inferer(cond, net)
    assert a.shape == (2, 1, 16, 16) and torch.equal(a, b)
    assert not torch.equal(a, inferer(cond, net, seed=8))
    assert a.abs().max() <= 1.0
    ddpm = ConditionedSamplingInferer(sampler="ddpm", num_inference_steps=5, seed=7)
    assert torch.equal(ddpm(cond, net), ddpm(cond, net))


def test_bf16_sampling_close_to_fp32() -> None:
    net, cond = tiny_diffusion_unet(), encode_mask(np.eye(16, dtype=int), 4)[None]
    fp32 = ConditionedSamplingInferer(num_inference_steps=5, seed=3)(cond, net)
    fast = ConditionedSamplingInferer(num_inference_steps=5, seed=3, precision="bf16", channels_last=True)(cond, net)
    assert next(net.parameters()).dtype == torch.float32  # the caller's network is left untouched
    assert (fast - fp32).abs().mean() < 0.05
