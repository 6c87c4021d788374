"""CIMD training pieces for MONAI's stock `SupervisedTrainer`: prepare-batch, training inferer and loss.

One training step (Rahman et al., CVPR 2023, with the prior/posterior trained as the paper describes):

1. `CIMDPrepareBatch`: the diffused variable is one rater's mask x_0 in [-1, 1] (batch key ``label``), the
   condition is the CT crop (key ``image``); it draws the noise and the timesteps, and the noise is the target.
2. `CIMDTrainingInferer`: x_t = q_sample(x_0, t, noise), then ``network(x_t, t, image=..., mask=x_0)``, which draws
   z from the posterior q(z | image, mask) and returns ``(eps_pred, kl)`` with kl = KL(q || p(z | image)).
3. `CIMDLoss`: ``mse(eps_pred, noise) + kl_weight * mean(kl)``; both encoders and the denoiser are optimised.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.engines import DiffusionPrepareBatch, default_prepare_batch
from torch import nn

from meddiff.inferers import PrecisionDiffusionInferer
from meddiff.precision import autocast, to_memory_format

__all__ = ["CIMDLoss", "CIMDPrepareBatch", "CIMDTrainingInferer"]


class CIMDPrepareBatch(DiffusionPrepareBatch):
    """`DiffusionPrepareBatch` that diffuses the mask (``label``) and passes the image (``image``) as the condition."""

    def __init__(self, num_train_timesteps: int) -> None:
        super().__init__(num_train_timesteps=num_train_timesteps, condition_name="image")

    def __call__(
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        image, mask = default_prepare_batch(batchdata, device, non_blocking, **kwargs)
        if mask is None:
            raise ValueError("CIMD training needs a 'label' (one rater's mask in [-1, 1]) in every batch.")
        noise = self.get_noise(mask).to(device, non_blocking=non_blocking)
        timesteps = self.get_timesteps(mask).to(device, non_blocking=non_blocking)
        target = self.get_target(mask, noise, timesteps)
        return mask, target, (), {"noise": noise, "timesteps": timesteps, "condition": image}


class CIMDTrainingInferer(PrecisionDiffusionInferer):
    """Noise the mask and run a `CIMDNetwork` on it with its posterior latent: returns ``(eps_pred, kl)`` in float32.

    The network runs under bf16/fp16 autocast and channels_last when asked (`meddiff.precision`).
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
        with autocast(inputs.device, self.precision):
            eps, kl = diffusion_model(noisy, timesteps, image=condition, mask=inputs)
        return eps.float(), kl.float()


class CIMDLoss(nn.Module):
    """``mse(eps_pred, target) + kl_weight * mean(KL(posterior || prior))`` for ``prediction = (eps_pred, kl)``.

    The seed divides its KL by 1000 next to a per-pixel mean MSE, hence the default `kl_weight` of 1e-3.
    """

    def __init__(self, kl_weight: float = 1e-3) -> None:
        super().__init__()
        self.kl_weight = kl_weight

    def forward(self, prediction: tuple[torch.Tensor, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """The scalar training loss."""
        eps, kl = prediction
        return nn.functional.mse_loss(eps, target) + self.kl_weight * kl.mean()
