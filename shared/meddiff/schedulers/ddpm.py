"""Ancestral DDPM (Ho et al. 2020, "Denoising Diffusion Probabilistic Models") on any grid, respaced as Nichol &
Dhariwal 2021 ("Improved Denoising Diffusion Probabilistic Models", section 4).

A move from t to t_next < t is one step of the respaced chain whose beta is b = 1 - a_t / a_next (a = alpha_bar; for
the full chain, t_next = t - 1, this is beta_t). The sample is drawn from the posterior q(x_next | x_t, x0)
(Ho et al. eq. 6-7) evaluated at the (clipped) predicted x0:

    mean = sqrt(a_next) b / (1 - a_t) x0 + sqrt(1 - b) (1 - a_next) / (1 - a_t) x_t,
    posterior variance = (1 - a_next) / (1 - a_t) b,

with the variance chosen by ``variance_type``:

- "fixed_small": the posterior variance (Ho et al.'s sigma^2 = beta tilde; MONAI's default);
- "fixed_large": b (Ho et al.'s sigma^2 = beta);
- "learned_range": the model output has 2C channels, the second half v in [-1, 1], frac = (v + 1) / 2 and
  log var = frac log(b) + (1 - frac) log(clipped posterior variance) (Nichol & Dhariwal eq. 15). "Clipped": the
  posterior variance of the final move is 0, so its log is replaced by that of the move into its start from the grid
  point above (b on a one-point grid), which for the full chain is Nichol & Dhariwal's
  ``log(append(posterior_variance[1], posterior_variance[1:]))``. Sampling never needs it (the final move adds no
  noise); ``meddiff.losses.HybridLoss`` does, for the decoder at t = 0.

The final move goes to t_next = -1 (a = 1), where the mean is x0 and no noise is added. With n = T the grid is the
full chain and this is MONAI's ``DDPMScheduler`` step.

Respaced DDPM and DDIM with eta = 1 (Song et al. 2021 eq. 16) have the same mean and variance when nothing is clipped.
With ``clip_sample`` they differ: DDPM's mean uses the clipped x0 for both of its terms, while DDIM keeps the raw,
unclipped eps in its "direction pointing to x_t".
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .base import GridScheduler

__all__ = ["VARIANCE_TYPES", "DDPMScheduler", "learned_range_log_variance"]

VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")


def learned_range_log_variance(
    v: torch.Tensor, log_beta: torch.Tensor | float, log_posterior_variance_clipped: torch.Tensor | float
) -> torch.Tensor:
    """Nichol & Dhariwal's eq. 15: log var = frac log(beta) + (1 - frac) log(posterior variance), frac = (v + 1) / 2."""
    frac = (v + 1.0) / 2.0
    return frac * log_beta + (1.0 - frac) * log_posterior_variance_clipped


class DDPMScheduler(GridScheduler):
    """Ancestral DDPM sampler over the trailing grid (the full chain for n = T, respaced otherwise).

    Args:
        num_train_timesteps: number of diffusion steps T the network was trained with.
        schedule: name of a MONAI noise schedule ("linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine").
        clip_sample: clip the predicted x_0 to ``clip_sample_values``.
        clip_sample_values: (min, max) for clipping the predicted x_0.
        prediction_type: what the network predicts: "epsilon", "sample" or "v_prediction".
        variance_type: "fixed_small" (posterior variance), "fixed_large" (beta) or "learned_range" (2C-channel output).
        schedule_args: keyword arguments of the schedule function, e.g. ``beta_start``, ``beta_end``.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        schedule: str = "linear_beta",
        clip_sample: bool = True,
        clip_sample_values: Sequence[float] = (-1.0, 1.0),
        prediction_type: str = "epsilon",
        variance_type: str = "fixed_small",
        **schedule_args,
    ) -> None:
        super().__init__(
            num_train_timesteps, schedule, clip_sample, clip_sample_values, prediction_type, **schedule_args
        )
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"Unknown variance_type {variance_type!r}; choose one of {list(VARIANCE_TYPES)}.")
        self.variance_type = variance_type

    def posterior(self, t: int, t_next: int) -> tuple[float, float, float, float]:
        """(coefficient of x0, coefficient of x_t, respaced beta b, posterior variance) of the move t -> t_next < t."""
        a, a_next = self.alpha_bar(t), self.alpha_bar(t_next)
        beta = 1.0 - a / a_next
        coef_x0 = math.sqrt(a_next) * beta / (1.0 - a)
        coef_xt = math.sqrt(1.0 - beta) * (1.0 - a_next) / (1.0 - a)
        return coef_x0, coef_xt, beta, (1.0 - a_next) / (1.0 - a) * beta

    def _clipped_posterior_variance(self, t: int, t_next: int) -> float:
        variance = self.posterior(t, t_next)[3]
        if variance > 0.0:
            return variance
        # the final move: use the move into t from the grid point above it; a one-point grid has none, use b
        above = [int(s) for s in self.timesteps.tolist() if int(s) > t]
        return self.posterior(min(above), t)[3] if above else self.posterior(t, t_next)[2]

    def variance(self, t: int, t_next: int, v: torch.Tensor | None = None) -> torch.Tensor | float:
        """The variance of the move t -> t_next by ``variance_type``; `v` is the variance half of the model output."""
        t, t_next = self._check_step(t, t_next)
        _, _, beta, posterior_variance = self.posterior(t, t_next)
        if self.variance_type == "fixed_small":
            return posterior_variance
        if self.variance_type == "fixed_large":
            return beta
        if v is None:
            raise ValueError("variance_type='learned_range' needs the variance half v of the model output.")
        log_clipped = math.log(self._clipped_posterior_variance(t, t_next))
        return torch.exp(learned_range_log_variance(v, math.log(beta), log_clipped))

    def step(
        self,
        model_output: torch.Tensor,
        t: int,
        t_next: int,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One ancestral move from t down to t_next (-1: the clean end); returns (x at t_next, predicted x_0)."""
        t, t_next = self._check_step(t, t_next)
        out, v = self._split(model_output, sample)
        if self.variance_type == "learned_range" and v is None:
            raise ValueError(
                "variance_type='learned_range' needs a model output with twice the sample's channels (eps, v)."
            )
        x0 = self.predict_x0(out, t, sample)
        coef_x0, coef_xt, _, _ = self.posterior(t, t_next)
        mean = coef_x0 * x0 + coef_xt * sample.to(x0.dtype)
        if t_next < 0:
            return mean, x0
        variance = self.variance(t, t_next, None if v is None else v.to(x0.dtype))
        std = variance.sqrt() if isinstance(variance, torch.Tensor) else math.sqrt(variance)
        return mean + std * self._randn(sample, x0.dtype, generator), x0
