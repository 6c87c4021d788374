"""Generate images from masks: PNG mask folders or NIfTI label volumes in, image+mask pairs out."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from meddiff.data.errors import DataError
from meddiff.data.layouts import IMAGE_SUFFIXES, VOLUME_SUFFIXES, check_label, file_stem, list_files, read_png_mask
from meddiff.data.slices import resize_label
from meddiff.data.transforms import encode_mask
from meddiff.io import StagedOutput, atomic_write, save_json, save_png, to_uint8
from meddiff.options import check, parse
from meddiff.visualize import label_to_rgb, save_grid, to_rgb_tile

__all__ = ["MaskConditionedGeneration", "find_condition_masks"]

GRID_COLUMNS = ("mask", "generated")


def find_condition_masks(
    mask_dir: str | None = None, dataset_dir: str | None = None, seg_dir: str | None = None, split: str = "test"
) -> tuple[str, list[Path]]:
    """Return ("png", mask files) or ("volume", label volumes) from the first input given."""
    if mask_dir:
        folder = Path(mask_dir)
    elif seg_dir:
        folder = Path(seg_dir) / "all" / split
    elif dataset_dir:
        folder = Path(dataset_dir) / ("labelsTs" if split in ("test", "testing") else "labelsTr")
        if folder.is_dir():
            return "volume", list_files(folder, VOLUME_SUFFIXES)
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
        seed: sampling seed; the batch starting at slice i (of a mask folder, or of one volume) uses ``seed + i``.
        max_items: generate from the first `max_items` inputs only (None: all).
        overwrite: replace existing outputs (option ``--overwrite``, ``true``/``false``).
        progress: show progress bars.
        grid_size: rows of the preview grid.
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

    def _device(self) -> torch.device:
        return next(self.network.parameters()).device

    def _generate(self, labels: np.ndarray, desc: str) -> np.ndarray:
        """Generate images (N,C,S,S) in [-1,1] for integer label slices (N,1,S,S), in batches."""
        device, out = self._device(), []
        for start in tqdm(range(0, len(labels), self.batch_size), desc=desc, disable=not self.progress, leave=False):
            batch = labels[start : start + self.batch_size]
            cond = torch.stack([encode_mask(b, self.num_classes, self.ablated_classes) for b in batch]).to(device)
            out.append(self.inferer(cond, self.network, seed=self.seed + start).cpu().numpy())
        return np.concatenate(out)

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
        sources = [self.mask_dir, self.dataset_dir, self.seg_dir, *dict.fromkeys(p.parent for p in inputs)]
        with StagedOutput(self.output_dir, [*images, *masks, grid], sources, self.overwrite, manifest) as stage:
            if kind == "png":
                self._run_png(inputs, images, masks, grid, stage)
            else:
                self._run_volumes(inputs, images, masks, grid, stage)
            outputs = [t.relative_to(self.output_dir).as_posix() for t in images]
            save_json(
                {"kind": kind, "outputs": outputs, "ablated_classes": list(self.ablated_classes)},
                stage.path(manifest),
            )
        return {"kind": kind, "outputs": [str(t) for t in images], "output_dir": str(self.output_dir)}

    def _run_png(
        self, inputs: list[Path], targets: list[Path], mask_targets: list[Path], grid: Path, stage: StagedOutput
    ) -> None:
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

    def _run_volumes(
        self, inputs: list[Path], targets: list[Path], label_targets: list[Path], grid: Path, stage: StagedOutput
    ) -> None:
        import SimpleITK as sitk

        from meddiff.dicom import read_volume, write_like

        volumes = []  # every label is read and checked before the first image is generated
        for path in inputs:
            reference = read_volume(path)
            label = sitk.GetArrayFromImage(reference)
            if label.ndim != 3:
                raise DataError(f"label volume {path} has {label.ndim} dimensions: expected a 3D label map.")
            volumes.append((reference, check_label(label, self.num_classes, str(path))))
        rows = []
        for path, target, label_target, (reference, label) in zip(inputs, targets, label_targets, volumes):
            slices = np.stack([resize_label(z[None], self.img_size) for z in label])
            images = self._generate(slices, f"generating {path.name}")
            volume = F.interpolate(torch.from_numpy(images), size=label.shape[1:], mode="bilinear")[:, 0].numpy()
            write_like(((volume + 1.0) / 2.0).astype(np.float32), reference, stage.path(target))
            atomic_write(stage.path(label_target), lambda tmp, src=path: shutil.copyfile(src, tmp))
            middle = int(np.argmax([np.count_nonzero(s) for s in slices]))
            rows.append([label_to_rgb(slices[middle, 0]), to_rgb_tile(images[middle])])
        save_grid(rows[: self.grid_size], stage.path(grid), column_labels=GRID_COLUMNS)
