"""Latent diffusion's autoencoder side: the latent scale factor and decoding as a sampling `finish` hook.

Latents are scaled by ``scale_factor`` before diffusion so that they have unit variance (Rombach et al. 2022,
section 4.3.2 and appendix G: scale_factor = 1 / std of the first batch's latents); decoding divides by it again.
`LatentEncoder` is the mirror of `LatentDecoder`: ``x -> encode(x) * scale_factor``, a posterior sample
``z_mu + z_sigma * eps`` (eps drawn on the CPU from the caller's generator, so every device sees the same numbers)
or the mean ``z_mu``.
"""

from __future__ import annotations

import torch

__all__ = ["LatentDecoder", "LatentEncoder", "latent_scale_factor"]


@torch.no_grad()
def latent_scale_factor(latents: torch.Tensor) -> float:
    """1 / std of a batch of (unscaled) latents."""
    std = float(latents.float().std())
    if not std > 0:
        raise ValueError("the latents have zero spread: the autoencoder is untrained or the batch is constant.")
    return 1.0 / std


class LatentDecoder:
    """``z -> autoencoder.decode(z / scale_factor)``: the `finish` hook of a latent diffusion sampler.

    Args:
        autoencoder: a network with ``decode_stage_2_outputs(z)`` (MONAI's `AutoencoderKL`) or ``decode(z)``.
        scale_factor: the factor the latents were multiplied by in training.
    """

    def __init__(self, autoencoder: torch.nn.Module, scale_factor: float = 1.0) -> None:
        self.autoencoder, self.scale_factor = autoencoder, float(scale_factor)
        self._decode = getattr(autoencoder, "decode_stage_2_outputs", None) or autoencoder.decode

    @torch.no_grad()
    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        dtype = next(self.autoencoder.parameters()).dtype
        return self._decode((z / self.scale_factor).to(dtype)).float()


class LatentEncoder:
    """``x -> (z_mu + z_sigma * eps) * scale_factor`` (or ``z_mu * scale_factor``), without gradients, float32.

    The images are cast to the autoencoder's device and dtype and encoded in eval mode; eps is drawn on the CPU by
    ``torch.randn(z_mu.shape, generator=generator)``.

    Args:
        autoencoder: a network with ``encode(x) -> (z_mu, z_sigma)`` (MONAI's `AutoencoderKL`).
        scale_factor: the factor the latents are multiplied by (``scale_factor`` stored with the autoencoder).
        sample: a posterior sample; False takes the posterior mean.
    """

    def __init__(self, autoencoder: torch.nn.Module, scale_factor: float = 1.0, sample: bool = True) -> None:
        self.autoencoder, self.scale_factor, self.sample = autoencoder, float(scale_factor), bool(sample)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        module = getattr(self.autoencoder, "module", self.autoencoder)
        parameter = next(module.parameters())
        module.eval()
        z_mu, z_sigma = module.encode(torch.as_tensor(x).to(device=parameter.device, dtype=parameter.dtype))
        z = z_mu.float()
        if self.sample:
            eps = torch.randn(z_mu.shape, generator=generator).to(z.device)
            z = z + z_sigma.float() * eps
        return z * self.scale_factor
