"""Evaluation metrics: ambiguity (GED, CI), FID, MS-SSIM diversity and class Dice."""

from .ambiguity import (
    ci_score,
    combined_sensitivity,
    dice,
    diversity_agreement,
    generalized_energy_distance,
    iou,
    majority_mask,
    max_dice_matching,
    pairwise_dice,
    pairwise_iou,
    to_binary_masks,
)
from .diversity import MS_SSIM_WEIGHTS, ms_ssim_config, ms_ssim_diversity
from .fid import InceptionFeatures, default_inception_weights, frechet_inception_distance
from .instances import (
    InstanceMatch,
    aji,
    aji_plus,
    as_instance_map,
    binary_dice,
    dataset_f1,
    instance_f1,
    match_instances,
    panoptic_quality,
)
from .overlap import mean_class_dice, per_class_dice

__all__ = [
    "MS_SSIM_WEIGHTS",
    "InceptionFeatures",
    "InstanceMatch",
    "aji",
    "aji_plus",
    "as_instance_map",
    "binary_dice",
    "ci_score",
    "combined_sensitivity",
    "dataset_f1",
    "default_inception_weights",
    "dice",
    "diversity_agreement",
    "frechet_inception_distance",
    "generalized_energy_distance",
    "instance_f1",
    "iou",
    "majority_mask",
    "match_instances",
    "max_dice_matching",
    "mean_class_dice",
    "ms_ssim_config",
    "ms_ssim_diversity",
    "pairwise_dice",
    "pairwise_iou",
    "panoptic_quality",
    "per_class_dice",
    "to_binary_masks",
]
