"""MONAI `Inferer`s: the training inferer, and sampling inferers that run a whole reverse process.

`DiffusionTrainingInferer` noises the input and calls the network through a `meddiff.conditioning.Conditioning`
under the requested precision. `SamplingInferer` holds what every sampler shares (settings, the scheduler, the cast
of the network, the seeded generator, ``no_grad``); its subclasses only say what is sampled:

- `ConditionedSamplingInferer`: images from a condition (an encoded mask, a SPADE label map, a class), with
  optional classifier-free guidance;
- `InpaintingSamplingInferer`: an image whose masked pixels are generated (RePaint jumps, or a partially noised
  start);
- `LatentSamplingInferer`: latents decoded by an autoencoder, with optional classifier-gradient guidance;
- `EnsembleSamplingInferer`: N CIMD segmentations per image (`meddiff.networks.CIMDNetwork`).

Their ``__call__(inputs, network)`` runs all of the sampling, so MONAI's `SupervisedEvaluator` and MONAI Label's
bundle loader drive them like any segmentation inferer; ``seed`` can be given per call as a keyword.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import DiffusionInferer, Inferer

from meddiff.conditioning import Conditioning
from meddiff.errors import OptionError
from meddiff.latent import LatentDecoder
from meddiff.options import parse
from meddiff.precision import autocast, cast_for_inference, check_precision
from meddiff.sampling import (
    KnownRegionMerge,
    class_log_prob,
    classifier_free,
    classifier_gradient,
    conditioned,
    make_generator,
    sample,
)
from meddiff.schedulers import GridScheduler, make_scheduler

__all__ = [
    "ConditionedSamplingInferer",
    "DiffusionTrainingInferer",
    "EnsembleSamplingInferer",
    "InpaintStyleInferer",
    "InpaintingSamplingInferer",
    "LatentSamplingInferer",
    "SamplingInferer",
]


ENSEMBLE_OUTPUTS = ("samples", "frequency", "majority")
# the styling loss's term weights (`meddiff.sampling.styling.StylingLoss`), scaled with the image size
STYLE_WEIGHTS = ("l2_target", "range", "zecon", "mse_source", "vgg", "dino_target", "dino_direction")


def _conditioning(conditioning: Conditioning | str, channels_last: bool = False) -> Conditioning:
    if isinstance(conditioning, Conditioning):
        return conditioning
    return Conditioning(conditioning, channels_last=channels_last)


class DiffusionTrainingInferer(DiffusionInferer):
    """`DiffusionInferer` for training: x_t = q_sample(x_0, t, noise), then the network through `conditioning`.

    The network runs under bf16/fp16 autocast and channels_last when asked; the loss sees a float32 prediction.

    Args:
        scheduler: the training noise scheduler (its `add_noise`).
        conditioning: how the condition reaches the network (`meddiff.conditioning.Conditioning` or its mode).
        precision: "fp32", "bf16", "fp16" or "auto".
        channels_last: run the network in channels-last memory format.
        return_inputs: return ``(prediction, x_0, x_t, timesteps)`` instead of the prediction alone, for losses that
            need the diffusion's inputs (`meddiff.losses.HybridLoss`).
    """

    def __init__(
        self,
        scheduler: Any,
        conditioning: Conditioning | str = "concat",
        precision: str = "fp32",
        channels_last: bool = False,
        return_inputs: bool = False,
    ) -> None:
        super().__init__(scheduler)
        self.precision, self.channels_last = check_precision(precision), channels_last
        self.conditioning = _conditioning(conditioning, channels_last)
        self.return_inputs = bool(return_inputs)

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        diffusion_model: torch.nn.Module,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        condition: Any = None,
        mode: str | None = None,
        seg: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if mode is not None and mode != self.conditioning.mode:
            raise ValueError(f"this inferer conditions by {self.conditioning.mode!r}; it was asked for {mode!r}.")
        noisy = self.scheduler.add_noise(original_samples=inputs, noise=noise, timesteps=timesteps)
        with autocast(inputs.device, self.precision):
            prediction = self.conditioning(diffusion_model, noisy, timesteps, seg if seg is not None else condition)
        if self.return_inputs:
            return prediction.float(), inputs, noisy, timesteps
        return prediction.float()


class SamplingInferer(Inferer):
    """What every sampling inferer shares; subclasses implement `run`.

    Args:
        sampler: "ddpm" (ancestral, respaced below `num_train_timesteps`), "ddim", "dpmpp_2m" or "dpmpp_2m_sde".
        num_inference_steps: reverse steps.
        num_train_timesteps: the timesteps the model was trained with.
        schedule: the noise schedule's name, as in training.
        clip_sample: clip each step's x_0 estimate to [-1, 1].
        precision: "auto", "fp32", "bf16" or "fp16" for sampling.
        channels_last: run the network in channels-last memory format.
        seed: the generator's seed (None: nondeterministic); ``seed=`` per call overrides it.
        progress: show the sampling progress bar.
        scheduler_args: further scheduler arguments (``eta``, ``variance_type``, ``jump_length``, ...).
    """

    def __init__(
        self,
        sampler: str = "ddim",
        num_inference_steps: int = 50,
        num_train_timesteps: int = 1000,
        schedule: str = "linear_beta",
        clip_sample: bool = True,
        precision: str = "fp32",
        channels_last: bool = False,
        seed: int | None = 0,
        progress: bool = False,
        scheduler_args: dict | None = None,
    ) -> None:
        super().__init__()
        self.sampler, self.num_inference_steps = (
            parse("sampler", sampler),
            parse("num_inference_steps", num_inference_steps),
        )
        self.num_train_timesteps, self.schedule = parse("num_train_timesteps", num_train_timesteps), schedule
        self.clip_sample = clip_sample
        self.precision, self.channels_last = check_precision(precision), parse("channels_last", channels_last)
        self.seed = None if seed is None else parse("seed", seed)
        self.progress, self.scheduler_args = parse("progress", progress), dict(scheduler_args or {})

    def make_scheduler(self) -> GridScheduler:
        """A fresh scheduler with its timesteps set (schedulers keep per-run state)."""
        return self._scheduler(self.sampler, self.scheduler_args)

    def _scheduler(self, sampler: str, scheduler_args: dict) -> GridScheduler:
        """`make_scheduler` for `sampler`; ``variance_type`` goes to the DDPM family only: the others ignore a learned
        variance (the second half of a 2C-channel output, `meddiff.schedulers.base`), so such a model samples with
        any of them."""
        args = {k: v for k, v in scheduler_args.items() if k != "variance_type" or sampler in ("ddpm", "repaint")}
        return make_scheduler(
            sampler,
            self.num_inference_steps,
            num_train_timesteps=self.num_train_timesteps,
            schedule=self.schedule,
            clip_sample=self.clip_sample,
            **args,
        )

    def __call__(self, inputs: Any, network: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        """Run `run` on the network cast for inference, under ``no_grad``, with the seeded generator."""
        net = cast_for_inference(network, self.precision, self.channels_last)
        net = getattr(net, "module", net).eval()
        inputs = torch.as_tensor(inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs)
        generator = make_generator(kwargs.pop("seed", self.seed), inputs.device)
        with torch.no_grad():
            return self.run(inputs, net, self.make_scheduler(), generator, **kwargs)

    def run(
        self,
        inputs: torch.Tensor,
        network: torch.nn.Module,
        scheduler: GridScheduler,
        generator: torch.Generator | None,
        **kwargs: Any,
    ) -> Any:
        """Sample for `inputs` with the prepared `network`; implemented by each subclass."""
        raise NotImplementedError(f"{type(self).__name__} does not implement run().")


def _offset(seed: int | None, offset: int) -> int | None:
    return None if seed is None else seed + offset


class ConditionedSamplingInferer(SamplingInferer):
    """Images generated from a condition: `inputs` is the condition, e.g. an encoded mask (B, C_cond, H, W).

    The result is (B, out_channels, H, W) clipped to [-1, 1]. Few-step DDIM is the interactive default; ``ddpm``
    with 1000 steps is the original methods' way. A stack of slices (B, C_cond, Z, H, W), a label volume cut
    row-major (`meddiff.data.inference.RowMajord`), is generated slice by slice, `slice_batch_size` slices at a
    time, the batch starting at slice z seeded ``seed + z``; the result is (B, out_channels, Z, H, W).

    Args:
        out_channels: channels of the generated image.
        conditioning: "concat" (the condition is stacked with x_t), "seg" (SPADE), "context" or "class".
        guidance_scale: classifier-free guidance scale s (1: plain conditional sampling; see
            `meddiff.sampling.guidance`); a call's ``guidance_scale=`` (one per sample, from
            `meddiff.engines.SeededPrepareBatch`'s ``item_keys``) replaces it.
        eps_channels: with learned sigma, the first `eps_channels` output channels are the noise prediction.
        slice_batch_size: slices of a volume sampled at once.
        kwargs: the `SamplingInferer` settings.
    """

    def __init__(
        self,
        out_channels: int = 1,
        conditioning: str = "concat",
        guidance_scale: float = 1.0,
        eps_channels: int | None = None,
        slice_batch_size: int = 8,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.out_channels, self.conditioning = out_channels, _conditioning(conditioning, self.channels_last)
        self.guidance_scale, self.eps_channels = parse("guidance_scale", guidance_scale), eps_channels
        self.slice_batch_size = parse("batch_size", slice_batch_size)

    def __call__(self, inputs: Any, network: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if inputs.ndim != 5:
            return super().__call__(inputs, network, *args, **kwargs)
        seed = kwargs.pop("seed", self.seed)
        slices = torch.as_tensor(inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs)
        slices = slices.permute(0, 2, 1, 3, 4)  # (B, Z, C, H, W)
        volumes, step = [], self.slice_batch_size
        for volume in slices:
            parts = []
            for z in range(0, len(volume), step):
                parts.append(super().__call__(volume[z : z + step], network, *args, seed=_offset(seed, z), **kwargs))
            volumes.append(torch.cat(parts).permute(1, 0, 2, 3))
        return torch.stack(volumes)

    def run(self, inputs, network, scheduler, generator, guidance_scale=None, **kwargs):  # noqa: D102
        condition = inputs.to(next(network.parameters()).dtype) if inputs.is_floating_point() else inputs
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        denoiser = classifier_free(network, self.conditioning, condition, scale, self.eps_channels)
        shape = (inputs.shape[0], self.out_channels, *inputs.shape[2:])
        images = sample(denoiser, scheduler, shape, generator=generator, device=inputs.device, progress=self.progress)
        return images.clamp(-1.0, 1.0)


class InpaintingSamplingInferer(SamplingInferer):
    """Generate the unknown pixels of an image: `inputs` is ``cat([image, known], dim=1)`` with ``known`` the last
    channel (1 = keep the pixel), or the image with ``known=`` given as a keyword.

    RePaint (Lugmayr et al. 2022): ``sampler="ddpm"`` with ``scheduler_args={"jump_length": 10, "jump_n_sample":
    10}`` resamples through the scheduler's jumps, and the known pixels are merged back after every step
    (`meddiff.sampling.KnownRegionMerge`). ``skip_steps`` > 0 starts from the image noised to the plan's remaining
    first timestep instead of pure noise (the seeds' ``skip_timesteps``).

    Args:
        skip_steps: moves of the plan skipped by starting from the noised image.
        conditioning: how an optional ``condition=`` keyword reaches the network ("none" when unconditional).
        kwargs: the `SamplingInferer` settings.
    """

    def __init__(self, skip_steps: int = 0, conditioning: str = "none", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.skip_steps, self.conditioning = parse("skip_steps", skip_steps), _conditioning(conditioning)
        jumps = int(self.scheduler_args.get("jump_n_sample", 1))
        if self.sampler != "ddpm" and jumps > 1:
            raise OptionError(
                f"RePaint's resampling (jump_n_sample {jumps}) runs on the ancestral sampler, not {self.sampler!r}: "
                f"use --sampler ddpm, or --jump_n_sample 1 to inpaint with {self.sampler} without resampling."
            )

    def make_scheduler(self) -> GridScheduler:
        jumps = ("jump_length", "jump_n_sample")
        if self.sampler == "ddpm" and set(jumps) & set(self.scheduler_args):
            return self._scheduler("repaint", self.scheduler_args)
        # other samplers: jump_n_sample is 1 (checked at construction), so no resampling and the jumps mean nothing
        return self._scheduler(self.sampler, {k: v for k, v in self.scheduler_args.items() if k not in jumps})

    def run(self, inputs, network, scheduler, generator, **kwargs):  # noqa: D102
        known = kwargs.get("known")
        image = inputs if known is not None else inputs[:, :-1]
        known = torch.as_tensor(known if known is not None else inputs[:, -1:]).to(inputs.device)
        denoiser = conditioned(network, self.conditioning, kwargs.get("condition"))
        merge = KnownRegionMerge(image, known, scheduler)
        start = {"image": image, "skip_steps": self.skip_steps} if self.skip_steps else {"shape": tuple(image.shape)}
        out = sample(
            denoiser,
            scheduler,
            generator=generator,
            device=inputs.device,
            after_step=merge,
            progress=self.progress,
            **start,
        )
        return out.clamp(-1.0, 1.0)


class InpaintStyleInferer(InpaintingSamplingInferer):
    """The polyp method's generation from a real target (Saragih et al. 2024; methods.md section 1.5): a new polyp
    and its mask inside the target's dilated polyp region, styled toward the target.

    `inputs` is the target (B, 4, S, S) in [-1, 1]: RGB, then the mask channel (> 0 is polyp). Per batch:

    1. pass A, with ``inpaint`` (the seed's ``-inp``): RePaint (this class's scheduler, ``sampler="ddpm"`` with
       ``jump_length``/``jump_n_sample`` in `scheduler_args`) generates all 4 channels inside the target's mask
       dilated by a `mask_dilation` ellipse and keeps the target (RGB and mask) outside it. Without it, the seed's
       unconditional start: zeros noised to the plan's first timestep after `style_skip_steps`, then plain steps;
    2. pass B, with ``style`` (``-sty``): `meddiff.sampling.styling.style` noises pass A's result back by
       `style_skip_steps` of a `style_steps`-step ancestral grid and guides it toward the target (`style_loss`);
    3. with ``use_colormatch``: the RGB is mapped to the target's colour mean and covariance
       (`meddiff.colour.mkl_transfer` on 8-bit values, as the seed);
    4. the mask channel is thresholded at 0 and opened with a `mask_opening` ellipse (`meddiff.morphology`).

    Returns (B, 4, S, S) in [-1, 1] with the mask channel in {-1, 1}. Both passes share the seeded generator.

    Args:
        mask_dilation: the inpainting region's ellipse size in pixels (seed: 20 at 256 px; 0: the mask itself).
        mask_opening: the final mask's opening ellipse size (seed: 16 at 256 px; 0: no opening).
        inpaint: run pass A as RePaint inpainting (else the unconditional partial start).
        style: run pass B.
        style_steps: the styling grid's steps (seed: 200).
        style_skip_steps: moves of the styling grid skipped (seed: 80, so 120 guided steps).
        use_noise_aug_all: guide on fac x0_hat + (1 - fac) x_t instead of x0_hat (the seed's flag).
        use_colormatch: MKL colour matching to the target.
        style_loss: `meddiff.sampling.styling.StylingLoss` keywords (term weights, ``vgg_weights``,
            ``dino_weights``, ``zecon_blocks``, ...). The term weights are the seed's at `weight_reference_size`;
            at S px they are multiplied by (S / weight_reference_size)^2: the terms are means over pixels, so this
            keeps the pull on each pixel what the seed's weights give at its size (at 32 px the seed's weights
            unchanged are 64 times stronger per pixel, and the styling diverges).
        weight_reference_size: the image size the style loss weights are set for (the seed's 256).
        kwargs: the `SamplingInferer` settings (sampler, steps, scheduler_args with ``variance_type``,
            ``jump_length``, ``jump_n_sample``).
    """

    def __init__(
        self,
        mask_dilation: int = 20,
        mask_opening: int = 16,
        inpaint: bool = True,
        style: bool = True,
        style_steps: int = 200,
        style_skip_steps: int = 80,
        use_noise_aug_all: bool = True,
        use_colormatch: bool = True,
        style_loss: dict | None = None,
        weight_reference_size: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(skip_steps=0, conditioning="none", **kwargs)
        self.weight_reference_size = parse("img_size", weight_reference_size)
        self.mask_dilation, self.mask_opening = (
            parse("mask_dilation", mask_dilation),
            parse("mask_opening", mask_opening),
        )
        self.inpaint, self.style = parse("inpaint", inpaint), parse("style", style)
        self.style_steps = parse("style_steps", style_steps)
        self.style_skip_steps = parse("style_skip_steps", style_skip_steps)
        self.use_noise_aug_all = parse("use_noise_aug_all", use_noise_aug_all)
        self.use_colormatch = parse("use_colormatch", use_colormatch)
        self.style_loss = dict(style_loss or {})
        for steps, name in ((self.num_inference_steps, "num_inference_steps"), (self.style_steps, "style_steps")):
            if self.style_skip_steps >= steps and (self.style or not self.inpaint):
                raise OptionError(
                    f"--style_skip_steps {self.style_skip_steps} leaves no step of the {steps}-step grid "
                    f"(--{name}): choose fewer."
                )

    def _region(self, target: torch.Tensor) -> torch.Tensor:
        """1 where pixels are generated: the target's mask dilated by the `mask_dilation` ellipse, (B, 1, S, S)."""
        from meddiff.morphology import dilate

        masks = (target[:, 3] > 0).cpu().numpy()
        grown = [dilate(m, self.mask_dilation) if self.mask_dilation > 1 else m for m in masks]
        return torch.from_numpy(np.stack(grown).astype(np.float32))[:, None].to(target.device)

    def run(self, inputs, network, scheduler, generator, **kwargs):  # noqa: D102
        from meddiff.colour import mkl_transfer
        from meddiff.morphology import open_mask
        from meddiff.sampling.styling import style

        target = inputs.float()
        if self.inpaint:
            out = super().run(target, network, scheduler, generator, known=1.0 - self._region(target))
        else:
            denoiser = conditioned(network, self.conditioning, None)
            out = sample(
                denoiser, scheduler, image=torch.zeros_like(target), skip_steps=self.style_skip_steps,
                generator=generator, progress=self.progress, desc="generating",
            )  # fmt: skip
        if self.style:
            style_scheduler = make_scheduler(
                "ddpm", self.style_steps, self.num_train_timesteps, self.schedule, False, **self._variance()
            )
            scale = target.shape[-2] * target.shape[-1] / self.weight_reference_size**2
            given = {**_style_weight_defaults(), **self.style_loss}
            weights = {k: v * scale for k, v in given.items() if k in STYLE_WEIGHTS and v is not None}
            with torch.enable_grad():
                out = style(
                    network, style_scheduler, out, target, generator,
                    skip_steps=self.style_skip_steps, noise_aug=self.use_noise_aug_all, progress=self.progress,
                    **{**self.style_loss, **weights},
                )  # fmt: skip
        out = out.detach().float().clamp(-1.0, 1.0)
        rgb, mask = out[:, :3], out[:, 3].cpu().numpy() > 0
        if self.use_colormatch:
            matched = []
            for generated, reference in zip(rgb, target[:, :3]):
                as8 = [((x.permute(1, 2, 0).cpu().numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
                       for x in (generated, reference)]  # fmt: skip
                matched.append(torch.from_numpy(mkl_transfer(*as8).astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1))
            rgb = torch.stack(matched).to(out.device)
        if self.mask_opening > 1:
            mask = np.stack([open_mask(m, self.mask_opening) for m in mask])
        mask_channel = torch.from_numpy(np.where(mask, 1.0, -1.0).astype(np.float32))[:, None].to(out.device)
        return torch.cat([rgb, mask_channel], dim=1)

    def _variance(self) -> dict:
        return {k: v for k, v in self.scheduler_args.items() if k == "variance_type"}


def _style_weight_defaults() -> dict:
    """The styling loss's default term weights (`meddiff.sampling.styling.StylingLoss`), the seed's."""
    import inspect

    from meddiff.sampling.styling import StylingLoss

    parameters = inspect.signature(StylingLoss.__init__).parameters
    return {name: parameters[name].default for name in STYLE_WEIGHTS}


class LatentSamplingInferer(SamplingInferer):
    """Latent diffusion: sample latents of `latent_shape`, optionally guided by a latent classifier, then decode.

    `inputs` holds the wanted class of each sample (B,) (or (B, 1)); with ``conditioning="class"`` it is also given
    to the network. ``classifier`` (a noise-aware classifier on latents, ``classifier(z_t, timesteps=t) -> logits``)
    and ``classifier_scale`` > 0 add classifier-gradient guidance towards that class (Dhariwal & Nichol 2021).

    Args:
        autoencoder: decodes the latents (`meddiff.latent.LatentDecoder`).
        latent_shape: (C, *spatial) of one latent.
        scale_factor: the factor latents were multiplied by in training.
        conditioning: "none" or "class".
        classifier: the latent classifier for guidance (None: no guidance).
        classifier_scale: guidance scale s.
        kwargs: the `SamplingInferer` settings.
    """

    def __init__(
        self,
        autoencoder: torch.nn.Module,
        latent_shape: tuple[int, ...],
        scale_factor: float = 1.0,
        conditioning: str = "none",
        classifier: torch.nn.Module | None = None,
        classifier_scale: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.decoder, self.latent_shape = LatentDecoder(autoencoder, scale_factor), tuple(latent_shape)
        self.conditioning, self.classifier = _conditioning(conditioning), classifier
        self.classifier_scale = float(classifier_scale)

    def run(self, inputs, network, scheduler, generator, **kwargs):  # noqa: D102
        labels = inputs.reshape(inputs.shape[0]).long()
        denoiser = conditioned(network, self.conditioning, labels if self.conditioning.mode == "class" else None)
        if self.classifier is not None and self.classifier_scale > 0:
            self.classifier.eval()
            log_prob = class_log_prob(self.classifier, labels)
            denoiser = classifier_gradient(denoiser, log_prob, scheduler, self.classifier_scale)
        shape = (labels.shape[0], *self.latent_shape)
        return sample(
            denoiser,
            scheduler,
            shape,
            generator=generator,
            device=inputs.device,
            finish=self.decoder,
            progress=self.progress,
        )


class EnsembleSamplingInferer(SamplingInferer):
    """Sample `num_samples` masks per input image with a `meddiff.networks.CIMDNetwork`.

    `inputs` is the image batch (B, 1, H, W) in [-1, 1]. Member m of image b gets its own noise (and, for the cVAE
    design only, its own z ~ p(z | image_b) drawn once); all B * N members run as one batch through
    `meddiff.sampling.sample`. The members differ through the stochastic reverse process: use a stochastic sampler
    (``ddpm``, ancestral and respaced when `num_inference_steps` < `num_train_timesteps`, or ``dpmpp_2m_sde``);
    deterministic ``ddim`` and ``dpmpp_2m`` map each x_T to one mask and remove most of the ensemble's diversity.
    Each x_0 is thresholded at `threshold` (0, the middle of the [-1, 1] mask range). Returns, by `output`:
    ``"frequency"`` (B, 1, H, W) fraction of members marking each pixel (the default: what MONAI Label shows);
    ``"samples"`` (B, N, H, W) the binary members; ``"majority"`` (B, 1, H, W) frequency > 0.5.
    ``seed`` and ``output`` can be overridden per call as keyword arguments.

    Args:
        num_samples: members per ensemble (option ``--num_samples``, at least 2).
        output: "frequency", "samples" or "majority" (see above).
        threshold: members are ``x_0 > threshold``.
        kwargs: the `meddiff.inferers.SamplingInferer` settings (sampler "ddpm" and 25 steps by default here).
    """

    def __init__(self, num_samples: int = 16, output: str = "frequency", threshold: float = 0.0, **kwargs: Any) -> None:
        kwargs.setdefault("sampler", "ddpm")
        kwargs.setdefault("num_inference_steps", 25)
        super().__init__(**kwargs)
        if output not in ENSEMBLE_OUTPUTS:
            raise ValueError(f"output must be one of {ENSEMBLE_OUTPUTS}, got {output!r}.")
        self.num_samples, self.output, self.threshold = parse("num_samples", num_samples), output, threshold

    def run(self, inputs, network, scheduler, generator, **kwargs):  # noqa: D102
        output = kwargs.get("output", self.output)
        samples = self.sample_ensemble(inputs, network, scheduler, generator).float()
        if output == "samples":
            return samples
        frequency = samples.mean(dim=1, keepdim=True)
        return frequency if output == "frequency" else (frequency > 0.5).float()

    def sample_ensemble(self, inputs, network, scheduler, generator) -> torch.Tensor:
        """The binary members (B, N, H, W) of every image's ensemble (network prepared by `__call__`)."""
        dtype, batch, n = next(network.parameters()).dtype, inputs.shape[0], self.num_samples
        image = inputs.float().to(dtype)
        latent = network.sample_prior(image, generator, num_samples=n) if network.injects_latent else None
        image = image.repeat_interleave(n, dim=0)

        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return network.denoise(x.to(dtype), t, image, latent)

        masks = sample(
            denoise,
            scheduler,
            (batch * n, network.mask_channels, *inputs.shape[2:]),
            device=inputs.device,
            generator=generator,
            progress=self.progress,
            desc=f"{self.sampler} x{n}",
        )
        return (masks[:, 0] > self.threshold).view(batch, n, *inputs.shape[2:])
