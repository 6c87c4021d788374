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

__all__ = ["CIMDPrepareBatch", "ConditionDropoutPrepareBatch", "ConditionedPrepareBatch", "SeededPrepareBatch"]


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
