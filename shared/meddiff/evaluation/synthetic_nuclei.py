"""Generated H&E nuclei patches scored: out-of-distribution scores, realism, faithfulness and the downstream test.

Two steps, each a bundle run (``ood.json`` and ``evaluate.json`` of ``monuseg_nuclei_generation``):

- `score_generated_nuclei` (methods.md §4.5): a PatchCore-style memory bank (`meddiff.ood.PatchCoreScorer`) of the
  real training patches of the model scores every generated patch (the largest nearest-neighbour distance of its
  patch features); the seed's sampling probabilities ``p`` (`meddiff.ood.subsample_probabilities`: scores clipped
  at their median, min-max scaled, ``p ~ 1 - s'``, so patches at or above the median score get ``p = 0``) are
  written beside the scores, one entry per sample, in ``ood_scores.json``;
- `evaluate_nuclei_generation`: FID (Inception pool3, `meddiff.features`) of the generated patches against the
  model's real training patches, beside the FID of the real test patches against the same training patches (the
  floor a generator cannot beat on this data); nuclear contrast, the mean grey level outside the structure's nuclei
  minus inside them (``(R + G + B) / 3`` in [0, 1]; haematoxylin makes real nuclei darker than the stroma), of
  generated and real patches; and the downstream nuclei segmentation test
  (`meddiff.evaluation.nuclei.nuclei_segmentation_comparison`: HoVerNet on real and on real + k x synthetic, the
  synthetic patches drawn with the OOD probabilities when ``ood_scores.json`` is given).

The verdict (`nuclei_verdict`) says "undertrained" when the generated nuclei are not darker than their surroundings
as the real ones are: a contrast below a third of the real patches' (`meddiff.verdicts.size_matches`), which is what
a model that ignores its condition gives.
"""

from __future__ import annotations

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

__all__ = [
    "evaluate_nuclei_generation",
    "nuclear_contrast",
    "nuclei_verdict",
    "read_nuclei_samples",
    "score_generated_nuclei",
    "summary",
]

logger = logging.getLogger(__name__)


def read_nuclei_samples(generated_dir: str | os.PathLike) -> tuple[list[str], np.ndarray, list[np.ndarray]]:
    """The generated samples of a `meddiff.nuclei_generation.NucleiWriter` folder: names, images (N, 3, S, S)
    float32 in [-1, 1] and instance maps (S, S) int32."""
    from PIL import Image

    from meddiff.nuclei_generation import read_generated_nuclei

    samples = read_generated_nuclei(generated_dir)
    if not samples:
        raise DataError(f"{generated_dir} holds no generated samples: run inference.json with --dataset_dir first.")
    images, insts = [], []
    for sample in samples:
        with Image.open(sample["sample"]) as im:
            images.append(np.moveaxis(np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0, -1, 0))
        with Image.open(sample["inst_mask"]) as im:
            insts.append(np.asarray(im).astype(np.int32))
    return [s["name"] for s in samples], np.stack(images), insts


def _real(items: Sequence[dict], what: str) -> tuple[np.ndarray, list[np.ndarray]]:
    from meddiff.data.monuseg import read_patch

    if not items:
        raise DataError(f"no real {what} patches: pass the --dataset_dir (a MoNuSeg folder) the model was trained on.")
    patches = [read_patch(item) for item in items]
    return np.stack([p[0] for p in patches]).astype(np.float32), [p[1] for p in patches]


