"""Writers for everything the bundles produce (JSON, PNG, NIfTI, torch weights), and how a run's outputs appear.

Conventions:
- every file is written atomically: to a temporary file beside it named
  ``.<name>.meddiff-tmp-<host>-<pid>-<random>.tmp<suffix>``, then renamed onto it. The first atomic write of a
  process into a folder removes the temporary files that dead processes of this host left there (a run killed
  mid-write), so they never pile up; those of live processes, or of other hosts, are left alone.
- a run that writes several files stages them (`StagedOutput`): every final path is checked before any work (existing
  files are refused unless ``overwrite``; an output folder inside an input folder, or an output path that is, holds or
  lies inside an input, is refused; so is an output folder that cannot be written); the files are written into
  ``<output_dir>/.meddiff.staging-<host>-<pid>-<random>/``, the manifest last, and moved onto their final paths only
  when the run finished. A run that fails or is interrupted leaves the output folder as it was; a staging folder left
  by a dead process of this host is removed by the next run into that folder (never reused).
- trained weights are a plain state dict ``<name>.pt``; beside it ``<name>.json`` holds ``{"settings": {...},
  "meddiff_version": ...}``, the settings the network was built and trained with. `load_trained_weights` compares
  the settings of a run with them and refuses every mismatch in one message.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import torch

from meddiff.errors import UserError

__all__ = [
    "OutputExistsError",
    "StagedOutput",
    "atomic_write",
    "check_new_output",
    "check_writable",
    "clean_stale_temporaries",
    "load_torch",
    "load_trained_weights",
    "make_staging_dir",
    "remove_stale_staging",
    "save_json",
    "save_png",
    "save_torch",
    "save_trained_weights",
    "settings_file",
    "settings_mismatch",
    "trained_setting",
    "trained_settings",
]

_HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"
_TMP_TAG = "meddiff-tmp"
_TMP_NAME = re.compile(rf"^\..*\.{_TMP_TAG}-(?P<host>.+)-(?P<pid>\d+)-[a-z0-9_]+\.tmp")
_STAGING_NAME = re.compile(r"^\.(?P<label>.+)\.staging-(?P<host>.+)-(?P<pid>\d+)-[a-z0-9_]+$")
_cleaned_folders: set[str] = set()


class OutputExistsError(UserError, FileExistsError):
    """Raised when a write would replace a file that already exists."""


def check_new_output(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Return `path` as a Path, raising `OutputExistsError` if it exists and `overwrite` is False."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(
            f"{path} already exists and would be overwritten. Choose another output_dir, remove the file, "
            "or pass overwrite=True (--overwrite true) to replace it."
        )
    return path


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _left_by_dead_process(match: re.Match | None) -> bool:
    return match is not None and match["host"] == _HOST and not _pid_alive(int(match["pid"]))


def _left_by_dead_processes(folder: str | os.PathLike, pattern: re.Pattern) -> list[tuple[os.DirEntry, re.Match]]:
    """The entries of `folder` whose names match `pattern` and carry the pid of a dead process of this host."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    found = [(entry, pattern.match(entry.name)) for entry in entries]
    return [(entry, match) for entry, match in found if _left_by_dead_process(match)]


def clean_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the atomic-write temporaries that dead processes of this host left in `folder`; return them."""
    removed = []
    for entry, _ in _left_by_dead_processes(folder, _TMP_NAME):
        if entry.is_file(follow_symlinks=False):
            try:
                os.remove(entry.path)
                removed.append(Path(entry.path))
            except FileNotFoundError:
                pass
    return removed


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any], overwrite: bool = True) -> Path:
    """Call `write(tmp_path)` on a temporary file beside `path`, then rename it onto `path` in one step."""
    path = check_new_output(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = os.path.realpath(path.parent)
    if folder not in _cleaned_folders:
        clean_stale_temporaries(folder)
        _cleaned_folders.add(folder)
    suffix = "".join(path.suffixes)  # keep e.g. ".nii.gz" so writers pick the right format
    prefix = f".{path.name}.{_TMP_TAG}-{_HOST}-{os.getpid()}-"
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_json(obj: Any, path: str | os.PathLike, overwrite: bool = True) -> Path:
    """Write `obj` as indented JSON atomically."""

    def _write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
            f.write("\n")

    return atomic_write(path, _write, overwrite)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj)} to JSON")


def to_uint8(image: np.ndarray | torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """Map an array from `value_range` to uint8 0..255, clipping outside values."""
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().numpy()
    lo, hi = value_range
    scaled = (np.asarray(image, dtype=np.float32) - lo) / (hi - lo)
    return (np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def save_png(
    array: np.ndarray, path: str | os.PathLike, overwrite: bool = False, *, provenance: Mapping[str, Any] | None = None
) -> Path:
    """Write a (H,W), (H,W,3) or channel-first (C,H,W) uint8 array as PNG atomically.

    A `provenance` record (`meddiff.provenance.make_provenance`) is stored as an iTXt chunk ``meddiff:provenance``.
    """
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    array = np.asarray(array)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype != np.uint8:
        raise ValueError(f"save_png expects uint8, got {array.dtype} for {path}")
    info = None
    if provenance is not None:
        from meddiff.provenance import PNG_KEY, provenance_json

        info = PngInfo()
        info.add_itxt(PNG_KEY, provenance_json(provenance))
    return atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG", pnginfo=info), overwrite)


def save_torch(obj: Any, path: str | os.PathLike) -> Path:
    """`torch.save` atomically (a crash never leaves a truncated checkpoint)."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp), overwrite=True)


