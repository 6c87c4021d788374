"""DPM-Solver++(2M) and SDE-DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
Diffusion Probabilistic Models", Algorithm 2 and section 5) on the trailing grid.

Notation: alpha_t = sqrt(a_t), sigma_t = sqrt(1 - a_t) with a = alpha_bar, lambda_t = log(alpha_t / sigma_t), and for
a move t -> t_next: h = lambda_next - lambda_t. The data prediction D0 = x_theta(x_t, t) is the (clipped) predicted
x_0. With the previous move's data prediction D_prev and step h_prev, r = h_prev / h and the second-order combination

    D = (1 + 1 / (2 r)) D0 - 1 / (2 r) D_prev                                  (Algorithm 2)

is used for every move except the first of a run (no history) and the final one, which are first order (D = D0).

- ODE (``sde=False``, Algorithm 2):  x_next = (sigma_next / sigma_t) x_t + alpha_next (1 - e^{-h}) D.
- SDE (``sde=True``, SDE-DPM-Solver++(2M), the exponential-integrator solution of the data-prediction reverse SDE
  with the same D): x_next = (sigma_next / sigma_t) e^{-h} x_t + alpha_next (1 - e^{-2h}) D
  + sigma_next sqrt(1 - e^{-2h}) z.

The final move goes to t_next = -1 (a = 1, sigma = 0, lambda = +inf, e^{-h} = 0): both formulas give x_next = D0, the
data prediction, exactly. The first-order ODE move equals DDIM with eta = 0 when nothing is clipped.

The solver keeps the previous move (t, t_next, h, D0) as state; ``set_timesteps`` and ``plan`` reset it, and the
correction is only applied when the current move starts where the remembered one ended. One instance drives one run
at a time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from .base import GridScheduler

__all__ = ["DPMSolverMultistepScheduler"]


class _Previous(NamedTuple):
    t_next: int
    h: float
    x0: torch.Tensor


class DPMSolverMultistepScheduler(GridScheduler):
    """DPM-Solver++(2M), deterministic, or its stochastic SDE variant with ``sde=True``.

    Args:
        num_train_timesteps: number of diffusion steps T the network was trained with.
        schedule: name of a MONAI noise schedule ("linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine").
        clip_sample: clip the predicted x_0 (the data prediction) to ``clip_sample_values``.
        clip_sample_values: (min, max) for clipping the predicted x_0.
        prediction_type: what the network predicts: "epsilon", "sample" or "v_prediction".
        sde: run SDE-DPM-Solver++(2M) (stochastic) instead of the ODE solver DPM-Solver++(2M).
        schedule_args: keyword arguments of the schedule function, e.g. ``beta_start``, ``beta_end``.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        schedule: str = "linear_beta",
        clip_sample: bool = True,
        clip_sample_values: Sequence[float] = (-1.0, 1.0),
        prediction_type: str = "epsilon",
        sde: bool = False,
        **schedule_args,
    ) -> None:
        super().__init__(
            num_train_timesteps, schedule, clip_sample, clip_sample_values, prediction_type, **schedule_args
        )
        self.sde = bool(sde)

    def reset(self) -> None:
        """Forget the previous move's data prediction (the next move is first order)."""
        self._previous: _Previous | None = None

    def log_snr_half(self, t: int) -> float:
        """lambda_t = log(alpha_t / sigma_t) = 0.5 log(a_t / (1 - a_t)); +inf at the clean end t = -1."""
        a = self.alpha_bar(t)
        return math.inf if a >= 1.0 else 0.5 * math.log(a / (1.0 - a))

    def step(
        self,
        model_output: torch.Tensor,
        t: int,
        t_next: int,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One solver move from t down to t_next (-1: the clean end); returns (x at t_next, predicted x_0)."""
        t, t_next = self._check_step(t, t_next)
        x0 = self.predict_x0(model_output, t, sample)
        if t_next < 0:
            self._previous = None
            return x0, x0
        a, a_next = self.alpha_bar(t), self.alpha_bar(t_next)
        alpha_next, sigma, sigma_next = math.sqrt(a_next), math.sqrt(1.0 - a), math.sqrt(1.0 - a_next)
        h = self.log_snr_half(t_next) - self.log_snr_half(t)
        d = x0
        previous = self._previous
        if previous is not None and previous.t_next == t and previous.x0.shape == x0.shape:
            r = previous.h / h
            d = (1.0 + 0.5 / r) * x0 - (0.5 / r) * previous.x0.to(x0.dtype)
        x = sample.to(x0.dtype)
        if self.sde:
            x_next = (sigma_next / sigma * math.exp(-h)) * x - alpha_next * math.expm1(-2.0 * h) * d
            x_next = x_next + sigma_next * math.sqrt(-math.expm1(-2.0 * h)) * self._randn(sample, x0.dtype, generator)
        else:
            x_next = (sigma_next / sigma) * x - alpha_next * math.expm1(-h) * d
        self._previous = _Previous(t_next, h, x0)
        return x_next, x0
