"""Score generated image+mask pairs: realism (FID), diversity (MS-SSIM) and mask faithfulness (Dice).

Conventions:
- generated images are scored as generated: the record `meddiff.generation.RECORD_NAME` holds them at the model's
  size exactly as the sampler returned them, in [-1, 1], the intensity space of the real slices (volumes scaled
  per volume between their 0.5 and 99.5 percentiles, PNGs by bit depth); they are never re-normalised, and the
  written PNGs / volumes (resampled to the mask's size, PNGs rounded to 8 bits) are not read back;
- one slice rule for both sets (`meddiff.generation.kept_by_slice_rule`, the rule `meddiff.data.load_slices`
  applies to real slices): a volume slice counts when its conditioning label's foreground fraction is strictly
  above ``min_foreground_fraction``; every 2D mask counts. ``num_real`` and ``num_generated`` are the slices scored
  on each side, ``num_generated_excluded`` the generated slices the rule left out;
- faithfulness Dice covers the classes the model was given; classes left out of the condition
  (``ablated_classes`` of the generation run) are scored apart, in ``faithfulness_dice_ablated_classes``;
- the metrics file is never replaced unless ``overwrite`` is set, and that is checked before anything is computed.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from meddiff.data.errors import DataError
from meddiff.generation import RECORD_NAME, kept_by_slice_rule
from meddiff.io import check_new_output, save_json
from meddiff.options import check, parse
from meddiff.precision import autocast

__all__ = ["evaluate_mask_conditioned_generation", "load_generated", "segment"]

_RECORD_KEYS = (
    "images",
    "labels",
    "foreground_fraction",
    "names",
    "z",
    "ablated_classes",
    "diversity_index",
    "diversity_images",
)


def segment(
    segmenter: torch.nn.Module, images: np.ndarray, batch_size: int = 16, precision: str = "fp32"
) -> np.ndarray:
    """Argmax class maps (N,H,W) of a segmentation network on images (N,C,H,W) in [-1,1]."""
    device = next(segmenter.parameters()).device
    segmenter.eval()
    out = []
    with torch.no_grad(), autocast(device, precision):
        for start in range(0, len(images), batch_size):
            batch = torch.as_tensor(images[start : start + batch_size], dtype=torch.float32, device=device)
            out.append(segmenter(batch).argmax(dim=1).cpu().numpy())
    return np.concatenate(out)


def load_generated(generated_dir: str, img_size: int, num_img_channels: int = 1) -> dict:
    """The generation record of `generated_dir` (arrays by name), checked to hold images of the evaluated size."""
    path = Path(generated_dir) / RECORD_NAME
    regenerate = f"rerun generation into {generated_dir} (--overwrite true replaces its outputs)"
    if not path.is_file():
        raise DataError(f"{path} is missing: evaluation scores the record generation writes there; {regenerate}.")
    try:
        with np.load(path, allow_pickle=False) as stored:
            record = {key: stored[key] for key in _RECORD_KEYS}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path} is not a complete generation record ({exc}); {regenerate}.") from None
    shape = tuple(record["images"].shape[1:])
    if shape != (num_img_channels, img_size, img_size):
        raise DataError(
            f"{path} holds images of shape {shape} but evaluation runs with --img_size {img_size} and "
            f"--num_img_channels {num_img_channels}: pass the generation's settings or {regenerate}."
        )
    return record


def _mean_dice(scores: np.ndarray, classes: list[int]) -> float | None:
    """Mean of per-(image, class) Dice (columns are classes 1..) over `classes`, skipping pairs absent from both."""
    if not classes:
        return None
    chosen = scores[:, [c - 1 for c in classes]]
    valid = ~np.isnan(chosen)
    return float(chosen[valid].mean()) if valid.any() else 1.0


def evaluate_mask_conditioned_generation(
    segmenter: torch.nn.Module,
    num_classes: int,
    img_size: int,
    generated_dir: str,
    output_file: str,
    real_slices: list[dict] | None = None,
    num_img_channels: int = 1,
    fid_weights: str | None = None,
    precision: str = "fp32",
    overwrite: bool = False,
    min_foreground_fraction: float = 0.0,
) -> dict:
    """Compute FID (real vs generated), MS-SSIM diversity and faithfulness Dice, write them as JSON, return them.

    Faithfulness (Konz et al. 2024): Dice between each conditioning mask and the prediction of a segmentation
    network trained on real images, run on the generated image, over the classes the model was given; the same
    network's Dice on the real images over the same classes is reported beside it as the ceiling. Diversity:
    ``ms_ssim_diversity`` over all pairs of scored generated images and, when generation sampled some masks
    several times, ``ms_ssim_per_mask`` (the mean over those masks of the mean pairwise MS-SSIM within each mask's
    samples); ``ms_ssim_settings`` records the window and scale weights used. `real_slices` must come from
    `meddiff.data.load_slices` with the same `min_foreground_fraction`. An existing `output_file` is refused
    (`meddiff.io.OutputExistsError`) before any work unless `overwrite` (option ``--overwrite``) is true.
    """
    from meddiff.metrics import InceptionFeatures, frechet_inception_distance, ms_ssim_diversity, per_class_dice
    from meddiff.metrics.diversity import ms_ssim_per_mask, ms_ssim_settings

    num_classes, img_size = parse("num_classes", num_classes), parse("img_size", img_size)
    check(num_classes is not None, "--num_classes must be set to evaluate: the label classes, background included.")
    num_img_channels = parse("num_img_channels", num_img_channels)
    min_foreground_fraction = parse("min_foreground_fraction", min_foreground_fraction)
    check_new_output(output_file, parse("overwrite", overwrite))
    record = load_generated(generated_dir, img_size, num_img_channels)
    keep = kept_by_slice_rule(record["z"], record["foreground_fraction"], min_foreground_fraction)
    if not keep.any():
        raise DataError(
            f"every generated slice in {generated_dir} is empty under min_foreground_fraction="
            f"{min_foreground_fraction}: lower it, or generate from labels that hold foreground."
        )
    ablated = sorted(int(c) for c in record["ablated_classes"])
    if any(not 1 <= c < num_classes for c in ablated):
        raise DataError(
            f"{generated_dir} was generated with ablated_classes {ablated}, not classes of this {num_classes}-class "
            "model: evaluate it with the model that generated it."
        )
    given = [c for c in range(1, num_classes) if c not in ablated]
    gen_images, gen_labels = record["images"][keep], record["labels"][keep].astype(np.int64)
    metrics: dict = {
        "num_generated": int(keep.sum()),
        "num_generated_excluded": int((~keep).sum()),
        "min_foreground_fraction": min_foreground_fraction,
        "given_classes": given,
        "ablated_classes": ablated,
    }
    scores = per_class_dice(segment(segmenter, gen_images, precision=precision), gen_labels, num_classes)
    metrics["faithfulness_dice"] = _mean_dice(scores, given)
    if ablated:
        metrics["faithfulness_dice_ablated_classes"] = _mean_dice(scores, ablated)
    if len(gen_images) >= 2:
        metrics["ms_ssim_diversity"] = ms_ssim_diversity(torch.from_numpy(gen_images))
    scored_sets = keep[record["diversity_index"]]
    if scored_sets.any():
        per_mask = ms_ssim_per_mask(record["diversity_images"][scored_sets])
        metrics["ms_ssim_per_mask"] = float(np.mean(per_mask))
        metrics["ms_ssim_per_mask_values"] = per_mask
        metrics["diversity_masks"] = [str(n) for n in record["names"][record["diversity_index"][scored_sets]]]
        metrics["samples_per_mask"] = int(record["diversity_images"].shape[1])
    metrics["ms_ssim_settings"] = ms_ssim_settings(img_size)
    if real_slices:
        real_images = np.stack([s["image"] for s in real_slices])
        real_labels = np.stack([s["label"][0] for s in real_slices])
        metrics["num_real"] = len(real_slices)
        metrics["same_slices_as_real"] = sorted(str(n) for n in record["names"][keep]) == sorted(
            s["name"] for s in real_slices
        )
        real_scores = per_class_dice(segment(segmenter, real_images, precision=precision), real_labels, num_classes)
        metrics["real_segmenter_dice"] = _mean_dice(real_scores, given)
        if len(real_images) >= 2 and len(gen_images) >= 2:
            device = next(segmenter.parameters()).device
            features = InceptionFeatures(weights_path=fid_weights).to(device)
            # FID stays in fp32 whatever `precision` is: it is only comparable across papers that way
            metrics["fid"] = frechet_inception_distance(
                features(torch.from_numpy(real_images)), features(torch.from_numpy(gen_images))
            )
    save_json(metrics, output_file, overwrite=True)  # checked above, before the work
    return metrics
