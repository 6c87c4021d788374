"""The lidc_ambiguous_segmentation bundle run as users run it: train -> infer -> evaluate, resume, torchrun overlay."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image

from meddiff.data.lidc import load_lidc_cases, make_synthetic_lidc, read_binary_mask
from meddiff.demo import run_bundle as meddiff_run_bundle
from meddiff.io import OutputExistsError

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "lidc_ambiguous_segmentation"
CONFIGS = BUNDLE / "configs"
SHARED = Path(__file__).resolve().parents[2] / "shared"
REAL_CROPS = SHARED / "data" / "lidc_crops" / "data"
SCHEMA = SHARED / "docs" / "meta_schema_20240725.json"
TINY = {  # on top of configs/demo.json: the smallest run that still exercises every piece
    "img_size": 32,
    "network_channels": [8, 16],
    "num_head_channels": 16,
    "encoder_channels": [4, 8],
    "num_samples": 4,
    "num_inference_steps": 3,
    "progress": False,
}


def run_bundle(run_id: str, configs: list[str], bundle_root: Path, dataset_dir: Path, **overrides) -> None:
    """Run the bundle with demo.json and the tiny settings on top of `configs`."""
    meddiff_run_bundle(
        BUNDLE,
        run_id,
        [*configs, "demo.json"],
        bundle_root=str(bundle_root),
        dataset_dir=str(dataset_dir),
        **{**TINY, **overrides},
    )


def check_ensembles(bundle_root: Path, dataset_dir: Path, num_samples: int) -> dict:
    """Assert the written ensembles and metrics; return the metrics."""
    cases = load_lidc_cases(dataset_dir, "testing", img_size=None, progress=False)
    manifest = json.loads((bundle_root / "samples" / "ensembles.json").read_text())
    assert manifest["cases"] == [c["name"] for c in cases] and manifest["num_samples"] == num_samples
    for case in cases:
        folder = bundle_root / "samples" / case["name"]
        members = np.stack([read_binary_mask(folder / f"sample_{k:02d}.png") for k in range(num_samples)])
        assert members.shape[1:] == case["image"].shape[1:]  # written at the case's own size
        frequency = np.asarray(Image.open(folder / "frequency.png"), np.float64) / 255
        assert np.allclose(frequency, members.mean(axis=0), atol=1 / 255)
        assert np.array_equal(read_binary_mask(folder / "majority.png"), members.mean(axis=0) > 0.5)
    assert (bundle_root / "grid.png").is_file()
    metrics = json.loads((bundle_root / "metrics.json").read_text())
    assert metrics["num_images"] == len(cases) and set(metrics["per_image"]) == {c["name"] for c in cases}
    mean = metrics["mean"]
    assert set(mean) == {"ged", "s_c", "d_max", "d_a", "ci", "ci_cimd", "dice_majority", "member_foreground",
                         "rater_foreground", "ged_empty_members"}  # fmt: skip
    assert metrics["verdict"].startswith(("undertrained", "members look like"))
    assert mean["ged"] >= 0 and all(0 <= mean[k] <= 1 for k in ("s_c", "d_max", "ci", "ci_cimd", "dice_majority"))
    return metrics


def test_builtin_data_train_infer_evaluate_resume(tmp_path):
    data = make_synthetic_lidc(tmp_path / "data", num_train=6, num_test=2, size=48, seed=3)
    root = tmp_path / "bundle"
    run_bundle("training", ["train.json"], root, data, num_epochs=1)
    checkpoint = torch.load(root / "models" / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 1 and (root / "models" / "model.pt").is_file()
    state = torch.load(root / "models" / "model.pt", weights_only=True)
    assert any(k.startswith("prior.") for k in state) and any(k.startswith("posterior.") for k in state)
    run_bundle("training", ["train.json"], root, data, num_epochs=2)  # resumes at epoch 1, trains one more
    checkpoint = torch.load(root / "models" / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == 2
    # the optimizer holds every parameter: denoiser, prior and posterior (the seed leaves the encoders out)
    assert sum(len(g["params"]) for g in checkpoint["optimizer"]["param_groups"]) == len(state)
    new_state = torch.load(root / "models" / "model.pt", weights_only=True)
    assert not torch.equal(new_state["denoiser.conv_in.conv.weight"], state["denoiser.conv_in.conv.weight"])
    run_bundle("run", ["inference.json"], root, data)
    run_bundle("evaluate", ["inference.json", "evaluate.json"], root, data)
    check_ensembles(root, data, num_samples=4)
    with pytest.raises(RuntimeError) as err:  # never overwrite: refused before any sampling
        run_bundle("run", ["inference.json"], root, data)
    assert isinstance(err.value.__cause__, OutputExistsError) and "already exists" in str(err.value.__cause__)
    # the clinical path through the same config: a DICOM CT series and a nodule centre
    from dicom_helpers import write_series

    pixels = np.full((3, 40, 40), 200, np.int16)
    pixels[1, 15:25, 15:25] = 1064
    uid = write_series(tmp_path / "ct", pixels)
    out = tmp_path / "dicom_out"
    run_bundle("run", ["inference.json"], root, data, dicom_dir=str(tmp_path / "ct"), nodule_centres=[[20, 20, 1]],
               output_dir=str(out), crop_size=32)  # fmt: skip
    assert {p.name for p in (out / "nodule_00").iterdir()} == {
        "majority.nii.gz", "frequency.nii.gz", "samples.nii.gz", "seg.dcm"
    }  # fmt: skip
    assert pydicom.dcmread(out / "nodule_00" / "seg.dcm").ReferencedSeriesSequence[0].SeriesInstanceUID == uid


@pytest.mark.skipif(not REAL_CROPS.is_dir(), reason="../shared/data/lidc_crops is absent")
def test_real_crops_train_infer_evaluate(tmp_path):
    root = tmp_path / "bundle"
    run_bundle("training", ["train.json"], root, REAL_CROPS, num_epochs=1, batch_size=10)
    # evaluate samples the ensembles itself when inference has not run yet, with DDPM this time
    run_bundle("evaluate", ["inference.json", "evaluate.json"], root, REAL_CROPS, sampler="ddpm", num_samples=2)
    metrics = check_ensembles(root, REAL_CROPS, num_samples=2)
    assert metrics["num_images"] == 9 and metrics["sampler"] == "ddpm"


def test_metadata_valid():
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    assert next(iter(meta["network_data_format"]["inputs"])) == "image"
    assert next(iter(meta["network_data_format"]["outputs"])) == "pred"
    if not SCHEMA.is_file():
        pytest.skip("../shared/docs/meta_schema_20240725.json is absent")
    import jsonschema

    jsonschema.validate(meta, json.loads(SCHEMA.read_text()))


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="no torchrun")
def test_multi_gpu_overlay_torchrun_cpu(tmp_path):
    data = make_synthetic_lidc(tmp_path / "data", num_train=4, num_test=1, size=32, seed=4)
    root = tmp_path / "bundle"
    overrides = [f"--{k}={json.dumps(v)}" if not isinstance(v, str) else f"--{k}={v}" for k, v in TINY.items()]
    configs = [str(CONFIGS / c) for c in ("train.json", "demo.json", "multi_gpu_train.json")]
    command = [
        str(Path(sys.executable).parent / "torchrun"),
        "--standalone",
        "--nnodes=1",
        "--nproc_per_node=2",
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        str(configs),
        "--meta_file",
        str(CONFIGS / "metadata.json"),
        "--logging_file",
        str(CONFIGS / "logging.conf"),
        "--bundle_root",
        str(root),
        "--dataset_dir",
        str(data),
        "--num_epochs",
        "1",
        "--batch_size",
        "2",
        "--val_interval",
        "1",
        *overrides,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    state = torch.load(root / "models" / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state)  # saved unwrapped, loadable by inference.json
    assert torch.load(root / "models" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert (root / "models" / "model_best.pt").is_file()
    # both ranks validate; only rank 0 logs it (the overlay's _disabled_ on the other ranks)
    assert (result.stdout + result.stderr).count("Metrics -- val_loss") == 1
