"""Sampling: the one reverse-diffusion loop (`loop`), guidance wrappers (`guidance`), RePaint's merge (`inpainting`)."""

from meddiff.sampling.guidance import LogProb, class_log_prob, classifier_free, classifier_gradient, conditioned
from meddiff.sampling.inpainting import KnownRegionMerge
from meddiff.sampling.loop import AfterStep, Denoiser, make_generator, sample

__all__ = [
    "AfterStep",
    "Denoiser",
    "KnownRegionMerge",
    "LogProb",
    "class_log_prob",
    "classifier_free",
    "classifier_gradient",
    "conditioned",
    "make_generator",
    "sample",
]
