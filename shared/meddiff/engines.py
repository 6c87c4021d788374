"""`PrepareBatch` classes for MONAI's `SupervisedTrainer`: each one hook on top of `DiffusionPrepareBatch`."""

from __future__ import annotations

from typing import Any

import torch
from monai.engines import DiffusionPrepareBatch

__all__ = ["ConcatDiffusionPrepareBatch"]


class ConcatDiffusionPrepareBatch(DiffusionPrepareBatch):
    """`DiffusionPrepareBatch` whose condition is concatenated to the noisy image (``mode="concat"``)."""

    def __init__(self, num_train_timesteps: int, condition_name: str = "mask") -> None:
        super().__init__(num_train_timesteps=num_train_timesteps, condition_name=condition_name)

    def __call__(
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        images, target, args, infer_kwargs = super().__call__(batchdata, device, non_blocking, **kwargs)
        infer_kwargs["mode"] = "concat"
        return images, target, args, infer_kwargs
