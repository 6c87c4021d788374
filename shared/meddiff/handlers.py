"""Ignite handlers: atomic, resumable, exclusive training checkpoints; gradient clipping; a divergence stop.

Conventions (`TrainingCheckpoint`):
- ``<ckpt_dir>/<name>`` (``checkpoint.pt``) is the resumable checkpoint: every `save_dict` object's state, the engine's
  epoch and iteration, and the model's settings; ``<ckpt_dir>/<final_filename>`` (``model.pt``) is the final plain
  state dict, with ``model.json`` beside it (`meddiff.io.save_trained_weights`);
- a training that would replace final weights it cannot resume (no checkpoint, or ``resume`` false) is refused
  before the first iteration unless ``overwrite``; a checkpoint that is unreadable, lacks an object of `save_dict`,
  does not fit the network or was written with other settings is refused, never silently skipped;
- one training at a time per ``ckpt_dir``: rank 0 holds ``fcntl.flock`` on ``<ckpt_dir>/.lock`` (holding its pid)
  from Events.STARTED to COMPLETED / TERMINATE / EXCEPTION_RAISED; the kernel drops it when the process dies, and a
  later training in the same process takes over a lock an earlier one left behind;
- weights with NaN or inf are never written (nor is a checkpoint holding them).
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from meddiff.errors import UserError
from meddiff.io import clean_stale_temporaries, load_torch, save_torch, save_trained_weights, settings_mismatch
from meddiff.options import parse

__all__ = ["GradientClipping", "StopOnNonFiniteLoss", "TrainingCheckpoint", "is_main_process"]

logger = logging.getLogger(__name__)

_held_locks: dict[str, int] = {}  # lock file (real path) -> descriptor, for every lock this process holds


def is_main_process() -> bool:
    """True on rank 0 of a distributed run, or when not distributed."""
    return not _distributed() or torch.distributed.get_rank() == 0


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _unwrap(obj: Any) -> Any:
    return obj.module if isinstance(obj, torch.nn.parallel.DistributedDataParallel) else obj


def _non_finite(state: Mapping[str, Any]) -> list[str]:
    return [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]


def _acquire(lock_file: Path) -> int:
    """Take the exclusive lock on `lock_file` for this process and write the pid into it; return its descriptor."""
    key = os.path.realpath(lock_file)
    if key in _held_locks:
        return _held_locks[key]
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise UserError(
            f"another training is writing to {lock_file.parent} (pid {holder}): wait for it or choose another "
            "bundle_root."
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held_locks[key] = fd
    return fd


def _release(lock_file: Path) -> None:
    fd = _held_locks.pop(os.path.realpath(lock_file), None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class TrainingCheckpoint:
    """Save `save_dict` (network, optimizer, ...) plus the engine's epoch/iteration atomically, and resume from it.

    - On start (rank 0): lock `ckpt_dir`, remove temporaries that killed runs left there, refuse to replace final
      weights that cannot be resumed (unless `overwrite`). Then, if ``<ckpt_dir>/<name>`` exists and `resume` is true,
      every object and the engine's epoch and iteration are restored from it (loaded with ``weights_only=True``).
    - Every `save_interval` epochs (rank 0 only), the checkpoint is written to a temporary file and renamed.
    - On completion, the state dict of ``save_dict[final_key]`` is written atomically to
      ``<ckpt_dir>/<final_filename>`` (the bundle's ``models/model.pt``) with `settings` beside it in
      ``<final_filename without .pt>.json``.

    Args:
        ckpt_dir: the folder of the checkpoint and the final weights (``<bundle_root>/models``).
        save_dict: name -> object with ``state_dict()``/``load_state_dict()``; ``final_key`` is the network.
        name: the resumable checkpoint's file name.
        final_key: the `save_dict` entry whose state dict is the final weights.
        final_filename: the final weights' file name.
        save_interval: epochs between checkpoints.
        resume: continue from the checkpoint when there is one (option ``--resume``).
        overwrite: allow replacing final weights or a checkpoint that this run does not resume (``--overwrite``).
        settings: the settings the network is built and trained with (img_size, num_classes, channels, ...), stored
            with the weights and compared on resume and by `meddiff.io.load_trained_weights`.
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
        overwrite: bool = False,
        settings: dict | None = None,
    ) -> None:
        self.ckpt_dir, self.save_dict, self.name = Path(ckpt_dir), save_dict, name
        self.final_key, self.final_filename = final_key, final_filename
        self.save_interval = max(1, int(save_interval))
        self.resume, self.overwrite = parse("resume", resume), parse("overwrite", overwrite)
        self.settings = dict(settings) if settings is not None else None

    @property
    def path(self) -> Path:
        """Where the resumable checkpoint lives."""
        return self.ckpt_dir / self.name

    @property
    def final_path(self) -> Path:
        """Where the final weights go."""
        return self.ckpt_dir / self.final_filename

    @property
    def lock_file(self) -> Path:
        """The file whose lock marks a training running into `ckpt_dir`."""
        return self.ckpt_dir / ".lock"

    def attach(self, engine: Engine) -> None:
        """Register the start (lock, checks, resume), periodic-save, final-save and release hooks on `engine`."""
        engine.add_event_handler(Events.STARTED, self.start)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self.save)
        engine.add_event_handler(Events.COMPLETED, self.save_final)
        engine.add_event_handler(Events.COMPLETED, self.release)
        engine.add_event_handler(Events.TERMINATE, self.release)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._release_and_raise)

    def start(self, engine: Engine) -> None:
        """Lock `ckpt_dir`, clean it, refuse replacing weights this run cannot resume, then resume if asked."""
        if is_main_process():
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            _acquire(self.lock_file)
            clean_stale_temporaries(self.ckpt_dir)
        try:
            self.check_replacing()
            self.load(engine)
        except BaseException:
            self.release()
            raise

    def check_replacing(self) -> None:
        """Unless `overwrite`, refuse to replace final weights or a checkpoint that this run does not resume."""
        if self.overwrite:
            return
        if self.path.is_file() and not self.resume:
            raise UserError(
                f"{self.path} exists and --resume is false: pass --resume true to continue it, choose another "
                "bundle_root, or pass --overwrite true to train from scratch over it."
            )
        if self.final_path.is_file() and not self.path.is_file():
            raise UserError(
                f"{self.final_path} exists but no {self.name} to resume from: move it away, choose another "
                "bundle_root, or pass --overwrite true."
            )

    def load(self, engine: Engine) -> None:
        """Restore objects and the engine's progress from the checkpoint, if there is one (and `resume` is true)."""
        if not (self.resume and self.path.is_file()):
            return
        try:
            state = load_torch(self.path, map_location=getattr(engine.state, "device", None) or "cpu")
        except Exception as err:
            raise UserError(
                f"{self.path} cannot be read ({type(err).__name__}): it is damaged; move it away and pass "
                "--overwrite true to train from scratch."
            ) from err
        missing = [key for key in self.save_dict if not isinstance(state, Mapping) or key not in state]
        if missing:
            raise UserError(
                f"{self.path} lacks {', '.join(missing)}: it was not written by this training; move it away, or pass "
                "--resume false --overwrite true to train from scratch."
            )
        mismatch = settings_mismatch(self.path, state.get("settings") or {}, self.settings or {})
        if mismatch:
            raise UserError(mismatch + ", or --resume false --overwrite true to start over.")
        for key, obj in self.save_dict.items():
            try:
                _unwrap(obj).load_state_dict(state[key])
            except (RuntimeError, ValueError, KeyError, TypeError) as err:
                reason = " ".join(str(err).split())[:200]
                raise UserError(
                    f"{self.path} does not fit this run's {key} ({reason}): it was trained with other settings; pass "
                    "those, or --resume false --overwrite true to start over."
                ) from err
        engine.state.epoch = int(state.get("epoch", 0))
        engine.state.iteration = int(state.get("iteration", 0))
        logger.info(f"resumed from {self.path} at epoch {engine.state.epoch}")
        if engine.state.epoch >= engine.state.max_epochs:
            logger.info(f"{self.path} already reached max_epochs={engine.state.max_epochs}; raise it to train on.")

    def _network_state(self) -> dict[str, Any]:
        state = _unwrap(self.save_dict[self.final_key]).state_dict()
        bad = _non_finite(state)
        if bad:
            raise UserError(
                f"training diverged: {len(bad)} tensors of the network ({bad[0]}, ...) hold NaN or inf, so "
                f"{self.final_path} is not written; lower --learning_rate or --grad_clip_norm and train again."
            )
        return state

    def save(self, engine: Engine) -> None:
        """Write the resumable checkpoint (rank 0 only); a network holding NaN or inf is refused, not saved."""
        if not is_main_process():
            return
        state = {key: _unwrap(obj).state_dict() for key, obj in self.save_dict.items() if key != self.final_key}
        state[self.final_key] = self._network_state()
        state.update(epoch=engine.state.epoch, iteration=engine.state.iteration)
        if self.settings is not None:
            state["settings"] = self.settings
        save_torch(state, self.path)

    def save_final(self, engine: Engine) -> None:
        """Write the final network state dict and its settings JSON (rank 0 only)."""
        if is_main_process():
            save_trained_weights(self._network_state(), self.final_path, self.settings)

    def release(self, engine: Engine | None = None) -> None:
        """Give up the lock on `ckpt_dir` (idempotent)."""
        _release(self.lock_file)

    def _release_and_raise(self, engine: Engine, error: BaseException) -> None:
        # Ignite swallows the exception once an EXCEPTION_RAISED handler exists, so hand it on
        self.release()
        raise error


