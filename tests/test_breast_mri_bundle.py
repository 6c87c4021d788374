"""Workflow tests of bundles/breast_mri_seg_guided_generation: train -> infer -> evaluate on tiny settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from meddiff.demo import bundles_dir, run_bundle
from meddiff.io import OutputExistsError

BUNDLE = bundles_dir() / "breast_mri_seg_guided_generation"
TINY = {
    "img_size": 16,
    "network_channels": [8, 16],
    "attention_levels": [False, True],
    "num_res_blocks": 1,
    "norm_num_groups": 8,
    "num_head_channels": 8,
    "batch_size": 8,
    "num_epochs": 1,
    "segmenter_epochs": 1,
    "num_inference_steps": 3,
}


def train(root: Path, segmenter: bool = True, **overrides) -> None:
    """Run the bundle's trainings with tiny settings into `root`: the diffusion model, then (if asked) the segmenter."""
    run_bundle(BUNDLE, "training", ["train.json"], bundle_root=str(root), **{**TINY, **overrides})
    if segmenter:
        run_bundle(BUNDLE, "training", ["train_segmenter.json"], bundle_root=str(root), **{**TINY, **overrides})


def infer(root: Path, **overrides) -> None:
    """Run the bundle's inference with tiny settings."""
    run_bundle(BUNDLE, "run", ["inference.json"], bundle_root=str(root), **{**TINY, **overrides})


def evaluate(root: Path, **overrides) -> dict:
    """Run the bundle's evaluation and return its metrics."""
    run_bundle(BUNDLE, "evaluate", ["inference.json", "evaluate.json"], bundle_root=str(root), **{**TINY, **overrides})
    return json.loads((root / "eval" / "metrics.json").read_text())


def check_metrics(metrics: dict) -> None:
    """Metrics exist and lie in their ranges."""
    assert 0.0 <= metrics["faithfulness_dice"] <= 1.0
    assert 0.0 <= metrics["real_segmenter_dice"] <= 1.0
    assert metrics["fid"] >= 0.0 and np.isfinite(metrics["fid"])
    assert -1.0 <= metrics["ms_ssim_diversity"] <= 1.0
    assert metrics["num_generated"] > 0 and metrics["num_real"] > 0


def test_nifti_workflow_writes_volumes_with_label_geometry(tmp_path: Path, phantom_dir: Path) -> None:
    train(tmp_path, segmenter=False, dataset_dir=str(phantom_dir), use_ablated_segmentations=True)
    models = tmp_path / "models"
    assert not any(p.name.startswith("segmenter") for p in models.iterdir())  # one trained model per train config
    train(tmp_path, dataset_dir=str(phantom_dir), use_ablated_segmentations=True)  # resumes, then the segmenter
    assert {"model.pt", "checkpoint.pt", "segmenter.pt", "segmenter_checkpoint.pt"} <= {
        p.name for p in models.iterdir()
    }
    state = torch.load(models / "model.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state.values())

    infer(tmp_path, dataset_dir=str(phantom_dir))
    generated = tmp_path / "eval" / "generated"
    for label_path in sorted((phantom_dir / "labelsTs").iterdir()):
        out = nib.load(generated / "imagesTs" / label_path.name)
        ref = nib.load(label_path)
        assert out.shape == ref.shape
        np.testing.assert_allclose(out.affine, ref.affine, atol=1e-5)
        data = out.get_fdata()
        assert np.isfinite(data).all() and data.min() >= 0.0 and data.max() <= 1.0
        assert (generated / "labelsTs" / label_path.name).is_file()
    assert (generated / "grid.png").is_file()

    with pytest.raises(RuntimeError) as info:  # MONAI's config parser wraps the error; the cause is ours
        infer(tmp_path, dataset_dir=str(phantom_dir))
    assert isinstance(info.value.__cause__, OutputExistsError) and "already exists" in str(info.value.__cause__)

    check_metrics(evaluate(tmp_path, dataset_dir=str(phantom_dir)))


def write_png_layout(phantom_dir: Path, root: Path) -> tuple[Path, Path]:
    """Write the phantom slices as the seed's PNG layout: img_dir/<split>/*.png, seg_dir/all/<split>/*.png."""
    from meddiff.data import load_slices

    img_dir, seg_dir = root / "images", root / "masks"
    for split in ("train", "test"):
        slices = load_slices(
            "msd", dataset_dir=str(phantom_dir), split=split, num_classes=4, img_size=32, progress=False
        )
        for folder in (img_dir / split, seg_dir / "all" / split):
            folder.mkdir(parents=True)
        for s in slices:
            image = ((s["image"][0] + 1) * 127.5).round().astype(np.uint8)
            Image.fromarray(image).save(img_dir / split / f"{s['name']}.png")
            Image.fromarray(s["label"][0].astype(np.uint8)).save(seg_dir / "all" / split / f"{s['name']}.png")
    return img_dir, seg_dir


def test_png_seed_layout_workflow(tmp_path: Path, phantom_dir: Path) -> None:
    img_dir, seg_dir = write_png_layout(phantom_dir, tmp_path / "data")
    paths = {"img_dir": str(img_dir), "seg_dir": str(seg_dir)}
    train(tmp_path, **paths)
    infer(tmp_path, seg_dir=str(seg_dir), ablated_classes=[2])
    generated = tmp_path / "eval" / "generated"
    masks = sorted((seg_dir / "all" / "test").iterdir())
    images = sorted((generated / "images").iterdir())
    assert [p.name for p in images] == [p.name for p in masks]
    for image, mask in zip(images, masks):
        assert Image.open(image).size == Image.open(mask).size
        np.testing.assert_array_equal(
            np.asarray(Image.open(generated / "masks" / mask.name)), np.asarray(Image.open(mask))
        )
    assert json.loads((generated / "generation.json").read_text())["ablated_classes"] == [2]
    check_metrics(evaluate(tmp_path, **paths))


def write_dicom_layout(phantom_dir: Path, root: Path) -> Path:
    """Write the phantom training volumes as <case>/image/ DICOM series with <case>/label.nrrd."""
    import SimpleITK as sitk
    from dicom_helpers import write_series

    from meddiff.dicom import read_series, write_like

    for path in sorted((phantom_dir / "imagesTr").iterdir()):
        case = root / path.name.replace(".nii.gz", "")
        volume = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        write_series(case / "image", (volume * 1000).astype(np.int16), modality="MR", description="ax dyn pre")
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(phantom_dir / "labelsTr" / path.name)))
        write_like(label.astype(np.uint8), read_series(case / "image"), case / "label.nrrd")
    return root


