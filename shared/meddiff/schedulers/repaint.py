"""RePaint's resampling schedule (Lugmayr et al. 2022, "RePaint: Inpainting using Denoising Diffusion Probabilistic
Models", Algorithm 1 and section 4.2 "Resampling") over the DDPM grid.

The moves are ancestral DDPM steps (``step``, as :class:`DDPMScheduler`) and undo moves (``undo``: x_{t+1} =
sqrt(1 - b) x_t + sqrt(b) z with the respaced b, Algorithm 1 line 9). Known-region mixing is the sampling loop's job.

The plan: number the n grid points by their position p = 0..n-1 from the clean end (p = 0 is the smallest grid
timestep, p = n-1 is T-1). Going down one position per move, on arriving at a position p that is a multiple of
``jump_length`` with p < n - jump_length (the top ``jump_length`` positions have no room to jump back), the first
``jump_n_sample - 1`` arrivals there are each followed by ``jump_length`` undo moves up one position at a time; the run
then goes down again. The last move goes from p = 0 to the clean end, t = -1. With J = |{p multiple of jump_length,
p < n - jump_length}| jump positions, a plan has J (jump_n_sample - 1) jump_length undo moves and n plus as many down
moves.
"""

from __future__ import annotations

from collections.abc import Sequence

from .ddpm import DDPMScheduler

__all__ = ["RePaintScheduler"]


class RePaintScheduler(DDPMScheduler):
    """Ancestral DDPM with RePaint's jump (resampling) plan.

    Args:
        num_train_timesteps: number of diffusion steps T the network was trained with.
        schedule: name of a MONAI noise schedule ("linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine").
        clip_sample: clip the predicted x_0 to ``clip_sample_values``.
        clip_sample_values: (min, max) for clipping the predicted x_0.
        prediction_type: what the network predicts: "epsilon", "sample" or "v_prediction".
        variance_type: "fixed_small" (posterior variance), "fixed_large" (beta) or "learned_range" (2C-channel output).
        jump_length: grid positions jumped back up per resampling (RePaint's j).
        jump_n_sample: times each jump position is passed going down (RePaint's r): r - 1 resamplings.
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
        jump_length: int = 10,
        jump_n_sample: int = 10,
        **schedule_args,
    ) -> None:
        super().__init__(
            num_train_timesteps,
            schedule,
            clip_sample,
            clip_sample_values,
            prediction_type,
            variance_type,
            **schedule_args,
        )
        for name, value in (("jump_length", jump_length), ("jump_n_sample", jump_n_sample)):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        self.jump_length = int(jump_length)
        self.jump_n_sample = int(jump_n_sample)

    def _moves(self) -> list[tuple[int, int]]:
        grid = [int(t) for t in self.timesteps.tolist()]
        n = len(grid)
        jumps_left = {p: self.jump_n_sample - 1 for p in range(0, n - self.jump_length, self.jump_length)}
        position = n - 1
        path = [position]
        while position > 0:
            position -= 1
            path.append(position)
            if jumps_left.get(position, 0) > 0:
                jumps_left[position] -= 1
                path.extend(range(position + 1, position + self.jump_length + 1))
                position += self.jump_length
        timesteps = [grid[n - 1 - p] for p in path] + [-1]
        return list(zip(timesteps[:-1], timesteps[1:]))
