"""Diffusion training losses: the hybrid objective of Nichol & Dhariwal 2021 for networks that learn their variance.

``HybridLoss`` is L_hybrid = L_simple + lambda L_vlb ("Improved Denoising Diffusion Probabilistic Models", eq. 16)
for a network whose output has 2C channels for C image channels: eps, then v in [-1, 1] (eq. 15). Conventions:

- L_simple is the mean squared error between the predicted eps and the true noise over all elements (Ho et al. 2020,
  eq. 14).
- L_t, per batch item, in bits per dimension (mean over the non-batch dimensions, divided by log 2), over the full
  training chain t -> t - 1:

  * t >= 1: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) between Gaussians, with q's log variance the clipped
    log posterior variance (Nichol & Dhariwal's ``posterior_log_variance_clipped``);
  * t = 0: -log p(x_0 | x_1) under the discretized Gaussian decoder (Ho et al. eq. 13) for data in [-1, 1] with 256
    levels: bins of half-width 1/255, the outermost bins extended to -inf and +inf.

  p's mean is the posterior mean at the x_0 predicted from the stop-gradient eps, without clipping, so L_vlb trains
  the variance only (Nichol & Dhariwal section 3.1); p's log variance is eq. 15 with the schedule's betas.
- L_vlb = sum_t L_t is estimated by T * L_t at the sampled timesteps (uniform t), so the loss is
  L_simple + lambda T mean_batch(L_t): at lambda = 0.001 and T = 1000 this is Nichol & Dhariwal's code (``mse + vb``
  with ``vb *= T / 1000``). ``vlb_terms`` returns the per-item L_t.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from meddiff.schedulers.base import GridScheduler
from meddiff.schedulers.ddpm import learned_range_log_variance

__all__ = ["HybridLoss", "discretized_gaussian_log_likelihood", "normal_kl"]


def normal_kl(mean1: torch.Tensor, log_var1: torch.Tensor, mean2: torch.Tensor, log_var2: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mean1, exp(log_var1)) || N(mean2, exp(log_var2))) in nats."""
    return 0.5 * (
        -1.0 + log_var2 - log_var1 + torch.exp(log_var1 - log_var2) + (mean1 - mean2) ** 2 * torch.exp(-log_var2)
    )


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """Elementwise log P(bin of x) under N(mean, exp(log_var)), for x on the 256 levels of [-1, 1] (nats)."""
    inv_std = torch.exp(-0.5 * log_var)
    centered = x - mean
    upper = inv_std * (centered + 1.0 / 255.0)
    lower = inv_std * (centered - 1.0 / 255.0)
    # difference of the CDFs on the side of the mean where they are small, to avoid cancellation near 1
    mass = torch.where(
        centered > 0,
        torch.special.ndtr(-lower) - torch.special.ndtr(-upper),
        torch.special.ndtr(upper) - torch.special.ndtr(lower),
    )
    log_mass = torch.log(mass.clamp(min=1e-12))
    return torch.where(
        x < -0.999,
        torch.special.log_ndtr(upper),
        torch.where(x > 0.999, torch.special.log_ndtr(-lower), log_mass),
    )


