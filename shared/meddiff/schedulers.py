"""Noise schedulers for sampling: DDPM (full chain, or respaced) and DDIM, from MONAI's implementations."""

from __future__ import annotations

from enum import Enum

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, Scheduler

__all__ = ["SamplerType", "make_sampling_scheduler"]


class SamplerType(str, Enum):
    """Which reverse process to run."""

    DDPM = "ddpm"
    DDIM = "ddim"


def make_sampling_scheduler(
    sampler: str | SamplerType,
    num_inference_steps: int,
    num_train_timesteps: int = 1000,
    schedule: str = "linear_beta",
    clip_sample: bool = True,
    **schedule_args: float,
) -> tuple[Scheduler, float]:
    """Build a scheduler with its timesteps set, and the DDIM `eta` to step it with.

    - ``ddpm`` with ``num_inference_steps == num_train_timesteps``: MONAI's ancestral DDPM (Ho et al. 2020).
    - ``ddpm`` with fewer steps: MONAI's DDPM does not respace its betas, so a respaced ancestral DDPM is run as
      DDIM with eta = 1, whose variance sigma_t^2 = (1-a_prev)/(1-a_t) * (1 - a_t/a_prev) is exactly the posterior
      variance of the respaced chain (Song et al. 2021, eq. 16).
    - ``ddim``: deterministic DDIM (eta = 0).

    DDIM runs on the "trailing" grid T-1, T-1-k, ..., k-1 with k = T // steps, so every step lands exactly on the
    next evaluated timestep (MONAI's ``prev = t - k``); MONAI's default rounded ``linspace`` grid does not.
    """
    sampler = SamplerType(sampler)
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(f"num_inference_steps must be in 1..{num_train_timesteps}, got {num_inference_steps}.")
    kwargs = {"num_train_timesteps": num_train_timesteps, "schedule": schedule, "clip_sample": clip_sample}
    kwargs.update(schedule_args)
    if sampler is SamplerType.DDPM and num_inference_steps == num_train_timesteps:
        scheduler: Scheduler = DDPMScheduler(**kwargs)
        eta = 0.0
    else:
        scheduler = DDIMScheduler(**kwargs)
        eta = 1.0 if sampler is SamplerType.DDPM else 0.0
    scheduler.set_timesteps(num_inference_steps)
    if isinstance(scheduler, DDIMScheduler):
        stride = num_train_timesteps // num_inference_steps
        scheduler.timesteps = torch.arange(num_train_timesteps - 1, -1, -stride)[:num_inference_steps].long()
    return scheduler, eta
