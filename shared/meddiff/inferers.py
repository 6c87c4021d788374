"""MONAI `Inferer`s: a training inferer with a precision switch, and samplers that run a whole reverse process.

The samplers' ``__call__(inputs, network)`` runs all of the sampling, so MONAI's `SupervisedEvaluator` and MONAI
Label's bundle loader can drive them like any segmentation inferer.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.inferers import DiffusionInferer, Inferer
from monai.networks.schedulers import Scheduler

from meddiff.precision import autocast, cast_for_inference, check_precision, to_memory_format
from meddiff.sampling import Denoiser, make_generator, sample
from meddiff.schedulers import make_sampling_scheduler

__all__ = ["ConcatSamplingInferer", "PrecisionDiffusionInferer", "concat_denoiser"]


class PrecisionDiffusionInferer(DiffusionInferer):
    """`DiffusionInferer` for training that runs the network under bf16/fp16 autocast and channels_last.

    The loss sees a float32 prediction. The condition is concatenated to the noisy image (``mode="concat"``) or
    passed as cross-attention context, as in MONAI.
    """

    def __init__(self, scheduler: Scheduler, precision: str = "fp32", channels_last: bool = False) -> None:
        super().__init__(scheduler)
        self.precision, self.channels_last = check_precision(precision), channels_last

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        diffusion_model: torch.nn.Module,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        condition: torch.Tensor | None = None,
        mode: str = "concat",
        seg: torch.Tensor | None = None,
    ) -> torch.Tensor:
        noisy = self.scheduler.add_noise(original_samples=inputs, noise=noise, timesteps=timesteps)
        context = None
        if condition is not None and mode == "concat":
            noisy = torch.cat([noisy, condition], dim=1)
        else:
            context = condition
        noisy = to_memory_format(noisy, self.channels_last)
        with autocast(inputs.device, self.precision):
            kwargs: dict[str, Any] = {"context": context} if context is not None else {}
            if seg is not None:
                kwargs["seg"] = seg
            prediction = diffusion_model(noisy, timesteps=timesteps, **kwargs)
        return prediction.float()


def concat_denoiser(network: torch.nn.Module, condition: torch.Tensor, channels_last: bool) -> Denoiser:
    """A denoiser that concatenates `condition` to x_t and runs `network` in the dtype of its weights."""
    dtype = next(network.parameters()).dtype
    condition = condition.to(dtype)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return network(to_memory_format(torch.cat([x.to(dtype), condition], dim=1), channels_last), timesteps=t)

    return denoise


class ConcatSamplingInferer(Inferer):
    """Generate images conditioned on a channel-concatenated input (e.g. an encoded mask): the full reverse process.

    `inputs` is the condition (B, C_cond, H, W); the result is (B, out_channels, H, W), clipped to [-1, 1].
    Few-step DDIM is the interactive default; ``sampler="ddpm"`` with 1000 steps is the original method's way.
    """

    def __init__(
        self,
        out_channels: int = 1,
        sampler: str = "ddim",
        num_inference_steps: int = 50,
        num_train_timesteps: int = 1000,
        schedule: str = "linear_beta",
        precision: str = "fp32",
        channels_last: bool = False,
        seed: int | None = 0,
        progress: bool = False,
    ) -> None:
        super().__init__()
        self.out_channels, self.seed, self.progress = out_channels, seed, progress
        self.precision, self.channels_last = check_precision(precision), channels_last
        self.sampler, self.num_inference_steps = sampler, num_inference_steps
        self.num_train_timesteps, self.schedule = num_train_timesteps, schedule

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Sample one image per condition in the batch."""
        scheduler, eta = make_sampling_scheduler(
            self.sampler, self.num_inference_steps, self.num_train_timesteps, self.schedule
        )
        device = inputs.device
        net = cast_for_inference(network, self.precision, self.channels_last)
        net.eval()
        shape = (inputs.shape[0], self.out_channels, *inputs.shape[2:])
        with torch.no_grad():
            images = sample(
                concat_denoiser(net, torch.as_tensor(inputs).float(), self.channels_last),
                scheduler,
                shape,
                device=device,
                generator=make_generator(kwargs.get("seed", self.seed), device),
                eta=eta,
                progress=self.progress,
            )
        return images.clamp(-1.0, 1.0)
