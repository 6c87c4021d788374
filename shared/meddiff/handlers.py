"""Ignite handlers: atomic, resumable, exclusive training checkpoints; gradient clipping; a divergence stop.

Conventions (`TrainingCheckpoint`):
- ``<ckpt_dir>/<name>`` (``checkpoint.pt``) is the resumable checkpoint: every `save_dict` object's state, the engine's
  epoch and iteration, and the model's settings; ``<ckpt_dir>/<final_filename>`` (``model.pt``) is the final plain
  state dict, with ``model.json`` beside it (`meddiff.io.save_trained_weights`); with validation,
  ``<ckpt_dir>/<best_filename>`` (``model_best.pt`` + ``model_best.json``) holds the network of the best validation
  so far (`BestModelCheckpoint`), and the checkpoint keeps that best value, so a resumed training replaces the best
  weights only with better ones;
- a training that would replace final or best weights it cannot resume (no checkpoint, or ``resume`` false) is refused
  before the first iteration unless ``overwrite``; a checkpoint that is unreadable, lacks an object of `save_dict`,
  does not fit the network or was written with other settings is refused, never silently skipped;
- one training at a time per ``ckpt_dir``: rank 0 holds ``fcntl.flock`` on ``<ckpt_dir>/.lock`` (holding its pid)
  from Events.STARTED to COMPLETED / TERMINATE / EXCEPTION_RAISED; the kernel drops it when the process dies, and a
  later training in the same process takes over a lock an earlier one left behind;
- weights with NaN or inf are never written (nor is a checkpoint holding them).
"""

from __future__ import annotations

import copy
import fcntl
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader

from meddiff.errors import UserError
from meddiff.io import (
    clean_stale_temporaries,
    load_torch,
    save_torch,
    save_trained_weights,
    settings_file,
    settings_mismatch,
)
from meddiff.options import parse

