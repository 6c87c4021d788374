"""The conditioning, prepare-batch, guidance, inpainting and latent pieces of the sampling core, against exact answers.

Exact answers come from Gaussian data: for x_0 ~ N(mu, Sigma) the optimal noise predictor is
E[eps | x_t] = sqrt(1 - a) (a Sigma + (1 - a) I)^-1 (x_t - sqrt(a) mu) with a = alpha_bar_t, so a "network" that
computes it makes every sampler's target distribution known in closed form.
"""

from __future__ import annotations

import math

import pytest
import torch
from monai.networks.nets import AutoencoderKL, SPADEDiffusionModelUNet

from meddiff.conditioning import Conditioning, concat_inputs
from meddiff.engines import CIMDPrepareBatch, ConditionDropoutPrepareBatch, ConditionedPrepareBatch
from meddiff.errors import OptionError
from meddiff.inferers import (
    ConditionedSamplingInferer,
    DiffusionTrainingInferer,
    InpaintingSamplingInferer,
    LatentSamplingInferer,
)
from meddiff.latent import LatentDecoder
from meddiff.sampling import KnownRegionMerge, classifier_free, classifier_gradient, make_generator, sample
from meddiff.schedulers import make_scheduler


def alpha_bar_of(scheduler, t: torch.Tensor) -> torch.Tensor:
    return scheduler.alphas_cumprod[t.long()]


def gaussian_eps(x: torch.Tensor, a: torch.Tensor, mu, s: float) -> torch.Tensor:
    """E[eps | x_t] for per-pixel independent x_0 ~ N(mu, s^2); `a` is alpha_bar per batch item."""
    a = a.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s**2 + 1 - a)


