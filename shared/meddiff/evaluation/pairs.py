"""Evaluation of generated image + mask pairs (the polyp bundle): FID, MS-SSIM and the downstream segmentation test.

Conventions:
- the generated pairs are those of every ``<generated_dir>/<model>/generation.json`` (`meddiff.pairs.PairWriter`;
  one folder per cluster model, ``cluster_<i>``, and ``full``); images are RGB PNG, masks 0/255 PNG;
- the real pairs are the training split at the same size (`meddiff.data.polyp.read_pair`), grouped by the clusters
  file when there is one;
- FID (Inception-v3 pool3, `meddiff.features.ImageFeatures`) of the generated images against the real training
  images: overall, and per cluster against that cluster's real images; with fewer than 2 images on a side it is
  left out (None). FID on tens of images is biased upward and noisy: compare settings on the same numbers only;
- MS-SSIM diversity (`meddiff.metrics.diversity.ms_ssim_diversity`, the mean over pairs of generated images; lower
  is more diverse) overall and per model, with the real training images' value beside it for scale;
- the downstream test (`meddiff.evaluation.downstream.segmentation_comparison`): a segmenter trained on the real
  training pairs, on the generated pairs, and on both, scored on the real test split over several seeds, with the
  mean and a 95% confidence interval per arm and for real+synthetic minus real.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from meddiff.data.errors import DataError
from meddiff.io import check_new_output, save_json
from meddiff.options import parse
from meddiff.verdicts import size_matches, verdict

__all__ = ["evaluate_pair_generation", "largest_piece", "pair_verdict", "read_generated_pairs", "summary"]

logger = logging.getLogger(__name__)


def read_generated_pairs(generated_dir: str | os.PathLike) -> dict[str, dict]:
    """{model folder: {"images": (N, 3, S, S) in [-1, 1], "masks": (N, 1, S, S) in {0, 1}, "records": [...]}}."""
    from PIL import Image

    root = Path(generated_dir)
    manifests = sorted(root.glob("*/generation.json"))
    if not manifests:
        raise DataError(f"{root} holds no generated pairs (*/generation.json): run the inference first.")
    out = {}
    for manifest in manifests:
        folder = manifest.parent
        pairs = json.loads(manifest.read_text())["pairs"]
        images, masks, records = [], [], []
        for pair in pairs:
            rgb = np.asarray(Image.open(folder / pair["image"]).convert("RGB"), dtype=np.float32)
            mask = np.asarray(Image.open(folder / pair["mask"]).convert("L")) > 127
            images.append(np.moveaxis(rgb, -1, 0) / 127.5 - 1.0)
            masks.append(mask[None].astype(np.float32))
            records.append(json.loads((folder / pair["record"]).read_text()))
        if images:
            out[folder.name] = {"images": np.stack(images), "masks": np.stack(masks), "records": records}
    return out


def _fid(features: Any, real: np.ndarray, fake: np.ndarray) -> float | None:
    from meddiff.metrics.fid import frechet_inception_distance

    if len(real) < 2 or len(fake) < 2:
        return None
    return frechet_inception_distance(features(real), features(fake))


def _diversity(images: np.ndarray) -> float | None:
    from meddiff.metrics.diversity import ms_ssim_diversity

    return ms_ssim_diversity(images) if len(images) >= 2 else None


def _read(items: Sequence[dict], img_size: int) -> tuple[np.ndarray, np.ndarray]:
    from meddiff.data.polyp import read_pair

    pairs = [read_pair(item["image"], item["label"], img_size) for item in items]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def evaluate_pair_generation(
    training_pairs: Sequence[dict],
    test_pairs: Sequence[dict],
    generated_dir: str | os.PathLike,
    img_size: int,
    metrics_file: str | os.PathLike,
    grid_file: str | os.PathLike | None = None,
    cluster_file: str | os.PathLike | None = None,
    feature_weights: str | None = None,
    downstream_seeds: Sequence[int] = (0, 1, 2),
    downstream_epochs: int = 100,
    downstream_features: Sequence[int] | None = None,
    downstream_batch_size: int = 32,
    downstream_learning_rate: float = 1e-4,
    grid_rows: int = 8,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Score the generated pairs (module docstring); write `metrics_file` (JSON) and `grid_file`; return the metrics.

    Args:
        training_pairs: the real training pairs (``name``, ``image``, ``label``) the models were trained on.
        test_pairs: the real held-out test pairs of the downstream test.
        generated_dir: the folder holding one folder of generated pairs per model.
        img_size: the models' image size (real pairs are read at it).
        metrics_file: the JSON written.
        grid_file: a preview grid (target, target mask, generated image, generated mask) of the first pairs of
            every model (None: none).
        cluster_file: the clusters file, for per-cluster FID (None: overall only).
        feature_weights: a TorchScript feature network instead of Inception-v3 (`meddiff.features`).
        downstream_seeds: one segmenter per arm and seed (empty: no downstream test).
        downstream_epochs: the segmenters' epochs.
        downstream_features: `BasicUNetPlusPlus` features (None: the library's default).
        downstream_batch_size: the segmenters' batch size.
        downstream_learning_rate: the segmenters' learning rate.
        grid_rows: rows of the preview grid.
        overwrite: replace an existing metrics file or grid.
        progress: show progress bars.
    """
    from meddiff.clustering import read_clusters
    from meddiff.evaluation.downstream import DEFAULT_FEATURES, arm_datasets, segmentation_comparison
    from meddiff.features import ImageFeatures

    overwrite, img_size = parse("overwrite", overwrite), parse("img_size", img_size)
    seeds = parse("downstream_seeds", list(downstream_seeds))
    epochs = parse("downstream_epochs", downstream_epochs)
    metrics_file = check_new_output(metrics_file, overwrite)
    if grid_file is not None:
        grid_file = check_new_output(grid_file, overwrite)
    generated = read_generated_pairs(generated_dir)
    if not training_pairs:
        raise DataError("no real training pairs to compare with: pass the --dataset_dir the models were trained on.")
    real_images, real_masks = _read(training_pairs, img_size)
    size = generated[next(iter(generated))]["images"].shape[-1]
    if size != img_size:
        raise DataError(f"{generated_dir} holds {size} px pairs but --img_size is {img_size}: pass --img_size {size}.")
    features = ImageFeatures(feature_weights)
    fake_images = np.concatenate([g["images"] for g in generated.values()])
    fake_masks = np.concatenate([g["masks"] for g in generated.values()])
    metrics: dict[str, Any] = {
        "num_generated": len(fake_images),
        "num_real_training": len(real_images),
        "num_real_test": len(test_pairs),
        "img_size": img_size,
        "fid": {"overall": _fid(features, real_images, fake_images), "per_cluster": {}},
        "ms_ssim": {"generated": _diversity(fake_images), "real": _diversity(real_images), "per_model": {}},
        "mask_fraction": {"generated": float(fake_masks.mean()), "real": float(real_masks.mean())},
    }
    clusters = read_clusters(cluster_file) if cluster_file and Path(cluster_file).is_file() else None
    names = [item["name"] for item in training_pairs]
    for model, pairs in generated.items():
        metrics["ms_ssim"]["per_model"][model] = _diversity(pairs["images"])
        if clusters is not None and model.startswith("cluster_"):
            index = int(model.split("_", 1)[1])
            members = [i for i, n in enumerate(names) if clusters["assignments"].get(n) == index]
            metrics["fid"]["per_cluster"][model] = _fid(features, real_images[members], pairs["images"])
    if seeds and test_pairs:
        test = _read(test_pairs, img_size)
        arms = arm_datasets((real_images, real_masks), (fake_images, fake_masks))
        metrics["downstream"] = segmentation_comparison(
            arms,
            test,
            seeds=seeds,
            epochs=epochs,
            batch_size=downstream_batch_size,
            learning_rate=downstream_learning_rate,
            features=tuple(downstream_features or DEFAULT_FEATURES),
            progress=progress,
        )
    if grid_file is not None:
        _grid(generated, grid_file, grid_rows, img_size)
    per_pair = fake_masks.reshape(len(fake_masks), -1).mean(axis=1)
    metrics["pairs_with_a_polyp"] = float((per_pair > 0).mean())
    metrics["mask_largest_piece"] = {"generated": largest_piece(fake_masks), "real": largest_piece(real_masks)}
    metrics["verdict"] = pair_verdict(metrics)
    (logger.warning if metrics["verdict"].startswith("undertrained") else logger.info)(metrics["verdict"])
    save_json(metrics, metrics_file, overwrite=overwrite)
    return metrics


