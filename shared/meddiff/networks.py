"""Networks beyond MONAI's: the CIMD prior/posterior Gaussian encoders and the latent-conditioned denoiser.

CIMD (Rahman et al., CVPR 2023) pairs a diffusion segmentation model with the two Gaussian encoders of the
Probabilistic U-Net (Kohl et al., NeurIPS 2018): a prior p(z | image) and a posterior q(z | image, mask). Here the
latent z really conditions the denoiser: it is broadcast over the image grid as `latent_dim` constant channels and
concatenated to the network input, beside the noisy mask and the image. During training z is drawn from the
posterior with the reparameterisation trick and KL(q || p) is returned for the loss; at sampling z is drawn once per
ensemble member from the prior and held fixed along that member's reverse process.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Pool
from torch import nn
from torch.distributions import Independent, Normal, kl_divergence

__all__ = ["AxisAlignedConvGaussian", "CIMDNetwork", "sample_latent"]


class AxisAlignedConvGaussian(nn.Module):
    """A convolutional encoder giving a diagonal Gaussian over a latent vector (Kohl et al. 2018).

    Blocks of `convs_per_block` 3x3 convolutions with ReLU, average pooling by 2 between blocks, a mean over the
    spatial dimensions, then a 1x1 convolution to the mean and log standard deviation of `latent_dim` Gaussians.
    The prior takes the image (`in_channels` = image channels); the posterior the image and the mask concatenated.
    The last layer starts at zero, so both distributions start as N(0, I) and the KL term starts at 0.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        latent_dim: int = 6,
        channels: Sequence[int] = (32, 64, 128, 192),
        convs_per_block: int = 3,
    ) -> None:
        super().__init__()
        self.in_channels, self.latent_dim = in_channels, latent_dim
        layers: list[nn.Module] = []
        width = in_channels
        for level, out in enumerate(channels):
            if level > 0:
                layers.append(Pool[Pool.AVG, spatial_dims](kernel_size=2, stride=2, ceil_mode=True))
            for _ in range(convs_per_block):
                layers.append(Convolution(spatial_dims, width, out, kernel_size=3, act="RELU", norm=None))
                width = out
        self.encoder = nn.Sequential(*layers)
        self.head = Convolution(spatial_dims, width, 2 * latent_dim, kernel_size=1, conv_only=True)
        nn.init.zeros_(self.head.conv.weight)
        nn.init.zeros_(self.head.conv.bias)

    def forward(self, x: torch.Tensor) -> Independent:
        """The distribution over z (batch shape (B,), event shape (latent_dim,)), in float32."""
        features = self.encoder(x)
        stats = self.head(features.mean(dim=tuple(range(2, features.ndim)), keepdim=True)).flatten(1).float()
        mu, log_sigma = stats.chunk(2, dim=1)
        return Independent(Normal(loc=mu, scale=torch.exp(log_sigma)), 1)


def sample_latent(
    distribution: Independent, generator: torch.Generator | None = None, num_samples: int = 1
) -> torch.Tensor:
    """Draw `num_samples` z per batch item, (B * num_samples, latent_dim) item-major, with an optional generator."""
    loc = distribution.base_dist.loc.repeat_interleave(num_samples, dim=0)
    scale = distribution.base_dist.scale.repeat_interleave(num_samples, dim=0)
    return loc + scale * torch.randn(loc.shape, generator=generator, device=loc.device, dtype=loc.dtype)


def _wants_channels_last(module: nn.Module) -> bool:
    weight = next((p for p in module.parameters() if p.ndim == 4 and p.shape[1] > 1), None)
    return weight is not None and not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last)


class CIMDNetwork(nn.Module):
    """A diffusion denoiser over the mask, conditioned on the image and on a latent z from the CIMD encoders.

    The denoiser (typically MONAI's `DiffusionModelUNet`) sees ``cat([x_t, image, z broadcast], dim=1)`` and must
    have ``in_channels = mask_channels + image_channels + latent_dim`` and ``out_channels = mask_channels``.

    ``forward(x, timesteps, image, mask=None, latent=None)`` returns ``(eps, kl)``:
    - training, `mask` given: z ~ q(z | image, mask) (reparameterised), ``kl = KL(q || p(z | image))`` of shape (B,);
    - sampling, `latent` given (e.g. from `sample_prior`): that z is used and ``kl`` is None.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        prior: AxisAlignedConvGaussian,
        posterior: AxisAlignedConvGaussian,
        image_channels: int = 1,
        mask_channels: int = 1,
    ) -> None:
        super().__init__()
        self.denoiser, self.prior, self.posterior = denoiser, prior, posterior
        self.image_channels, self.mask_channels, self.latent_dim = image_channels, mask_channels, prior.latent_dim
        expected = mask_channels + image_channels + self.latent_dim
        if getattr(denoiser, "in_channels", expected) != expected:
            raise ValueError(
                f"CIMDNetwork: the denoiser has in_channels={denoiser.in_channels} but needs {expected} "
                f"(mask {mask_channels} + image {image_channels} + latent_dim {self.latent_dim})."
            )
        if posterior.latent_dim != prior.latent_dim:
            raise ValueError(f"prior latent_dim {prior.latent_dim} differs from posterior {posterior.latent_dim}.")
        if prior.in_channels != image_channels or posterior.in_channels != image_channels + mask_channels:
            raise ValueError(
                f"CIMDNetwork: the prior needs in_channels={image_channels} (image) and the posterior "
                f"{image_channels + mask_channels} (image + mask); got {prior.in_channels} and {posterior.in_channels}."
            )

    def sample_prior(
        self, image: torch.Tensor, generator: torch.Generator | None = None, num_samples: int = 1
    ) -> torch.Tensor:
        """Draw `num_samples` latents per image, (B * num_samples, latent_dim) item-major, from p(z | image)."""
        return sample_latent(self.prior(image), generator, num_samples)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        image: torch.Tensor,
        mask: torch.Tensor | None = None,
        latent: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Predict the noise of the noisy mask `x` at `timesteps`; see the class docstring for `mask`/`latent`."""
        kl = None
        if mask is not None:
            # the encoders and their KL run in float32 even under autocast: KL terms are small differences
            with torch.autocast(device_type=image.device.type, enabled=False):
                image32 = image.float()
                posterior = self.posterior(torch.cat([image32, mask.float()], dim=1))
                latent = posterior.rsample()
                kl = kl_divergence(posterior, self.prior(image32))
        elif latent is None:
            raise ValueError("CIMDNetwork needs `mask` (training, posterior latent) or `latent` (sampling, prior).")
        latent_map = latent.to(x.dtype).view(*latent.shape, *([1] * (x.ndim - 2))).expand(-1, -1, *x.shape[2:])
        h = torch.cat([x, image.to(x.dtype), latent_map], dim=1)
        if _wants_channels_last(self.denoiser):
            h = h.contiguous(memory_format=torch.channels_last)
        return self.denoiser(h, timesteps=timesteps), kl
