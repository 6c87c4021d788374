"""Class-guided histology tiles: which classes are generated, and how the samples are written.

HistoDiffusion (methods.md §5.4) samples an unconditional latent diffusion model guided towards one class at a time
by a noise-aware latent classifier, then decodes the latents with the autoencoder. The seed's script generates one
hard-coded class per run; here one run generates every requested class.

Conventions:
- `class_targets` lists ``samples_per_class`` items per requested class, class by class in the classifier's label
  order: ``{"name": "<CLASS>-SYN<k:05d>", "label": <index in classes>, "class_name", "seed": seed + it}`` for item
  ``it`` of the whole list. The sampling inferer receives the labels (`meddiff.engines.SeededPrepareBatch` with
  ``image_name="label"``) and draws a batch's noise from its first item's seed;
- `HistologyWriter` writes ``<output_dir>/<CLASS>/<name>.png`` (RGB uint8, carrying its provenance record), so the
  output folder is itself a class-folder dataset that `meddiff.data.histology.histology_datalist` reads;
  ``grid.png`` (one row per class, the first ``grid_size`` samples of each) and the manifest ``generation.json``:
  ``{"kind": "histology", "settings", "classes", "items": [{"name", "class_name", "label", "file", "seed",
  "guidance_scale"}]}`` with ``file`` relative to the output folder; all together when the run finished
  (`meddiff.writers.StagedWriter`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.utils import convert_to_numpy

from meddiff.errors import OptionError
from meddiff.io import save_json, save_png, to_uint8
from meddiff.options import parse
from meddiff.visualize import save_grid
from meddiff.writers import ItemWriter

__all__ = ["HistologyWriter", "class_targets"]


def _sample_classes(value: Any) -> list[str]:
    from meddiff.data.histology import parse_classes

    try:
        return parse_classes(value)
    except OptionError as err:
        raise OptionError(str(err).replace("--classes", "--sample_classes")) from err


def class_targets(
    classes: Sequence[str], samples_per_class: int, seed: int = 0, sample_classes: Sequence[str] | None = None
) -> list[dict]:
    """The generation datalist: `samples_per_class` items for each of `sample_classes` (None: every class).

    Args:
        classes: the classifier's class names in label order.
        samples_per_class: tiles generated per class.
        seed: the run's seed; item ``it`` carries ``seed + it``.
        sample_classes: the classes to generate, by name (None: all of `classes`).
    """
    classes = [str(c) for c in classes]
    if not classes:
        raise OptionError("no classes to generate: the latent classifier lists none; train it on labelled tiles.")
    count, seed = parse("samples_per_class", samples_per_class), parse("seed", seed)
    wanted = classes if sample_classes is None else _sample_classes(sample_classes)
    unknown = [c for c in wanted if c not in classes]
    if unknown:
        raise OptionError(
            f"--sample_classes {unknown} are not classes of the latent classifier {classes}: pass some of these."
        )
    items = []
    for name in wanted:
        for k in range(count):
            label, item_seed = classes.index(name), seed + len(items)
            items.append({"name": f"{name}-SYN{k:05d}", "label": label, "class_name": name, "seed": item_seed})
    return items


class HistologyWriter(ItemWriter):
    """Write the generated tiles into class folders as the evaluator produces them (module docstring).

    Args:
        datalist: the evaluator's items (`class_targets`).
        output_dir: where the class folders go.
        classes: the class names in label order.
        settings: the generation settings recorded in the manifest.
        overwrite: replace existing outputs.
        grid_size: samples per class in the preview grid.
        provenance: the record (`meddiff.provenance.make_provenance`) every tile carries, with its seed.
    """

    def __init__(
        self,
        datalist: Sequence[dict],
        output_dir: str | os.PathLike,
        classes: Sequence[str],
        settings: dict | None = None,
        overwrite: bool = False,
        grid_size: int = 8,
        provenance: dict | None = None,
    ) -> None:
        super().__init__(datalist, output_dir, settings, overwrite, grid_size, provenance)
        self.classes = [str(c) for c in classes]
        self.tiles: dict[str, list[np.ndarray]] = {}

    def reset(self) -> None:  # noqa: D102
        super().reset()
        self.tiles = {}

    def _file(self, name: str) -> Path:
        return self.output_dir / self.items[name]["class_name"] / f"{name}.png"

    def targets(self) -> tuple[list[Path], list]:  # noqa: D102
        return [*(self._file(name) for name in self.items), self.output_dir / "grid.png"], []

    def write(self, engine: Any, item: dict, output: dict) -> None:  # noqa: D102
        name = str(item["name"])
        entry = self.items[name]
        rgb = np.moveaxis(to_uint8(np.asarray(convert_to_numpy(output["pred"]), dtype=np.float32)), 0, -1)
        record = None if self.provenance is None else dict(self.provenance, seed=int(entry["seed"]))
        save_png(rgb, self.path(self._file(name)), provenance=record)
        self.written.append(name)
        tiles = self.tiles.setdefault(entry["class_name"], [])
        if len(tiles) < self.grid_size:
            tiles.append(rgb)

    def finish(self, engine: Any) -> dict:  # noqa: D102
        rows = [self.tiles[c] for c in self.classes if c in self.tiles]
        if rows:
            save_grid(rows, self.path(self.output_dir / "grid.png"), provenance=self.provenance)
        scale = self.settings.get("guidance_scale")
        items = [
            {
                "name": name,
                "class_name": self.items[name]["class_name"],
                "label": int(self.items[name]["label"]),
                "file": self._file(name).relative_to(self.output_dir).as_posix(),
                "seed": int(self.items[name]["seed"]),
                "guidance_scale": scale,
            }
            for name in self.written
        ]
        manifest = {"kind": "histology", "settings": self.settings, "classes": self.classes, "items": items}
        save_json(manifest, self.path(self.output_dir / "generation.json"))
        return {"output_dir": str(self.output_dir), "samples": len(items)}
