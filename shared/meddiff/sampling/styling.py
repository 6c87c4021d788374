"""The polyp method's styling pass (methods.md section 1.5, pass B): loss-gradient guidance of an ancestral DDPM run,
after DiffuseIT (Kwon & Ye 2023, "Diffusion-based Image Translation using Disentangled Style and Content
Representation") and ZeCon (Yang et al. 2023, "Zero-Shot Contrastive Loss for Text-Guided Diffusion Image Style
Transfer").

The network is an unconditional eps-predicting `monai.networks.nets.DiffusionModelUNet` with learned sigma: for C
image channels (RGB + mask in [-1, 1], C = 4) it outputs 2C channels, eps then the variance interpolation v (Nichol &
Dhariwal 2021, eq. 15). The scheduler is a `meddiff.schedulers.DDPMScheduler` with ``clip_sample=False`` (the seed's
``clip_denoised=False``; a clipped x_0 would make the step's mean nonlinear in eps), typically 200 steps with
``variance_type="learned_range"``. Timesteps t are train timesteps (0..T-1) throughout.

Each guided move t -> t_next (`mean_shift_guidance`):

1. the network runs once on x_t, with gradients enabled and x_t requiring them; x0_hat = (x_t - sqrt(1 - ab_t) eps)
   / sqrt(ab_t);
2. the guidance input is x_in = x0_hat, or with ``noise_aug`` (the seed's ``use_noise_aug_all``, its paper setting)
   x_in = fac x0_hat + (1 - fac) x_t with fac = sqrt(1 - ab_t);
3. a loss L(x_in), per batch item, and grad = dL/dx_t through the network (L of item b depends on x_t of item b only,
   so summing over the batch gives every image its own gradient, as a batch of one in the seed);
4. the ancestral mean is moved to mean - Sigma grad, Sigma the move's variance (the learned-range variance of that
   move when the scheduler has one): guided-diffusion's ``condition_mean`` with the seed's ``cond_fn`` = -dL/dx_t.
   The scheduler's mean, unclipped, is mean = (x_t - b / sqrt(1 - ab_t) eps) / sqrt(1 - b) with the respaced
   b = 1 - ab_t / ab_{t_next}, so the wrapper returns eps + Sigma grad sqrt(1 - b) sqrt(1 - ab_t) / b and leaves v
   (hence Sigma) unchanged; the scheduler's `step` then draws around the shifted mean.

The final move (t_next = -1, alpha_bar = 1) is not guided: the seed returns the final step's ``pred_xstart``, which
``condition_mean`` does not move, and on our trailing grid the final move's sample is exactly that x0_hat.

`StylingLoss` is the seed's loss, the sum of these terms per batch item (weight 0 switches a term off and skips its
work; y_in = fac src + (1 - fac) q_sample(src, t) with fresh noise from the run's generator, src the pass-B source):

- ``l2_target`` (10000): mean over (3, H, W) of (x_in_rgb - target_rgb)^2;
- ``range`` (200): mean over (C, H, W) of (x0_hat - clamp(x0_hat, -1, 1))^2 (guided-diffusion/DiffuseIT
  ``range_loss``, on x0_hat, not x_in);
- ``zecon`` (500): PatchNCE (Park et al. 2020, CUT, eq. 3; temperature 0.07) between the UNet's own encoder features
  of x_in (with gradients) and of y_in (no gradients), both at timestep t, summed over the chosen ``down_blocks``:
  per block, 256 locations drawn without replacement from the generator (the same for x_in, y_in and every batch
  item), the query patch of x_in at a location is pulled to y_in's patch at that location and pushed from y_in's
  other drawn patches of the same image; features are L2-normalised over channels;
- ``mse_source`` (5000): mean over (C, H, W) of (x_in - y_in)^2;
- ``vgg`` (100): only with ``vgg_weights``: sum over the feature network's outputs of the mean squared difference
  between its features of x_in_rgb and of y_in_rgb;
- ``dino_target`` (10000): only with ``dino_weights``: mean over D of (cls(x_in_rgb) - cls(target_rgb))^2;
- ``dino_direction`` (40000): only with ``dino_weights`` and only while the step index k > ``direction_above``
  (100): -mean over D of (cls(x_in_rgb) - cls(prev))^2, prev the previous guided step's x_in (the source before
  the first). The step index is the seed's unit: k = n - 1 - (position of t in the scheduler's n-point grid), so k
  runs n - 1 .. 0 along a full run; on the 200-point grid the term is on for k = 199 .. 101.

Feature networks are local TorchScript files (``torch.jit.load``; nothing is ever downloaded). Without them the
VGG and DINO terms are off whatever their weights. Each receives RGB mapped from [-1, 1] to [0, 1] and normalised
with the ImageNet mean and std, shape (B, 3, H, W); the DINO input is first resized bilinearly to 224 x 224. The DINO
module returns the (B, D) CLS embedding; the VGG module returns a feature map or a tuple/list of them (the seed uses
VGG19 conv1_1 and conv2_1).

Per guided step the work is one network forward and backward on x_t, one encoder forward (with gradients) on x_in
and one on y_in without (ZeCon; the encoder forwards stop after the last chosen block), plus the feature networks.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from meddiff.errors import OptionError
from meddiff.sampling.loop import Denoiser, sample
from meddiff.schedulers.ddpm import DDPMScheduler

__all__ = [
    "EncoderFeatures",
    "StepLoss",
    "StylingLoss",
    "load_feature_network",
    "mean_shift_guidance",
    "patch_nce_loss",
    "range_loss",
    "style",
    "styling_guidance",
    "zecon_loss",
]

# loss(x_in, x0_hat, t) -> (B,) per-item loss, t the (B,) long timesteps of the move
StepLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINO_SIZE = 224


# ---- the guidance wrapper ----


def _check_scheduler(scheduler) -> None:
    if not isinstance(scheduler, DDPMScheduler):
        raise OptionError(
            f"styling guides ancestral DDPM steps; got {type(scheduler).__name__}: use sampler 'ddpm' without jumps."
        )
    if scheduler.prediction_type != "epsilon":
        raise OptionError("styling needs an eps-predicting network: set prediction_type to 'epsilon'.")
    if scheduler.clip_sample:
        raise OptionError(
            "styling needs an unclipped x_0 estimate (the seed's clip_denoised=False): set clip_sample to false."
        )


def _single_timestep(t: torch.Tensor) -> int:
    t0 = int(t.reshape(-1)[0])
    if not bool((t == t0).all()):
        raise ValueError("styling guidance needs one timestep for the whole batch.")
    return t0


class _NextTimestep:
    """t -> t_next of the scheduler's plan, rebuilt when its grid changes (``set_timesteps``)."""

    def __init__(self, scheduler: DDPMScheduler) -> None:
        self.scheduler, self.grid, self.moves = scheduler, None, {}

    def __call__(self, t: int) -> int:
        grid = tuple(int(s) for s in self.scheduler.timesteps.tolist())
        if grid != self.grid:
            moves = self.scheduler.plan(0)
            if any(t_next > t_now for t_now, t_next in moves):
                raise OptionError("styling runs plain DDPM moves; the scheduler's plan jumps back up (RePaint).")
            self.grid, self.moves = grid, dict(moves)
        if t not in self.moves:
            raise ValueError(f"timestep {t} is not on the scheduler's grid.")
        return self.moves[t]