def load_torch(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load a checkpoint with `weights_only=True` (no pickled code is ever executed)."""
    return torch.load(path, map_location=map_location, weights_only=True)


# ---------------------------------------------------------------- staged, all-or-nothing outputs


def remove_stale_staging(parent: str | os.PathLike, label: str) -> list[Path]:
    """Remove the ``.<label>.staging-*`` folders in `parent` that dead processes of this host left; return them."""
    removed = []
    for entry, match in _left_by_dead_processes(parent, _STAGING_NAME):
        if match["label"] == label and entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed


def make_staging_dir(parent: str | os.PathLike, label: str) -> Path:
    """A new ``<parent>/.<label>.staging-<host>-<pid>-<random>/`` folder, after removing stale ones of `label`."""
    remove_stale_staging(parent, label)
    return Path(tempfile.mkdtemp(prefix=f".{label}.staging-{_HOST}-{os.getpid()}-", dir=parent))


def _overlap(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def _missing_parents(folder: Path) -> list[Path]:
    """`folder` and its ancestors that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_empty(folders: list[Path]) -> None:
    """Remove `folders` (deepest first) while they are empty: the ones a run created and left nothing in."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            break


def check_writable(folder: str | os.PathLike, what: str = "output folder") -> None:
    """Refuse a folder that cannot be created or written (it, or its nearest existing ancestor, is checked)."""
    folder = Path(folder)
    missing = _missing_parents(folder)
    existing = missing[-1].parent if missing else folder
    if not existing.is_dir():
        raise UserError(f"{what} {folder} cannot be created: {existing} is a file. Choose another --output_dir.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what} {folder} is not writable ({existing} refuses writes): choose another --output_dir.")


class StagedOutput:
    """Write a run's files all-or-nothing: checked before any work, staged, moved into place when the run finished.

    Use as a context manager around the work; write each file to ``stage.path(final_path)``. On a clean exit the
    staged files are moved onto their final paths (the manifest last) and the staging folder is removed; on any
    exception (KeyboardInterrupt included) the staging folder is removed and nothing final changes. A commit that
    fails half-way puts back the files it had replaced.

    Args:
        output_dir: the run's output folder; the staging folder is created inside it.
        targets: every final path the run may write (files it then does not write are simply not created).
        inputs: the files and folders the run reads; None entries are skipped.
        overwrite: replace existing final files; without it, any existing one refuses the run.
        manifest: the final path of the run's manifest (one of `targets` or not), moved into place last.
    """

    LABEL = "meddiff"

    def __init__(
        self,
        output_dir: str | os.PathLike,
        targets: Iterable[str | os.PathLike],
        inputs: Iterable[str | os.PathLike | None] = (),
        overwrite: bool = False,
        manifest: str | os.PathLike | None = None,
    ) -> None:
        self.output_dir = Path(os.path.abspath(output_dir))
        self.manifest = Path(os.path.abspath(manifest)) if manifest is not None else None
        ordered = [Path(os.path.abspath(t)) for t in targets]
        ordered = [t for t in ordered if t != self.manifest] + ([self.manifest] if self.manifest else [])
        self.targets = list(dict.fromkeys(ordered))
        self.overwrite = overwrite
        self.staging: Path | None = None
        self._created: list[Path] = []
        self._check(inputs)
        self._staged = {target: self._relative(i, target) for i, target in enumerate(self.targets)}

    def _relative(self, index: int, target: Path) -> Path:
        if target.is_relative_to(self.output_dir):
            return target.relative_to(self.output_dir)
        return Path(".outside") / str(index) / target.name

    def _check(self, inputs: Iterable[str | os.PathLike | None]) -> None:
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise UserError(f"output folder {self.output_dir} is a file: choose another --output_dir.")
        real_out = self.output_dir.resolve()
        real_targets = [t.resolve() for t in self.targets]
        for given in (Path(p) for p in inputs if p is not None):
            real = given.resolve()
            if real_out == real or real_out.is_relative_to(real):
                raise UserError(
                    f"output folder {self.output_dir} is inside the input {given}: choose an --output_dir outside it."
                )
            clash = next((t for t, r in zip(self.targets, real_targets) if _overlap(r, real)), None)
            if clash is not None:
                raise UserError(
                    f"output {clash} would overwrite or hold the input {given}: choose another --output_dir."
                )
        for target in self.targets:
            if target.is_dir():
                raise UserError(f"output {target} is a folder where a file would be written: move it away.")
        existing = [t for t in self.targets if t.exists()]
        if existing and not self.overwrite:
            self._refuse_existing(existing)
        for folder in {self.output_dir, *(t.parent for t in self.targets if not t.is_relative_to(self.output_dir))}:
            check_writable(folder)

    def _refuse_existing(self, existing: list[Path]) -> None:
        others = f" and {len(existing) - 1} other output(s) of this run" if len(existing) > 1 else ""
        raise OutputExistsError(
            f"{existing[0]}{others} already exists in {self.output_dir}: choose another output_dir, move them "
            "away, or pass --overwrite true to replace them."
        )

    def path(self, target: str | os.PathLike) -> Path:
        """Where to write the final file `target` during the run (inside the staging folder)."""
        if self.staging is None:
            raise RuntimeError("StagedOutput.path() is only valid inside `with StagedOutput(...)`.")
        key = Path(os.path.abspath(target))
        if key not in self._staged:
            raise ValueError(f"{target} was not declared as a target of this StagedOutput.")
        staged = self.staging / self._staged[key]
        staged.parent.mkdir(parents=True, exist_ok=True)
        return staged

    def __enter__(self) -> StagedOutput:
        self._created = _missing_parents(self.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.staging = make_staging_dir(self.output_dir, self.LABEL)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if exc_type is None:
                self._commit()
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None
            _remove_empty(self._created)

    def _commit(self) -> None:
        staged = [(self.staging / self._staged[t], t) for t in self.targets]
        moves = [(source, final) for source, final in staged if source.exists()]
        if not self.overwrite:
            existing = [final for _, final in moves if final.exists()]
            if existing:  # another run wrote them meanwhile
                self._refuse_existing(existing)
        backups = self.staging / ".replaced"
        done: list[tuple[Path, Path | None, list[Path]]] = []
        try:
            for k, (staged, final) in enumerate(moves):
                created = _missing_parents(final.parent)
                final.parent.mkdir(parents=True, exist_ok=True)
                backup = None
                if final.exists():
                    backup = backups / str(k)
                    backups.mkdir(exist_ok=True)
                    _keep_copy(final, backup)
                done.append((final, backup, created))
                _move(staged, final)
        except BaseException:
            for final, backup, created in reversed(done):
                if backup is not None:
                    _move(backup, final)
                else:
                    final.unlink(missing_ok=True)
                _remove_empty(created)
            raise
        self._created = []


def _keep_copy(path: Path, backup: Path) -> None:
    """A second name for `path` (a hard link, else a copy) so a failed commit can put it back."""
    try:
        os.link(path, backup)
    except OSError:
        shutil.copy2(path, backup)


def _move(source: Path, target: Path) -> None:
    """Rename `source` onto `target` in one step; across filesystems, copy beside `target` and rename."""
    try:
        os.replace(source, target)
    except OSError as err:
        if err.errno != errno.EXDEV:
            raise
        atomic_write(target, lambda tmp: shutil.copyfile(source, tmp), overwrite=True)
        source.unlink()


# ---------------------------------------------------------------- trained weights and their settings


def settings_file(weights_file: str | os.PathLike) -> Path:
    """The JSON beside a weights file that holds the settings it was trained with (model.pt -> model.json)."""
    return Path(weights_file).with_suffix(".json")


def _normalized(value: Any) -> Any:
    return json.loads(json.dumps(value, default=_json_default))


def save_trained_weights(
    state_dict: Mapping[str, Any], weights_file: str | os.PathLike, settings: Mapping[str, Any] | None = None
) -> Path:
    """Write a state dict and, beside it, its settings JSON; the old JSON goes first so no stale one survives."""
    from meddiff import __version__

    weights_file = Path(weights_file)
    meta = settings_file(weights_file)
    meta.unlink(missing_ok=True)
    save_torch(dict(state_dict), weights_file)
    save_json({"settings": _normalized(dict(settings or {})), "meddiff_version": __version__}, meta)
    return weights_file


def trained_settings(weights_file: str | os.PathLike) -> dict:
    """The settings stored beside `weights_file` (empty when there is no settings JSON)."""
    meta = settings_file(weights_file)
    if not meta.is_file():
        return {}
    try:
        stored = json.loads(meta.read_text())["settings"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(
            f"{meta} is damaged ({type(err).__name__}): delete it to skip the settings check, or train again."
        ) from err
    if not isinstance(stored, dict):
        raise UserError(f"{meta} is damaged (settings is not a mapping): delete it, or train again.")
    return stored


def trained_setting(weights_file: str | os.PathLike, name: str, value: Any = None) -> Any:
    """`value` when given, else the setting `name` stored with the weights; refuses when neither says it."""
    if value is not None:
        return value
    stored = trained_settings(weights_file)
    if stored.get(name) is None:
        raise UserError(
            f"--{name} is not set and {settings_file(weights_file)} does not record it: pass --{name} with the value "
            f"the weights {weights_file} were trained with."
        )
    return stored[name]


def trained_or(weights_file: str | os.PathLike, name: str, default: Any) -> Any:
    """The setting `name` stored with the weights when they record it, else `default`.

    An inference config's architecture keys default to this, so the settings the weights were trained with travel
    with them: a server that reads only ``inference.json`` (MONAI Label) builds the network the weights fit. A value
    given on the command line replaces the expression and is checked against the stored one when the weights load.
    """
    value = trained_settings(weights_file).get(name)
    return default if value is None else value


def _flag_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def settings_mismatch(path: str | os.PathLike, stored: Mapping[str, Any], settings: Mapping[str, Any]) -> str | None:
    """A one-line message listing every setting that differs from the stored one, or None when all agree.

    A setting given as None counts as not set (the run takes the stored value), and is not compared.
    """
    wanted = _normalized({k: v for k, v in settings.items() if v is not None})
    differ = [k for k, v in wanted.items() if k in stored and stored[k] != v]
    if not differ:
        return None
    was = ", ".join(f"{k}={_flag_value(stored[k])}" for k in differ)
    now = ", ".join(f"{k}={_flag_value(wanted[k])}" for k in differ)
    flags = " ".join(f"--{k} {_flag_value(stored[k])}" for k in differ)
    return (
        f"{path} was trained with {was}; this run has {now}: pass {flags} or use the weights trained with these "
        "settings"
    )


def _first_problem(err: BaseException) -> str:
    lines = [" ".join(line.split()) for line in str(err).splitlines() if line.strip()]
    detail = next(
        (line for line in lines if line.lower().startswith(("size mismatch", "missing key", "unexpected"))), ""
    )
    return (detail or (lines[0] if lines else type(err).__name__))[:200]


def load_trained_weights(
    network: torch.nn.Module, weights_file: str | os.PathLike, settings: Mapping[str, Any] | None = None
) -> torch.nn.Module:
    """Load trained weights (``weights_only=True``) into `network` after checking `settings` against the stored ones.

    Raises `UserError` naming the file when it is missing (train first), unreadable, trained with other settings
    (every mismatch listed with the flags that select the trained ones), or shaped for another network.
    """
    path = Path(weights_file)
    if not path.is_file():
        raise UserError(
            f"{path} does not exist: train the bundle first (run `training` with this bundle_root), or point "
            "--bundle_root / --ckpt_dir at trained weights."
        )
    mismatch = settings_mismatch(path, trained_settings(path), settings or {})
    if mismatch:
        raise UserError(mismatch + ".")
    module = getattr(network, "module", network)
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    try:
        state = load_torch(path, map_location=device)
    except Exception as err:
        raise UserError(
            f"{path} cannot be read as weights ({_first_problem(err)}): it is damaged or not a meddiff weights file; "
            "train again or restore it."
        ) from err
    if not isinstance(state, Mapping):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state dict: pass the final weights (model.pt).")
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(
            f"{path} does not fit this network ({_first_problem(err)}): it was trained with other settings (network "
            "channels, num_classes, ...); pass the settings it was trained with."
        ) from err
    return network