def largest_piece(masks: np.ndarray) -> float | None:
    """The mean, over masks (N, 1, H, W) with any foreground, of the share of their foreground pixels that lie in
    their largest 8-connected piece: about 1 for polyp masks (one or two blobs), low for speckle. None: all empty."""
    from scipy import ndimage

    shares = []
    for mask in np.asarray(masks) > 0.5:
        labels, count = ndimage.label(mask[0], structure=np.ones((3, 3), dtype=bool))
        if count:
            shares.append(np.bincount(labels.ravel())[1:].max() / mask.sum())
    return float(np.mean(shares)) if shares else None


def pair_verdict(metrics: dict) -> str:
    """A plain sentence on whether the generated pairs carry polyps like the real ones, from the metrics.

    Undertrained when fewer than half of the generated pairs have a polyp in their mask, when the generated masks
    cover less than 1/3 or more than 3x the real masks' share of the pixels, or when they are speckle rather than
    blobs: their largest connected piece holds on average less than half of their foreground (`largest_piece`).
    """
    fake, real = metrics["mask_fraction"]["generated"], metrics["mask_fraction"]["real"]
    with_polyp, problems = metrics["pairs_with_a_polyp"], []
    if with_polyp < 0.5:
        problems.append(f"only {100 * with_polyp:.0f}% of the generated pairs have a polyp in their mask")
    piece = (metrics.get("mask_largest_piece") or {}).get("generated")
    if piece is not None and piece < 0.5:
        problems.append(f"the generated masks are speckle: their largest piece holds {100 * piece:.0f}% of the mask")
    if not size_matches(fake, real):
        problems.append(f"generated masks cover {100 * fake:.2f}% of the pixels, real masks {100 * real:.2f}%")
    return verdict(
        problems,
        f"{100 * with_polyp:.0f}% of the generated pairs have a polyp; generated masks cover {100 * fake:.2f}% of the "
        f"pixels (real masks {100 * real:.2f}%).",
    )


