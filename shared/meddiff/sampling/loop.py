"""The one reverse-diffusion loop: start -> (step | undo) -> after-step -> finish, with nothing bundle-specific.

- start: Gaussian noise of a shape, or a given image noised to the plan's first timestep (the seeds'
  ``skip_timesteps``: ``skip_steps`` moves of the plan are skipped and the image is noised to where it resumes);
- the scheduler's `plan` lists the moves (t, t_next): a move down calls the denoiser and the scheduler's `step`; a
  move up (t_next > t, RePaint's jumps) is the scheduler's `undo` and calls no network;
- after-step: a callable ``(x, t_next, generator) -> x`` run after every move down (RePaint's known-region merge);
- finish: a callable ``x -> output`` (decoding latents through an autoencoder);
- one `torch.Generator` drives every random draw (start, steps, undo, merges), so a seed reproduces a run.

A denoiser is ``denoiser(x_t, t) -> model output`` with t a (B,) long tensor; conditioning, guidance and precision
casts live inside it (`meddiff.conditioning`, `meddiff.sampling.guidance`). Everything runs under ``no_grad``
except what a guidance wrapper enables for itself.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm import tqdm

__all__ = ["AfterStep", "Denoiser", "make_generator", "sample"]

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
AfterStep = Callable[[torch.Tensor, int, "torch.Generator | None"], torch.Tensor]


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A seeded generator on `device`, or None for an unseeded run."""
    if seed is None:
        return None
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    scheduler,
    shape: tuple[int, ...] | None = None,
    *,
    image: torch.Tensor | None = None,
    skip_steps: int = 0,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    after_step: AfterStep | None = None,
    finish: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: bool = False,
    desc: str = "sampling",
) -> torch.Tensor:
    """Run the reverse process of `scheduler` (its timesteps already set) and return the finished sample.

    Args:
        denoiser: ``(x_t, t) -> model output`` for the scheduler's `step`.
        scheduler: a `meddiff.schedulers.GridScheduler`.
        shape: shape of x_T when starting from noise.
        image: start from this image noised to the first timestep of ``scheduler.plan(skip_steps)`` instead.
        skip_steps: moves of the plan to skip (with `image`: how much of it to keep).
        noise: the starting noise itself (instead of drawing it from `generator`).
        generator: the one random stream of the run.
        device: where to run (default: the device of `image` or `noise`, else CPU).
        after_step: ``(x, t_next, generator) -> x`` after every move down.
        finish: ``x_0 -> output`` at the end.
        progress: show a progress bar.
        desc: the progress bar's label.
    """
    plan = scheduler.plan(skip_steps)
    if not plan:
        raise ValueError(f"skip_steps={skip_steps} leaves no step of the {len(scheduler.timesteps)}-step plan to run.")
    x = _start(scheduler, plan[0][0], shape, image, noise, generator, device)
    for t, t_next in tqdm(plan, desc=desc, disable=not progress, leave=False):
        if t_next > t:
            x = scheduler.undo(x, t, t_next, generator)
            continue
        output = denoiser(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        x, _ = scheduler.step(output, t, t_next, x, generator)
        if after_step is not None:
            x = after_step(x, t_next, generator)
    return finish(x) if finish is not None else x


def _start(
    scheduler,
    t_start: int,
    shape: tuple[int, ...] | None,
    image: torch.Tensor | None,
    noise: torch.Tensor | None,
    generator: torch.Generator | None,
    device: torch.device | str | None,
) -> torch.Tensor:
    """x at the plan's first timestep: the given `noise`, fresh noise of `shape`, or `image` noised to `t_start`."""
    if image is not None:
        image = image.float().to(device or image.device)
        if noise is None:
            noise = torch.randn(image.shape, generator=generator, device=image.device, dtype=torch.float32)
        timesteps = torch.full((image.shape[0],), t_start, device=image.device, dtype=torch.long)
        return scheduler.add_noise(image, noise.to(image.device).float(), timesteps).float()
    if noise is not None:
        return noise.float().to(device or noise.device)
    if shape is None:
        raise ValueError("sample() needs a `shape`, a starting `noise` or an `image` to start from.")
    return torch.randn(shape, generator=generator, device=device or "cpu", dtype=torch.float32)
