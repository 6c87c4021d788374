"""DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12 with sigma from eq. 16) on the trailing grid.

One move from t to t_next (a = alpha_bar):

    x_next = sqrt(a_next) x0 + sqrt(1 - a_next - sigma^2) eps + sigma z,
    sigma^2 = eta^2 (1 - a_next) / (1 - a_t) (1 - a_t / a_next),

with x0 the (clipped) predicted x_0 and eps the raw predicted noise (not recomputed from the clipped x0, as in Song et
al.'s code and MONAI's ``DDIMScheduler``). eta = 0 is the deterministic DDIM; eta = 1 has the posterior variance of
the respaced chain, so it equals the respaced ancestral DDPM when nothing is clipped. The final move goes to
t_next = -1 (a = 1), where sigma = 0 and x_next = x0 exactly, for every step count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .base import GridScheduler

__all__ = ["DDIMScheduler"]


class DDIMScheduler(GridScheduler):
    """DDIM sampler over the trailing grid; deterministic for eta = 0.

    Args:
        num_train_timesteps: number of diffusion steps T the network was trained with.
        schedule: name of a MONAI noise schedule ("linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine").
        clip_sample: clip the predicted x_0 to ``clip_sample_values``.
        clip_sample_values: (min, max) for clipping the predicted x_0.
        prediction_type: what the network predicts: "epsilon", "sample" or "v_prediction".
        eta: noise scale in [0, 1] of Song et al. eq. 16 (0: deterministic DDIM, 1: DDPM-like posterior variance).
        schedule_args: keyword arguments of the schedule function, e.g. ``beta_start``, ``beta_end``.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        schedule: str = "linear_beta",
        clip_sample: bool = True,
        clip_sample_values: Sequence[float] = (-1.0, 1.0),
        prediction_type: str = "epsilon",
        eta: float = 0.0,
        **schedule_args,
    ) -> None:
        super().__init__(
            num_train_timesteps, schedule, clip_sample, clip_sample_values, prediction_type, **schedule_args
        )
        if not 0.0 <= float(eta) <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta!r}.")
        self.eta = float(eta)

    def step(
        self,
        model_output: torch.Tensor,
        t: int,
        t_next: int,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM move from t down to t_next (-1: the clean end); returns (x at t_next, predicted x_0)."""
        t, t_next = self._check_step(t, t_next)
        x0 = self.predict_x0(model_output, t, sample)
        eps = self.predict_eps(model_output, t, sample)
        a, a_next = self.alpha_bar(t), self.alpha_bar(t_next)
        variance = self.eta**2 * (1.0 - a_next) / (1.0 - a) * (1.0 - a / a_next)
        x_next = math.sqrt(a_next) * x0 + math.sqrt(max(1.0 - a_next - variance, 0.0)) * eps
        if variance > 0.0:
            x_next = x_next + math.sqrt(variance) * self._randn(sample, x0.dtype, generator)
        return x_next, x0
