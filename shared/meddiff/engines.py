"""`PrepareBatch` classes for MONAI's `SupervisedTrainer`, one hook each on top of MONAI's `DiffusionPrepareBatch`.

MONAI's class diffuses ``batch["image"]`` and hands ``batch[condition_name]`` to the inferer as ``condition``; how
the condition reaches the network is the training inferer's `meddiff.conditioning.Conditioning`, so concat and
SPADE conditioning need no class of their own (``condition_name="mask"`` or ``"seg"``). `ConditionedPrepareBatch`
adds two hooks, `get_images` (what is diffused) and `get_condition`, and runs MONAI's ``__call__`` on them; the
subclasses override one hook each:

- `CIMDPrepareBatch`: the diffused variable is one rater's mask (``label``), the condition the CT crop (``image``);
- `ConditionDropoutPrepareBatch`: the condition is replaced by its null with probability `drop_rate` per sample,
  for classifier-free guidance (Ho & Salimans 2022); ``drop_channels`` nulls only those channels, as the seed's
  ``--drop_hvb_only`` does for the nuclei bundle's HV and edge maps.

Latent diffusion (`meddiff.latent`, Rombach et al. 2022) and its classifier:

- `LatentPrepareBatch`: the diffused variable is the batch's ``image`` (B, 3, H, W) encoded by a frozen autoencoder
  and multiplied by its ``scale_factor`` (`meddiff.latent.LatentEncoder`), on the autoencoder's device; with
  ``sample=False`` the posterior mean, for a validation whose inputs do not change between validations;
- `NoisyLatentClassifierPrepareBatch`: ``(z_t, label, (), {"timesteps": t})`` for a classifier on noisy latents
  (MONAI's `DiffusionModelEncoder` is called ``network(z_t, timesteps=t)``), z_t = sqrt(abar_t) z_0 +
  sqrt(1 - abar_t) eps with t uniform in 0..T-1 (Dhariwal & Nichol 2021, the noise-aware classifier of classifier
  guidance), or t = 0 and z_t = z_0 exactly (``noisy=False``, the seed's classifier).

For inference, `SeededPrepareBatch` hands MONAI's `SupervisedEvaluator` the batch's ``image`` and its ``seed`` (the
first item's), so the sampling inferer draws each batch's noise from that seed: a run's outputs do not depend on
which batches came before.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.engines import DiffusionPrepareBatch, PrepareBatch

from meddiff.conditioning import Conditioning
from meddiff.latent import LatentEncoder

__all__ = [
    "CIMDPrepareBatch",
    "ConditionDropoutPrepareBatch",
    "ConditionedPrepareBatch",
    "LatentPrepareBatch",
    "NoisyLatentClassifierPrepareBatch",
    "SeededPrepareBatch",
]


class ConditionedPrepareBatch(DiffusionPrepareBatch):
    """`DiffusionPrepareBatch` with hooks for the diffused variable and the condition.

    Args:
        num_train_timesteps: timesteps t are drawn uniformly from 0..num_train_timesteps-1.
        condition_name: batch key of the condition (None: unconditional).
        image_name: batch key of the diffused variable.
    """

    def __init__(
        self, num_train_timesteps: int, condition_name: str | None = "mask", image_name: str = "image"
    ) -> None:
        # MONAI's __call__ reads the remapped batch built below, whose condition is always under "condition"
        super().__init__(
            num_train_timesteps=num_train_timesteps, condition_name=None if condition_name is None else "condition"
        )
        self.image_name, self.condition_key = image_name, condition_name

    def get_images(self, batchdata: dict[str, Any]) -> torch.Tensor:
        """The variable that is noised and denoised."""
        if self.image_name not in batchdata:
            raise ValueError(f"every training batch needs {self.image_name!r}; this one has {sorted(batchdata)}.")
        return batchdata[self.image_name]

    def get_condition(self, batchdata: dict[str, Any]) -> torch.Tensor | None:
        """The condition handed to the inferer (None when unconditional)."""
        if self.condition_key is None:
            return None
        if self.condition_key not in batchdata:
            raise ValueError(f"every training batch needs {self.condition_key!r}; this one has {sorted(batchdata)}.")
        return batchdata[self.condition_key]

    def __call__(
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        remapped: dict[str, Any] = {"image": self.get_images(batchdata)}
        condition = self.get_condition(batchdata)
        if condition is not None:
            remapped["condition"] = condition
        return super().__call__(remapped, device, non_blocking, **kwargs)


class CIMDPrepareBatch(ConditionedPrepareBatch):
    """CIMD (Rahman et al. 2023): diffuse one rater's mask (``label``, in [-1, 1]), condition on the CT (``image``).

    Args:
        num_train_timesteps: timesteps t are drawn uniformly from 0..num_train_timesteps-1.
    """

    def __init__(self, num_train_timesteps: int) -> None:
        super().__init__(num_train_timesteps, condition_name="image", image_name="label")

    def get_images(self, batchdata: dict[str, Any]) -> torch.Tensor:
        if "label" not in batchdata:
            raise ValueError("CIMD training needs a 'label' (one rater's mask in [-1, 1]) in every batch.")
        return batchdata["label"]


class ConditionDropoutPrepareBatch(ConditionedPrepareBatch):
    """Replace the condition by its null with probability `drop_rate` per sample (classifier-free guidance training).

    Args:
        num_train_timesteps: timesteps t are drawn uniformly from 0..num_train_timesteps-1.
        condition_name: batch key of the condition.
        conditioning: the `Conditioning` the training inferer uses (it defines the null condition).
        drop_rate: probability that a sample's condition is nulled.
        drop_channels: null only these channels of the condition (None: all of it).
        image_name: batch key of the diffused variable.
    """

    def __init__(
        self,
        num_train_timesteps: int,
        condition_name: str,
        conditioning: Conditioning | str = "seg",
        drop_rate: float = 0.2,
        drop_channels: Sequence[int] | None = None,
        image_name: str = "image",
    ) -> None:
        super().__init__(num_train_timesteps, condition_name=condition_name, image_name=image_name)
        if not 0.0 <= float(drop_rate) <= 1.0:
            raise ValueError(f"drop_rate must be in [0, 1], got {drop_rate}.")
        self.conditioning = Conditioning(conditioning) if isinstance(conditioning, str) else conditioning
        self.drop_rate, self.drop_channels = float(drop_rate), None if drop_channels is None else list(drop_channels)

    def get_condition(self, batchdata: dict[str, Any]) -> torch.Tensor | None:
        condition = super().get_condition(batchdata)
        keep = torch.rand(condition.shape[0]) >= self.drop_rate
        if self.drop_channels is None:
            return self.conditioning.drop(condition, keep)
        dropped = condition.clone()
        dropped[:, self.drop_channels] = self.conditioning.drop(condition[:, self.drop_channels], keep)
        return dropped


class SeededPrepareBatch(PrepareBatch):
    """Evaluation batches for sampling inferers: ``inferer(batch["image"], network, seed=batch["seed"][0])``.

    Args:
        image_name: batch key of the inferer's input.
        seed_name: batch key of the per-item seeds (absent: the inferer's own seed).
        item_keys: further batch keys handed to the inferer per item, as (B,) tensors under the same name (e.g.
            ``guidance_scale``: one scale per item); a key absent from the batch is not passed.
    """

    def __init__(self, image_name: str = "image", seed_name: str = "seed", item_keys: Sequence[str] = ()) -> None:
        self.image_name, self.seed_name, self.item_keys = image_name, seed_name, list(item_keys)

    def __call__(
        self,
        batchdata: dict[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None, tuple, dict]:
        inputs = batchdata[self.image_name].to(device=device, non_blocking=non_blocking, **kwargs)
        seeds = batchdata.get(self.seed_name)
        extra = {} if seeds is None else {"seed": int(torch.as_tensor(seeds).reshape(-1)[0])}
        extra.update({key: torch.as_tensor(batchdata[key]).reshape(-1) for key in self.item_keys if key in batchdata})
        return inputs, None, (), extra


def _freeze(autoencoder: torch.nn.Module) -> torch.nn.Module:
    return getattr(autoencoder, "module", autoencoder).eval().requires_grad_(False)


class LatentPrepareBatch(ConditionedPrepareBatch):
    """Latent diffusion: diffuse ``batch[image_name]`` encoded by a frozen autoencoder and scaled by `scale_factor`.

    The latents are computed on the autoencoder's device (put it on the trainer's device); the noise and timesteps
    are MONAI's `DiffusionPrepareBatch` draws. For validation with `meddiff.validation.FixedNoisePrepareBatch`, wrap
    a second instance with ``sample=False``, so the encoded inputs are the same at every validation.

    Args:
        num_train_timesteps: timesteps t are drawn uniformly from 0..num_train_timesteps-1.
        autoencoder: the trained autoencoder (``encode(x) -> (z_mu, z_sigma)``, MONAI's `AutoencoderKL`); frozen and
            put in eval mode here.
        scale_factor: the latent scale factor stored with the autoencoder's weights (``scale_factor`` in its
            ``model.json``: `meddiff.io.trained_setting`).
        condition_name: batch key of the condition (None: unconditional).
        sample: encode to a posterior sample (training); False takes the posterior mean.
        image_name: batch key of the images.
    """

    def __init__(
        self,
        num_train_timesteps: int,
        autoencoder: torch.nn.Module,
        scale_factor: float,
        condition_name: str | None = None,
        sample: bool = True,
        image_name: str = "image",
    ) -> None:
        super().__init__(num_train_timesteps, condition_name=condition_name, image_name=image_name)
        self.encoder = LatentEncoder(_freeze(autoencoder), scale_factor, sample=sample)

    def get_images(self, batchdata: dict[str, Any]) -> torch.Tensor:
        return self.encoder(super().get_images(batchdata))


class NoisyLatentClassifierPrepareBatch(PrepareBatch):
    """``(image, label) -> (z_t, label, (), {"timesteps": t})`` for a classifier of noisy latents.

    z_0 = `LatentEncoder` (scaled posterior sample, or mean when ``sample=False``); with ``noisy`` true, t is uniform
    in 0..T-1 (T = ``len(scheduler.alphas_cumprod)``) and z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps, abar_t from
    ``scheduler.alphas_cumprod``; with ``noisy`` false, t = 0 and z_t = z_0 (no noise at all).

    Random numbers are drawn on the CPU in this order: the posterior's eps (when ``sample``), t, then the diffusion
    eps, by ``torch.randn``/``torch.randint`` with a generator that is the global one, or, with `seed`, a
    ``torch.Generator().manual_seed(seed)`` made anew at every call (a validation batch then gets the same numbers at
    every validation). A batch holding `timestep_name` or `seed_name` (`meddiff.validation.fixed_noise_items`) takes
    its timesteps and its diffusion noise (`meddiff.validation.fixed_noise`, per item seed) from them instead.

    Args:
        autoencoder: the trained autoencoder (frozen and put in eval mode here), on the trainer's device.
        scale_factor: the latent scale factor stored with the autoencoder's weights.
        scheduler: a `meddiff.schedulers` scheduler (or any object with ``alphas_cumprod``).
        noisy: noise-aware classifier (True) or the seed's clean latents at t = 0 (False).
        label_name: batch key of the class labels (B,) or (B, 1).
        image_name: batch key of the images.
        sample: encode to a posterior sample; False takes the posterior mean.
        seed: reseed the draws at every call with this seed (validation); None draws from the global generator.
        timestep_name: batch key of fixed timesteps, used when present.
        seed_name: batch key of per-item noise seeds, used when present.
    """

    def __init__(
        self,
        autoencoder: torch.nn.Module,
        scale_factor: float,
        scheduler: Any,
        noisy: bool = True,
        label_name: str = "label",
        image_name: str = "image",
        sample: bool = True,
        seed: int | None = None,
        timestep_name: str = "timestep",
        seed_name: str = "noise_seed",
    ) -> None:
        self.encoder = LatentEncoder(_freeze(autoencoder), scale_factor, sample=sample)
        self.alphas_cumprod = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64).cpu()
        self.noisy, self.label_name, self.image_name = bool(noisy), label_name, image_name
        self.seed = None if seed is None else int(seed)
        self.timestep_name, self.seed_name = timestep_name, seed_name

    @property
    def num_train_timesteps(self) -> int:
        """T, the number of the scheduler's training timesteps."""
        return int(self.alphas_cumprod.shape[0])

    def __call__(
        self,
        batchdata: dict[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        for key in (self.image_name, self.label_name):
            if key not in batchdata:
                raise ValueError(f"every classifier batch needs {key!r}; this one has {sorted(batchdata)}.")
        generator = None if self.seed is None else torch.Generator().manual_seed(self.seed)
        z0 = self.encoder(batchdata[self.image_name], generator=generator)
        b = z0.shape[0]
        if not self.noisy:
            timesteps = torch.zeros(b, dtype=torch.long)
            z_t = z0
        else:
            if self.timestep_name in batchdata:
                timesteps = torch.as_tensor(batchdata[self.timestep_name]).reshape(-1).long().cpu()
            else:
                timesteps = torch.randint(0, self.num_train_timesteps, (b,), generator=generator)
            if self.seed_name in batchdata:
                from meddiff.validation import fixed_noise

                noise = fixed_noise(batchdata[self.seed_name], z0.shape[1:])
            else:
                noise = torch.randn(z0.shape, generator=generator)
            abar = self.alphas_cumprod[timesteps].reshape((-1,) + (1,) * (z0.ndim - 1))
            a, s = abar.sqrt().to(z0.device, z0.dtype), (1.0 - abar).sqrt().to(z0.device, z0.dtype)
            z_t = a * z0 + s * noise.to(z0.device, z0.dtype)
        labels = torch.as_tensor(batchdata[self.label_name]).reshape(-1).long()
        to = {"device": device, "non_blocking": non_blocking, **kwargs}
        return z_t.to(**to), labels.to(**to), (), {"timesteps": timesteps.to(**to)}
