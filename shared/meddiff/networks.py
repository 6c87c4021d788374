"""Networks beyond MONAI's: the CIMD Gaussian encoders and the CIMD segmentation network in its two designs.

CIMD (Rahman et al., CVPR 2023) pairs a diffusion segmentation model with the two Gaussian encoders of the
Probabilistic U-Net (Kohl et al., NeurIPS 2018). The paper's Fig. 1 contrasts CIMD (C) with cVAE-style methods (B)
that sample a latent from a prior encoder and inject it into the segmenter; CIMD "does not need an additional prior
encoder to provide latent variables". Two designs are built here, named by that figure:

- ``design="paper"`` (the default, Fig. 1C): the denoiser sees ``cat([x_t, image])`` and no latent. A posterior
  q(z | image, x_0) encodes the ground-truth mask and a prior p(z | image, x̂_0) the model's current estimate
  x̂_0 = (x_t - sqrt(1 - ᾱ_t) ε̂) / sqrt(ᾱ_t) (clipped to [-1, 1]); KL(q || p) is an auxiliary loss whose gradient
  reaches the denoiser through x̂_0 and trains both encoders. Ensemble diversity comes from the stochastic reverse
  process alone. (The seed's code feeds ε̂ itself to the prior and never optimises either encoder.)
- ``design="cvae"`` (Fig. 1B, the cVAE variant): z is drawn from the posterior q(z | image, x_0) during training and
  from the prior p(z | image) at sampling, broadcast over the grid as `latent_dim` constant channels and
  concatenated to the denoiser's input. Measured on the real LIDC crops this latent collapses (KL ~0.02 nats) and
  changes nothing; its diagnostics (`CIMDNetwork.diagnostics`) and free bits (`meddiff.cimd.CIMDLoss`) are there to
  see and counter that.

KL terms are returned per latent dimension, shape (B, latent_dim), so the loss can apply free bits and the training
log can show which dimensions carry information.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Pool
from torch import nn
from torch.distributions import Independent, Normal, kl_divergence

from meddiff.conditioning import concat_inputs

__all__ = ["DESIGNS", "AxisAlignedConvGaussian", "CIMDNetwork", "estimate_x0", "kl_per_dimension", "sample_latent"]


class AxisAlignedConvGaussian(nn.Module):
    """A convolutional encoder giving a diagonal Gaussian over a latent vector (Kohl et al. 2018).

    Blocks of `convs_per_block` 3x3 convolutions with ReLU, average pooling by 2 between blocks, a mean over the
    spatial dimensions, then a 1x1 convolution to the mean and log standard deviation of `latent_dim` Gaussians.
    With `zero_init_head` the last layer starts at zero, so the distribution starts as N(0, I) (two such encoders
    start with KL 0: right for the cVAE design, whose latent should start harmless). Without it the head starts
    with PyTorch's default initialisation, as the seed's encoders do; the paper design needs that, since two encoders
    that agree exactly have a KL at its minimum, with zero gradient, and would never move.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels (image, or image + mask).
        latent_dim: dimensions of z.
        channels: output channels of the convolution blocks.
        convs_per_block: 3x3 convolutions per block.
        zero_init_head: start the mean/log-sigma layer at zero.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        latent_dim: int = 6,
        channels: Sequence[int] = (32, 64, 128, 192),
        convs_per_block: int = 3,
        zero_init_head: bool = True,
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
        if zero_init_head:
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


DESIGNS = ("paper", "cvae")


def _wants_channels_last(module: nn.Module) -> bool:
    weight = next((p for p in module.parameters() if p.ndim == 4 and p.shape[1] > 1), None)
    return weight is not None and not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last)


