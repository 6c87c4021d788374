"""Grid schedulers: a MONAI noise schedule, the grid of train timesteps a sampler evaluates, and the moves between them.

Conventions shared by every scheduler in :mod:`meddiff.schedulers`:

- Train timesteps are the integers 0..T-1 of a noise schedule from MONAI's registry (``NoiseSchedules``), and
  ``alphas_cumprod[t]`` is alpha_bar_t = prod_{s <= t} (1 - beta_s), so that x_t = sqrt(alpha_bar_t) x_0 +
  sqrt(1 - alpha_bar_t) eps (Ho et al. 2020, eq. 4). The timestep -1 is the clean end of the chain: alpha_bar = 1.
- ``timesteps`` is the strictly descending grid of train timesteps at which the network is evaluated. At construction
  it is the full chain T-1, ..., 0; ``set_timesteps(n)`` sets the "trailing" grid t_i = round(T - i T / n) - 1,
  i = 0..n-1 (halves round up), which starts at T-1 for every n and is the full chain for n = T.
- A reverse run is the list of moves returned by ``plan()``: pairs (t, t_next). A move with t_next < t is a
  denoising ``step`` that needs the network output at t; the last move of a plain plan goes to t_next = -1, so every
  run ends exactly at alpha_bar = 1. A move with t_next > t is an ``undo`` that noises the sample again (RePaint).
- ``step`` returns (x at t_next, predicted x_0). Coefficients are Python floats computed in float64 from the float64
  ``alphas_cumprod``; tensors are computed in the sample's dtype promoted to at least float32, that is float32 for
  half, bfloat16 and float32 samples and float64 only when the caller passes float64.
- All randomness is ``torch.randn(shape, generator=generator, device=sample.device)``, so one generator drives a run.
- ``model_output`` may have 2C channels for a sample of C channels (a network that also predicts its variance,
  Nichol & Dhariwal 2021): the second half is read only by ``DDPMScheduler(variance_type="learned_range")`` and is
  ignored by every other scheduler.
- ``predict_x0`` is the x_0 implied by the model output (by ``prediction_type``), clipped to ``clip_sample_values``
  when ``clip_sample``. ``predict_eps`` is the eps implied by the raw model output, never clipped; passing the
  clipped x_0 recomputes eps from it instead. DDIM steps with the raw eps (as Song et al.'s code and MONAI do); DDPM,
  RePaint and DPM-Solver++ use x_0 only and never need eps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.schedulers.scheduler import NoiseSchedules

__all__ = ["PREDICTION_TYPES", "GridScheduler", "trailing_timesteps"]

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def trailing_timesteps(num_train_timesteps: int, num_inference_steps: int) -> torch.Tensor:
    """The trailing grid t_i = round(T - i T / n) - 1, i = 0..n-1 (halves round up), as a descending LongTensor.

    Exact integer arithmetic: t_i = T - 1 - floor((2 i T + n) / (2 n)). Consecutive values differ by at least 1
    because T / n >= 1, so the n values are distinct, the first is T - 1 and the last is >= 0.
    """
    i = torch.arange(num_inference_steps, dtype=torch.long)
    return num_train_timesteps - 1 - (2 * i * num_train_timesteps + num_inference_steps) // (2 * num_inference_steps)


class GridScheduler:
    """Base of the grid schedulers: the noise schedule, the evaluated grid, the plan of moves and the shared helpers.

    Subclasses implement ``step`` (and may override ``_moves`` for other plans, ``reset`` for solver state).

    Args:
        num_train_timesteps: number of diffusion steps T the network was trained with.
        schedule: name of a MONAI noise schedule: "linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine"
            (or any other member of ``monai.networks.schedulers.scheduler.NoiseSchedules``).
        clip_sample: clip the predicted x_0 to ``clip_sample_values``.
        clip_sample_values: (min, max) for clipping the predicted x_0.
        prediction_type: what the network predicts: "epsilon", "sample" (x_0) or "v_prediction".
        schedule_args: keyword arguments of the schedule function, e.g. ``beta_start``, ``beta_end``.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        schedule: str = "linear_beta",
        clip_sample: bool = True,
        clip_sample_values: Sequence[float] = (-1.0, 1.0),
        prediction_type: str = "epsilon",
        **schedule_args,
    ) -> None:
        if isinstance(num_train_timesteps, bool) or int(num_train_timesteps) != num_train_timesteps:
            raise ValueError(f"num_train_timesteps must be an integer, got {num_train_timesteps!r}.")
        num_train_timesteps = int(num_train_timesteps)
        if num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}.")
        if schedule not in NoiseSchedules:
            raise ValueError(f"Unknown schedule {schedule!r}; choose one of {sorted(NoiseSchedules.names)}.")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"Unknown prediction_type {prediction_type!r}; choose one of {list(PREDICTION_TYPES)}.")
        if len(clip_sample_values) != 2 or not float(clip_sample_values[0]) < float(clip_sample_values[1]):
            raise ValueError(f"clip_sample_values must be (min, max) with min < max, got {clip_sample_values!r}.")
        try:
            noise_schedule = NoiseSchedules[schedule](num_train_timesteps=num_train_timesteps, **schedule_args)
        except TypeError as err:
            raise ValueError(f"Bad arguments {schedule_args} for schedule {schedule!r}: {err}") from err
        betas = noise_schedule[0] if isinstance(noise_schedule, tuple) else noise_schedule
        self.betas = torch.as_tensor(betas).detach().to(device="cpu", dtype=torch.float64)
        if self.betas.shape != (num_train_timesteps,) or not bool(((self.betas > 0) & (self.betas < 1)).all()):
            raise ValueError(f"Schedule {schedule!r} with {schedule_args} must give T betas in (0, 1).")
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self.num_train_timesteps = num_train_timesteps
        self.schedule = schedule
        self.schedule_args = dict(schedule_args)
        self.clip_sample = bool(clip_sample)
        self.clip_sample_values = (float(clip_sample_values[0]), float(clip_sample_values[1]))
        self.prediction_type = prediction_type
        self._noise_tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self.num_inference_steps = num_train_timesteps
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.long)
        self.reset()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_train_timesteps={self.num_train_timesteps}, schedule={self.schedule!r}, "
            f"num_inference_steps={self.num_inference_steps}, prediction_type={self.prediction_type!r}, "
            f"clip_sample={self.clip_sample})"
        )

    # ---- grid and plan ----

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Set ``timesteps`` to the trailing grid of `num_inference_steps` train timesteps, and reset solver state."""
        n = num_inference_steps
        if isinstance(n, bool) or int(n) != n or not 1 <= int(n) <= self.num_train_timesteps:
            raise ValueError(f"num_inference_steps must be an integer in 1..{self.num_train_timesteps}, got {n!r}.")
        self.num_inference_steps = int(n)
        self.timesteps = trailing_timesteps(self.num_train_timesteps, int(n)).to(device)
        self.reset()

    def reset(self) -> None:
        """Forget solver state (multistep history); called by ``set_timesteps`` and ``plan``."""

    def _moves(self) -> list[tuple[int, int]]:
        grid = [int(t) for t in self.timesteps.tolist()]
        return list(zip(grid, grid[1:] + [-1]))

    def plan(self, skip_steps: int = 0) -> list[tuple[int, int]]:
        """The (t, t_next) moves of one reverse run, minus the first `skip_steps`; starts a new run (``reset``).

        ``t_next == -1`` is the clean end (alpha_bar = 1); ``t_next > t`` is an undo move. With `skip_steps` > 0 the
        run starts from an image noised to ``plan(skip_steps)[0][0]``.
        """
        self.reset()
        moves = self._moves()
        if isinstance(skip_steps, bool) or int(skip_steps) != skip_steps or not 0 <= skip_steps < len(moves):
            raise ValueError(f"skip_steps must be an integer in 0..{len(moves) - 1}, got {skip_steps!r}.")
        return moves[int(skip_steps) :]

    # ---- schedule values ----

    def alpha_bar(self, t: int) -> float:
        """alpha_bar_t as a float; 1.0 for t < 0 (the clean end)."""
        t = int(t)
        if t < 0:
            return 1.0
        if t >= self.num_train_timesteps:
            raise ValueError(f"Timestep {t} is outside 0..{self.num_train_timesteps - 1}.")
        return float(self.alphas_cumprod[t])

    def _check_timestep(self, t: int) -> int:
        t = int(t)
        if not 0 <= t < self.num_train_timesteps:
            raise ValueError(f"Model outputs exist only at timesteps 0..{self.num_train_timesteps - 1}, got {t}.")
        return t

    def _check_step(self, t: int, t_next: int) -> tuple[int, int]:
        t, t_next = self._check_timestep(t), int(t_next)
        if not -1 <= t_next < t:
            raise ValueError(f"A step goes down: need -1 <= t_next < t, got ({t}, {t_next}); use undo() to go up.")
        return t, t_next

    @staticmethod
    def _compute_dtype(sample: torch.Tensor) -> torch.dtype:
        return torch.promote_types(sample.dtype, torch.float32)

    @staticmethod
    def _randn(sample: torch.Tensor, dtype: torch.dtype, generator: torch.Generator | None) -> torch.Tensor:
        return torch.randn(sample.shape, generator=generator, device=sample.device, dtype=dtype)

    def _split(self, model_output: torch.Tensor, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prediction, variance half or None) from a model output of C or 2C channels for a sample of C channels."""
        if model_output.shape == sample.shape:
            return model_output, None
        c = sample.shape[1] if sample.ndim > 1 else 0
        if (
            c > 0
            and model_output.ndim == sample.ndim
            and model_output.shape[1] == 2 * c
            and model_output.shape[0] == sample.shape[0]
            and model_output.shape[2:] == sample.shape[2:]
        ):
            return model_output[:, :c], model_output[:, c:]
        raise ValueError(
            f"model_output of shape {tuple(model_output.shape)} does not fit sample of shape {tuple(sample.shape)}:"
            " expected the same shape, or twice the channels (prediction, variance)."
        )

    # ---- predictions ----

    def predict_x0(self, model_output: torch.Tensor, t: int, sample: torch.Tensor) -> torch.Tensor:
        """The x_0 implied by the model output at t (by ``prediction_type``), clipped when ``clip_sample``."""
        t = self._check_timestep(t)
        dtype = self._compute_dtype(sample)
        out, _ = self._split(model_output, sample)
        out, x = out.to(dtype), sample.to(dtype)
        ab = self.alpha_bar(t)
        if self.prediction_type == "epsilon":
            x0 = (x - math.sqrt(1.0 - ab) * out) / math.sqrt(ab)
        elif self.prediction_type == "sample":
            x0 = out
        else:
            x0 = math.sqrt(ab) * x - math.sqrt(1.0 - ab) * out
        if self.clip_sample:
            x0 = x0.clamp(*self.clip_sample_values)
        return x0

    def predict_eps(
        self, model_output: torch.Tensor, t: int, sample: torch.Tensor, x0: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The eps implied by the raw (unclipped) model output at t; given `x0`, the eps consistent with that x_0."""
        t = self._check_timestep(t)
        dtype = self._compute_dtype(sample)
        x = sample.to(dtype)
        ab = self.alpha_bar(t)
        if x0 is not None:
            return (x - math.sqrt(ab) * x0.to(dtype)) / math.sqrt(1.0 - ab)
        out = self._split(model_output, sample)[0].to(dtype)
        if self.prediction_type == "epsilon":
            return out
        if self.prediction_type == "sample":
            return (x - math.sqrt(ab) * out) / math.sqrt(1.0 - ab)
        return math.sqrt(ab) * out + math.sqrt(1.0 - ab) * x

    # ---- moves ----

    def step(
        self,
        model_output: torch.Tensor,
        t: int,
        t_next: int,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One reverse move from t down to t_next (-1: the clean end); returns (x at t_next, predicted x_0)."""
        raise NotImplementedError

    def undo(self, sample: torch.Tensor, t: int, t_next: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Noise x_t up to t_next > t: a draw from q(x_{t_next} | x_t) = N(sqrt(r) x_t, (1 - r) I), r = ab_next / ab_t.

        For neighbouring grid points this is RePaint's x_{t+1} = sqrt(1 - b) x_t + sqrt(b) z with the respaced
        b = 1 - ab(t_next) / ab(t) (Lugmayr et al. 2022, Algorithm 1, line 9).
        """
        t, t_next = int(t), int(t_next)
        if not -1 <= t < t_next < self.num_train_timesteps:
            raise ValueError(
                f"An undo goes up: need -1 <= t < t_next < {self.num_train_timesteps}, got ({t}, {t_next})."
            )
        ratio = self.alpha_bar(t_next) / self.alpha_bar(t)
        dtype = self._compute_dtype(sample)
        noise = self._randn(sample, dtype, generator)
        return math.sqrt(ratio) * sample.to(dtype) + math.sqrt(1.0 - ratio) * noise

    # ---- training ----

    def _sqrt_tables(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """[sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)] rows cached per (device, dtype)."""
        key = (device, dtype)
        if key not in self._noise_tables:
            table = torch.stack([self.alphas_cumprod.sqrt(), (1.0 - self.alphas_cumprod).sqrt()])
            self._noise_tables[key] = table.to(device=device, dtype=dtype)
        return self._noise_tables[key]

    def _per_item(self, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if timesteps.is_floating_point() or timesteps.is_complex():
            raise ValueError(f"timesteps must be an integer tensor, got {timesteps.dtype}.")
        if timesteps.device.type == "cpu" and timesteps.numel() and not 0 <= int(timesteps.min()):
            raise ValueError("timesteps must be >= 0.")
        table = self._sqrt_tables(like.device, like.dtype)[:, timesteps.to(like.device).reshape(-1)]
        shape = (-1,) + (1,) * (like.ndim - 1)
        return table[0].reshape(shape), table[1].reshape(shape)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) noise, with one timestep per batch item (as MONAI's ``add_noise``)."""
        sqrt_ab, sqrt_one_minus_ab = self._per_item(timesteps, original_samples)
        return sqrt_ab * original_samples + sqrt_one_minus_ab * noise

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The v-prediction target v = sqrt(ab_t) noise - sqrt(1 - ab_t) x_0 (as MONAI's ``get_velocity``)."""
        sqrt_ab, sqrt_one_minus_ab = self._per_item(timesteps, sample)
        return sqrt_ab * noise - sqrt_one_minus_ab * sample
