"""Score generated image+mask pairs: realism (FID), diversity (MS-SSIM) and mask faithfulness (Dice).

The metrics file is never replaced unless ``overwrite`` is set, and that is checked before anything is computed.
"""

from __future__ import annotations

import numpy as np
import torch

from meddiff.data.layouts import load_slices
from meddiff.io import check_new_output, save_json
from meddiff.options import check, parse
from meddiff.precision import autocast

__all__ = ["evaluate_mask_conditioned_generation", "segment"]


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
) -> dict:
    """Compute FID (real vs generated), MS-SSIM diversity and faithfulness Dice, write them as JSON, return them.

    Faithfulness (Konz et al. 2024): Dice between each conditioning mask and the prediction of a segmentation
    network trained on real images, run on the generated image; the same network's Dice on the real images is
    reported beside it as the ceiling. An existing `output_file` is refused (`meddiff.io.OutputExistsError`) before
    any work unless `overwrite` (option ``--overwrite``) is true.
    """
    from meddiff.metrics import (
        InceptionFeatures,
        frechet_inception_distance,
        mean_class_dice,
        ms_ssim_diversity,
    )

    num_classes, img_size = parse("num_classes", num_classes), parse("img_size", img_size)
    check(num_classes is not None, "--num_classes must be set to evaluate: the label classes, background included.")
    num_img_channels = parse("num_img_channels", num_img_channels)
    check_new_output(output_file, parse("overwrite", overwrite))
    generated = load_slices(
        "auto",
        dataset_dir=generated_dir,
        split="test",
        num_classes=num_classes,
        img_size=img_size,
        num_img_channels=num_img_channels,
        min_foreground_fraction=-1.0,
        progress=False,
    )
    gen_images = np.stack([s["image"] for s in generated])
    gen_labels = np.stack([s["label"][0] for s in generated])
    metrics: dict = {"num_generated": len(generated)}
    gen_pred = segment(segmenter, gen_images, precision=precision)
    metrics["faithfulness_dice"] = mean_class_dice(gen_pred, gen_labels, num_classes)
    if len(gen_images) >= 2:
        metrics["ms_ssim_diversity"] = ms_ssim_diversity(torch.from_numpy(gen_images))
    if real_slices:
        real_images = np.stack([s["image"] for s in real_slices])
        real_labels = np.stack([s["label"][0] for s in real_slices])
        metrics["num_real"] = len(real_slices)
        metrics["real_segmenter_dice"] = mean_class_dice(
            segment(segmenter, real_images, precision=precision), real_labels, num_classes
        )
        if len(real_images) >= 2 and len(gen_images) >= 2:
            device = next(segmenter.parameters()).device
            features = InceptionFeatures(weights_path=fid_weights).to(device)
            # FID stays in fp32 whatever `precision` is: it is only comparable across papers that way
            metrics["fid"] = frechet_inception_distance(
                features(torch.from_numpy(real_images)), features(torch.from_numpy(gen_images))
            )
    save_json(metrics, output_file, overwrite=True)  # checked above, before the work
    return metrics