def estimate_x0(x: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The model's estimate x̂_0 = (x_t - sqrt(1 - ᾱ_t) ε̂) / sqrt(ᾱ_t) in float32, clipped to [-1, 1]."""
    ab = alpha_bar.float().view(-1, *([1] * (x.ndim - 1)))
    return ((x.float() - (1.0 - ab).sqrt() * eps.float()) / ab.sqrt()).clamp(-1.0, 1.0)


def kl_per_dimension(posterior: Independent, prior: Independent) -> torch.Tensor:
    """KL(q || p) of two diagonal Gaussians per latent dimension, shape (B, latent_dim), in float32."""
    return kl_divergence(posterior.base_dist, prior.base_dist).float()


class CIMDNetwork(nn.Module):
    """The CIMD segmentation network: a diffusion denoiser over the mask, conditioned on the image, and two encoders.

    The denoiser (typically MONAI's `DiffusionModelUNet`) predicts the noise of the noisy mask. Its input is
    ``cat([x_t, image])`` for ``design="paper"`` (``in_channels = mask_channels + image_channels``) and
    ``cat([x_t, image, z broadcast])`` for ``design="cvae"`` (plus `latent_dim`). The prior sees the image and the
    current estimate for "paper" (``in_channels = image_channels + mask_channels``), the image alone for "cvae";
    the posterior always sees the image and the ground-truth mask. See the module docstring for the two designs.

    ``forward(x, timesteps, image, mask=None, latent=None, alpha_bar=None)`` returns ``(eps, kl)``:
    - training, `mask` (x_0) given: ``kl`` is KL(q || p) per latent dimension, (B, latent_dim); "paper" needs
      `alpha_bar` (ᾱ_t per batch item) to form x̂_0;
    - sampling, no `mask`: ``kl`` is None; "cvae" needs `latent` (e.g. from `sample_prior`).

    Args:
        denoiser: the noise-predicting network.
        prior: the prior encoder (a `AxisAlignedConvGaussian`).
        posterior: the posterior encoder (a `AxisAlignedConvGaussian`).
        design: "paper" (default) or "cvae".
        image_channels: channels of the conditioning image.
        mask_channels: channels of the diffused mask.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        prior: AxisAlignedConvGaussian,
        posterior: AxisAlignedConvGaussian,
        design: str = "paper",
        image_channels: int = 1,
        mask_channels: int = 1,
    ) -> None:
        super().__init__()
        if design not in DESIGNS:
            raise ValueError(f"CIMDNetwork design must be one of {DESIGNS}, got {design!r}.")
        self.denoiser, self.prior, self.posterior, self.design = denoiser, prior, posterior, design
        self.image_channels, self.mask_channels, self.latent_dim = image_channels, mask_channels, prior.latent_dim
        injects = design == "cvae"
        expected = mask_channels + image_channels + (self.latent_dim if injects else 0)
        if getattr(denoiser, "in_channels", expected) != expected:
            raise ValueError(
                f"CIMDNetwork ({design}): the denoiser has in_channels={denoiser.in_channels} but needs {expected} "
                f"(mask {mask_channels} + image {image_channels}"
                + (f" + latent_dim {self.latent_dim})." if injects else ").")
            )
        if posterior.latent_dim != prior.latent_dim:
            raise ValueError(f"prior latent_dim {prior.latent_dim} differs from posterior {posterior.latent_dim}.")
        prior_in = image_channels if injects else image_channels + mask_channels
        if prior.in_channels != prior_in or posterior.in_channels != image_channels + mask_channels:
            raise ValueError(
                f"CIMDNetwork ({design}): the prior needs in_channels={prior_in} and the posterior "
                f"{image_channels + mask_channels} (image + mask); got {prior.in_channels} and {posterior.in_channels}."
            )

    @property
    def injects_latent(self) -> bool:
        """True for the cVAE design, whose denoiser takes z."""
        return self.design == "cvae"

    def sample_prior(
        self, image: torch.Tensor, generator: torch.Generator | None = None, num_samples: int = 1
    ) -> torch.Tensor:
        """cVAE design: `num_samples` latents per image, (B * num_samples, latent_dim) item-major, from p(z | image)."""
        return sample_latent(self.prior(image), generator, num_samples)

    def denoise(
        self, x: torch.Tensor, timesteps: torch.Tensor, image: torch.Tensor, latent: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The noise prediction for the noisy mask `x`; `latent` is used (and needed) by the cVAE design only."""
        if self.injects_latent and latent is None:
            raise ValueError("the cVAE design needs `latent` (a prior draw at sampling, posterior in training).")
        h = concat_inputs(x, image, latent if self.injects_latent else None)
        if _wants_channels_last(self.denoiser):
            h = h.contiguous(memory_format=torch.channels_last)
        return self.denoiser(h, timesteps=timesteps)

    def encoders(
        self, image: torch.Tensor, mask: torch.Tensor, estimate: torch.Tensor | None = None
    ) -> tuple[Independent, Independent]:
        """(posterior q(z | image, mask), prior): p(z | image, estimate) for "paper", p(z | image) for "cvae"."""
        # the encoders and their KL run in float32 even under autocast: KL terms are small differences
        with torch.autocast(device_type=image.device.type, enabled=False):
            image32 = image.float()
            posterior = self.posterior(torch.cat([image32, mask.float()], dim=1))
            if self.injects_latent:
                prior = self.prior(image32)
            else:
                if estimate is None:
                    raise ValueError("the paper design's prior needs the model's current estimate of the mask.")
                prior = self.prior(torch.cat([image32, estimate.float()], dim=1))
        return posterior, prior

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        image: torch.Tensor,
        mask: torch.Tensor | None = None,
        latent: torch.Tensor | None = None,
        alpha_bar: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Predict the noise of `x` at `timesteps`; see the class docstring for `mask`, `latent` and `alpha_bar`."""
        if mask is None:
            return self.denoise(x, timesteps, image, latent), None
        if self.injects_latent:
            posterior, prior = self.encoders(image, mask)
            eps = self.denoise(x, timesteps, image, posterior.rsample())
            return eps, kl_per_dimension(posterior, prior)
        if alpha_bar is None:
            raise ValueError("the paper design needs `alpha_bar` (ᾱ_t per item) to form the model's estimate x̂_0.")
        eps = self.denoise(x, timesteps, image)
        posterior, prior = self.encoders(image, mask, estimate_x0(x, eps, alpha_bar))
        return eps, kl_per_dimension(posterior, prior)

    @torch.no_grad()
    def diagnostics(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        image: torch.Tensor,
        mask: torch.Tensor,
        noise: torch.Tensor,
        alpha_bar: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> dict[str, float | list[float]]:
        """Collapse diagnostics on one batch: KL per latent dimension and, for the cVAE design, the denoising loss
        with the posterior mean against a prior draw (a gap near 0 means the latent carries nothing)."""
        if self.injects_latent:
            posterior, prior = self.encoders(image, mask)
        else:
            posterior, prior = self.encoders(image, mask, estimate_x0(x, self.denoise(x, timesteps, image), alpha_bar))
        kl = kl_per_dimension(posterior, prior).mean(dim=0)
        out: dict[str, float | list[float]] = {"kl_total": float(kl.sum()), "kl_per_dim": [float(v) for v in kl]}
        if self.injects_latent:
            mse_post = nn.functional.mse_loss(self.denoise(x, timesteps, image, posterior.mean).float(), noise)
            mse_prior = nn.functional.mse_loss(
                self.denoise(x, timesteps, image, sample_latent(prior, generator)).float(), noise
            )
            out.update(mse_posterior=float(mse_post), mse_prior=float(mse_prior), gap=float(mse_prior - mse_post))
        return out
