"""Ignite handlers: atomic, resumable training checkpoints."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from meddiff.io import load_torch, save_torch

__all__ = ["GradientClipping", "TrainingCheckpoint", "is_main_process"]

logger = logging.getLogger(__name__)


def is_main_process() -> bool:
    """True on rank 0 of a distributed run, or when not distributed."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


def _unwrap(obj: Any) -> Any:
    return obj.module if isinstance(obj, torch.nn.parallel.DistributedDataParallel) else obj


class TrainingCheckpoint:
    """Save `save_dict` (network, optimizer, ...) plus the engine's epoch/iteration atomically, and resume from it.

    - On start, if ``<ckpt_dir>/<name>`` exists and `resume` is True, every object and the engine's epoch and
      iteration are restored from it (loaded with ``weights_only=True``), so an interrupted run continues.
    - Every `save_interval` epochs (rank 0 only), the checkpoint is written to a temporary file and renamed.
    - On completion, the state dict of ``save_dict[final_key]`` is written atomically to ``<ckpt_dir>/<final_filename>``
      (the bundle's ``models/model.pt``).
    """

    def __init__(
        self,
        ckpt_dir: str,
        save_dict: dict[str, Any],
        name: str = "checkpoint.pt",
        final_key: str = "model",
        final_filename: str = "model.pt",
        save_interval: int = 1,
        resume: bool = True,
    ) -> None:
        self.ckpt_dir, self.save_dict, self.name = Path(ckpt_dir), save_dict, name
        self.final_key, self.final_filename = final_key, final_filename
        self.save_interval, self.resume = max(1, int(save_interval)), resume

    @property
    def path(self) -> Path:
        """Where the resumable checkpoint lives."""
        return self.ckpt_dir / self.name

    def attach(self, engine: Engine) -> None:
        """Register the resume, periodic-save and final-save hooks on `engine`."""
        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self.save)
        engine.add_event_handler(Events.COMPLETED, self.save_final)

    def load(self, engine: Engine) -> None:
        """Restore objects and the engine's progress from the checkpoint, if there is one."""
        if not (self.resume and self.path.is_file()):
            return
        state = load_torch(self.path, map_location=getattr(engine.state, "device", None) or "cpu")
        for key, obj in self.save_dict.items():
            if key in state:
                _unwrap(obj).load_state_dict(state[key])
        engine.state.epoch = int(state.get("epoch", 0))
        engine.state.iteration = int(state.get("iteration", 0))
        logger.info(f"resumed from {self.path} at epoch {engine.state.epoch}")
        if engine.state.epoch >= engine.state.max_epochs:
            logger.info(f"{self.path} already reached max_epochs={engine.state.max_epochs}; raise it to train on.")

    def save(self, engine: Engine) -> None:
        """Write the resumable checkpoint (rank 0 only)."""
        if not is_main_process():
            return
        state = {key: _unwrap(obj).state_dict() for key, obj in self.save_dict.items()}
        state.update(epoch=engine.state.epoch, iteration=engine.state.iteration)
        save_torch(state, self.path)

    def save_final(self, engine: Engine) -> None:
        """Write the final network state dict (rank 0 only)."""
        if is_main_process():
            save_torch(_unwrap(self.save_dict[self.final_key]).state_dict(), self.ckpt_dir / self.final_filename)


class GradientClipping:
    """Clip the global gradient norm after backward and before the optimizer step (as the seed code does)."""

    def __init__(self, max_norm: float = 1.0) -> None:
        self.max_norm = max_norm

    def attach(self, engine: Engine) -> None:
        """Run after MONAI's `BACKWARD_COMPLETED` event, which fires before `optimizer.step()`."""
        from monai.engines.utils import IterationEvents

        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if engine.scaler is not None:  # fp16: unscale first so the norm is in true units
            engine.scaler.unscale_(engine.optimizer)
        torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.max_norm)
