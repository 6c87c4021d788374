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
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from meddiff.data.errors import DataError
from meddiff.data.layouts import (
    IMAGE_SUFFIXES,
    VOLUME_SUFFIXES,
    check_label,
    file_stem,
    list_files,
    msd_split_folders,
    read_png_mask,
)
from meddiff.data.slices import foreground_fraction, resize_label
from meddiff.data.transforms import encode_mask
from meddiff.io import StagedOutput, atomic_write, save_json, save_png, to_uint8
from meddiff.options import check, parse
from meddiff.visualize import label_to_rgb, save_grid, to_rgb_tile

__all__ = ["RECORD_NAME", "MaskConditionedGeneration", "find_condition_masks", "kept_by_slice_rule"]

GRID_COLUMNS = ("mask", "generated")
RECORD_NAME = "generated_slices.npz"
# far above any slice index, so per-mask samples never reuse a seed of the main run
DIVERSITY_SEED_OFFSET = 2**31


def kept_by_slice_rule(z: np.ndarray, fraction: np.ndarray, min_foreground_fraction: float) -> np.ndarray:
    """Which slices count (bool array): 2D masks (``z`` < 0) always, volume slices with foreground fraction above."""
    return (np.asarray(z) < 0) | (np.asarray(fraction) > min_foreground_fraction)


def find_condition_masks(
    mask_dir: str | None = None, dataset_dir: str | None = None, seg_dir: str | None = None, split: str = "test"
) -> tuple[str, list[Path]]:
    """Return ("png", mask files) or ("volume", label volumes) from the first input given."""
    if mask_dir:
        folder = Path(mask_dir)
    elif seg_dir:
        folder = Path(seg_dir) / "all" / split
    elif dataset_dir:
        return "volume", list_files(msd_split_folders(dataset_dir, split)[1], VOLUME_SUFFIXES)
    else:
        raise DataError("No masks given: pass --mask_dir (PNG masks) or --dataset_dir holding labelsTs/ volumes.")
    if not folder.is_dir():
        raise DataError(f"mask folder {folder} does not exist: pass --mask_dir or a dataset_dir with labelsTs/.")
    volumes = list_files(folder, VOLUME_SUFFIXES)
    return ("volume", volumes) if volumes else ("png", list_files(folder, IMAGE_SUFFIXES))


