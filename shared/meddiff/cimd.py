"""CIMD training pieces for MONAI's stock `SupervisedTrainer`: prepare-batch, training inferer, loss, diagnostics.

One training step (Rahman et al., CVPR 2023; the network's two designs are described in `meddiff.networks`):

1. `meddiff.engines.CIMDPrepareBatch`: the diffused variable is one rater's mask x_0 in [-1, 1] (batch key
   ``label``), the condition is the CT crop (key ``image``); it draws the noise and timesteps; the noise is the target.
2. `CIMDTrainingInferer`: x_t = q_sample(x_0, t, noise), then ``network(x_t, t, image=..., mask=x_0,
   alpha_bar=ᾱ_t)``, which returns ``(eps_pred, kl)`` with kl = KL(q || p) per latent dimension, (B, latent_dim).
3. `CIMDLoss`: ``mse(eps_pred, noise) + kl_weight * sum_d max(mean_batch KL_d, free_bits)``; the denoiser and both
   encoders are optimised (free bits, Kingma et al. 2016, keep each latent dimension from collapsing below
   `free_bits` nats; 0 turns them off).
4. `CIMDDiagnostics`: every few iterations, the KL per dimension and, for the cVAE design, the denoising loss with
   the posterior mean against a prior draw, in the training log.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from ignite.engine import Engine, Events
from torch import nn

from meddiff.inferers import DiffusionTrainingInferer
from meddiff.options import parse
from meddiff.precision import autocast, to_memory_format

__all__ = ["CIMDDiagnostics", "CIMDLoss", "CIMDTrainingInferer"]

logger = logging.getLogger(__name__)


class CIMDTrainingInferer(DiffusionTrainingInferer):
    """Noise the mask and run a `CIMDNetwork` on it in training mode: returns ``(eps_pred, kl)`` in float32.

    The network gets ᾱ_t of each item (for the paper design's estimate x̂_0) and runs under bf16/fp16 autocast and
    channels_last when asked (`meddiff.precision`).
    """

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        diffusion_model: nn.Module,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        condition: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if condition is None:
            raise ValueError("CIMDTrainingInferer needs the image as `condition`.")
        noisy = self.scheduler.add_noise(original_samples=inputs, noise=noise, timesteps=timesteps)
        noisy = to_memory_format(noisy, self.channels_last)
        alpha_bar = self.scheduler.alphas_cumprod.to(inputs.device)[timesteps]
        with autocast(inputs.device, self.precision):
            eps, kl = diffusion_model(noisy, timesteps, image=condition, mask=inputs, alpha_bar=alpha_bar)
        return eps.float(), kl.float()


class CIMDLoss(nn.Module):
    """``mse(eps_pred, target) + kl_weight * sum_d max(mean_batch KL_d, free_bits)`` for ``prediction = (eps, kl)``.

    The seed divides its KL by 1000 next to a per-pixel mean MSE, hence the default `kl_weight` of 1e-3.

    Args:
        kl_weight: weight of the KL term (option ``--kl_weight``).
        free_bits: nats per latent dimension below which the KL is not pushed further (option ``--free_bits``;
            0 = plain KL).
    """

    def __init__(self, kl_weight: float = 1e-3, free_bits: float = 0.0) -> None:
        super().__init__()
        self.kl_weight, self.free_bits = parse("kl_weight", kl_weight), parse("free_bits", free_bits)

    def forward(self, prediction: tuple[torch.Tensor, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """The scalar training loss."""
        eps, kl = prediction
        kl_term = kl.mean(dim=0).clamp(min=self.free_bits).sum()
        return nn.functional.mse_loss(eps, target) + self.kl_weight * kl_term


class CIMDDiagnostics:
    """Log CIMD's latent diagnostics every `interval` iterations (logger ``meddiff.cimd``).

    On the current batch, with fresh noise and timesteps from a seeded generator: the KL per latent dimension
    (nats, batch mean) and, for the cVAE design, the denoising MSE with z = posterior mean against z = a prior draw
    and their gap (a latent that collapsed gives KL ~0 and a gap ~0). The last values are kept in
    ``engine.state.cimd_diagnostics``.

    Args:
        scheduler: the training noise scheduler.
        interval: iterations between two reports.
        seed: seed of the diagnostics' own noise (the training's random stream is not touched).
    """

    def __init__(self, scheduler: Any, interval: int = 100, seed: int = 0) -> None:
        self.scheduler, self.interval, self.seed = scheduler, max(1, int(interval)), seed
        self._reported = -1

    def attach(self, engine: Engine) -> None:
        """Report every `interval` iterations and after the last one."""
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if engine.state.iteration == self._reported:  # the last iteration was a multiple of `interval`
            return
        self._reported = engine.state.iteration
        network = getattr(engine.network, "module", engine.network)
        batch, device = engine.state.batch, next(network.parameters()).device
        image, mask = batch["image"].to(device).float(), batch["label"].to(device).float()
        generator = torch.Generator(device=device).manual_seed(self.seed + engine.state.iteration)
        noise = torch.randn(mask.shape, generator=generator, device=device)
        steps = self.scheduler.num_train_timesteps
        timesteps = torch.randint(0, steps, (mask.shape[0],), generator=generator, device=device)
        noisy = self.scheduler.add_noise(original_samples=mask, noise=noise, timesteps=timesteps)
        alpha_bar = self.scheduler.alphas_cumprod.to(device)[timesteps]
        was_training = network.training
        network.eval()
        found = network.diagnostics(noisy, timesteps, image, mask, noise, alpha_bar, generator)
        network.train(was_training)
        engine.state.cimd_diagnostics = found
        kl = ", ".join(f"{v:.3f}" for v in found["kl_per_dim"])
        line = (
            f"iteration {engine.state.iteration}: KL per latent dimension [{kl}] nats (total {found['kl_total']:.3f})"
        )
        if "gap" in found:
            line += (
                f"; denoising MSE posterior mean {found['mse_posterior']:.4f}, prior draw {found['mse_prior']:.4f} "
                f"(gap {found['gap']:+.4f}: near 0 means the latent is ignored)"
            )
        logger.info(line)