__all__ = [
    "BestModelCheckpoint",
    "EMAWeights",
    "GradientClipping",
    "StopOnNonFiniteLoss",
    "TrainedWeightsLoader",
    "TrainingCheckpoint",
    "is_main_process",
]

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
    - Every `save_interval` epochs and at the end (rank 0 only), the checkpoint is written to a temporary file and
      renamed.
    - On completion, the state dict of ``save_dict[final_key]`` is written atomically to
      ``<ckpt_dir>/<final_filename>`` (the bundle's ``models/model.pt``) with `settings` beside it in
      ``<final_filename without .pt>.json``.
    - With `best_filename`, `save_best` (called by `BestModelCheckpoint` on the validation evaluator) writes the
      network the same way to ``<ckpt_dir>/<best_filename>`` and records the best value and epoch, which the
      checkpoint stores and a resumed run restores (checkpoints without them resume with no best yet).

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
        best_filename: the best validated weights' file name (``model_best.pt``); None when the training has no
            validation.
        init_from: weights to start from when there is no checkpoint to resume (fine-tuning a pre-trained model):
            loaded with `meddiff.io.load_trained_weights` into ``save_dict[init_keys[0]]`` and copied into the
            other `init_keys` (the weight average). A resumed run continues its own checkpoint instead.
        init_settings: the settings `init_from` must have been trained with (None: `settings`).
        init_keys: the `save_dict` entries that start from `init_from`.
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
        best_filename: str | None = None,
        init_from: str | None = None,
        init_settings: dict | None = None,
        init_keys: Sequence[str] = ("model", "ema"),
    ) -> None:
        self.ckpt_dir, self.save_dict, self.name = Path(ckpt_dir), save_dict, name
        self.init_from = None if init_from is None else Path(init_from)
        self.init_settings = dict(init_settings) if init_settings is not None else None
        self.init_keys = [key for key in init_keys if key in save_dict]
        self.final_key, self.final_filename, self.best_filename = final_key, final_filename, best_filename
        self.save_interval = max(1, int(save_interval))
        self.resume, self.overwrite = parse("resume", resume), parse("overwrite", overwrite)
        self.settings = dict(settings) if settings is not None else None
        self.best_metric: float | None = None
        self.best_epoch = -1

    @property
    def path(self) -> Path:
        """Where the resumable checkpoint lives."""
        return self.ckpt_dir / self.name

    @property
    def final_path(self) -> Path:
        """Where the final weights go."""
        return self.ckpt_dir / self.final_filename

    @property
    def best_path(self) -> Path | None:
        """Where the best validated weights go (None without `best_filename`)."""
        return self.ckpt_dir / self.best_filename if self.best_filename else None

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
        resumed = self.resume and self.path.is_file()
        if not resumed:
            self.initialise()
        if not resumed and self.best_path is not None and self.best_path.is_file() and is_main_process():
            # --overwrite: a training from scratch must not leave an earlier training's best weights beside its own
            for stale in (self.best_path, settings_file(self.best_path)):
                stale.unlink(missing_ok=True)
            logger.info(f"removed {self.best_path} of the earlier training (--overwrite true)")

    def initialise(self) -> None:
        """Start the `init_keys` objects from `init_from` (fine-tuning); nothing without `init_from`."""
        if self.init_from is None or not self.init_keys:
            return
        from meddiff.io import load_trained_weights

        settings = self.settings if self.init_settings is None else self.init_settings
        first = _unwrap(self.save_dict[self.init_keys[0]])
        load_trained_weights(first, self.init_from, settings)
        for key in self.init_keys[1:]:
            _unwrap(self.save_dict[key]).load_state_dict(first.state_dict())
        logger.info(f"started from {self.init_from}")

    def check_replacing(self) -> None:
        """Unless `overwrite`, refuse to replace final or best weights or a checkpoint this run does not resume."""
        if self.overwrite:
            return
        if self.path.is_file() and not self.resume:
            raise UserError(
                f"{self.path} exists and --resume is false: pass --resume true to continue it, choose another "
                "bundle_root, or pass --overwrite true to train from scratch over it."
            )
        for final in (self.final_path, self.best_path):
            if final is not None and final.is_file() and not self.path.is_file():
                raise UserError(
                    f"{final} exists but no {self.name} to resume from: move it away, choose another "
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
        if state.get("best_metric") is not None:
            self.best_metric, self.best_epoch = float(state["best_metric"]), int(state.get("best_epoch", -1))
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
        if self.best_metric is not None:
            state.update(best_metric=self.best_metric, best_epoch=self.best_epoch)
        if self.settings is not None:
            state["settings"] = self.settings
        save_torch(state, self.path)

    def save_final(self, engine: Engine) -> None:
        """Write the final network state dict and its settings JSON (rank 0 only), and the checkpoint of the last
        epoch when `save_interval` skipped it."""
        if engine.state.epoch % self.save_interval:
            self.save(engine)
        if is_main_process():
            save_trained_weights(self._network_state(), self.final_path, self.settings)

    def save_best(self, metric: float, epoch: int) -> None:
        """Record `metric` (of `epoch`) as the best validation so far and write the network to `best_path` (rank 0)."""
        if self.best_path is None:
            raise ValueError("TrainingCheckpoint.save_best needs best_filename (e.g. 'model_best.pt') in the config.")
        self.best_metric, self.best_epoch = float(metric), int(epoch)
        if is_main_process():
            save_trained_weights(self._network_state(), self.best_path, self.settings)
            logger.info(f"epoch {epoch}: best validation so far ({metric:.6g}), written to {self.best_path}")

    def release(self, engine: Engine | None = None) -> None:
        """Give up the lock on `ckpt_dir` (idempotent)."""
        _release(self.lock_file)

    def _release_and_raise(self, engine: Engine, error: BaseException) -> None:
        # Ignite swallows the exception once an EXCEPTION_RAISED handler exists, so hand it on
        self.release()
        raise error


class BestModelCheckpoint:
    """Keep the network of the best validation: on the evaluator, write it through `TrainingCheckpoint.save_best`.

    After each validation, when the evaluator's key metric is a new best by the evaluator's own rule
    (``metric_cmp_fn``; a loss passes `meddiff.validation.lower_is_better`), the network is written atomically to
    the training's ``<ckpt_dir>/<best_filename>`` (``models/model_best.pt`` with ``model_best.json``, through
    `meddiff.io.save_trained_weights`). The best value so far lives in the training checkpoint: at its first run the
    evaluator starts from it, so a resumed training compares with the best before the interruption. Attach it to the
    validation evaluator (``validate#handlers``); the training's `TrainingCheckpoint` refuses, before the first
    iteration, to replace best weights that the run does not resume (unless ``overwrite``).

    Args:
        checkpoint: the training's `TrainingCheckpoint` (e.g. ``@train#handlers#6``), with ``best_filename`` set.
    """

    def __init__(self, checkpoint: TrainingCheckpoint) -> None:
        if not isinstance(checkpoint, TrainingCheckpoint) or checkpoint.best_path is None:
            raise TypeError(
                "BestModelCheckpoint needs the training's TrainingCheckpoint with best_filename set; got "
                f"{type(checkpoint).__name__}: point `checkpoint` at that handler in train#handlers."
            )
        self.checkpoint = checkpoint

    def attach(self, engine: Engine) -> None:
        """Restore the best so far when the evaluator starts; save after each validation epoch."""
        engine.add_event_handler(Events.STARTED, self.restore)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def restore(self, engine: Engine) -> None:
        """Hand the evaluator the best value so far from the checkpoint (once, before its first comparison)."""
        if self.checkpoint.best_metric is not None and engine.state.best_metric_epoch == -1:
            engine.state.best_metric = self.checkpoint.best_metric
            engine.state.best_metric_epoch = self.checkpoint.best_epoch

    def __call__(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        if engine.state.best_metric_epoch == epoch and self.checkpoint.best_epoch != epoch:
            self.checkpoint.save_best(engine.state.best_metric, epoch)


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


class EMAWeights:
    """An exponential moving average of a network's weights, the weights a diffusion model samples with.

    After every optimizer step (``Events.ITERATION_COMPLETED``) each parameter of the average moves toward the
    network's: ``ema <- d * ema + (1 - d) * w``, with ``d = min(decay, (1 + n) / (10 + n))`` at the n-th iteration (the
    warm-up of TensorFlow's ``ExponentialMovingAverage(num_updates=...)``, so a short training averages over its
    recent iterations instead of staying near the initial weights); buffers are copied. Guided diffusion, CIMD and
    the seeds built on them sample from such an average with ``decay`` 0.9999.

    Put it in ``train#handlers`` and in the `TrainingCheckpoint`'s ``save_dict`` under its ``final_key``: the final and
    best weights are then the average, and the resumable checkpoint keeps the average beside the raw network. Give
    the validation evaluator ``$@ema.model``. With ``decay`` 0 there is no average: `model` is the network itself.

    Args:
        network: the trained network (a DistributedDataParallel wrapper is looked through).
        decay: the largest decay; 0 disables averaging (option ``--ema_decay``).
    """

    def __init__(self, network: torch.nn.Module, decay: float = 0.9999) -> None:
        self.decay = parse("ema_decay", decay)
        self.network = _unwrap(network)
        if self.decay > 0:
            self.model = copy.deepcopy(self.network).requires_grad_(False)
        else:
            self.model = self.network

    def attach(self, engine: Engine) -> None:
        """Update the average after every iteration."""
        if self.decay > 0:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    @torch.no_grad()
    def __call__(self, engine: Engine) -> None:
        n = engine.state.iteration
        decay = min(self.decay, (1 + n) / (10 + n))
        average, current = list(self.model.parameters()), list(self.network.parameters())
        torch._foreach_lerp_(average, current, 1.0 - decay)
        for mine, theirs in zip(self.model.buffers(), self.network.buffers()):
            mine.copy_(theirs)

    def state_dict(self) -> dict[str, Any]:
        """The averaged network's state dict (the same keys as the network's)."""
        return self.model.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the average (from a checkpoint written by `TrainingCheckpoint`)."""
        self.model.load_state_dict(state)


class TrainedWeightsLoader(CheckpointLoader):
    """MONAI's `CheckpointLoader` for meddiff weights: settings checked, ``weights_only=True``, one-line errors.

    At ``Events.STARTED`` it loads `load_path` into `network` through `meddiff.io.load_trained_weights`, which first
    compares `settings` with those stored beside the weights (``model.json``) and names the flags that select the
    trained ones when they differ.

    Args:
        load_path: the weights file (``models/model.pt``).
        network: the network to load into.
        settings: the settings this run builds the network with.
    """

    def __init__(self, load_path: str, network: torch.nn.Module, settings: dict | None = None) -> None:
        super().__init__(load_path=load_path, load_dict={"model": network}, map_location="cpu")
        self.network, self.settings = network, dict(settings or {})

    def __call__(self, engine: Engine) -> None:
        from meddiff.io import load_trained_weights

        load_trained_weights(self.network, self.load_path, self.settings)