def mean_shift_guidance(
    network: torch.nn.Module, scheduler: DDPMScheduler, loss: StepLoss, *, noise_aug: bool = True
) -> Denoiser:
    """Guide `network` by moving each ancestral step's mean to mean - Sigma dL/dx_t (module docstring, steps 1-4).

    Args:
        network: ``network(x, timesteps=t) -> (eps[, v])`` with C or 2C output channels for C input channels.
        scheduler: the run's `DDPMScheduler` (``clip_sample=False``, eps prediction); its timesteps already set.
        loss: ``loss(x_in, x0_hat, t) -> (B,)``; a result that does not require gradients guides nothing.
        noise_aug: x_in = fac x0_hat + (1 - fac) x_t with fac = sqrt(1 - ab_t) (else x_in = x0_hat).
    """
    _check_scheduler(scheduler)
    next_timestep = _NextTimestep(scheduler)
    next_timestep(int(scheduler.timesteps[0]))  # checks the plan now rather than at the first step
    dtype = next(network.parameters()).dtype

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t_now = _single_timestep(t)
        t_next = next_timestep(t_now)
        if t_next < 0:
            with torch.no_grad():
                return network(x.to(dtype), timesteps=t).float()
        c = x.shape[1]
        ab = scheduler.alpha_bar(t_now)
        with torch.enable_grad():
            x_t = x.detach().float().requires_grad_(True)
            out = network(x_t.to(dtype), timesteps=t).float()
            x0 = scheduler.predict_x0(out[:, :c], t_now, x_t)
            fac = math.sqrt(1.0 - ab)
            x_in = fac * x0 + (1.0 - fac) * x_t if noise_aug else x0
            value = loss(x_in, x0, t)
            if value.requires_grad:
                grad = torch.autograd.grad(value.sum(), x_t)[0]
            else:
                grad = torch.zeros_like(x_t)
        out = out.detach()
        v = out[:, c:] if out.shape[1] == 2 * c else None
        sigma = scheduler.variance(t_now, t_next, v)
        beta = scheduler.posterior(t_now, t_next)[2]
        eps = out[:, :c] + sigma * grad * (math.sqrt(1.0 - beta) * math.sqrt(1.0 - ab) / beta)
        return torch.cat([eps, v], dim=1) if v is not None else eps

    return denoise


