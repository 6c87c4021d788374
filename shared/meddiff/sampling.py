"""The one reverse-diffusion loop shared by every bundle, with hooks for conditioning and precision."""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.networks.schedulers import DDIMScheduler, Scheduler
from tqdm import tqdm

__all__ = ["Denoiser", "make_generator", "sample"]

# denoiser(x_t, t) -> the network's epsilon prediction for x_t (conditioning, guidance and casts live inside it)
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A seeded generator on `device`, or None for an unseeded run."""
    if seed is None:
        return None
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


def sample(
    denoiser: Denoiser,
    scheduler: Scheduler,
    shape: tuple[int, ...],
    *,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    progress: bool = False,
    desc: str = "sampling",
) -> torch.Tensor:
    """Run the reverse process over `scheduler.timesteps` from Gaussian noise of `shape`; return x_0 (float32)."""
    x = noise if noise is not None else torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    x = x.to(device=device, dtype=torch.float32)
    for t in tqdm(scheduler.timesteps, desc=desc, disable=not progress, leave=False):
        t_batch = torch.full((x.shape[0],), int(t), device=device, dtype=torch.long)
        eps = denoiser(x, t_batch).float()
        if isinstance(scheduler, DDIMScheduler):
            x, _ = scheduler.step(eps, int(t), x, eta=eta, generator=generator)
        else:
            x, _ = scheduler.step(eps, int(t), x, generator=generator)
    return x
