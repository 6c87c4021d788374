"""Latent diffusion's prepare-batches (`meddiff.engines.LatentPrepareBatch`, `NoisyLatentClassifierPrepareBatch`) and
`meddiff.latent.LatentEncoder`: exact latents and z_t for fixed generators, and one MONAI training step each."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_diffusion_unet
from monai.engines import SupervisedTrainer
from monai.networks.nets.diffusion_model_unet import DiffusionModelEncoder

from meddiff.engines import LatentPrepareBatch, NoisyLatentClassifierPrepareBatch
from meddiff.inferers import DiffusionTrainingInferer
from meddiff.latent import LatentDecoder, LatentEncoder
from meddiff.schedulers import DDPMScheduler
from meddiff.validation import fixed_noise

SCALE = 0.5


class KnownAutoencoder(torch.nn.Module):
    """encode(x) = (mu, sigma) with mu = 2 * x[:, :2] pooled 2x2, sigma = 0.25 everywhere; decode(z) = z repeated.

    Its one parameter sets the dtype (float64 here, to check that inputs are cast to it)."""

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones((), dtype=dtype))
        self.seen: list[torch.dtype] = []

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.seen.append(x.dtype)
        mu = 2.0 * torch.nn.functional.avg_pool2d(x[:, :2], 2) * self.w
        return mu, torch.full_like(mu, 0.25)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(z[:, :1].repeat(1, 3, 1, 1), scale_factor=2)


def images(n: int = 2) -> torch.Tensor:
    return torch.arange(n * 3 * 4 * 4, dtype=torch.float32).reshape(n, 3, 4, 4) / 100.0 - 0.4


def mean_latents(x: torch.Tensor) -> torch.Tensor:
    return 2.0 * torch.nn.functional.avg_pool2d(x[:, :2].double(), 2).float()


def test_latent_encoder_mean_sample_and_dtype() -> None:
    ae, x = KnownAutoencoder(), images()
    z = LatentEncoder(ae, SCALE, sample=False)(x)
    assert z.dtype == torch.float32 and ae.seen == [torch.float64]
    assert torch.equal(z, mean_latents(x) * SCALE)
    eps = torch.randn((2, 2, 2, 2), generator=torch.Generator().manual_seed(3))
    z = LatentEncoder(ae, SCALE)(x, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(z, (mean_latents(x) + 0.25 * eps) * SCALE, atol=1e-6)
    # decoding divides the scale out again
    assert LatentDecoder(ae, SCALE)(LatentEncoder(ae, SCALE, sample=False)(x)).shape == (2, 3, 4, 4)


def test_latent_prepare_batch_diffuses_scaled_latents_with_a_frozen_autoencoder() -> None:
    ae, x = KnownAutoencoder(), images()
    ae.train()
    prepare = LatentPrepareBatch(10, ae, SCALE, sample=False)
    assert not ae.training and not ae.w.requires_grad
    torch.manual_seed(0)
    inputs, target, args, kwargs = prepare({"image": x, "label": torch.tensor([0, 1])}, device="cpu")
    assert torch.equal(inputs, mean_latents(x) * SCALE)
    assert torch.equal(target, kwargs["noise"]) and target.shape == (2, 2, 2, 2)
    assert args == () and set(kwargs) == {"noise", "timesteps"}
    assert (
        kwargs["timesteps"].shape == (2,) and 0 <= int(kwargs["timesteps"].min()) <= int(kwargs["timesteps"].max()) < 10
    )
    conditioned = LatentPrepareBatch(10, ae, SCALE, condition_name="mask", sample=False)
    mask = torch.ones(2, 1, 2, 2)
    assert torch.equal(conditioned({"image": x, "mask": mask})[3]["condition"], mask)
    with pytest.raises(ValueError, match="'image'"):
        prepare({"label": torch.tensor([0])})


def test_latent_prepare_batch_trains_a_diffusion_unet_with_l1() -> None:
    ae = KnownAutoencoder(torch.float32)
    unet = tiny_diffusion_unet(in_channels=2, out_channels=2)
    data = [{"image": torch.full((3, 16, 16), i / 10.0)} for i in range(2)]  # 8x8 latents
    before = [p.detach().clone() for p in unet.parameters()]
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=torch.utils.data.DataLoader(data, batch_size=2),
        network=unet,
        optimizer=torch.optim.AdamW(unet.parameters(), 1e-3),
        loss_function=torch.nn.L1Loss(),
        inferer=DiffusionTrainingInferer(DDPMScheduler(num_train_timesteps=10), conditioning="none"),
        prepare_batch=LatentPrepareBatch(10, ae, SCALE),
        decollate=False,
    )
    trainer.run()
    assert trainer.state.iteration == 1 and torch.isfinite(torch.as_tensor(trainer.state.output["loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, unet.parameters()))
    assert not ae.w.requires_grad and ae.w.item() == 1.0


def test_noisy_classifier_batch_gives_the_exact_z_t_of_a_fixed_generator() -> None:
    ae, x = KnownAutoencoder(), images()
    scheduler = DDPMScheduler(num_train_timesteps=50)
    prepare = NoisyLatentClassifierPrepareBatch(ae, SCALE, scheduler, seed=7)
    z_t, labels, args, kwargs = prepare({"image": x, "label": torch.tensor([[1], [0]])}, device="cpu")
    g = torch.Generator().manual_seed(7)  # the documented order: posterior eps, t, diffusion eps
    z0 = (mean_latents(x) + 0.25 * torch.randn((2, 2, 2, 2), generator=g)) * SCALE
    t = torch.randint(0, 50, (2,), generator=g)
    eps = torch.randn((2, 2, 2, 2), generator=g)
    abar = scheduler.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    expected = abar.sqrt().float() * z0 + (1 - abar).sqrt().float() * eps
    assert torch.allclose(z_t, expected, atol=1e-6)
    assert torch.equal(kwargs["timesteps"], t) and args == ()
    assert torch.equal(labels, torch.tensor([1, 0])) and labels.dtype == torch.long
    again = prepare({"image": x, "label": torch.tensor([1, 0])})
    assert torch.equal(again[0], z_t)  # reseeded at every call: a deterministic validation
    assert not torch.equal(
        NoisyLatentClassifierPrepareBatch(ae, SCALE, scheduler, seed=8)({"image": x, "label": labels})[0], z_t
    )


def test_noisy_classifier_batch_takes_fixed_timesteps_and_noise_seeds_from_the_batch() -> None:
    ae, x = KnownAutoencoder(), images()
    scheduler = DDPMScheduler(num_train_timesteps=50)
    prepare = NoisyLatentClassifierPrepareBatch(ae, SCALE, scheduler, sample=False)
    batch = {"image": x, "label": torch.tensor([0, 1]), "timestep": torch.tensor([3, 40]), "noise_seed": [11, 12]}
    z_t, _, _, kwargs = prepare(batch)
    abar = scheduler.alphas_cumprod[torch.tensor([3, 40])].reshape(-1, 1, 1, 1)
    eps = fixed_noise([11, 12], (2, 2, 2))
    expected = abar.sqrt().float() * mean_latents(x) * SCALE + (1 - abar).sqrt().float() * eps
    assert torch.allclose(z_t, expected, atol=1e-6) and torch.equal(kwargs["timesteps"], torch.tensor([3, 40]))


def test_t_zero_option_gives_z_0_exactly() -> None:
    ae, x = KnownAutoencoder(), images()
    prepare = NoisyLatentClassifierPrepareBatch(ae, SCALE, DDPMScheduler(num_train_timesteps=50), noisy=False, seed=2)
    z_t, _, _, kwargs = prepare({"image": x, "label": torch.tensor([0, 1])})
    posterior = torch.randn((2, 2, 2, 2), generator=torch.Generator().manual_seed(2))
    assert torch.equal(z_t, ((mean_latents(x) + 0.25 * posterior) * SCALE))
    assert torch.equal(kwargs["timesteps"], torch.zeros(2, dtype=torch.long))
    mean = NoisyLatentClassifierPrepareBatch(
        ae, SCALE, DDPMScheduler(num_train_timesteps=50), noisy=False, sample=False
    )
    assert torch.equal(mean({"image": x, "label": torch.tensor([0, 1])})[0], mean_latents(x) * SCALE)
    with pytest.raises(ValueError, match="'label'"):
        mean({"image": x})


def test_noisy_classifier_batch_trains_a_diffusion_model_encoder() -> None:
    ae = KnownAutoencoder(torch.float32)
    torch.manual_seed(0)
    classifier = DiffusionModelEncoder(
        spatial_dims=2,
        in_channels=2,
        out_channels=2,
        input_shape=(4, 4),
        num_res_blocks=1,
        channels=(8, 8),
        attention_levels=(False, False),
        norm_num_groups=4,
    )
    data = [{"image": torch.full((3, 8, 8), i - 0.5), "label": i} for i in range(2)]
    before = [p.detach().clone() for p in classifier.parameters()]
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=torch.utils.data.DataLoader(data, batch_size=2),
        network=classifier,
        optimizer=torch.optim.AdamW(classifier.parameters(), 1e-3),
        loss_function=torch.nn.CrossEntropyLoss(),
        prepare_batch=NoisyLatentClassifierPrepareBatch(ae, SCALE, DDPMScheduler(num_train_timesteps=10)),
        decollate=False,
    )
    trainer.run()
    assert trainer.state.output["pred"].shape == (2, 2)
    assert any(not torch.equal(a, b) for a, b in zip(before, classifier.parameters()))
