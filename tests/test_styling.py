"""`meddiff.sampling.styling`: the mean-shift identity of the guided step, the loss terms, ZeCon, the styling run."""

from __future__ import annotations

import math

import pytest
import torch
from monai.networks.nets import DiffusionModelUNet

from meddiff.errors import OptionError, UserError
from meddiff.sampling import sample
from meddiff.sampling.styling import (
    EncoderFeatures,
    StylingLoss,
    mean_shift_guidance,
    patch_nce_loss,
    style,
    styling_guidance,
    zecon_loss,
)
from meddiff.schedulers import DDIMScheduler, DDPMScheduler, RePaintScheduler

OFF = {"l2_target": 0.0, "range": 0.0, "zecon": 0.0, "mse_source": 0.0}


def tiny_unet() -> DiffusionModelUNet:
    torch.manual_seed(0)
    return DiffusionModelUNet(
        spatial_dims=2,
        in_channels=4,
        out_channels=8,
        channels=(8, 8),
        attention_levels=(False, False),
        num_res_blocks=1,
        norm_num_groups=8,
    ).eval()


class ToyNet(torch.nn.Module):
    """(eps, v) from a convolution of x, scaled by the timestep."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        out = self.conv(x) * (1.0 + timesteps.float().view(-1, 1, 1, 1) / 1000.0)
        return torch.cat([out[:, :4], torch.tanh(out[:, 4:])], dim=1)


def make_scheduler(variance_type: str = "learned_range", steps: int = 20) -> DDPMScheduler:
    scheduler = DDPMScheduler(1000, variance_type=variance_type, clip_sample=False)
    scheduler.set_timesteps(steps)
    return scheduler


def images(batch: int = 1, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    source = torch.rand(batch, 4, size, size, generator=g) * 2 - 1
    target = torch.rand(batch, 4, size, size, generator=g) * 2 - 1
    return source, target


def step_mean(scheduler: DDPMScheduler, output: torch.Tensor, t: int, t_next: int, x: torch.Tensor) -> torch.Tensor:
    coef_x0, coef_xt, _, _ = scheduler.posterior(t, t_next)
    return coef_x0 * scheduler.predict_x0(output[:, :4], t, x) + coef_xt * x


@pytest.mark.parametrize("variance_type", ["learned_range", "fixed_small"])
@pytest.mark.parametrize("noise_aug", [True, False])
@pytest.mark.parametrize("move", [0, 9, 18])
def test_guided_mean_is_unguided_mean_minus_sigma_grad(variance_type, noise_aug, move):
    network, scheduler = ToyNet(), make_scheduler(variance_type)
    t, t_next = scheduler.plan()[move]
    weight = torch.linspace(0.5, 2.0, 4 * 8 * 8).view(1, 4, 8, 8)
    ab = scheduler.alpha_bar(t)

    def loss(x_in, x0, _t):
        # scaled by alpha_bar so that the gradient (x0 ~ x_t / sqrt(alpha_bar)) stays O(0.1) at every t
        return ab * (0.01 * ((x_in - 0.3) ** 2 * weight).flatten(1).sum(1) + 0.1 * x0.pow(2).flatten(1).mean(1))

    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    tt = torch.full((2,), t, dtype=torch.long)
    guided = mean_shift_guidance(network, scheduler, loss, noise_aug=noise_aug)(x, tt)
    with torch.no_grad():
        plain = network(x, timesteps=tt)

    # the gradient and Sigma, computed here independently
    x_req = x.clone().requires_grad_(True)
    out = network(x_req, timesteps=tt)
    x0 = (x_req - math.sqrt(1 - ab) * out[:, :4]) / math.sqrt(ab)
    fac = math.sqrt(1 - ab)
    x_in = fac * x0 + (1 - fac) * x_req if noise_aug else x0
    grad = torch.autograd.grad(loss(x_in, x0, tt).sum(), x_req)[0]
    sigma = scheduler.variance(t, t_next, plain[:, 4:])
    assert grad.abs().max() > 1e-3  # the check is not vacuous
    torch.testing.assert_close(guided[:, 4:], plain[:, 4:], rtol=0, atol=0)

    # means in float64: at t = 999 they are hundreds, where float32 itself resolves only ~1e-4
    guided, plain, x, shift = guided.double(), plain.double(), x.double(), (sigma * grad).double()
    expected = step_mean(scheduler, plain, t, t_next, x) - shift
    torch.testing.assert_close(step_mean(scheduler, guided, t, t_next, x), expected, rtol=0, atol=1e-5)
    # the scheduler's own step draws around the shifted mean
    s_guided, _ = scheduler.step(guided, t, t_next, x, torch.Generator().manual_seed(3))
    s_plain, _ = scheduler.step(plain, t, t_next, x, torch.Generator().manual_seed(3))
    torch.testing.assert_close(s_guided - s_plain, -shift, rtol=0, atol=1e-5)


def test_final_move_is_unguided():
    network, scheduler = ToyNet(), make_scheduler()
    t, t_next = scheduler.plan()[-1]
    assert t_next == -1
    x = torch.randn(1, 4, 8, 8)
    tt = torch.full((1,), t, dtype=torch.long)
    guided = mean_shift_guidance(network, scheduler, lambda x_in, x0, _t: x_in.pow(2).flatten(1).sum(1))(x, tt)
    with torch.no_grad():
        torch.testing.assert_close(guided, network(x, timesteps=tt), rtol=0, atol=0)


def test_scheduler_requirements():
    network = ToyNet()
    clipped = DDPMScheduler(1000, variance_type="learned_range", clip_sample=True)
    with pytest.raises(OptionError, match="clip_sample"):
        mean_shift_guidance(network, clipped, lambda *a: a[0].sum())
    with pytest.raises(OptionError, match="ddpm"):
        mean_shift_guidance(network, DDIMScheduler(1000, clip_sample=False), lambda *a: a[0].sum())
    jumping = RePaintScheduler(1000, clip_sample=False, jump_length=2, jump_n_sample=2)
    jumping.set_timesteps(10)
    with pytest.raises(OptionError, match="jumps"):
        mean_shift_guidance(network, jumping, lambda *a: a[0].sum())


def test_patch_nce_exact_value_and_zecon_sanity():
    p = 6
    keys = torch.eye(p).unsqueeze(0)  # orthonormal patches: q.k = 1 at the positive, 0 elsewhere
    for tau in (0.07, 0.5):
        expected = math.log(1 + (p - 1) * math.exp(-1 / tau))
        torch.testing.assert_close(patch_nce_loss(keys, keys, tau), torch.tensor([expected]), rtol=1e-5, atol=1e-7)

    network, scheduler = tiny_unet(), make_scheduler()
    encoder = EncoderFeatures(network)
    x, y = images(batch=2)
    t = torch.full((2,), 500, dtype=torch.long)
    with torch.no_grad():
        fx, fy = encoder(x, t), encoder(y, t)
    same = zecon_loss(fx, fx, torch.Generator().manual_seed(0))
    other = zecon_loss(fx, fy, torch.Generator().manual_seed(0))
    assert same.shape == (2,) and (same < other).all()
    del scheduler


def test_encoder_features_stop_early_and_match_the_full_forward():
    network = tiny_unet()
    x, _ = images()
    t = torch.full((1,), 300, dtype=torch.long)
    seen = []
    handle = network.down_blocks[0].register_forward_hook(lambda _m, _i, out: seen.append(out[1][0]))
    calls = []
    out_handle = network.out.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        network(x, timesteps=t)
        assert len(calls) == 1
        features = EncoderFeatures(network, blocks=[0])(x, t)
    handle.remove(), out_handle.remove()
    assert len(calls) == 1  # the encoder-only forward never reached the output block
    assert len(features) == 1 and features[0].shape == (1, 8, 16, 16)
    torch.testing.assert_close(features[0], seen[0])
    with pytest.raises(OptionError, match="zecon_blocks"):
        EncoderFeatures(network, blocks=[2])


def test_terms_switch_off_at_weight_zero():
    network, scheduler = tiny_unet(), make_scheduler()
    source, target = images()
    t, _ = scheduler.plan()[3]
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    tt = torch.full((1,), t, dtype=torch.long)
    with torch.no_grad():
        plain = network(x, timesteps=tt)
    off = styling_guidance(network, scheduler, source, target, torch.Generator(), **OFF)
    torch.testing.assert_close(off(x, tt), plain, rtol=0, atol=0)
    for name in OFF:
        loss = StylingLoss(network, scheduler, source, target, torch.Generator().manual_seed(0), **{**OFF, name: 1.0})
        assert loss.active == [name]
        guided = mean_shift_guidance(network, scheduler, loss)(x, tt)
        assert list(loss.last_terms) == [name]
        assert (guided - plain).abs().max() > 0, name
        torch.testing.assert_close(guided[:, 4:], plain[:, 4:], rtol=0, atol=0)


def test_all_off_style_is_the_plain_run():
    network, scheduler = tiny_unet(), make_scheduler()
    source, target = images()
    styled = style(network, scheduler, source, target, torch.Generator().manual_seed(7), skip_steps=14, **OFF)
    plain = sample(
        lambda x, t: network(x, timesteps=t),
        scheduler,
        image=source,
        skip_steps=14,
        generator=torch.Generator().manual_seed(7),
    )
    torch.testing.assert_close(styled, plain, rtol=0, atol=0)


def test_style_is_deterministic_and_returns_the_final_x0_hat():
    network, scheduler = tiny_unet(), make_scheduler()
    source, target = images(batch=2, size=8)
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    handle = network.register_forward_hook(
        lambda _m, args, kwargs, out: calls.append((args[0], kwargs["timesteps"], out)), with_kwargs=True
    )
    first = style(network, scheduler, source, target, torch.Generator().manual_seed(11), skip_steps=16)
    handle.remove()
    second = style(network, scheduler, source, target, torch.Generator().manual_seed(11), skip_steps=16)
    third = style(network, scheduler, source, target, torch.Generator().manual_seed(12), skip_steps=16)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert (first - third).abs().max() > 1e-4
    assert first.shape == source.shape and torch.isfinite(first).all()
    # 4 moves: 3 guided full forwards plus the unguided final one (encoder-only forwards stop before the output)
    assert len(calls) == 4
    x_last, t_last, out_last = calls[-1]
    assert int(t_last[0]) == scheduler.plan()[-1][0]
    x0_hat = scheduler.predict_x0(out_last[:, :4], int(t_last[0]), x_last)
    torch.testing.assert_close(first, x0_hat, rtol=0, atol=1e-6)


def test_feature_network_files(tmp_path):
    network, scheduler = tiny_unet(), make_scheduler()
    source, target = images()
    with pytest.raises(UserError, match="vgg_weights") as err:
        StylingLoss(network, scheduler, source, target, vgg_weights=tmp_path / "vgg.pt")
    assert "vgg.pt" in str(err.value)
    garbage = tmp_path / "dino.pt"
    garbage.write_bytes(b"not a torchscript file")
    with pytest.raises(UserError, match="dino_weights"):
        StylingLoss(network, scheduler, source, target, dino_weights=garbage)

    class Vgg(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(4, 4, 3, stride=2, padding=1)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = self.a(x)
            return h, self.b(h)

    class Dino(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Conv2d(3, 6, 8, stride=8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            assert x.shape[-1] == 224
            return self.proj(x).mean(dim=(2, 3))

    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(Vgg()), str(tmp_path / "vgg.pt"))
    torch.jit.save(torch.jit.script(Dino()), str(tmp_path / "dino.pt"))
    # the feature terms are off without their files, whatever their weights
    assert "vgg" not in StylingLoss(network, scheduler, source, target).active
    loss = StylingLoss(
        network,
        scheduler,
        source,
        target,
        torch.Generator().manual_seed(0),
        **OFF,
        vgg_weights=tmp_path / "vgg.pt",
        dino_weights=tmp_path / "dino.pt",
        direction_above=15,
    )
    assert loss.active == ["vgg", "dino_target", "dino_direction"]
    guide = mean_shift_guidance(network, scheduler, loss)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    plan = scheduler.plan()
    for move, expect_direction in ((0, True), (3, True), (4, False)):  # step index k = 19 - move; on while k > 15
        t = torch.full((1,), plan[move][0], dtype=torch.long)
        guide(x, t)
        assert set(loss.last_terms) == {"vgg", "dino_target"} | ({"dino_direction"} if expect_direction else set())
        assert all(torch.isfinite(v).all() for v in loss.last_terms.values())
    assert loss.last_terms["vgg"].item() > 0