def _grid(generated: dict, grid_file: Path, rows: int, img_size: int) -> None:
    from meddiff.data.polyp import read_pair
    from meddiff.pairs import GRID_COLUMNS
    from meddiff.visualize import save_grid, to_rgb_tile

    tiles, per_model = [], max(1, rows // len(generated))
    for pairs in generated.values():
        for image, mask, record in list(zip(pairs["images"], pairs["masks"], pairs["records"]))[:per_model]:
            target, target_mask = read_pair(record["target_image"], record["target_mask"], img_size)
            row = [target, target_mask, image, mask]
            tiles.append([to_rgb_tile(x, (0, 1) if x.shape[0] == 1 else (-1, 1)) for x in row])
    save_grid(tiles, grid_file, column_labels=GRID_COLUMNS)


def summary(metrics: dict) -> str:
    """The lines a person reads last: FID and diversity, the downstream arms and difference, then the verdict."""
    fid, ms = metrics["fid"]["overall"], metrics["ms_ssim"]
    lines = [
        f"{metrics['num_generated']} generated pairs: FID {'n/a' if fid is None else f'{fid:.1f}'} against "
        f"{metrics['num_real_training']} real training images; MS-SSIM {ms['generated'] or float('nan'):.3f} "
        f"(real {ms['real'] or float('nan'):.3f}; lower is more diverse)"
    ]
    downstream = metrics.get("downstream")
    if downstream:
        arms = ", ".join(f"{arm} {v['mean']['dice']['mean']:.3f}" for arm, v in downstream["arms"].items())
        lines.append(f"downstream Dice on {metrics['num_real_test']} real test pairs: {arms}")
        for arm, diff in downstream["differences"].items():
            d = diff["dice"]
            lines.append(
                f"  {arm} minus {downstream['reference']}: {d['mean']:+.3f} "
                f"(95% CI {d['low']:+.3f} to {d['high']:+.3f}, {d['n']} seeds)"
            )
    lines.append(metrics["verdict"])
    return "\n".join(lines)
