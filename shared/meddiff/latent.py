"""Latent diffusion's autoencoder side: the latent scale factor and decoding as a sampling `finish` hook.

Latents are scaled by ``scale_factor`` before diffusion so that they have unit variance (Rombach et al. 2022,
section 4.3.2 and appendix G: scale_factor = 1 / std of the first batch's latents); decoding divides by it again.
"""

from __future__ import annotations

import torch

__all__ = ["LatentDecoder", "latent_scale_factor"]


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
