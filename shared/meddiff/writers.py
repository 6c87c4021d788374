"""The base of the bundles' output writers: an ignite handler that writes an evaluator's results all-or-nothing.

Inference runs as MONAI does it (``dataset`` -> ``SupervisedEvaluator`` with ``preprocessing``, the sampling
``inferer`` and ``postprocessing``); a `StagedWriter` in the evaluator's handlers then writes each item's files as
its iteration completes, into a `meddiff.io.StagedOutput`:

- ``Events.STARTED`` checks every output path (`targets`) before any sampling (nothing existing is replaced unless
  ``overwrite``; outputs may not overlap the inputs) and opens the staging folder;
- ``ITERATION_COMPLETED`` calls `write` for every item of the batch (its decollated batch entry and postprocessed
  output);
- ``COMPLETED`` calls `finish` (grids, records, the manifest) and moves everything into place, the manifest last;
- an exception removes the staging folder and is raised again, so a failed run changes nothing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events

from meddiff.io import StagedOutput
from meddiff.options import parse

__all__ = ["ItemWriter", "StagedWriter"]


class StagedWriter:
    """Write an evaluator's outputs all-or-nothing; subclasses implement `write` and `finish`.

    Args:
        output_dir: the run's output folder.
        overwrite: replace existing outputs.
        manifest: the run's manifest, moved into place last.
    """

    def __init__(
        self, output_dir: str | os.PathLike, overwrite: bool = False, manifest: str | os.PathLike | None = None
    ) -> None:
        self.output_dir, self.overwrite, self.manifest = output_dir, overwrite, manifest
        self.stage: StagedOutput | None = None
        self.result: Any = None

    def attach(self, engine: Engine) -> None:
        """Register on `engine` (MONAI calls this for every entry of ``val_handlers``)."""
        engine.add_event_handler(Events.STARTED, self._open)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._write_batch)
        engine.add_event_handler(Events.COMPLETED, self._close)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._abort)

    def _open(self, engine: Engine) -> None:
        self.reset()
        targets, inputs = self.targets()
        self.stage = StagedOutput(self.output_dir, targets, inputs, self.overwrite, self.manifest)
        self.stage.__enter__()

    def _write_batch(self, engine: Engine) -> None:
        batch, output = engine.state.batch, engine.state.output
        if isinstance(batch, dict) or isinstance(output, dict):
            raise RuntimeError(f"{type(self).__name__} needs decollated outputs: give the evaluator a postprocessing.")
        for item, out in zip(batch, output):
            self.write(engine, item, out)

    def _close(self, engine: Engine) -> None:
        self.result = self.finish(engine)
        self.stage.__exit__(None, None, None)

    def _abort(self, engine: Engine, err: BaseException) -> None:
        if self.stage is not None and self.stage.staging is not None:
            self.stage.__exit__(type(err), err, err.__traceback__)
        raise err

    def path(self, target: str | os.PathLike) -> os.PathLike:
        """Where the final file `target` is written during the run."""
        return self.stage.path(target)

    def reset(self) -> None:
        """Forget what an earlier run of the same evaluator collected (called when a run starts)."""
        self.result = None

    def targets(self) -> tuple[list[os.PathLike], list[os.PathLike | None]]:
        """Every file the run may write, and the files and folders it reads (outputs may not overlap them)."""
        raise NotImplementedError

    def write(self, engine: Engine, item: dict, output: dict) -> None:
        """Write one item's outputs (`item`: its decollated batch entry, `output`: its postprocessed output)."""
        raise NotImplementedError

    def finish(self, engine: Engine) -> Any:
        """Write what needs every item (grids, records, the manifest); the return value becomes `result`."""
        raise NotImplementedError


class ItemWriter(StagedWriter):
    """A `StagedWriter` for generation datalists: one entry per generated item, a preview grid, ``generation.json``.

    Keeps the datalist by ``name`` (`items`), the settings and provenance recorded with every item, the preview rows
    (`rows`, at most `grid_size`) and the names written so far (`written`); subclasses implement `targets`, `write`
    and `finish`.

    Args:
        datalist: the evaluator's items, each with a unique "name".
        output_dir: where the outputs go; the manifest is ``<output_dir>/generation.json``.
        settings: the generation settings recorded with each item.
        overwrite: replace existing outputs.
        grid_size: rows of the preview grid.
        provenance: the record (`meddiff.provenance.make_provenance`) every image carries (None: no record).
    """

    def __init__(
        self,
        datalist: Sequence[dict],
        output_dir: str | os.PathLike,
        settings: dict | None = None,
        overwrite: bool = False,
        grid_size: int = 8,
        provenance: dict | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        super().__init__(self.output_dir, parse("overwrite", overwrite), self.output_dir / "generation.json")
        self.items = {item["name"]: item for item in datalist}
        self.settings, self.grid_size, self.provenance = dict(settings or {}), int(grid_size), provenance
        self.rows: list[list[Any]] = []
        self.written: list[str] = []

    def reset(self) -> None:  # noqa: D102
        super().reset()
        self.rows, self.written = [], []