class MaskConditionedGeneration:
    """Generate one image per mask slice with a sampling inferer and write image+mask pairs.

    PNG masks give ``output_dir/images/<name>.png`` and ``output_dir/masks/<name>.png``; label volumes give
    ``output_dir/imagesTs/<case>.nii.gz`` (generated slice by slice, written with the label's geometry) and
    ``output_dir/labelsTs/<case>.nii.gz``; both give ``output_dir/grid.png`` and the manifest
    ``output_dir/generation.json`` (outputs relative to `output_dir`). The outputs appear all together when the run
    finished (`meddiff.io.StagedOutput`): every output path is checked before sampling starts, nothing existing is
    replaced unless `overwrite` is set, and a failed or interrupted run leaves `output_dir` as it was.

    Args:
        network: the trained denoising network.
        inferer: a sampling inferer called as ``inferer(condition, network, seed=...)``.
        num_classes: label classes the network was trained with, background included.
        img_size: the network's square input size; masks are resized to it and images back to the mask's size.
        output_dir: where the pairs go.
        mask_dir: a folder of PNG masks (first choice of input).
        dataset_dir: a dataset with ``labelsTs/`` (test) or ``labelsTr/`` label volumes.
        seg_dir: masks in the seed's layout, ``<seg_dir>/all/<split>/``.
        split: which split of `dataset_dir` / `seg_dir` to read.
        ablated_classes: classes left out of the condition (the model generates them freely).
        batch_size: masks sampled at once.
        seed: sampling seed; the batch starting at slice i (of a mask folder, or of one volume) uses ``seed + i``;
            the batch starting at sample j of diversity mask k uses ``seed + 2**31 + k * samples_per_mask + j``.
        max_items: generate from the first `max_items` inputs only (None: all).
        overwrite: replace existing outputs (option ``--overwrite``, ``true``/``false``).
        progress: show progress bars.
        grid_size: rows of the preview grid.
        diversity_masks: K masks, evenly spaced over those the slice rule keeps, are each sampled
            `samples_per_mask` more times for per-mask diversity (0: none).
        samples_per_mask: samples per diversity mask (at least 2).
        min_foreground_fraction: the slice rule's threshold, used here to choose the diversity masks.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        inferer: torch.nn.Module,
        num_classes: int,
        img_size: int,
        output_dir: str,
        mask_dir: str | None = None,
        dataset_dir: str | None = None,
        seg_dir: str | None = None,
        split: str = "test",
        ablated_classes: tuple[int, ...] = (),
        batch_size: int = 8,
        seed: int = 0,
        max_items: int | None = None,
        overwrite: bool = False,
        progress: bool = True,
        grid_size: int = 8,
        diversity_masks: int = 0,
        samples_per_mask: int = 4,
        min_foreground_fraction: float = 0.0,
    ) -> None:
        num_classes = parse("num_classes", num_classes)
        check(
            num_classes is not None,
            "--num_classes must be set to generate: the label classes the model was trained with, background included.",
        )
        self.network, self.inferer = network, inferer
        self.num_classes, self.img_size, self.output_dir = num_classes, parse("img_size", img_size), Path(output_dir)
        self.mask_dir, self.dataset_dir, self.seg_dir, self.split = mask_dir, dataset_dir, seg_dir, split
        self.ablated_classes = tuple(parse("ablated_classes", list(ablated_classes)))
        self.batch_size, self.seed = parse("batch_size", batch_size), parse("seed", seed)
        self.max_items, self.overwrite = parse("max_items", max_items), parse("overwrite", overwrite)
        self.progress, self.grid_size = parse("progress", progress), grid_size
        self.diversity_masks = parse("diversity_masks", diversity_masks)
        self.samples_per_mask = parse("samples_per_mask", samples_per_mask)
        self.min_foreground_fraction = parse("min_foreground_fraction", min_foreground_fraction)
        bad = [k for k in self.ablated_classes if not 1 <= k < num_classes]
        check(not bad, f"--ablated_classes {bad} are not foreground classes: choose among 1..{num_classes - 1}.")

    def _device(self) -> torch.device:
        return next(self.network.parameters()).device

    def _generate(self, labels: np.ndarray, desc: str, seed: int | None = None) -> np.ndarray:
        """Images (N,C,S,S) in [-1,1] for integer label slices (N,1,S,S), in batches seeded ``seed + start``."""
        device, out, seed = self._device(), [], self.seed if seed is None else seed
        for start in tqdm(range(0, len(labels), self.batch_size), desc=desc, disable=not self.progress, leave=False):
            batch = labels[start : start + self.batch_size]
            cond = torch.stack([encode_mask(b, self.num_classes, self.ablated_classes) for b in batch]).to(device)
            out.append(self.inferer(cond, self.network, seed=seed + start).float().cpu().numpy())
        return np.concatenate(out)

    def _diversity(self, record: dict) -> tuple[np.ndarray, np.ndarray]:
        """Indices (K,) of the diversity masks and their samples (K, M, C, S, S)."""
        eligible = np.flatnonzero(
            kept_by_slice_rule(record["z"], record["foreground_fraction"], self.min_foreground_fraction)
        )
        count = min(self.diversity_masks, len(eligible))
        index = eligible[np.unique(np.linspace(0, len(eligible) - 1, count).round().astype(np.int64))]
        m, shape = self.samples_per_mask, record["images"].shape[1:]
        samples = np.zeros((len(index), m, *shape), dtype=np.float32)
        for k, i in enumerate(index):
            repeated = np.repeat(record["labels"][i][None, None].astype(np.int64), m, axis=0)
            seed = self.seed + DIVERSITY_SEED_OFFSET + k * m
            samples[k] = self._generate(repeated, f"diversity {k + 1}/{len(index)}", seed=seed)
        return index, samples

    def run(self) -> dict:
        """Generate for every input mask; return {"kind", "outputs": [final image paths], "output_dir"}."""
        kind, inputs = find_condition_masks(self.mask_dir, self.dataset_dir, self.seg_dir, self.split)
        if not inputs:
            raise DataError("no masks found to generate from: check --mask_dir / --dataset_dir.")
        inputs = inputs[: self.max_items] if self.max_items else inputs
        if kind == "png":
            images = [self.output_dir / "images" / f"{file_stem(p)}.png" for p in inputs]
            masks = [self.output_dir / "masks" / f"{file_stem(p)}.png" for p in inputs]
        else:
            images = [self.output_dir / "imagesTs" / p.name for p in inputs]
            masks = [self.output_dir / "labelsTs" / p.name for p in inputs]
        grid, manifest = self.output_dir / "grid.png", self.output_dir / "generation.json"
        record_file = self.output_dir / RECORD_NAME
        sources = [self.mask_dir, self.dataset_dir, self.seg_dir, *dict.fromkeys(p.parent for p in inputs)]
        targets = [*images, *masks, grid, record_file]
        with StagedOutput(self.output_dir, targets, sources, self.overwrite, manifest) as stage:
            if kind == "png":
                record = self._run_png(inputs, images, masks, grid, stage)
            else:
                record = self._run_volumes(inputs, images, masks, grid, stage)
            record["diversity_index"], record["diversity_images"] = self._diversity(record)
            record["ablated_classes"] = np.asarray(self.ablated_classes, dtype=np.int64)
            atomic_write(stage.path(record_file), lambda tmp: _save_record(tmp, record))
            outputs = [t.relative_to(self.output_dir).as_posix() for t in images]
            save_json(
                {
                    "kind": kind,
                    "outputs": outputs,
                    "ablated_classes": list(self.ablated_classes),
                    "record": RECORD_NAME,
                    "img_size": self.img_size,
                    "min_foreground_fraction": self.min_foreground_fraction,
                    "diversity_masks": len(record["diversity_index"]),
                    "samples_per_mask": self.samples_per_mask,
                },
                stage.path(manifest),
            )
        return {"kind": kind, "outputs": [str(t) for t in images], "output_dir": str(self.output_dir)}

    def _run_png(
        self, inputs: list[Path], targets: list[Path], mask_targets: list[Path], grid: Path, stage: StagedOutput
    ) -> dict:
        masks = [read_png_mask(str(p)) for p in inputs]
        for m, p in zip(masks, inputs):
            check_label(m, self.num_classes, str(p))
        labels = np.stack([resize_label(m, self.img_size) for m in masks])
        images = self._generate(labels, "generating images")
        for image, mask, target, mask_target in zip(images, masks, targets, mask_targets):
            full = F.interpolate(torch.from_numpy(image)[None], size=mask.shape[-2:], mode="bilinear")[0].numpy()
            save_png(to_uint8(full), stage.path(target))
            save_png(mask[0].astype(np.uint8), stage.path(mask_target))
        rows = [[label_to_rgb(labels[i, 0]), to_rgb_tile(images[i])] for i in range(min(len(images), self.grid_size))]
        save_grid(rows, stage.path(grid), column_labels=GRID_COLUMNS)
        return _record(
            images,
            labels,
            [foreground_fraction(m[0]) for m in masks],
            [file_stem(p) for p in inputs],
            [str(p) for p in inputs],
            [-1] * len(inputs),
        )

    def _run_volumes(
        self, inputs: list[Path], targets: list[Path], label_targets: list[Path], grid: Path, stage: StagedOutput
    ) -> dict:
        import SimpleITK as sitk

        from meddiff.dicom import read_volume, write_like

        volumes = []  # every label is read and checked before the first image is generated
        for path in inputs:
            reference = read_volume(path)
            label = sitk.GetArrayFromImage(reference)
            if label.ndim != 3:
                raise DataError(f"label volume {path} has {label.ndim} dimensions: expected a 3D label map.")
            volumes.append((reference, check_label(label, self.num_classes, str(path))))
        rows, parts = [], []
        for path, target, label_target, (reference, label) in zip(inputs, targets, label_targets, volumes):
            slices = np.stack([resize_label(z[None], self.img_size) for z in label])
            images = self._generate(slices, f"generating {path.name}")
            volume = F.interpolate(torch.from_numpy(images), size=label.shape[1:], mode="bilinear")[:, 0].numpy()
            write_like(((volume + 1.0) / 2.0).astype(np.float32), reference, stage.path(target))
            atomic_write(stage.path(label_target), lambda tmp, src=path: shutil.copyfile(src, tmp))
            middle = int(np.argmax([np.count_nonzero(s) for s in slices]))
            rows.append([label_to_rgb(slices[middle, 0]), to_rgb_tile(images[middle])])
            stem, depth = file_stem(path), len(label)
            parts.append(
                _record(
                    images,
                    slices,
                    [foreground_fraction(z) for z in label],
                    [f"{stem}_z{z:03d}" for z in range(depth)],
                    [str(path)] * depth,
                    list(range(depth)),
                )
            )
        save_grid(rows[: self.grid_size], stage.path(grid), column_labels=GRID_COLUMNS)
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


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