# ---- loss pieces ----


def range_loss(x: torch.Tensor) -> torch.Tensor:
    """(B,) mean over the non-batch dimensions of (x - clamp(x, -1, 1))^2 (guided-diffusion's ``range_loss``)."""
    return (x - x.clamp(-1.0, 1.0)).pow(2).flatten(1).mean(1)


def _mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).pow(2).flatten(1).mean(1)


class _StopForward(Exception):
    """Raised by the last feature hook to end an encoder-only forward."""


class EncoderFeatures:
    """Encoder features of a MONAI `DiffusionModelUNet`: the output of the last resnet (and its attention) of each
    chosen ``down_blocks[i]``, before that block's downsampling, by forward hooks; the forward stops after the last
    chosen block.

    Args:
        network: a `monai.networks.nets.DiffusionModelUNet` (anything with ``down_blocks`` of MONAI's down blocks).
        blocks: indices into ``network.down_blocks``; None: the first four (all if fewer), which at the seed's
            resolutions are its guided-diffusion input blocks 2, 5, 8 and 11 (its input convolution, layer 0, is not
            used here).
    """

    def __init__(self, network: torch.nn.Module, blocks: Sequence[int] | None = None) -> None:
        down = getattr(network, "down_blocks", None)
        if down is None:
            raise OptionError(
                f"the zecon term needs a MONAI DiffusionModelUNet (with down_blocks), got {type(network).__name__}; "
                "set zecon to 0 for other networks."
            )
        n = len(down)
        chosen = list(range(min(4, n))) if blocks is None else [int(b) for b in blocks]
        if not chosen or any(not 0 <= b < n for b in chosen):
            raise OptionError(f"zecon_blocks must be indices in 0..{n - 1} of the UNet's down_blocks, got {blocks!r}.")
        self.network, self.blocks = network, sorted(set(chosen))

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
        """[(B, C_i, H_i, W_i)] features of `x` at timesteps `t`, in block order."""
        features: dict[int, torch.Tensor] = {}
        last = self.blocks[-1]

        def hook(index: int, block: torch.nn.Module):
            def capture(_module, _inputs, output):
                features[index] = output[1][len(block.resnets) - 1]
                if index == last:
                    raise _StopForward

            return capture

        handles = [
            self.network.down_blocks[i].register_forward_hook(hook(i, self.network.down_blocks[i])) for i in self.blocks
        ]
        dtype = next(self.network.parameters()).dtype
        try:
            self.network(x.to(dtype), timesteps=t)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return [features[i].float() for i in self.blocks]


