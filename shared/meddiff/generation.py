"""Generate images from masks: PNG mask folders or NIfTI label volumes in, image+mask pairs out.

Besides the pairs, every run writes ``generated_slices.npz``, the exact record evaluation scores (the PNGs and
volumes are resampled to the mask's size and, for PNGs, rounded to 8 bits; the record is what the sampler returned):

- ``images`` (N, C, S, S) float32 in [-1, 1] at the model's ``img_size`` S, in sampling order: PNG masks in file
  order, then volumes slice by slice (every slice, empty ones included, so the written volumes are whole);
- ``labels`` (N, S, S) uint8, the conditioning label slices at S (nearest neighbour), every class present, the
  ablated ones included;
- ``foreground_fraction`` (N,) of each conditioning slice at its own resolution (the quantity the slice rule of
  `meddiff.data.slices.volume_to_slices` tests), ``names`` (``<stem>`` for PNG masks, ``<stem>_z<zzz>`` for volume
  slices, as `meddiff.data.load_slices` names real slices), ``label_files`` (the source mask or label volume) and
  ``z`` (the slice index; -1 for a 2D mask);
- ``ablated_classes``, ``diversity_index`` (K,) (indices of the masks sampled several times) and
  ``diversity_images`` (K, M, C, S, S) (their M samples each).

Slice rule (`kept_by_slice_rule`), the one real slices follow: a volume slice counts when its foreground fraction
is strictly above ``min_foreground_fraction``; every 2D mask counts.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from meddiff.data.errors import DataError
from meddiff.data.inference import as_numpy
from meddiff.data.layouts import (
    IMAGE_SUFFIXES,
    VOLUME_SUFFIXES,
    check_label,
    detect_layout,
    dicom_pairs,
    file_stem,
    list_files,
    msd_split_folders,
    read_png_mask,
)
from meddiff.data.slices import foreground_fraction
from meddiff.data.transforms import encode_mask
from meddiff.dicom import write_like
from meddiff.io import atomic_write, save_json, save_png
from meddiff.options import check, parse
from meddiff.visualize import label_to_rgb, save_grid, to_rgb_tile
from meddiff.writers import StagedWriter

__all__ = ["RECORD_NAME", "GenerationWriter", "find_condition_masks", "generation_datalist", "kept_by_slice_rule"]

GRID_COLUMNS = ("mask", "generated")
RECORD_NAME = "generated_slices.npz"
# far above any slice index, so per-mask samples never reuse a seed of the main run
DIVERSITY_SEED_OFFSET = 2**31


def kept_by_slice_rule(z: np.ndarray, fraction: np.ndarray, min_foreground_fraction: float) -> np.ndarray:
    """Which slices count (bool array): 2D masks (``z`` < 0) always, volume slices with foreground fraction above."""
    return (np.asarray(z) < 0) | (np.asarray(fraction) > min_foreground_fraction)


def find_condition_masks(
    mask_dir: str | None = None, dataset_dir: str | None = None, seg_dir: str | None = None, split: str = "test"
) -> tuple[str, list[Path], dict[Path, dict]]:
    """Return ("png", mask files, {}) or ("volume", label volumes, cases) from the first input given.

    `cases` maps each label of a DICOM-layout dataset to its pair (``name``: the case, ``image``: its series
    folder); it is empty for the other layouts.
    """
    if mask_dir:
        folder = Path(mask_dir)
    elif seg_dir:
        folder = Path(seg_dir) / "all" / split
    elif dataset_dir and detect_layout(dataset_dir) == "dicom":
        cases = {Path(pair["label"]): pair for pair in dicom_pairs(Path(dataset_dir), split)}
        return "volume", list(cases), cases
    elif dataset_dir:
        return "volume", list_files(msd_split_folders(dataset_dir, split)[1], VOLUME_SUFFIXES), {}
    else:
        raise DataError("No masks given: pass --mask_dir (PNG masks) or --dataset_dir holding labelsTs/ volumes.")
    if not folder.is_dir():
        raise DataError(f"mask folder {folder} does not exist: pass --mask_dir or a dataset_dir with labelsTs/.")
    volumes = list_files(folder, VOLUME_SUFFIXES)
    return ("volume", volumes, {}) if volumes else ("png", list_files(folder, IMAGE_SUFFIXES), {})


def generation_datalist(
    mask_dir: str | None = None,
    dataset_dir: str | None = None,
    seg_dir: str | None = None,
    split: str = "test",
    num_classes: int | None = None,
    seed: int = 0,
    max_items: int | None = None,
) -> list[dict]:
    """The inference dataset's items: one per PNG mask or label volume, every one read and checked first.

    Each is ``{"image": the mask's file, "name": its stem, "seed": ...}``; in the DICOM layout (``<case>/image/``
    + ``<case>/label.nii.gz``) the name is the case and ``"series"`` its DICOM series folder. PNG mask i is seeded
    ``seed + i`` (with ``batch_size`` masks per batch, the batch starting at mask i is sampled with ``seed + i``); a
    volume is seeded ``seed``, and its batch of slices starting at slice z with ``seed + z`` (see
    `meddiff.inferers.ConditionedSamplingInferer`).
    """
    num_classes = parse("num_classes", num_classes)
    check(
        num_classes is not None,
        "--num_classes must be set to generate: the label classes the model was trained with, background included.",
    )
    kind, inputs, cases = find_condition_masks(mask_dir, dataset_dir, seg_dir, split)
    if not inputs:
        raise DataError("no masks found to generate from: check --mask_dir / --dataset_dir.")
    inputs = inputs[: parse("max_items", max_items)] if max_items else inputs
    unreadable = [p for p in inputs if p.name.lower().endswith((".mha", ".mhd"))]
    if unreadable:
        raise DataError(f"{unreadable[0]}: MetaImage label volumes are not read here; save it as .nii.gz or .nrrd.")
    for path in inputs:  # every label is read and checked before the first image is generated
        if kind == "png":
            check_label(read_png_mask(str(path)), num_classes, str(path))
        else:
            _read_label_volume(path, num_classes)
    seed = parse("seed", seed)
    items = [
        {"image": str(p), "name": file_stem(p), "seed": seed + i if kind == "png" else seed}
        for i, p in enumerate(inputs)
    ]
    for item, path in zip(items, inputs):  # the DICOM layout's labels lie on their case's series
        if path in cases:
            item["name"], item["series"] = cases[path]["name"], cases[path]["image"]
    return items


def _read_label_volume(path: Path, num_classes: int) -> tuple:
    import SimpleITK as sitk

    from meddiff.dicom import read_volume

    reference = read_volume(path)
    label = sitk.GetArrayFromImage(reference)
    if label.ndim != 3:
        raise DataError(f"label volume {path} has {label.ndim} dimensions: expected a 3D label map.")
    return reference, check_label(label, num_classes, str(path))


class GenerationWriter(StagedWriter):
    """Write the generated image+mask pairs as the evaluator produces them (an evaluator handler).

    PNG masks give ``output_dir/images/<name>.png`` and ``output_dir/masks/<name>.png``; label volumes give
    ``output_dir/imagesTs/<case>.nii.gz`` (generated slice by slice, written with the label's geometry, in [0, 1])
    and ``output_dir/labelsTs/<case>.nii.gz``; both give ``output_dir/grid.png``, the record
    ``generated_slices.npz`` and the manifest ``output_dir/generation.json`` (outputs relative to `output_dir`). The
    outputs appear all together when the run finished (`meddiff.writers.StagedWriter`).

    Args:
        datalist: the evaluator's items (`generation_datalist`).
        output_dir: where the pairs go.
        num_classes: label classes the network was trained with, background included.
        img_size: the network's square input size.
        inputs: the input folders (outputs may not overlap them).
        ablated_classes: classes left out of the condition.
        batch_size: masks sampled at once for the diversity samples.
        seed: the run's seed; the batch starting at sample j of diversity mask k uses
            ``seed + 2**31 + k * samples_per_mask + j``.
        overwrite: replace existing outputs.
        grid_size: rows of the preview grid.
        diversity_masks: K masks, evenly spaced over those the slice rule keeps, are each sampled
            `samples_per_mask` more times for per-mask diversity (0: none).
        samples_per_mask: samples per diversity mask (at least 2).
        min_foreground_fraction: the slice rule's threshold, used here to choose the diversity masks.
        provenance: the record (`meddiff.provenance.make_provenance`) every generated file carries, with the item's
            seed (None: no record).
    """

    def __init__(
        self,
        datalist: Sequence[dict],
        output_dir: str,
        num_classes: int,
        img_size: int,
        inputs: Sequence[str | None] = (),
        ablated_classes: Sequence[int] = (),
        batch_size: int = 8,
        seed: int = 0,
        overwrite: bool = False,
        grid_size: int = 8,
        diversity_masks: int = 0,
        samples_per_mask: int = 4,
        min_foreground_fraction: float = 0.0,
        provenance: dict | None = None,
    ) -> None:
        self.output_dir, self.provenance = Path(output_dir), provenance
        self.series = {item["name"]: item["series"] for item in datalist if item.get("series")}
        super().__init__(self.output_dir, parse("overwrite", overwrite), self.output_dir / "generation.json")
        self.files = {item["name"]: Path(item["image"]) for item in datalist}
        self.kind = "png" if all(p.name.lower().endswith(IMAGE_SUFFIXES) for p in self.files.values()) else "volume"
        self.num_classes, self.img_size = parse("num_classes", num_classes), parse("img_size", img_size)
        self.inputs = list(inputs)
        self.ablated_classes = tuple(parse("ablated_classes", list(ablated_classes)))
        bad = [k for k in self.ablated_classes if not 1 <= k < self.num_classes]
        check(not bad, f"--ablated_classes {bad} are not foreground classes: choose among 1..{self.num_classes - 1}.")
        self.batch_size, self.seed = parse("batch_size", batch_size), parse("seed", seed)
        self.grid_size = grid_size
        self.diversity_masks = parse("diversity_masks", diversity_masks)
        self.samples_per_mask = parse("samples_per_mask", samples_per_mask)
        self.min_foreground_fraction = parse("min_foreground_fraction", min_foreground_fraction)
        self.parts: list[dict] = []
        self.rows: list[list[np.ndarray]] = []

    def reset(self) -> None:  # noqa: D102
        super().reset()
        self.parts, self.rows = [], []

    def _outputs(self, name: str) -> tuple[Path, Path]:
        source = self.files[name]
        if self.kind == "png":
            return self.output_dir / "images" / f"{name}.png", self.output_dir / "masks" / f"{name}.png"
        named = name + source.name[len(file_stem(source)) :]  # the case's name (DICOM layout) with the file's suffix
        return self.output_dir / "imagesTs" / named, self.output_dir / "labelsTs" / named

    def targets(self) -> tuple[list[Path], list]:  # noqa: D102
        pairs = [self._outputs(name) for name in self.files]
        extra = [self.output_dir / "grid.png", self.output_dir / RECORD_NAME]
        extra += [self.output_dir / "dicom" / name for name in self.series]
        sources = [*self.inputs, *dict.fromkeys(p.parent for p in self.files.values()), *self.series.values()]
        return [p for pair in pairs for p in pair] + extra, sources

    def write(self, engine: Any, item: dict, output: dict) -> None:  # noqa: D102
        name = item["name"]
        source, (image_file, mask_file) = self.files[name], self._outputs(name)
        sampled = as_numpy(output["sampled"]).astype(np.float32)  # (C, [Z,] S, S) in [-1, 1], row-major
        labels = as_numpy(item["label"]).astype(np.int64)  # (1, [Z,] S, S), the condition's classes
        pred = as_numpy(output["pred"])  # on the input's grid, MONAI's axis order: ([C,] X, Y[, Z])
        record = None if self.provenance is None else dict(self.provenance, seed=int(item["seed"]))
        if self.kind == "png":
            mask = read_png_mask(str(source))
            save_png(np.swapaxes(pred, -1, -2).reshape(-1, *mask.shape[1:]), self.path(image_file), provenance=record)
            save_png(mask[0].astype(np.uint8), self.path(mask_file))
            part = _record(sampled[None], labels, [foreground_fraction(mask[0])], [name], [str(source)], [-1])
        else:
            reference, label = _read_label_volume(source, self.num_classes)
            volume = np.transpose(pred.reshape(pred.shape[-3:]), (2, 1, 0))  # (Z, Y, X) as SimpleITK holds it
            write_like(volume.astype(np.float32), reference, self.path(image_file), provenance=record)
            if name in self.series:
                self._write_dicom(volume, reference, name, record)
            atomic_write(self.path(mask_file), lambda tmp: shutil.copyfile(source, tmp))
            images, labels = np.moveaxis(sampled, 1, 0), np.moveaxis(labels, 1, 0)  # (Z, C, S, S), (Z, 1, S, S)
            depth = len(label)
            part = _record(
                images,
                labels,
                [foreground_fraction(z) for z in label],
                [f"{name}_z{z:03d}" for z in range(depth)],
                [str(source)] * depth,
                list(range(depth)),
            )
        self.parts.append(part)
        if len(self.rows) < self.grid_size:
            middle = int(np.argmax([np.count_nonzero(s) for s in part["labels"]]))
            self.rows.append([label_to_rgb(part["labels"][middle]), to_rgb_tile(part["images"][middle])])

    def _write_dicom(self, volume: np.ndarray, reference: Any, name: str, record: dict | None) -> None:
        """The generated volume as a synthetic series of its case's study (`meddiff.dicom.write_synthetic_series`)."""
        import SimpleITK as sitk

        from meddiff.dicom import label_on_image_grid, read_series, write_synthetic_series

        if record is None:
            raise ValueError(f"GenerationWriter needs a provenance record to write {name}'s synthetic DICOM series.")
        image = sitk.GetImageFromArray(volume.astype(np.float32))
        image.CopyInformation(reference)
        series = read_series(self.series[name])
        on_series = sitk.GetArrayFromImage(label_on_image_grid(image, series, self.files[name]))
        write_synthetic_series(
            on_series, self.series[name], self.path(self.output_dir / "dicom" / name), provenance=record,
            value_range=(0.0, 1.0),
        )  # fmt: skip

    def _generate(self, engine: Any, labels: np.ndarray, seed: int) -> np.ndarray:
        """Images (N,C,S,S) in [-1,1] for integer label slices (N,1,S,S), in batches seeded ``seed + start``."""
        device, out = next(engine.network.parameters()).device, []
        for start in range(0, len(labels), self.batch_size):
            batch = labels[start : start + self.batch_size]
            cond = torch.stack([encode_mask(b, self.num_classes, self.ablated_classes) for b in batch]).to(device)
            out.append(engine.inferer(cond, engine.network, seed=seed + start).float().cpu().numpy())
        return np.concatenate(out)

    def _diversity(self, engine: Any, record: dict) -> tuple[np.ndarray, np.ndarray]:
        """Indices (K,) of the diversity masks and their samples (K, M, C, S, S)."""
        eligible = np.flatnonzero(
            kept_by_slice_rule(record["z"], record["foreground_fraction"], self.min_foreground_fraction)
        )
        count = min(self.diversity_masks, len(eligible))
        index = eligible[np.unique(np.linspace(0, len(eligible) - 1, count).round().astype(np.int64))]
        m, shape = self.samples_per_mask, record["images"].shape[1:]
        samples = np.zeros((len(index), m, *shape), dtype=np.float32)
        for k, i in enumerate(tqdm(index, desc="diversity samples", leave=False)):
            repeated = np.repeat(record["labels"][i][None, None].astype(np.int64), m, axis=0)
            samples[k] = self._generate(engine, repeated, self.seed + DIVERSITY_SEED_OFFSET + k * m)
        return index, samples

    def finish(self, engine: Any) -> dict:  # noqa: D102
        record = {key: np.concatenate([part[key] for part in self.parts]) for key in self.parts[0]}
        record["diversity_index"], record["diversity_images"] = self._diversity(engine, record)
        record["ablated_classes"] = np.asarray(self.ablated_classes, dtype=np.int64)
        atomic_write(self.path(self.output_dir / RECORD_NAME), lambda tmp: _save_record(tmp, record))
        grid = self.path(self.output_dir / "grid.png")
        save_grid(self.rows, grid, column_labels=GRID_COLUMNS, provenance=self.provenance)
        images = [self._outputs(name)[0] for name in self.files]
        save_json(
            {
                "kind": self.kind,
                "outputs": [t.relative_to(self.output_dir).as_posix() for t in images],
                "ablated_classes": list(self.ablated_classes),
                "record": RECORD_NAME,
                "img_size": self.img_size,
                "min_foreground_fraction": self.min_foreground_fraction,
                "diversity_masks": len(record["diversity_index"]),
                "samples_per_mask": self.samples_per_mask,
            },
            self.path(self.output_dir / "generation.json"),
        )
        return {"kind": self.kind, "outputs": [str(t) for t in images], "output_dir": str(self.output_dir)}


def _record(images, labels, fractions, names, label_files, z) -> dict:
    """The record arrays of one batch of generated slices (see the module docstring)."""
    return {
        "images": np.asarray(images, dtype=np.float32),
        "labels": np.asarray(labels, dtype=np.uint8).reshape(len(names), *np.shape(labels)[-2:]),
        "foreground_fraction": np.asarray(fractions, dtype=np.float64),
        "names": np.asarray(names, dtype=str),
        "label_files": np.asarray(label_files, dtype=str),
        "z": np.asarray(z, dtype=np.int64),
    }


def _save_record(path: str, record: dict) -> None:
    with open(path, "wb") as f:
        np.savez(f, **record)
