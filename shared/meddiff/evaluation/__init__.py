"""Evaluation of generated data: how it looks (`generation`) and what it is worth downstream (`downstream`).

- `meddiff.evaluation.generation`: mask-conditioned generation scored directly: realism (FID), diversity (MS-SSIM)
  and mask faithfulness (Dice of a segmenter trained on real images);
- `meddiff.evaluation.pairs`: generated image + mask pairs (the polyp bundle): FID, MS-SSIM and the downstream test;
- `meddiff.evaluation.nuclei`: the nuclei instance segmentation test (HoVerNet on real vs real + k x synthetic);
- `meddiff.evaluation.synthetic_nuclei`: generated H&E patches: OOD scores, FID, nuclear contrast, downstream;
- `meddiff.evaluation.histology`: class-guided histology tiles: FID per class, the intended-class rate with and
  without guidance, and the downstream classification test at label fractions;
- `meddiff.evaluation.downstream`: task networks trained on real, synthetic and real+synthetic data over several
  seeds, scored on a held-out real test split, with Student-t intervals and paired-by-seed differences.

Everything public in both modules is importable from ``meddiff.evaluation`` (bundle configs call
``$meddiff.evaluation.evaluate_mask_conditioned_generation(...)``).
"""

from __future__ import annotations

from meddiff.evaluation.downstream import (
    DEFAULT_FEATURES,
    SEGMENTATION_LOSSES,
    accuracy,
    arm_datasets,
    classification_comparison,
    compare_arms,
    macro_f1,
    make_classifier,
    mean_ci,
    predict_classes,
    random_flips,
    segmentation_comparison,
    train_and_score,
)
from meddiff.evaluation.generation import evaluate_mask_conditioned_generation, load_generated, segment
from meddiff.evaluation.histology import evaluate_histology_augmentation
from meddiff.evaluation.nuclei import (
    NUCLEI_METRICS,
    PaddedHoVerNet,
    hovernet_targets,
    nuclei_scores,
    nuclei_segmentation_comparison,
    predict_instances,
    train_hovernet,
)
from meddiff.evaluation.pairs import evaluate_pair_generation, read_generated_pairs
from meddiff.evaluation.synthetic_nuclei import evaluate_nuclei_generation, score_generated_nuclei

__all__ = [
    "DEFAULT_FEATURES",
    "NUCLEI_METRICS",
    "PaddedHoVerNet",
    "SEGMENTATION_LOSSES",
    "accuracy",
    "arm_datasets",
    "classification_comparison",
    "compare_arms",
    "evaluate_histology_augmentation",
    "evaluate_mask_conditioned_generation",
    "evaluate_nuclei_generation",
    "evaluate_pair_generation",
    "hovernet_targets",
    "load_generated",
    "macro_f1",
    "make_classifier",
    "mean_ci",
    "predict_classes",
    "nuclei_scores",
    "nuclei_segmentation_comparison",
    "predict_instances",
    "random_flips",
    "read_generated_pairs",
    "score_generated_nuclei",
    "segment",
    "segmentation_comparison",
    "train_and_score",
    "train_hovernet",
]