class MeanFromCondition(torch.nn.Module):
    """A concat-conditioned "network": channel 0 is x_t, channel 1 the data mean mu; returns the exact eps."""

    def __init__(self, scheduler, s: float) -> None:
        super().__init__()
        self.scheduler, self.s, self.dummy = scheduler, s, torch.nn.Parameter(torch.zeros(()))
        self.calls: list[int] = []

    def forward(self, inputs: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        self.calls.append(inputs.shape[0])
        x, mu = inputs[:, :1].double(), inputs[:, 1:].double()
        return gaussian_eps(x, alpha_bar_of(self.scheduler, timesteps), mu, self.s).float()


def test_conditioning_modes_place_the_condition() -> None:
    x, seen = torch.randn(2, 1, 4, 4), {}

    def net(inputs, timesteps, **kwargs):
        seen.update(inputs=inputs, **kwargs)
        return inputs[:, :1]

    cond = torch.rand(2, 3, 4, 4)
    Conditioning("concat")(net, x, torch.zeros(2), cond)
    assert seen["inputs"].shape == (2, 4, 4, 4) and torch.equal(seen["inputs"][:, 1:], cond)
    seen.clear()
    Conditioning("seg")(net, x, torch.zeros(2), cond)
    assert torch.equal(seen["inputs"], x) and torch.equal(seen["seg"], cond)
    seen.clear()
    Conditioning("class", null_class=5)(net, x, torch.zeros(2), torch.tensor([1, 2]))
    assert seen["class_labels"].tolist() == [1, 2]
    z = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    stacked = concat_inputs(x, cond, z)
    assert stacked.shape == (2, 6, 4, 4) and (stacked[1, 5] == 4.0).all()  # the vector is broadcast over the grid
    assert torch.equal(Conditioning("latent").network_inputs(x, z)[0], concat_inputs(x, z))
    assert torch.equal(Conditioning("none").network_inputs(x, None)[0], x)
    assert (Conditioning("seg").null(cond) == 0).all() and (
        Conditioning("concat", null_value=-1).null(cond) == -1
    ).all()
    assert Conditioning("class", null_class=5).null(torch.tensor([1, 2])).tolist() == [5, 5]
    with pytest.raises(ValueError, match="null_class"):
        Conditioning("class").null(torch.tensor([1]))
    with pytest.raises(ValueError, match="unknown conditioning mode 'crossatn'"):
        Conditioning("crossatn")
    with pytest.raises(ValueError, match="needs a condition"):
        Conditioning("seg").network_inputs(x, None)


def test_prepare_batches_override_one_hook() -> None:
    batch = {"image": torch.rand(4, 1, 8, 8), "label": torch.rand(4, 1, 8, 8), "mask": torch.rand(4, 3, 8, 8)}
    images, target, args, kwargs = ConditionedPrepareBatch(1000, "mask")(batch, "cpu")
    assert torch.equal(images, batch["image"]) and torch.equal(kwargs["condition"], batch["mask"])
    assert torch.equal(target, kwargs["noise"]) and kwargs["timesteps"].shape == (4,) and args == ()
    images, _, _, kwargs = CIMDPrepareBatch(1000)(batch, "cpu")
    assert torch.equal(images, batch["label"]) and torch.equal(kwargs["condition"], batch["image"])
    with pytest.raises(ValueError, match="'label'"):
        CIMDPrepareBatch(1000)({"image": batch["image"]}, "cpu")
    kept = ConditionDropoutPrepareBatch(1000, "mask", drop_rate=0.0)(batch, "cpu")[3]["condition"]
    assert torch.equal(kept, batch["mask"])
    dropped = ConditionDropoutPrepareBatch(1000, "mask", drop_rate=1.0)(batch, "cpu")[3]["condition"]
    assert (dropped == 0).all()
    partial = ConditionDropoutPrepareBatch(1000, "mask", drop_rate=1.0, drop_channels=[0, 2])(batch, "cpu")[3]
    assert (partial["condition"][:, [0, 2]] == 0).all() and torch.equal(partial["condition"][:, 1], batch["mask"][:, 1])
    torch.manual_seed(0)
    big = {"image": torch.rand(2000, 1, 1, 1), "mask": torch.ones(2000, 1, 1, 1)}
    rate = float(
        (ConditionDropoutPrepareBatch(1000, "mask", drop_rate=0.2)(big, "cpu")[3]["condition"] == 0).float().mean()
    )
    assert abs(rate - 0.2) < 0.03  # drawn per sample


def test_training_inferer_refuses_another_mode_and_feeds_spade() -> None:
    scheduler = make_scheduler("ddpm", 1000)
    net = SPADEDiffusionModelUNet(
        2, 1, 1, label_nc=3, channels=(8, 8), attention_levels=(False, False), num_res_blocks=1, norm_num_groups=8
    )
    inferer = DiffusionTrainingInferer(scheduler, conditioning="seg")
    x, noise, seg = torch.rand(2, 1, 8, 8), torch.randn(2, 1, 8, 8), torch.rand(2, 3, 8, 8)
    t = torch.tensor([3, 500])
    out = inferer(x, net, noise, t, condition=seg)
    noisy = scheduler.add_noise(x, noise, t)
    assert torch.allclose(out, net(noisy, timesteps=t, seg=seg), atol=1e-6)
    with pytest.raises(ValueError, match="asked for 'crossattn'"):
        inferer(x, net, noise, t, condition=seg, mode="crossattn")


def test_classifier_free_guidance_gives_the_known_mixture() -> None:
    """Conditional data N(mu_c, s^2), null N(0, s^2): guidance scale w must sample N(w * mu_c, s^2) exactly."""
    s, mu_c, n = 0.5, 0.8, 2000
    for w in (0.0, 1.0, 2.5):
        scheduler = make_scheduler("ddpm", 1000, clip_sample=False)
        net = MeanFromCondition(scheduler, s)
        condition = torch.full((n, 1, 1, 1), mu_c)
        denoiser = classifier_free(net, Conditioning("concat"), condition, w)
        x = sample(denoiser, scheduler, (n, 1, 1, 1), generator=make_generator(w * 10, "cpu"))
        assert abs(float(x.mean()) - w * mu_c) < 4 * s / math.sqrt(n) + 0.01, (w, float(x.mean()))
        assert abs(float(x.std()) - s) < 0.03, (w, float(x.std()))
        assert set(net.calls) == ({2 * n} if w not in (0.0, 1.0) else {n})  # one batched call per step


def test_classifier_free_guidance_reaches_spade_maps() -> None:
    """MONAI 1.6's sampler leaves the SPADE map unguided; here scale 0, 1 and 2 are null, conditional, 2c - u."""
    torch.manual_seed(0)
    net = SPADEDiffusionModelUNet(
        2, 1, 1, label_nc=2, channels=(8, 8), attention_levels=(False, False), num_res_blocks=1, norm_num_groups=8
    ).eval()
    for p in net.parameters():  # MONAI zero-initialises the output layer: give every weight a value
        p.data.normal_(0.0, 0.2)
    seg, x, t = torch.rand(2, 2, 8, 8), torch.randn(2, 1, 8, 8), torch.tensor([10, 10])
    with torch.no_grad():
        cond, uncond = net(x, timesteps=t, seg=seg), net(x, timesteps=t, seg=torch.zeros_like(seg))
        spade = Conditioning("seg")
        assert torch.allclose(classifier_free(net, spade, seg, 0.0)(x, t), uncond, atol=1e-5)
        assert torch.allclose(classifier_free(net, spade, seg, 1.0)(x, t), cond, atol=1e-5)
        assert torch.allclose(classifier_free(net, spade, seg, 2.0)(x, t), 2 * cond - uncond, atol=1e-4)
        assert not torch.allclose(cond, uncond, atol=1e-3)
        two = torch.cat([cond, torch.rand(2, 1, 8, 8)], 1)  # learned sigma: only the eps half is guided
        net2 = lambda inputs, timesteps, seg: torch.cat([two, two])  # noqa: E731
        net2.parameters = net.parameters  # type: ignore[attr-defined]
        out = classifier_free(net2, spade, seg, 3.0, eps_channels=1)(x, t)
        assert torch.equal(out[:, 1:], two[:, 1:])
        per_sample = classifier_free(net, spade, seg, torch.tensor([0.0, 2.0]))(x, t)  # a sweep over s in one batch
        assert torch.allclose(per_sample[0], uncond[0], atol=1e-5)
        assert torch.allclose(per_sample[1], 2 * cond[1] - uncond[1], atol=1e-4)


def test_classifier_gradient_guidance_samples_the_posterior() -> None:
    """Prior x_0 ~ N(mu, s^2), y | x_0 ~ N(x_0, r^2): scale 1 with the exact log p(y | x_t) samples p(x_0 | y)."""
    mu, s, r, y, n = 0.0, 0.6, 0.3, 1.0, 4000
    scheduler = make_scheduler("ddpm", 1000, clip_sample=False)

    def prior(x, t):
        return gaussian_eps(x.double(), alpha_bar_of(scheduler, t), mu, s).float()

    def log_prob(x, t):
        a = alpha_bar_of(scheduler, t).view(-1, 1, 1, 1).to(x.dtype)
        var_t = a * s**2 + 1 - a
        mean_x0 = mu + a.sqrt() * s**2 * (x - a.sqrt() * mu) / var_t  # E[x_0 | x_t]
        var_x0 = s**2 * (1 - a) / var_t
        return (-((y - mean_x0) ** 2) / (2 * (var_x0 + r**2))).flatten(1).sum(1)

    guided = classifier_gradient(prior, log_prob, scheduler, scale=1.0)
    x = sample(guided, scheduler, (n, 1, 1, 1), generator=make_generator(1, "cpu"))
    post_mean, post_std = (mu * r**2 + y * s**2) / (s**2 + r**2), s * r / math.sqrt(s**2 + r**2)
    assert abs(float(x.mean()) - post_mean) < 4 * post_std / math.sqrt(n) + 0.01, float(x.mean())
    assert abs(float(x.std()) - post_std) < 0.03, float(x.std())
    unguided = sample(
        prior, make_scheduler("ddpm", 1000, clip_sample=False), (n, 1, 1, 1), generator=make_generator(1, "cpu")
    )
    assert abs(float(unguided.mean()) - mu) < 0.05  # the shift comes from the guidance


def correlated_eps(x: torch.Tensor, a: torch.Tensor, mu: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """E[eps | x_t] for two-pixel images (B, 1, 1, 2) with x_0 ~ N(mu, cov)."""
    flat = x.double().view(x.shape[0], 2)
    out = torch.empty_like(flat)
    for value in a.unique():
        rows = a == value
        cov_t = value * cov + (1 - value) * torch.eye(2, dtype=torch.float64)
        out[rows] = (1 - value).sqrt() * torch.linalg.solve(cov_t, (flat[rows] - value.sqrt() * mu).T).T
    return out.view_as(x).float()


def test_repaint_keeps_known_pixels_and_samples_the_conditional() -> None:
    """Two correlated pixels; pixel 0 is known (= v). Pixel 1 must follow N(mu1 + rho s1/s0 (v - mu0), s1^2 (1-rho^2)):
    RePaint's resampling at the paper's settings (250 steps, jumps of 10, 10 resamplings) gets there (mean off by
    0.03 where 0.72 is wanted), plain replacement (no jumps) stays biased towards the marginal (off by 0.2)."""
    mu, sd, rho, v, n = torch.tensor([0.0, 0.0], dtype=torch.float64), (0.5, 0.5), 0.9, 0.8, 3000
    cov = torch.tensor([[sd[0] ** 2, rho * sd[0] * sd[1]], [rho * sd[0] * sd[1], sd[1] ** 2]], dtype=torch.float64)
    want_mean, want_std = rho * sd[1] / sd[0] * v, sd[1] * math.sqrt(1 - rho**2)
    known, mask = torch.zeros(n, 1, 1, 2), torch.zeros(n, 1, 1, 2)
    known[..., 0], mask[..., 0] = v, 1.0
    errors = {}
    for name, scheduler in (
        ("repaint", make_scheduler("repaint", 250, clip_sample=False, jump_length=10, jump_n_sample=10)),
        ("replacement", make_scheduler("ddpm", 250, clip_sample=False)),
    ):

        def denoise(x, t, scheduler=scheduler):
            return correlated_eps(x, alpha_bar_of(scheduler, t), mu, cov)

        merge = KnownRegionMerge(known, mask, scheduler)
        x = sample(denoise, scheduler, (n, 1, 1, 2), generator=make_generator(3, "cpu"), after_step=merge)
        assert torch.equal(x[..., 0], known[..., 0])  # known pixels end exactly at their values
        errors[name] = abs(float(x[..., 1].mean()) - want_mean)
        if name == "repaint":
            assert errors[name] < 0.05, errors
            assert abs(float(x[..., 1].std()) - want_std) < 0.02
    assert errors["replacement"] > 4 * errors["repaint"], errors


def test_known_region_merge_draws_from_q_of_the_known_image() -> None:
    """After a move to t_next the known pixels are q(x_t_next | x_0) draws (fresh noise); at the end, x_0 itself."""
    scheduler = make_scheduler("ddpm", 50)
    known, mask = torch.full((20000, 1, 1, 2), 0.6), torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    merge = KnownRegionMerge(known, mask, scheduler)
    x = torch.full_like(known, 9.0)
    out = merge(x, 499, make_generator(0, "cpu"))
    a = scheduler.alpha_bar(499)
    assert abs(float(out[..., 0].mean()) - math.sqrt(a) * 0.6) < 0.02
    assert abs(float(out[..., 0].std()) - math.sqrt(1 - a)) < 0.02
    assert (out[..., 1] == 9.0).all()  # unknown pixels are the sampler's
    assert not torch.equal(out[..., 0], merge(x, 499, make_generator(1, "cpu"))[..., 0])  # fresh noise per call
    assert torch.equal(merge(x, -1, None)[..., 0], known[..., 0])
    with pytest.raises(ValueError, match="only 0"):
        KnownRegionMerge(known, torch.full_like(known, 0.5), scheduler)


def test_noised_image_start_and_seeds() -> None:
    """skip_steps starts from the image noised to the plan's first remaining timestep; a seed fixes everything."""
    scheduler = make_scheduler("ddim", 20, clip_sample=False)
    image = torch.full((512, 1, 1, 1), 0.7)

    def point_mass(x, t):  # data = the constant 0.7: eps = (x - sqrt(a) mu) / sqrt(1 - a)
        a = alpha_bar_of(scheduler, t).view(-1, 1, 1, 1).float()
        return (x - a.sqrt() * 0.7) / (1 - a).sqrt()

    out = sample(point_mass, scheduler, image=image, skip_steps=15, generator=make_generator(0, "cpu"))
    assert torch.allclose(out, image, atol=1e-4)
    with pytest.raises(ValueError, match="skip_steps"):
        sample(point_mass, scheduler, image=image, skip_steps=20)
    stochastic = make_scheduler("ddpm", 10)
    a = sample(point_mass, stochastic, (4, 1, 2, 2), generator=make_generator(5, "cpu"))
    b = sample(point_mass, make_scheduler("ddpm", 10), (4, 1, 2, 2), generator=make_generator(5, "cpu"))
    c = sample(point_mass, make_scheduler("ddpm", 10), (4, 1, 2, 2), generator=make_generator(6, "cpu"))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_inpainting_inferer_keeps_known_pixels_with_a_real_network(tiny_unet_factory=None) -> None:
    from conftest import tiny_diffusion_unet

    net = tiny_diffusion_unet(in_channels=1, out_channels=1)
    image = torch.rand(2, 1, 16, 16) * 2 - 1
    known = torch.zeros(2, 1, 16, 16)
    known[..., :8] = 1
    inferer = InpaintingSamplingInferer(
        sampler="ddpm", num_inference_steps=6, seed=1, scheduler_args={"jump_length": 2, "jump_n_sample": 2}
    )
    out = inferer(torch.cat([image, known], 1), net)
    assert out.shape == (2, 1, 16, 16) and torch.equal(out[..., :8], image[..., :8])
    assert not torch.equal(out[..., 8:], image[..., 8:])
    assert torch.equal(out, inferer(image, net, known=known))  # the same with the mask as a keyword
    partial = InpaintingSamplingInferer(sampler="ddim", num_inference_steps=10, skip_steps=8, seed=1)(
        torch.cat([image, torch.zeros_like(known)], 1), net
    )
    assert partial.shape == image.shape


def test_inpainting_with_a_learned_range_model_runs_on_every_sampler_and_refuses_jumps_off_ddpm() -> None:
    from conftest import tiny_diffusion_unet

    net = tiny_diffusion_unet(in_channels=1, out_channels=2)  # eps and the learned variance's interpolation
    image = torch.rand(1, 1, 16, 16) * 2 - 1
    known = torch.zeros(1, 1, 16, 16)
    known[..., :8] = 1
    seed_args = {"variance_type": "learned_range", "jump_length": 10, "jump_n_sample": 5}  # the polyp bundle's
    for sampler in ("ddim", "dpmpp_2m", "dpmpp_2m_sde"):
        with pytest.raises(OptionError, match=r"jump_n_sample 5\) runs on the ancestral sampler.*--jump_n_sample 1"):
            InpaintingSamplingInferer(sampler=sampler, num_inference_steps=4, scheduler_args=seed_args)
        inferer = InpaintingSamplingInferer(
            sampler=sampler, num_inference_steps=4, seed=1, scheduler_args={**seed_args, "jump_n_sample": 1}
        )
        scheduler = inferer.make_scheduler()
        assert type(scheduler) is type(make_scheduler(sampler, 4)) and len(scheduler.timesteps) == 4
        out = inferer(image, net, known=known)
        assert torch.equal(out[..., :8], image[..., :8]) and out.shape == image.shape
    repaint = InpaintingSamplingInferer(sampler="ddpm", num_inference_steps=4, scheduler_args=seed_args)
    assert repaint.make_scheduler().variance_type == "learned_range"


def test_latent_inferer_decodes_and_guides_without_touching_weights() -> None:
    from conftest import tiny_diffusion_unet

    torch.manual_seed(0)
    autoencoder = AutoencoderKL(
        2,
        3,
        3,
        channels=(8, 8),
        latent_channels=2,
        attention_levels=(False, False),
        num_res_blocks=1,
        norm_num_groups=8,
    )
    net = tiny_diffusion_unet(in_channels=2, out_channels=2)
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2 * 8 * 8, 3))
    classifier.forward = lambda x, timesteps=None, _f=classifier.forward: _f(x)  # a noise-unaware toy classifier
    plain = LatentSamplingInferer(autoencoder, (2, 8, 8), scale_factor=2.0, num_inference_steps=4, seed=0)
    guided = LatentSamplingInferer(
        autoencoder,
        (2, 8, 8),
        scale_factor=2.0,
        num_inference_steps=4,
        seed=0,
        classifier=classifier,
        classifier_scale=50.0,
    )
    labels = torch.tensor([0, 2])
    a, b = plain(labels, net), guided(labels, net)
    assert a.shape == (2, 3, 16, 16) and not torch.allclose(a, b)
    assert all(p.grad is None for p in [*net.parameters(), *classifier.parameters(), *autoencoder.parameters()])
    z = torch.randn(1, 2, 8, 8)
    assert torch.allclose(LatentDecoder(autoencoder, 2.0)(z), autoencoder.decode_stage_2_outputs(z / 2.0))


def test_conditioned_inferer_matches_the_loop() -> None:
    scheduler = make_scheduler("dpmpp_2m", 50, clip_sample=False)
    net = MeanFromCondition(scheduler, 0.5)
    condition = torch.full((3, 1, 2, 2), 0.25)
    inferer = ConditionedSamplingInferer(sampler="dpmpp_2m", num_inference_steps=50, clip_sample=False, seed=4)
    out = inferer(condition, net)
    x_t = torch.randn((3, 1, 2, 2), generator=make_generator(4, "cpu"))
    a_t = scheduler.alpha_bar(int(scheduler.timesteps[0]))
    exact = 0.25 + 0.5 * (x_t - math.sqrt(a_t) * 0.25) / math.sqrt(a_t * 0.25 + 1 - a_t)  # the flow map
    assert torch.allclose(out, exact.clamp(-1, 1), atol=3e-3)  # DPM-Solver++ 2M at 50 steps: 1.2e-3 off here
