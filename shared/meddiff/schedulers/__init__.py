"""Noise schedulers that own their timestep grids: DDPM (full or respaced), DDIM, RePaint and DPM-Solver++(2M).

Every scheduler is a :class:`GridScheduler` (see :mod:`meddiff.schedulers.base` for the conventions): ``plan()`` lists
the (t, t_next) moves of one reverse run, ending at t_next = -1 (alpha_bar = 1); ``step(model_output, t, t_next,
sample, generator)`` makes a move down and returns (x at t_next, predicted x_0); ``undo(sample, t, t_next, generator)``
makes a move up. :func:`make_scheduler` builds one by sampler name with its timesteps set.
"""

from __future__ import annotations

from .base import PREDICTION_TYPES, GridScheduler, trailing_timesteps
from .ddim import DDIMScheduler
from .ddpm import VARIANCE_TYPES, DDPMScheduler, learned_range_log_variance
from .dpm_solver import DPMSolverMultistepScheduler
from .repaint import RePaintScheduler

__all__ = [
    "PREDICTION_TYPES",
    "SAMPLERS",
    "VARIANCE_TYPES",
    "DDIMScheduler",
    "DDPMScheduler",
    "DPMSolverMultistepScheduler",
    "GridScheduler",
    "RePaintScheduler",
    "learned_range_log_variance",
    "make_scheduler",
    "trailing_timesteps",
]

# sampler name -> (class, fixed constructor arguments)
SAMPLERS: dict[str, tuple[type[GridScheduler], dict]] = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"sde": False}),
    "dpmpp_2m_sde": (DPMSolverMultistepScheduler, {"sde": True}),
    "repaint": (RePaintScheduler, {}),
}


def make_scheduler(
    sampler: str,
    num_inference_steps: int,
    num_train_timesteps: int = 1000,
    schedule: str = "linear_beta",
    clip_sample: bool = True,
    **kwargs,
) -> GridScheduler:
    """The scheduler for `sampler` ("ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde", "repaint") with its timesteps set.

    `kwargs` go to the scheduler's constructor: e.g. ``variance_type`` (ddpm), ``eta`` (ddim), ``prediction_type``,
    ``clip_sample_values`` and the schedule's arguments (``beta_start``, ``beta_end``, ...).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"Unknown sampler {sampler!r}; choose one of {list(SAMPLERS)}.")
    cls, fixed = SAMPLERS[sampler]
    clash = sorted(set(fixed) & set(kwargs))
    if clash:
        raise ValueError(f"Sampler {sampler!r} fixes {clash}; do not pass them.")
    scheduler = cls(
        num_train_timesteps=num_train_timesteps, schedule=schedule, clip_sample=clip_sample, **fixed, **kwargs
    )
    scheduler.set_timesteps(num_inference_steps)
    return scheduler
