"""Generated image + mask pairs: which real targets a cluster's model generates from, and how the pairs are written.

Conventions:
- a target is a real training pair of the cluster (the full model: of every cluster); the generated pair keeps the
  target's background and puts a new polyp with its own mask inside the target's dilated polyp region;
- `pair_targets` lists ``samples_per_image`` x ``num_targets`` items (``num_targets`` None: every image of the
  cluster once). ``target_selection="cycle"`` takes target ``files[it % len(files)]`` at iteration ``it`` as the
  seed code does (deterministic); ``"random"`` draws each target with a ``numpy`` generator seeded by ``seed``. Item
  ``it`` is sampled with seed ``seed + it`` and named ``<target>_<k>`` (k: the k-th sample of that target);
- `PairWriter` writes ``images/<name>.png`` (RGB), ``masks/<name>.png`` (0/255), ``records/<name>.json`` (cluster,
  target files, seed, settings and provenance), ``grid.png`` (target, target mask, generated image, generated mask)
  and the manifest ``generation.json``, all together when the run finished (`meddiff.writers.StagedWriter`); the
  generated tensor is (4, S, S) in [-1, 1]: RGB, then the mask channel (> 0 is polyp).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from meddiff.data.errors import DataError
from meddiff.data.inference import as_numpy
from meddiff.io import save_json, save_png, to_uint8
from meddiff.options import parse
from meddiff.visualize import save_grid, to_rgb_tile
from meddiff.writers import ItemWriter

__all__ = ["GRID_COLUMNS", "PairWriter", "pair_targets"]

GRID_COLUMNS = ("target", "target mask", "generated image", "generated mask")


def pair_targets(
    items: Sequence[dict],
    samples_per_image: int = 1,
    num_targets: int | None = None,
    target_selection: str = "cycle",
    seed: int = 0,
    cluster_index: int | None = None,
) -> list[dict]:
    """The generation datalist of one model: one entry per generated pair (see the module docstring).

    Args:
        items: the model's real training pairs (``name``, ``image``, ``label``), in datalist order.
        samples_per_image: pairs generated per target (the seed's ``-spi``).
        num_targets: targets to generate from (None: every item once).
        target_selection: "cycle" (the seed's deterministic ``files[it % len]``) or "random" (seeded).
        seed: the run's seed; item ``it`` is sampled with ``seed + it``.
        cluster_index: the model's cluster, recorded with each pair (None: the full model).
    """
    samples = parse("samples_per_image", samples_per_image)
    count = parse("num_targets", num_targets)
    selection, seed = parse("target_selection", target_selection), parse("seed", seed)
    files = list(items)
    if not files:
        raise ValueError("pair_targets needs at least one target pair.")
    count = len(files) if count is None else count
    total = count * samples
    if selection == "cycle":
        order = [files[it % len(files)] for it in range(total)]
    else:
        picks = np.random.default_rng(seed).integers(0, len(files), size=count)
        order = [files[int(i)] for i in picks for _ in range(samples)]
    seen: dict[str, int] = {}
    out = []
    for it, target in enumerate(order):
        k = seen[target["name"]] = seen.get(target["name"], -1) + 1
        out.append(
            {
                "name": f"{target['name']}_{k}",
                "target": target["name"],
                "image": target["image"],
                "label": target["label"],
                "cluster": -1 if cluster_index is None else int(cluster_index),
                "seed": seed + it,
            }
        )
    return out


class PairWriter(ItemWriter):
    """Write the generated pairs as the evaluator produces them (an evaluator handler; module docstring).

    Args:
        datalist: the evaluator's items (`pair_targets`).
        output_dir: where the pairs go.
        settings: the generation settings recorded with each pair.
        overwrite: replace existing outputs.
        grid_size: rows of the preview grid.
        provenance: the record (`meddiff.provenance.make_provenance`) every image carries, with the pair's seed
            (None: no record).
    """

    def _files(self, name: str) -> tuple[Path, Path, Path]:
        out = self.output_dir
        return out / "images" / f"{name}.png", out / "masks" / f"{name}.png", out / "records" / f"{name}.json"

    def targets(self) -> tuple[list[Path], list]:  # noqa: D102
        if not self.items:
            raise DataError(
                "no target pairs to generate from: pass --dataset_dir (a Kvasir-SEG folder with images/ and masks/, "
                "or HyperKvasir's segmented-images/)."
            )
        files = [path for name in self.items for path in self._files(name)]
        sources = list(
            dict.fromkeys(Path(item[key]).parent for item in self.items.values() for key in ("image", "label"))
        )
        return [*files, self.output_dir / "grid.png"], sources

    def write(self, engine: Any, item: dict, output: dict) -> None:  # noqa: D102
        name = item["name"]
        entry = self.items[name]
        pred = np.asarray(as_numpy(output["pred"]), dtype=np.float32)  # (4, S, S) in [-1, 1]
        image_file, mask_file, record_file = self._files(name)
        rgb = np.moveaxis(to_uint8(pred[:3]), 0, -1)
        mask = np.where(pred[3] > 0, 255, 0).astype(np.uint8)
        record = None if self.provenance is None else dict(self.provenance, seed=int(entry["seed"]))
        save_png(rgb, self.path(image_file), provenance=record)
        save_png(mask, self.path(mask_file), provenance=record)
        save_json(
            {
                "name": name,
                "cluster": None if entry["cluster"] < 0 else entry["cluster"],
                "target": entry["target"],
                "target_image": str(entry["image"]),
                "target_mask": str(entry["label"]),
                "seed": int(entry["seed"]),
                "image": image_file.relative_to(self.output_dir).as_posix(),
                "mask": mask_file.relative_to(self.output_dir).as_posix(),
                "mask_fraction": float((mask > 0).mean()),
                "settings": self.settings,
                "provenance": record,
            },
            self.path(record_file),
        )
        self.written.append(name)
        if len(self.rows) < self.grid_size:
            target = np.asarray(as_numpy(item["image"]), dtype=np.float32)  # (4, S, S): the target and its mask
            self.rows.append(
                [to_rgb_tile(target[:3]), to_rgb_tile(target[3:4]), to_rgb_tile(pred[:3]), to_rgb_tile(pred[3:4])]
            )

    def finish(self, engine: Any) -> dict:  # noqa: D102
        save_grid(
            self.rows, self.path(self.output_dir / "grid.png"), column_labels=GRID_COLUMNS, provenance=self.provenance
        )
        pairs = [
            {"name": n, "image": f"images/{n}.png", "mask": f"masks/{n}.png", "record": f"records/{n}.json"}
            for n in self.written
        ]
        save_json(
            {"kind": "pairs", "pairs": pairs, "settings": self.settings}, self.path(self.output_dir / "generation.json")
        )
        return {"output_dir": str(self.output_dir), "pairs": len(pairs)}