def _loss_of(output: Any) -> Any:
    """The loss in a MONAI trainer's output: ``output["loss"]``, or that of the first decollated item."""
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], Mapping):
        output = output[0]
    return output["loss"] if isinstance(output, Mapping) else output


class StopOnNonFiniteLoss:
    """Stop training with a `UserError` at the first iteration whose loss is NaN or inf.

    Under torch.distributed each rank that has the handler checks its own loss, with no collective call, so it may
    sit on rank 0 only; the rank that stops ends the run (torchrun then stops the others), and NaN gradients reach
    every rank through DDP's all-reduce anyway.

    Args:
        learning_rate: the run's ``--learning_rate``, named in the message (None leaves it out).
        grad_clip_norm: the run's ``--grad_clip_norm``, likewise.
        output_transform: engine.state.output -> loss (default: the ``"loss"`` entry of MONAI's output).
    """

    def __init__(
        self,
        learning_rate: float | None = None,
        grad_clip_norm: float | None = None,
        output_transform: Callable[[Any], Any] = _loss_of,
    ) -> None:
        self.learning_rate = None if learning_rate is None else parse("learning_rate", learning_rate)
        self.grad_clip_norm = None if grad_clip_norm is None else parse("grad_clip_norm", grad_clip_norm)
        self.output_transform = output_transform

    def attach(self, engine: Engine) -> None:
        """Check after every iteration."""
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        loss = torch.as_tensor(self.output_transform(engine.state.output)).detach().float()
        if torch.isfinite(loss).all():
            return
        shown = next(f"{v:g}" for v in loss.flatten().tolist() if not math.isfinite(v))
        lr = f" (now {self.learning_rate:g})" if self.learning_rate is not None else ""
        clip = f" (now {self.grad_clip_norm:g})" if self.grad_clip_norm is not None else ""
        raise UserError(
            f"training diverged: loss is {shown} at epoch {engine.state.epoch} iteration {engine.state.iteration}; "
            f"lower --learning_rate{lr} or --grad_clip_norm{clip}, or train with --precision fp32."
        )


class GradientClipping:
    """Clip the global gradient norm after backward and before the optimizer step (as the seed code does).

    Args:
        max_norm: the largest global gradient norm kept (option ``--grad_clip_norm``).
    """

    def __init__(self, max_norm: float = 1.0) -> None:
        self.max_norm = parse("grad_clip_norm", max_norm)

    def attach(self, engine: Engine) -> None:
        """Run after MONAI's `BACKWARD_COMPLETED` event, which fires before `optimizer.step()`."""
        from monai.engines.utils import IterationEvents

        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if engine.scaler is not None:  # fp16: unscale first so the norm is in true units
            engine.scaler.unscale_(engine.optimizer)
        torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.max_norm)