class HybridLoss(nn.Module):
    """L_simple + lambda L_vlb (Nichol & Dhariwal 2021, eq. 16) for an (eps, v) network with learned-range variance.

    Args:
        scheduler: the training noise schedule (its ``betas`` and ``alphas_cumprod``); ``prediction_type`` must be
            "epsilon". Its grid is not used: the VLB is over the full training chain.
        lambda_vlb: weight lambda of L_vlb (Nichol & Dhariwal: 0.001).
    """

    def __init__(self, scheduler: GridScheduler, lambda_vlb: float = 0.001) -> None:
        super().__init__()
        if scheduler.prediction_type != "epsilon":
            raise ValueError(f"HybridLoss needs prediction_type='epsilon', got {scheduler.prediction_type!r}.")
        if scheduler.num_train_timesteps < 2:
            raise ValueError("HybridLoss needs num_train_timesteps >= 2 (the clipped posterior variance uses t = 1).")
        if not float(lambda_vlb) >= 0.0:
            raise ValueError(f"lambda_vlb must be >= 0, got {lambda_vlb!r}.")
        self.scheduler = scheduler
        self.lambda_vlb = float(lambda_vlb)
        self.num_train_timesteps = scheduler.num_train_timesteps
        betas = scheduler.betas.to(torch.float64)
        ab = scheduler.alphas_cumprod.to(torch.float64)
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        posterior_variance = betas * (1.0 - ab_prev) / (1.0 - ab)
        # rows indexed by t: sqrt(ab), sqrt(1 - ab), posterior mean coefficients of x_0 and x_t, log beta,
        # clipped log posterior variance (t = 0 takes t = 1's value)
        self._table = torch.stack(
            [
                ab.sqrt(),
                (1.0 - ab).sqrt(),
                betas * ab_prev.sqrt() / (1.0 - ab),
                (1.0 - betas).sqrt() * (1.0 - ab_prev) / (1.0 - ab),
                betas.log(),
                torch.cat([posterior_variance[1:2], posterior_variance[1:]]).log(),
            ]
        )
        self._tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def _rows(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        key = (like.device, like.dtype)
        if key not in self._tables:
            self._tables[key] = self._table.to(device=like.device, dtype=like.dtype)
        rows = self._tables[key][:, timesteps.to(like.device).reshape(-1)]
        return rows.reshape(rows.shape[0], -1, *(1,) * (like.ndim - 1))

    def vlb_terms(
        self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """Per-item L_t in bits per dimension: the KL for t >= 1, the decoder NLL for t = 0; shape (B,)."""
        c = x_t.shape[1]
        if model_output.shape[1] != 2 * c or model_output.shape[2:] != x_t.shape[2:]:
            raise ValueError(
                f"model_output {tuple(model_output.shape)} must have twice the channels of x_t {tuple(x_t.shape)}."
            )
        dtype = torch.promote_types(model_output.dtype, torch.float32)
        eps = model_output[:, :c].detach().to(dtype)
        v = model_output[:, c:].to(dtype)
        x_start, x_t = x_start.to(dtype), x_t.to(dtype)
        sqrt_ab, sqrt_one_minus_ab, coef_x0, coef_xt, log_beta, log_posterior_variance = self._rows(timesteps, x_t)
        x0_pred = (x_t - sqrt_one_minus_ab * eps) / sqrt_ab
        model_mean = coef_x0 * x0_pred + coef_xt * x_t
        model_log_var = learned_range_log_variance(v, log_beta, log_posterior_variance)
        true_mean = coef_x0 * x_start + coef_xt * x_t
        kl = normal_kl(true_mean, log_posterior_variance.expand_as(x_t), model_mean, model_log_var)
        nll = -discretized_gaussian_log_likelihood(x_start, model_mean, model_log_var)
        dims = tuple(range(1, x_t.ndim))
        per_item = torch.where(timesteps.to(x_t.device).reshape(-1) == 0, nll.mean(dim=dims), kl.mean(dim=dims))
        return per_item / math.log(2.0)

    def forward(
        self,
        model_output: torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        noise: torch.Tensor,
        x_start: torch.Tensor | None = None,
        x_t: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """L_simple + lambda T mean(L_t) for an (eps, v) model output at `timesteps`; a scalar (float32 or wider).

        `model_output` may be the ``(model_output, x_start, x_t, timesteps)`` tuple of a
        `meddiff.inferers.DiffusionTrainingInferer` with ``return_inputs=True``, as MONAI's trainer passes it.
        """
        if isinstance(model_output, (tuple, list)):
            model_output, x_start, x_t, timesteps = model_output
        if x_start is None or x_t is None or timesteps is None:
            raise ValueError("HybridLoss needs x_start, x_t and timesteps (or the inferer's 4-tuple).")
        c = x_t.shape[1]
        dtype = torch.promote_types(model_output.dtype, torch.float32)
        mse = F.mse_loss(model_output[:, :c].to(dtype), noise.to(dtype))
        if self.lambda_vlb == 0.0:
            return mse
        vlb = self.vlb_terms(model_output, x_start, x_t, timesteps)
        return mse + self.lambda_vlb * self.num_train_timesteps * vlb.mean()
