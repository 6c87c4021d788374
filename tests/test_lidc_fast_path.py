"""Quality guard of the fast path on the real LIDC crops: bf16 GED stays within the fp32 GED's own noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from test_lidc_workflow import BUNDLE, CONFIGS, REAL_CROPS, TINY, run_bundle

from meddiff.data.lidc import load_lidc_cases
from meddiff.inferers import EnsembleSamplingInferer
from meddiff.io import load_trained_weights
from meddiff.metrics import generalized_energy_distance

# Stated tolerance: on the same weights, images and seeds, the bf16 + channels_last ensemble's mean GED may differ
# from the fp32 one by at most twice the spread of the fp32 GED over seeds, or 0.05, whichever is larger.
SEEDS = (0, 1, 2)


@pytest.mark.skipif(not REAL_CROPS.is_dir(), reason="../shared/data/lidc_crops is absent")
def test_bf16_ged_within_fp32_noise_on_real_crops(tmp_path: Path) -> None:
    run_bundle("training", ["train.json"], tmp_path, REAL_CROPS, num_epochs=3, batch_size=10)
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "inference.json"), str(CONFIGS / "demo.json")])
    parser.update({"bundle_root": str(tmp_path), "device": "$torch.device('cpu')", **TINY})
    network = parser.get_parsed_content("network")
    load_trained_weights(
        network, parser.get_parsed_content("weights_file"), parser.get_parsed_content("model_settings")
    )
    cases = load_lidc_cases(REAL_CROPS, "testing", 32, progress=False)[:4]
    images = torch.from_numpy(np.stack([c["image"] for c in cases]))

    def mean_ged(precision: str, seed: int) -> float:
        inferer = EnsembleSamplingInferer(
            num_samples=4,
            num_inference_steps=5,
            precision=precision,
            channels_last=precision != "fp32",
            seed=seed,
            output="samples",
        )
        members = inferer(images, network.eval()).numpy().astype(bool)
        return float(np.mean([generalized_energy_distance(m, c["label"].astype(bool)) for m, c in zip(members, cases)]))

    fp32 = [mean_ged("fp32", s) for s in SEEDS]
    bf16 = [mean_ged("bf16", s) for s in SEEDS]
    assert all(np.isfinite(fp32 + bf16))
    assert abs(np.mean(bf16) - np.mean(fp32)) <= max(0.05, 2 * np.std(fp32)), (fp32, bf16)
    assert BUNDLE.is_dir()