def score_generated_nuclei(
    real_items: Sequence[dict],
    generated_dir: str | os.PathLike,
    output_file: str | os.PathLike,
    feature_weights: str | None = None,
    coreset_fraction: float = 0.1,
    patch_stride: int = 4,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """OOD-score every generated patch against the real training patches and write ``ood_scores.json``.

    Args:
        real_items: the model's real training patches (`meddiff.data.monuseg` items): the memory bank.
        generated_dir: the inference output folder.
        output_file: the JSON written: ``{"samples": {name: {"score", "p"}}, "median", "memory_bank", ...}``.
        feature_weights: a TorchScript feature network instead of Inception-v3 (`meddiff.features`).
        coreset_fraction: the memory bank's share of the real patch features (PatchCore's 10 %).
        patch_stride: stride of the patch-feature grid (the seed's score file used 4).
        seed: the coreset's and projection's seed.
        overwrite: replace an existing `output_file`.
    """
    from meddiff.features import ImageFeatures
    from meddiff.ood import PatchCoreScorer, subsample_probabilities

    output_file = check_new_output(output_file, parse("overwrite", overwrite))
    fraction = parse("coreset_fraction", coreset_fraction)
    names, images, _ = read_nuclei_samples(generated_dir)
    real, _ = _real(real_items, "training")
    scorer = PatchCoreScorer(
        features=ImageFeatures(feature_weights), coreset_fraction=fraction, patch_stride=patch_stride, seed=seed
    )
    scores = scorer.fit(real).score(images)
    p = subsample_probabilities(scores)
    record = {
        "memory_bank": {"real_patches": len(real), "features": int(len(scorer.memory_bank))},
        "settings": {"coreset_fraction": fraction, "patch_stride": int(patch_stride), "seed": int(seed)},
        "median": float(np.median(scores)),
        "kept": int((p > 0).sum()),
        "samples": {name: {"score": float(s), "p": float(q)} for name, s, q in zip(names, scores, p)},
    }
    save_json(record, output_file, overwrite=overwrite)
    logger.info(f"{record['kept']} of {len(names)} generated patches score below the median: written to {output_file}")
    return record


def nuclear_contrast(images: np.ndarray, insts: Sequence[np.ndarray]) -> float | None:
    """Mean over patches with nuclei and background of grey(outside nuclei) - grey(inside), grey in [0, 1]."""
    values = []
    for image, inst in zip(images, insts):
        grey = (np.asarray(image, dtype=np.float64).mean(axis=0) + 1.0) / 2.0
        inside = np.asarray(inst) > 0
        if inside.any() and (~inside).any():
            values.append(float(grey[~inside].mean() - grey[inside].mean()))
    return float(np.mean(values)) if values else None


def _fid(real_features: np.ndarray, features: Any, images: np.ndarray) -> float | None:
    """FID of `images` against the real patches' already extracted features (None with fewer than 2 on a side)."""
    import warnings

    from meddiff.metrics.fid import frechet_inception_distance

    if len(real_features) < 2 or len(images) < 2:
        return None
    with warnings.catch_warnings():  # scipy's sqrtm warns on the rank-deficient covariances of small sets
        warnings.simplefilter("ignore")
        return float(frechet_inception_distance(real_features, features.extract(images)))


def _weights(names: Sequence[str], ood_file: str | os.PathLike) -> list[float]:
    import json

    path = Path(ood_file)
    if not path.is_file():
        raise DataError(f"{path} does not exist: run ood.json first, or pass --ood_filter false.")
    samples = json.loads(path.read_text()).get("samples", {})
    missing = [n for n in names if n not in samples]
    if missing:
        raise DataError(f"{path} has no score for {missing[0]} ({len(missing)} missing): run ood.json again.")
    return [float(samples[n]["p"]) for n in names]


def evaluate_nuclei_generation(
    training_items: Sequence[dict],
    test_items: Sequence[dict],
    generated_dir: str | os.PathLike,
    metrics_file: str | os.PathLike,
    ood_file: str | os.PathLike | None = None,
    feature_weights: str | None = None,
    downstream_ratios: Sequence[int] = (1, 2, 3, 4, 5),
    downstream_seeds: Sequence[int] = (0, 1, 2),
    downstream_epochs: int = 100,
    downstream_batch_size: int = 8,
    downstream_learning_rate: float = 1e-4,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Score the generated patches (module docstring); write `metrics_file` (JSON) and return the metrics.

    Args:
        training_items: the model's real training patches.
        test_items: the real test patches of the downstream test.
        generated_dir: the inference output folder of the model.
        metrics_file: the JSON written.
        ood_file: ``ood_scores.json`` of `score_generated_nuclei`: the downstream test draws synthetic patches with
            its probabilities (None: uniformly).
        feature_weights: a TorchScript feature network instead of Inception-v3 for FID.
        downstream_ratios: synthetic patches per real patch of each real+synthetic arm.
        downstream_seeds: one segmenter per arm and seed (empty: no downstream test).
        downstream_epochs: the segmenters' epochs.
        downstream_batch_size: the segmenters' batch size.
        downstream_learning_rate: the segmenters' learning rate.
        overwrite: replace an existing metrics file.
        progress: show progress bars.
    """
    from meddiff.evaluation.nuclei import nuclei_segmentation_comparison
    from meddiff.features import ImageFeatures

    overwrite, progress = parse("overwrite", overwrite), parse("progress", progress)
    seeds = parse("downstream_seeds", list(downstream_seeds))
    ratios = parse("downstream_ratios", list(downstream_ratios))
    epochs = parse("downstream_epochs", downstream_epochs)
    metrics_file = check_new_output(metrics_file, overwrite)
    names, fake, fake_insts = read_nuclei_samples(generated_dir)
    weights = None if ood_file is None else _weights(names, ood_file)
    real, real_insts = _real(training_items, "training")
    if fake.shape[-1] != real.shape[-1]:
        raise DataError(
            f"{generated_dir} holds {fake.shape[-1]} px patches but the real ones are {real.shape[-1]} px: pass the "
            f"--patch_size the model was trained with ({fake.shape[-1]})."
        )
    test, test_insts = _real(test_items, "test") if test_items else (np.zeros((0, *real.shape[1:])), [])
    features = ImageFeatures(feature_weights)
    real_features = features.extract(real)  # once, for both FIDs
    metrics: dict[str, Any] = {
        "num_generated": len(fake),
        "num_real_training": len(real),
        "num_real_test": len(test),
        "patch_size": int(real.shape[-1]),
        "fid": {
            "generated_vs_training": _fid(real_features, features, fake),
            "real_test_vs_training": _fid(real_features, features, test) if len(test) else None,
        },
        "nuclear_contrast": {
            "generated": nuclear_contrast(fake, fake_insts),
            "real": nuclear_contrast(real, real_insts),
        },
        "ood_filter": None if ood_file is None else str(ood_file),
    }
    if seeds and len(test):
        metrics["downstream"] = nuclei_segmentation_comparison(
            list(zip(real, real_insts)),
            list(zip(fake, fake_insts)),
            list(zip(test, test_insts)),
            ratios=ratios,
            seeds=seeds,
            synthetic_weights=weights,
            epochs=epochs,
            batch_size=downstream_batch_size,
            learning_rate=downstream_learning_rate,
            progress=progress,
        )
    metrics["verdict"] = nuclei_verdict(metrics)
    (logger.warning if metrics["verdict"].startswith("undertrained") else logger.info)(metrics["verdict"])
    save_json(metrics, metrics_file, overwrite=overwrite)
    return metrics


def nuclei_verdict(metrics: dict) -> str:
    """A plain sentence on whether the generated nuclei sit where their structure puts them (module docstring)."""
    fake, real = metrics["nuclear_contrast"]["generated"], metrics["nuclear_contrast"]["real"]
    if fake is None or real is None or real <= 0:
        return "no verdict: the structures hold no nuclei, or the real nuclei are not darker than their surroundings."
    problems = []
    if fake <= 0 or not size_matches(fake, real):
        problems.append(
            f"the generated nuclei are {'not darker' if fake <= 0 else 'far from as dark'} than their surroundings "
            f"(contrast {fake:.3f}, real {real:.3f})"
        )
    return verdict(
        problems,
        f"the generated nuclei are darker than their surroundings as in the real patches (contrast {fake:.3f}, "
        f"real {real:.3f}).",
    )


def summary(metrics: dict) -> str:
    """The lines a person reads last: FID beside its floor, the downstream arms and differences, then the verdict."""
    fid = metrics["fid"]

    def show(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1f}"

    lines = [
        f"{metrics['num_generated']} generated patches: FID {show(fid['generated_vs_training'])} against "
        f"{metrics['num_real_training']} real training patches (real test patches: "
        f"{show(fid['real_test_vs_training'])})"
    ]
    downstream = metrics.get("downstream")
    if not downstream:
        lines.append(
            "no downstream test (--downstream_seeds is empty, or no test patches): HoVerNet trains for minutes per "
            "epoch on a CPU; run evaluate.json with --downstream_seeds [0,1,2] where there is a GPU"
        )
    else:
        arms = ", ".join(f"{arm} {v['mean']['f1']['mean']:.3f}" for arm, v in downstream["arms"].items())
        lines.append(f"downstream instance F1@0.5 on {metrics['num_real_test']} real test patches: {arms}")
        for arm, diff in downstream["differences"].items():
            d = diff["f1"]
            low, high = d["low"], d["high"]
            interval = "no interval with one seed" if np.isnan(low) else f"95% CI {low:+.3f} to {high:+.3f}"
            lines.append(f"  {arm} minus {downstream['reference']}: {d['mean']:+.3f} ({interval}, {d['n']} seeds)")
    lines.append(metrics["verdict"])
    return "\n".join(lines)