def patch_nce_loss(query: torch.Tensor, key: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """(B,) PatchNCE: mean over P of -log softmax_j(q_p . k_j / tau)[p], q, k (B, P, D) L2-normalised patches.

    The key at the query's own location is the positive, the image's other P - 1 keys are the negatives (CUT,
    Park et al. 2020, eq. 3, negatives from the same image); keys carry no gradient.
    """
    logits = query @ key.detach().transpose(1, 2) / temperature
    b, p, _ = logits.shape
    labels = torch.arange(p, device=logits.device).repeat(b)
    return F.cross_entropy(logits.flatten(0, 1), labels, reduction="none").view(b, p).mean(1)


def zecon_loss(
    features_q: Sequence[torch.Tensor],
    features_k: Sequence[torch.Tensor],
    generator: torch.Generator | None = None,
    num_patches: int = 256,
    temperature: float = 0.07,
) -> torch.Tensor:
    """(B,) ZeCon's patch-wise contrastive loss summed over layers (module docstring).

    Args:
        features_q: per layer (B, C, H, W) features of x_in (the queries, with gradients).
        features_k: per layer the same-shaped features of y_in (the keys).
        generator: draws the patch locations.
        num_patches: locations per layer (all of them when a layer has fewer).
        temperature: the softmax temperature tau.
    """
    total = None
    for fq, fk in zip(features_q, features_k, strict=True):
        q, k = fq.flatten(2).transpose(1, 2), fk.flatten(2).transpose(1, 2)  # (B, HW, C)
        device = generator.device if generator is not None else q.device
        ids = torch.randperm(q.shape[1], generator=generator, device=device)[:num_patches].to(q.device)
        q, k = F.normalize(q[:, ids], dim=-1), F.normalize(k[:, ids], dim=-1)
        term = patch_nce_loss(q, k, temperature)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("zecon_loss needs at least one feature layer.")
    return total


def load_feature_network(path: str | os.PathLike, option: str, device: torch.device | str) -> torch.jit.ScriptModule:
    """A local TorchScript feature network in eval mode without parameter gradients; `option` names it in errors."""
    from meddiff.features import load_torchscript

    return load_torchscript(path, device, f"--{option}")


def _imagenet(rgb: torch.Tensor, size: int | None = None) -> torch.Tensor:
    x = (rgb + 1.0) / 2.0
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def _as_list(features) -> list[torch.Tensor]:
    return [features] if isinstance(features, torch.Tensor) else list(features)


class StylingLoss:
    """The seed's styling loss ``(x_in, x0_hat, t) -> (B,)`` (module docstring); a `StepLoss` with state (prev).

    ``last_terms`` holds the detached per-item value of each active term (unweighted) after every call.

    Args:
        network: the diffusion UNet (its encoder gives the ZeCon features).
        scheduler: the run's scheduler (its `add_noise` and grid).
        source: the pass-B source (the inpainted image being styled), (B, C, H, W) in [-1, 1].
        target: the target image, (B or 1, >= 3, H, W) in [-1, 1]; its first 3 channels are RGB.
        generator: the run's random stream (y_in's noise, ZeCon's patch locations).
        l2_target, range, zecon, mse_source, vgg, dino_target, dino_direction: the terms' weights (0: off).
        zecon_blocks: `EncoderFeatures` blocks.
        zecon_patches: patch locations per block.
        zecon_temperature: PatchNCE's temperature.
        vgg_weights: local TorchScript VGG feature network (None: no VGG term).
        dino_weights: local TorchScript DINO CLS network (None: no DINO terms).
        direction_above: the direction term is on while the step index k > this (seed: 100).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        scheduler: DDPMScheduler,
        source: torch.Tensor,
        target: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        l2_target: float = 10000.0,
        range: float = 200.0,
        zecon: float = 500.0,
        mse_source: float = 5000.0,
        vgg: float = 100.0,
        dino_target: float = 10000.0,
        dino_direction: float = 40000.0,
        zecon_blocks: Sequence[int] | None = None,
        zecon_patches: int = 256,
        zecon_temperature: float = 0.07,
        vgg_weights: str | os.PathLike | None = None,
        dino_weights: str | os.PathLike | None = None,
        direction_above: int = 100,
    ) -> None:
        self.weights = {
            "l2_target": float(l2_target),
            "range": float(range),
            "zecon": float(zecon),
            "mse_source": float(mse_source),
            "vgg": float(vgg) if vgg_weights is not None else 0.0,
            "dino_target": float(dino_target) if dino_weights is not None else 0.0,
            "dino_direction": float(dino_direction) if dino_weights is not None else 0.0,
        }
        for name, weight in self.weights.items():
            if not math.isfinite(weight) or weight < 0:
                raise OptionError(f"{name}: the styling weight must be a finite number >= 0, got {weight!r}.")
        if source.ndim != 4 or target.ndim != 4 or target.shape[1] < 3:
            raise ValueError(
                f"source must be (B, C, H, W) and target (B, >=3, H, W); got {tuple(source.shape)}, "
                f"{tuple(target.shape)}."
            )
        if target.shape[0] not in (1, source.shape[0]) or target.shape[2:] != source.shape[2:]:
            raise ValueError(f"target {tuple(target.shape)} does not fit source {tuple(source.shape)}.")
        self.network, self.scheduler, self.generator = network, scheduler, generator
        self.source = source.detach().float()
        self.target = target.detach().float().to(self.source.device).expand(source.shape[0], -1, -1, -1)
        self.zecon_patches, self.zecon_temperature = int(zecon_patches), float(zecon_temperature)
        self.direction_above = int(direction_above)
        self.encoder = EncoderFeatures(network, zecon_blocks) if self.weights["zecon"] > 0 else None
        device = self.source.device
        self.vgg = load_feature_network(vgg_weights, "vgg_weights", device) if self.weights["vgg"] > 0 else None
        use_dino = self.weights["dino_target"] > 0 or self.weights["dino_direction"] > 0
        self.dino = load_feature_network(dino_weights, "dino_weights", device) if use_dino else None
        self.last_terms: dict[str, torch.Tensor] = {}
        self._target_cls: torch.Tensor | None = None
        self.reset()

    @property
    def active(self) -> list[str]:
        """The names of the terms with a weight > 0 (and, for VGG/DINO, a feature network)."""
        return [name for name, weight in self.weights.items() if weight > 0]

    def reset(self) -> None:
        """Start a new run: the direction term's previous x_in is the source again."""
        self._prev_cls: torch.Tensor | None = None

    def _cls(self, rgb: torch.Tensor) -> torch.Tensor:
        return self.dino(_imagenet(rgb, DINO_SIZE)).float().flatten(1)

    def _step_index(self, t: int) -> int:
        grid = [int(s) for s in self.scheduler.timesteps.tolist()]
        return len(grid) - 1 - grid.index(t)

    def _y_in(self, t: torch.Tensor, fac: float) -> torch.Tensor:
        noise = torch.randn(self.source.shape, generator=self.generator, device=self.source.device)
        y_t = self.scheduler.add_noise(self.source, noise, t.to(self.source.device)).float()
        return fac * self.source + (1.0 - fac) * y_t

    def __call__(self, x_in: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        w, terms = self.weights, {}
        t_now = _single_timestep(t)
        fac = math.sqrt(1.0 - self.scheduler.alpha_bar(t_now))
        rgb = x_in[:, :3]
        y_in = self._y_in(t, fac) if w["zecon"] > 0 or w["mse_source"] > 0 or w["vgg"] > 0 else None
        if w["l2_target"] > 0:
            terms["l2_target"] = _mse(rgb, self.target[:, :3])
        if w["range"] > 0:
            terms["range"] = range_loss(x0)
        if w["zecon"] > 0:
            with torch.no_grad():
                keys = self.encoder(y_in, t)
            queries = self.encoder(x_in, t)
            terms["zecon"] = zecon_loss(queries, keys, self.generator, self.zecon_patches, self.zecon_temperature)
        if w["mse_source"] > 0:
            terms["mse_source"] = _mse(x_in, y_in)
        if w["vgg"] > 0:
            with torch.no_grad():
                keys = _as_list(self.vgg(_imagenet(y_in[:, :3])))
            queries = _as_list(self.vgg(_imagenet(rgb)))
            terms["vgg"] = sum(_mse(q.float(), k.float()) for q, k in zip(queries, keys, strict=True))
        if self.dino is not None:
            cls = self._cls(rgb)
            if w["dino_target"] > 0:
                if self._target_cls is None:
                    with torch.no_grad():
                        self._target_cls = self._cls(self.target[:, :3])
                terms["dino_target"] = _mse(cls, self._target_cls)
            if w["dino_direction"] > 0 and self._step_index(t_now) > self.direction_above:
                if self._prev_cls is None:
                    with torch.no_grad():
                        self._prev_cls = self._cls(self.source[:, :3])
                terms["dino_direction"] = -_mse(cls, self._prev_cls)
            self._prev_cls = cls.detach()
        self.last_terms = {name: value.detach() for name, value in terms.items()}
        total = torch.zeros(x_in.shape[0], device=x_in.device)
        for name, value in terms.items():
            total = total + w[name] * value
        return total


def styling_guidance(
    network: torch.nn.Module,
    scheduler: DDPMScheduler,
    source: torch.Tensor,
    target: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    noise_aug: bool = True,
    **loss_options,
) -> Denoiser:
    """The styling denoiser: `mean_shift_guidance` by a `StylingLoss` (its keywords in `loss_options`)."""
    loss = StylingLoss(network, scheduler, source, target, generator, **loss_options)
    return mean_shift_guidance(network, scheduler, loss, noise_aug=noise_aug)


def style(
    network: torch.nn.Module,
    scheduler: DDPMScheduler,
    source: torch.Tensor,
    target: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    skip_steps: int = 80,
    noise_aug: bool = True,
    progress: bool = False,
    **loss_options,
) -> torch.Tensor:
    """Pass B: `source` noised to ``scheduler.plan(skip_steps)[0][0]``, then the guided run; returns x0_hat of the
    final step (the final move's sample, unclipped).

    Args:
        network: the unconditional (eps, v) `DiffusionModelUNet`, in eval mode.
        scheduler: a `DDPMScheduler` with its timesteps set (seed: 200, learned_range, clip_sample=False).
        source: the image to style (pass A's inpainted sample), (B, C, H, W) in [-1, 1].
        target: the target image (B or 1, >= 3, H, W) in [-1, 1].
        generator: the one random stream of the run (start noise, steps, y_in noise, patch locations).
        skip_steps: moves of the plan skipped (seed: 80 of 200, so the run starts at the 120th point from the end).
        noise_aug: the seed's ``use_noise_aug_all``.
        progress: show a progress bar.
        loss_options: `StylingLoss` keywords (weights, ``zecon_blocks``, ``vgg_weights``, ``dino_weights``, ...).
    """
    denoiser = styling_guidance(network, scheduler, source, target, generator, noise_aug=noise_aug, **loss_options)
    return sample(
        denoiser, scheduler, image=source, skip_steps=skip_steps, generator=generator, progress=progress, desc="styling"
    )