def test_dicom_layout_training(tmp_path: Path, phantom_dir: Path) -> None:
    data = write_dicom_layout(phantom_dir, tmp_path / "dicom")
    train(tmp_path, segmenter=False, dataset_dir=str(data))
    assert (tmp_path / "models" / "model.pt").is_file()


def test_real_dicom_slices_through_dicom_path(tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    from meddiff.data import load_slices
    from meddiff.dicom import read_series, write_like

    ct_small = get_testdata_file("CT_small.dcm", download=False)
    series = Path(ct_small).parent / "dicomdirtests" / "98892001" / "CT5N" if ct_small else None
    if series is None or not series.is_dir():
        pytest.skip("pydicom's bundled dicomdirtests are not installed")
    case = tmp_path / "data" / "case0"
    (case / "image").mkdir(parents=True)
    for f in series.iterdir():
        (case / "image" / f.name).write_bytes(f.read_bytes())
    image = read_series(case / "image")
    label = np.zeros(image.GetSize()[::-1], dtype=np.uint8)
    label[:, 4:12, 4:12] = 1
    write_like(label, image, case / "label.nii.gz")
    slices = load_slices("auto", dataset_dir=str(tmp_path / "data"), num_classes=2, img_size=16, progress=False)
    assert len(slices) == 5
    assert all(s["image"].shape == (1, 16, 16) and -1.0 <= s["image"].min() <= s["image"].max() <= 1.0 for s in slices)
    assert all(set(np.unique(s["label"])) == {0, 1} for s in slices)


def test_training_resumes_from_checkpoint(tmp_path: Path, phantom_dir: Path) -> None:
    train(tmp_path, segmenter=False, dataset_dir=str(phantom_dir))
    first = torch.load(tmp_path / "models" / "checkpoint.pt", weights_only=True)
    assert first["epoch"] == 1
    train(tmp_path, segmenter=False, dataset_dir=str(phantom_dir), num_epochs=2)
    second = torch.load(tmp_path / "models" / "checkpoint.pt", weights_only=True)
    assert second["epoch"] == 2 and second["iteration"] == 2 * first["iteration"]
    changed = [not torch.equal(first["model"][k], second["model"][k]) for k in first["model"]]
    assert any(changed)


@pytest.mark.slow
def test_multi_gpu_overlay_under_torchrun(tmp_path: Path, phantom_dir: Path) -> None:
    overrides = [f"--{k} {json.dumps(v).replace(' ', '')}" for k, v in {**TINY, "val_interval": 1}.items()]
    configs = f"['{BUNDLE}/configs/train.json','{BUNDLE}/configs/multi_gpu_train.json']"
    torchrun = Path(sys.executable).parent / "torchrun"
    command = (
        f"{torchrun} --standalone --nnodes=1 --nproc_per_node=2 -m monai.bundle run training "
        f'--config_file "{configs}" --meta_file {BUNDLE}/configs/metadata.json '
        f"--logging_file {BUNDLE}/configs/logging.conf --bundle_root {tmp_path} --dataset_dir {phantom_dir} "
        + " ".join(overrides)
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, shell=True, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "models" / "model.pt").is_file() and (tmp_path / "models" / "model_best.pt").is_file()
    assert torch.load(tmp_path / "models" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    # both ranks validate; only rank 0 logs it (the overlay's _disabled_ on the other ranks)
    assert (result.stdout + result.stderr).count("Metrics -- val_loss") == 1
