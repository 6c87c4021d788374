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
from meddiff.io import atomic_write, check_new_output, save_json, save_png, to_uint8
from meddiff.visualize import label_to_rgb, save_grid, to_rgb_tile

__all__ = ["MaskConditionedGeneration", "find_condition_masks"]


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
    ``output_dir/labelsTs/<case>.nii.gz``. Every output path is checked before sampling starts, and nothing existing
    is overwritten unless `overwrite` is set.
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
        self.network, self.inferer = network, inferer
        self.num_classes, self.img_size, self.output_dir = num_classes, img_size, Path(output_dir)
        self.mask_dir, self.dataset_dir, self.seg_dir, self.split = mask_dir, dataset_dir, seg_dir, split
        self.ablated_classes, self.batch_size, self.seed = tuple(ablated_classes), batch_size, seed
        self.max_items, self.overwrite, self.progress, self.grid_size = max_items, overwrite, progress, grid_size

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
        """Generate for every input mask; return {"kind", "outputs": [paths], "output_dir"}."""
        kind, inputs = find_condition_masks(self.mask_dir, self.dataset_dir, self.seg_dir, self.split)
        if not inputs:
            raise DataError("no masks found to generate from: check --mask_dir / --dataset_dir.")
        inputs = inputs[: self.max_items] if self.max_items else inputs
        if kind == "png":
            result = self._run_png(inputs)
        else:
            result = self._run_volumes(inputs)
        save_json(
            {"kind": kind, "outputs": result, "ablated_classes": list(self.ablated_classes)},
            self.output_dir / "generation.json",
            overwrite=True,
        )
        return {"kind": kind, "outputs": result, "output_dir": str(self.output_dir)}

    def _run_png(self, inputs: list[Path]) -> list[str]:
        targets = [self.output_dir / "images" / f"{file_stem(p)}.png" for p in inputs]
        mask_targets = [self.output_dir / "masks" / f"{file_stem(p)}.png" for p in inputs]
        for t in targets + mask_targets:
            check_new_output(t, self.overwrite)
        masks = [read_png_mask(str(p)) for p in inputs]
        for m, p in zip(masks, inputs):
            check_label(m, self.num_classes, str(p))
        labels = np.stack([resize_label(m, self.img_size) for m in masks])
        images = self._generate(labels, "generating images")
        for image, mask, target, mask_target in zip(images, masks, targets, mask_targets):
            full = F.interpolate(torch.from_numpy(image)[None], size=mask.shape[-2:], mode="bilinear")[0].numpy()
            save_png(to_uint8(full), target, overwrite=self.overwrite)
            save_png(mask[0].astype(np.uint8), mask_target, overwrite=self.overwrite)
        rows = [[label_to_rgb(labels[i, 0]), to_rgb_tile(images[i])] for i in range(min(len(images), self.grid_size))]
        save_grid(rows, self.output_dir / "grid.png")
        return [str(t) for t in targets]

    def _run_volumes(self, inputs: list[Path]) -> list[str]:
        import SimpleITK as sitk

        from meddiff.dicom import write_like

        targets = [self.output_dir / "imagesTs" / p.name for p in inputs]
        label_targets = [self.output_dir / "labelsTs" / p.name for p in inputs]
        for t in targets + label_targets:
            check_new_output(t, self.overwrite)
        rows = []
        for path, target, label_target in zip(inputs, targets, label_targets):
            reference = sitk.ReadImage(str(path))
            label = sitk.GetArrayFromImage(reference)
            if label.ndim != 3:
                raise DataError(f"label volume {path} has {label.ndim} dimensions: expected a 3D label map.")
            check_label(label, self.num_classes, str(path))
            slices = np.stack([resize_label(z[None], self.img_size) for z in label])
            images = self._generate(slices, f"generating {path.name}")
            volume = F.interpolate(torch.from_numpy(images), size=label.shape[1:], mode="bilinear")[:, 0].numpy()
            write_like(((volume + 1.0) / 2.0).astype(np.float32), reference, target, overwrite=self.overwrite)
            atomic_write(label_target, lambda tmp, src=path: shutil.copyfile(src, tmp), overwrite=self.overwrite)
            middle = int(np.argmax([np.count_nonzero(s) for s in slices]))
            rows.append([label_to_rgb(slices[middle, 0]), to_rgb_tile(images[middle])])
        save_grid(rows[: self.grid_size], self.output_dir / "grid.png")
        return [str(t) for t in targets]
