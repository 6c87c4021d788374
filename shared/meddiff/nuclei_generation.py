"""H&E patches generated from nuclei layouts: which structure meets which appearance, and how samples are written.

The nuclei method (methods.md §4.4) generates one image per *structure*: a real patch's instance map gives the
HV and edge channels of the condition, and another real patch, the *appearance source*, gives the pixel-shuffled
colour channels (`meddiff.nuclei.nuclei_condition`). The generated image is labelled by the structure's instance
map, so every sample is an image + instance-map pair for training a nuclei segmenter.

Conventions:
- structures are the model's real training patches (a cluster's, or every patch for the pre-trained model), in
  datalist order; `nuclei_targets` lists ``samples_per_structure`` x ``num_structures`` items (``num_structures``
  None: every structure once). Item ``it`` is sampled with seed ``seed + it`` and named ``<structure>_<k>``. A sweep
  over guidance scales (``guidance_scales``; the seed's synthetic set is the union over s = 1.3 ... 1.6) repeats the
  items once per scale, named ``<structure>_s<scale>_<k>`` and carrying their ``guidance_scale``;
- pairing: ``"match_struct"`` (the seed's ``--match_struct True``) picks the appearance among the 20 structures
  most alike in nuclear area and solidity (`meddiff.nuclei.match_structures`, seeded with ``seed``),
  ``"shuffle"`` (the seed's ``--shuffle_masks``) a seeded random permutation, ``"self"`` the structure's own patch
  (reconstruction, for checking a model);
- the colour shuffle of item ``it`` draws from ``numpy.random.default_rng(seed + it)``, so a condition is the same
  in every run of the same settings;
- `NucleiWriter` writes ``samples/<name>.png`` (the generated RGB image), ``inst_masks/<name>.tif`` (uint16, the
  structure's instance map: the sample's label), ``images/<name>.png`` (the appearance source patch),
  ``cond/<name>.png`` (`meddiff.nuclei.condition_preview`), ``records/<name>.json`` (structure, appearance, seed,
  guidance scale, sampler, provenance), ``grid.png`` (structure, appearance, condition, generated) and the manifest
  ``generation.json``, all together when the run finished (`meddiff.writers.StagedWriter`);
- `read_generated_nuclei` reads such a folder back (the manifest lists the samples).
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform

from meddiff.data.errors import DataError
from meddiff.data.inference import as_numpy
from meddiff.io import atomic_write, save_json, save_png, to_uint8
from meddiff.options import parse
from meddiff.visualize import save_grid, to_rgb_tile
from meddiff.writers import ItemWriter

__all__ = [
    "GRID_COLUMNS",
    "PAIRINGS",
    "LoadStructureAppearanced",
    "NucleiWriter",
    "instance_tile",
    "nuclei_targets",
    "read_generated_nuclei",
]

PAIRINGS = ("match_struct", "shuffle", "self")
GRID_COLUMNS = ("structure", "appearance", "condition", "generated")


def _patch(item: Mapping[str, Any]) -> dict:
    return {key: item[key] for key in ("name", "slide", "image", "annotation", "label", "box") if key in item}


def nuclei_targets(
    items: Sequence[Mapping[str, Any]],
    pairing: str = "match_struct",
    samples_per_structure: int = 1,
    num_structures: int | None = None,
    seed: int = 0,
    cluster_index: int | None = None,
    num_similar: int = 20,
    guidance_scales: Sequence[float] | None = None,
) -> list[dict]:
    """The generation datalist of one model: one entry per generated image (see the module docstring).

    Args:
        items: the model's real training patches (`meddiff.data.monuseg` items), in datalist order.
        pairing: "match_struct", "shuffle" or "self".
        samples_per_structure: images generated per structure.
        num_structures: structures to generate from, the first ones in datalist order (None: all).
        seed: the run's seed; item ``it`` is sampled with ``seed + it``.
        cluster_index: the model's cluster, recorded with each sample (None: the pre-trained model).
        num_similar: how many of the most alike structures "match_struct" chooses the appearance from.
        guidance_scales: a sweep over classifier-free guidance scales (None: the inferer's one scale).
    """
    from meddiff.data.monuseg import read_patch
    from meddiff.nuclei import match_structures, shuffle_structures

    pairing, seed = parse("pairing", pairing), parse("seed", seed)
    samples = parse("samples_per_structure", samples_per_structure)
    count = parse("num_structures", num_structures)
    patches = [_patch(item) for item in items]
    if not patches:
        raise DataError("no structures to generate from: pass --dataset_dir (a MoNuSeg folder) with annotated tiles.")
    if pairing == "self":
        partner = list(range(len(patches)))
    elif len(patches) < 2:
        raise DataError(
            f"pairing {pairing!r} needs at least 2 patches and the model has {len(patches)} ({patches[0]['name']}): "
            "pass --pairing self, or give more tiles."
        )
    elif pairing == "shuffle":
        partner = [int(j) for j in shuffle_structures(len(patches), seed=seed)]
    else:
        maps = [read_patch(p)[1] for p in patches]
        partner = [int(j) for j in match_structures(maps, num_similar=num_similar, seed=seed)]
    chosen = range(len(patches) if count is None else min(count, len(patches)))
    scales = [None] if guidance_scales is None else parse("guidance_scales", guidance_scales)
    out = []
    for scale in scales:
        for i in chosen:
            for k in range(samples):
                tag = "" if scale is None else f"_s{scale:g}"
                item = {
                    "name": f"{patches[i]['name']}{tag}_{k}",
                    "structure": patches[i],
                    "appearance": patches[partner[i]],
                    "cluster": -1 if cluster_index is None else int(cluster_index),
                    "seed": seed + len(out),
                }
                if scale is not None:
                    item["guidance_scale"] = float(scale)
                out.append(item)
    return out


class LoadStructureAppearanced(MapTransform):
    """Read a generation item's structure and appearance patches and build its condition.

    Adds ``label`` (int32 (1, S, S), the structure's instance map), ``appearance`` (float32 (3, S, S) in [-1, 1])
    and ``condition`` (float32 (6, S, S), `meddiff.nuclei.nuclei_condition` with the colour shuffle seeded by the
    item's ``seed``).

    Args:
        keys: the items' structure and appearance keys.
        preserve_nuclei: shuffle nucleus and background colours separately (the seed's ``preserve_nuclei_col``).
        min_size: nuclei smaller than this (pixels) get no HV map, as in training.
    """

    def __init__(
        self,
        keys: Sequence[Hashable] = ("structure", "appearance"),
        preserve_nuclei: bool = False,
        min_size: int = 30,
    ) -> None:
        super().__init__(keys)
        self.preserve_nuclei, self.min_size = bool(preserve_nuclei), int(min_size)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        from meddiff.data.monuseg import read_patch
        from meddiff.nuclei import nuclei_condition

        d = dict(data)
        structure_key, appearance_key = self.keys
        _, inst = read_patch(d[structure_key])
        appearance, appearance_inst = read_patch(d[appearance_key])
        if appearance.shape[1:] != inst.shape:
            raise DataError(
                f"the appearance patch {d[appearance_key]['name']} is {appearance.shape[1:]} and the structure "
                f"{d[structure_key]['name']} {inst.shape}: use one --patch_size for both."
            )
        rng = np.random.default_rng(int(d.get("seed", 0)))
        condition = nuclei_condition(
            inst,
            appearance,
            rng,
            preserve_nuclei=self.preserve_nuclei,
            appearance_inst=appearance_inst,
            min_size=self.min_size,
        )
        d["label"] = torch.as_tensor(inst.astype(np.int32))[None]
        d["appearance"] = torch.as_tensor(appearance, dtype=torch.float32)
        d["condition"] = torch.as_tensor(condition, dtype=torch.float32)
        return d


def instance_tile(inst: np.ndarray) -> np.ndarray:
    """An (H, W, 3) uint8 picture of an instance map: each nucleus in a colour of its own, background black."""
    inst = np.asarray(inst).astype(np.int64)
    rng = np.random.default_rng(0)
    palette = rng.integers(64, 256, size=(max(int(inst.max()), 0) + 1, 3)).astype(np.uint8)
    palette[0] = 0
    return palette[inst]


def _write_tif(array: np.ndarray, path: os.PathLike) -> None:
    from PIL import Image

    def write(tmp: str) -> None:
        Image.fromarray(array.astype(np.uint16)).save(tmp, format="TIFF")

    atomic_write(path, write)


class NucleiWriter(ItemWriter):
    """Write the generated images and their instance maps as the evaluator produces them (module docstring).

    Args:
        datalist: the evaluator's items (`nuclei_targets`).
        output_dir: where the samples go.
        settings: the generation settings recorded with each sample.
        overwrite: replace existing outputs.
        grid_size: rows of the preview grid.
        provenance: the record (`meddiff.provenance.make_provenance`) every image carries, with the sample's seed
            (None: no record).
    """

    def _files(self, name: str) -> dict[str, Path]:
        out = self.output_dir
        return {
            "sample": out / "samples" / f"{name}.png",
            "inst_mask": out / "inst_masks" / f"{name}.tif",
            "appearance_image": out / "images" / f"{name}.png",
            "condition": out / "cond" / f"{name}.png",
            "record": out / "records" / f"{name}.json",
        }

    def targets(self) -> tuple[list[Path], list]:  # noqa: D102
        if not self.items:
            raise DataError(
                "no structures to generate from: pass --dataset_dir (a MoNuSeg folder: Tissue_Images/ with "
                "Annotations/, or <id>.tif beside <id>.xml)."
            )
        files = [path for name in self.items for path in self._files(name).values()]
        sources = {
            Path(patch[key]).parent
            for item in self.items.values()
            for patch in (item["structure"], item["appearance"])
            for key in ("image", "annotation", "label")
            if patch.get(key)
        }
        return [*files, self.output_dir / "grid.png"], sorted(sources)

    def write(self, engine: Any, item: dict, output: dict) -> None:  # noqa: D102
        from meddiff.nuclei import condition_preview

        name = item["name"]
        entry = self.items[name]
        files = self._files(name)
        pred = np.asarray(as_numpy(output["pred"]), dtype=np.float32)  # (3, S, S) in [-1, 1]
        inst = np.asarray(as_numpy(item["label"]))[0].astype(np.uint16)
        appearance = np.asarray(as_numpy(item["appearance"]), dtype=np.float32)
        condition = np.asarray(as_numpy(item["condition"]), dtype=np.float32)
        record = None if self.provenance is None else dict(self.provenance, seed=int(entry["seed"]))
        rgb = np.moveaxis(to_uint8(pred), 0, -1)
        save_png(rgb, self.path(files["sample"]), provenance=record)
        save_png(np.moveaxis(to_uint8(appearance), 0, -1), self.path(files["appearance_image"]), provenance=record)
        preview = condition_preview(condition)
        save_png(preview, self.path(files["condition"]), provenance=record)
        _write_tif(inst, self.path(files["inst_mask"]))
        structure, source = entry["structure"], entry["appearance"]
        save_json(
            {
                "name": name,
                "cluster": None if entry["cluster"] < 0 else entry["cluster"],
                "structure": structure["name"],
                "appearance": source["name"],
                "structure_patch": structure,
                "appearance_patch": source,
                "seed": int(entry["seed"]),
                "guidance_scale": entry.get("guidance_scale", self.settings.get("guidance_scale")),
                "nuclei": int(len(np.unique(inst)) - (1 if (inst == 0).any() else 0)),
                **{key: path.relative_to(self.output_dir).as_posix() for key, path in files.items() if key != "record"},
                "settings": self.settings,
                "provenance": record,
            },
            self.path(files["record"]),
        )
        self.written.append(name)
        if len(self.rows) < self.grid_size:
            self.rows.append([instance_tile(inst), to_rgb_tile(appearance), preview, to_rgb_tile(pred)])

    def finish(self, engine: Any) -> dict:  # noqa: D102
        save_grid(
            self.rows, self.path(self.output_dir / "grid.png"), column_labels=GRID_COLUMNS, provenance=self.provenance
        )
        samples = [
            {k: p.relative_to(self.output_dir).as_posix() for k, p in self._files(n).items()} | {"name": n}
            for n in self.written
        ]
        save_json(
            {"kind": "nuclei", "samples": samples, "settings": self.settings},
            self.path(self.output_dir / "generation.json"),
        )
        return {"output_dir": str(self.output_dir), "samples": len(samples)}


def read_generated_nuclei(generated_dir: str | os.PathLike) -> list[dict]:
    """The samples of a `NucleiWriter` folder: dicts with "name", "sample", "inst_mask", "record" (absolute paths).

    Raises `DataError` naming the folder when it holds no ``generation.json`` of kind "nuclei", or a listed file is
    missing.
    """
    folder = Path(generated_dir)
    manifest = folder / "generation.json"
    if not manifest.is_file():
        raise DataError(f"{manifest} does not exist: run inference.json first, or pass --generated_dir.")
    try:
        record = json.loads(manifest.read_text())
    except ValueError as err:
        raise DataError(f"{manifest} is not valid JSON ({err}): run inference.json again.") from err
    if record.get("kind") != "nuclei":
        raise DataError(f"{manifest} was not written by the nuclei bundle's inference: pass its own output folder.")
    samples = []
    for entry in record.get("samples", []):
        paths = {key: folder / value for key, value in entry.items() if key != "name"}
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            raise DataError(f"{missing[0]} is listed in {manifest} but missing: run inference.json again.")
        samples.append({"name": entry["name"], **{key: str(p) for key, p in paths.items()}})
    return samples
