"""The histology_augmentation bundle run as users run it: autoencoder -> latent diffusion -> latent classifier ->
class-guided generation -> centroid filter -> evaluation, on synthetic tiles in the Zenodo NCT-CRC-HE layout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from meddiff.data.histology import make_synthetic_histology
from meddiff.demo import demo_plan, run_bundle
from meddiff.errors import find_user_error
from meddiff.io import trained_settings

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "histology_augmentation"
CONFIGS = BUNDLE / "configs"
QUIET = str(Path(__file__).resolve().parents[1] / "shared" / "meddiff" / "quiet_logging.conf")
AE = ["train_autoencoder.json"]
DIFFUSION = [*AE, "train_diffusion.json"]
CLASSIFIER = [*AE, "train_classifier.json"]
CLASSES = ["ADI", "DEB", "LYM"]

# tiny networks and the cheapest schedules that still run every stage
TINY = {
    "image_size": 16,
    "autoencoder_channels": [8, 8],
    "autoencoder_res_blocks": 1,
    "autoencoder_norm_groups": 4,
    "discriminator_channels": 8,
    "discriminator_layers": 2,
    "adversarial_start": 1,
    "network_channels": [8, 16],
    "attention_levels": [False, True],
    "num_res_blocks": 1,
    "num_head_channels": 8,
    "norm_num_groups": 4,
    "resblock_updown": False,
    "lr_warmup_steps": 0,
    "classifier_channels": [8, 16],
    "classifier_attention_levels": [False, False],
    "classifier_res_blocks": 1,
    "classifier_head_channels": 8,
    "classifier_norm_groups": 4,
    "batch_size": 8,
    "num_epochs": 1,
    "val_interval": 1,
    "samples_per_class": 2,
    "num_inference_steps": 3,
    "progress": False,
    "label_fractions": [1.0],
    "downstream_seeds": [0],
    "downstream_epochs": 1,
    "downstream_batch_size": 8,
    "downstream_network": "small_cnn",
}


def run(run_id: str, configs: list[str], root: Path, data: Path, **overrides) -> None:
    settings = {**TINY, **overrides}
    run_bundle(BUNDLE, run_id, configs, logging_file=QUIET, bundle_root=str(root), dataset_dir=str(data), **settings)


def user_error(err: pytest.ExceptionInfo) -> str:
    found = find_user_error(err.value)
    assert found is not None, f"not a user error: {err.value!r}"
    return str(found)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """3 synthetic classes (6 training + 2 test tiles each, 32 px, read at 16 px) and the three trained models:
    (bundle_root, dataset)."""
    tmp = tmp_path_factory.mktemp("histology")
    data = Path(make_synthetic_histology(str(tmp / "data"), classes=CLASSES, per_class=6, size=32, test_per_class=2))
    root = tmp / "root"
    torch.set_num_threads(1)
    run("training", AE, root, data)
    run("training", DIFFUSION, root, data)
    run("training", CLASSIFIER, root, data)
    return root, data


def test_each_stage_writes_its_model_with_the_settings_the_next_stage_needs(trained) -> None:
    root, _ = trained
    autoencoder = trained_settings(root / "models" / "autoencoder" / "model.pt")
    assert autoencoder["image_size"] == 16 and autoencoder["scale_factor"] > 0
    diffusion = trained_settings(root / "models" / "diffusion" / "model.pt")
    assert diffusion["latent_size"] == 8 and diffusion["latent_channels"] == 3  # f = 2 here: one halving
    assert (diffusion["beta_start"], diffusion["beta_end"]) == (0.0015, 0.0155)
    assert diffusion["autoencoder"]["scale_factor"] == autoencoder["scale_factor"]
    classifier = trained_settings(root / "models" / "classifier" / "model.pt")
    assert classifier["classes"] == CLASSES and classifier["classifier_noise"] == "noisy"
    state = torch.load(root / "models" / "classifier" / "model.pt", weights_only=True)
    assert state["out.3.weight"].shape[0] == len(CLASSES)  # one logit per class of the data


def read_tiles(folder: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.asarray(Image.open(p)) for p in sorted(folder.glob("*/*.png"))}


def test_guided_generation_writes_every_class_into_class_folders_reproducibly(trained, tmp_path) -> None:
    root, data = trained
    out = tmp_path / "guided"
    run("run", ["inference.json"], root, data, output_dir=str(out))
    manifest = json.loads((out / "generation.json").read_text())
    assert manifest["kind"] == "histology" and manifest["classes"] == CLASSES
    names = [item["name"] for item in manifest["items"]]
    assert names == [f"{c}-SYN{k:05d}" for c in CLASSES for k in range(2)]
    assert [item["label"] for item in manifest["items"]] == [0, 0, 1, 1, 2, 2]
    assert [item["seed"] for item in manifest["items"]] == list(range(6))
    assert manifest["settings"]["classifier_scale"] == 10.0 and manifest["settings"]["sampler"] == "ddim"
    tiles = read_tiles(out)
    assert sorted(tiles) == sorted(names)
    assert all(t.shape == (16, 16, 3) and t.dtype == np.uint8 for t in tiles.values())
    assert (out / "grid.png").is_file()
    again = tmp_path / "again"
    run("run", ["inference.json"], root, data, output_dir=str(again))
    assert all(np.array_equal(tiles[n], t) for n, t in read_tiles(again).items())
    unguided = tmp_path / "unguided"
    run("run", ["inference.json"], root, data, output_dir=str(unguided), classifier_scale=0)
    differ = [n for n, t in read_tiles(unguided).items() if not np.array_equal(tiles[n], t)]
    assert differ, "the classifier gradient changed no tile"
    with pytest.raises(Exception) as err:
        run("run", ["inference.json"], root, data, output_dir=str(out))
    assert "--overwrite" in user_error(err) or "exists" in user_error(err)


def test_few_step_solver_and_a_chosen_class(trained, tmp_path) -> None:
    root, data = trained
    out = tmp_path / "dpm"
    run("run", ["inference.json"], root, data, output_dir=str(out), sampler="dpmpp_2m", sample_classes="LYM")
    manifest = json.loads((out / "generation.json").read_text())
    assert [i["name"] for i in manifest["items"]] == ["LYM-SYN00000", "LYM-SYN00001"]
    assert {i["label"] for i in manifest["items"]} == {2}
    with pytest.raises(Exception) as err:
        run("run", ["inference.json"], root, data, output_dir=str(tmp_path / "x"), sample_classes="MUS")
    assert "MUS" in user_error(err) and "--sample_classes" in user_error(err)


def test_filter_then_evaluation_write_scores_and_metrics(trained, tmp_path) -> None:
    root, data = trained
    out, unguided = root / "eval" / "generated", root / "eval" / "unguided"
    run("run", ["inference.json"], root, data, overwrite=True)
    run("run", ["inference.json"], root, data, overwrite=True, classifier_scale=0)
    assert (out / "generation.json").is_file() and (unguided / "generation.json").is_file()
    run("run", ["inference.json", "filter.json"], root, data, overwrite=True)
    scores = json.loads((out / "filter_scores.json").read_text())
    assert scores["classes"] == CLASSES and len(scores["samples"]) == 6
    for name, sample in scores["samples"].items():
        nearest = min(sample["distances"], key=sample["distances"].get)
        assert sample["nearest"] == nearest and sample["kept"] == (nearest == sample["intended"])
        assert sample["intended"] == name.split("-")[0]
    assert scores["centroids_from"] == {c: 6 for c in CLASSES}
    metrics_file = root / "metrics_test.json"
    run("evaluate", ["inference.json", "evaluate.json"], root, data, metrics_file=str(metrics_file))
    metrics = json.loads(metrics_file.read_text())
    assert metrics["num_generated"] == 6 and metrics["num_unguided"] == 6 and metrics["num_real_test"] == 6
    assert metrics["num_kept"] == sum(s["kept"] for s in scores["samples"].values())
    assert set(metrics["fid"]["guided"]["per_class"]) == set(CLASSES)
    rates = metrics["guidance"]["guided"]["per_class"]
    assert all(sum(r["predicted"].values()) == 2 for r in rates.values())
    assert metrics["guidance"]["unguided"] is not None and metrics["guidance"]["chance"] == pytest.approx(1 / 3)
    arms = metrics["downstream"]["1"]["arms"]
    assert set(arms) == {"real", "real+synthetic"} and set(arms["real"]["mean"]) == {"accuracy", "macro_f1"}


def test_the_seeds_clean_latent_classifier_is_an_option(trained, tmp_path) -> None:
    root, data = trained
    other = tmp_path / "root"
    shutil.copytree(root / "models" / "autoencoder", other / "models" / "autoencoder")
    run("training", CLASSIFIER, other, data, classifier_noise="zero")
    assert trained_settings(other / "models" / "classifier" / "model.pt")["classifier_noise"] == "zero"


def test_a_classifier_for_other_classes_is_refused_before_sampling(trained, tmp_path) -> None:
    root, _ = trained
    fewer = Path(make_synthetic_histology(str(tmp_path / "two"), classes=["ADI", "LYM"], per_class=2, size=32))
    with pytest.raises(Exception) as err:
        run("run", ["inference.json"], root, fewer, output_dir=str(tmp_path / "out"))
    message = user_error(err)
    assert "classifier" in message and "missing DEB" in message and not (tmp_path / "out").exists()


def test_the_diffusion_stage_needs_the_autoencoder_first(tmp_path) -> None:
    data = Path(make_synthetic_histology(str(tmp_path / "data"), classes=CLASSES, per_class=2, size=32))
    with pytest.raises(Exception) as err:
        run("training", DIFFUSION, tmp_path / "root", data)
    assert "train_autoencoder.json" in user_error(err)


def test_bad_tiles_are_one_line_naming_the_file_from_the_command_line(tmp_path) -> None:
    data = Path(make_synthetic_histology(str(tmp_path / "data"), classes=CLASSES, per_class=2, size=32))
    grey = data / "NCT-CRC-HE-100K" / "LYM" / "LYM-GREY.tif"
    Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(grey)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [
        sys.executable, "-m", "monai.bundle", "run", "training",
        "--config_file", str(CONFIGS / "train_autoencoder.json"), "--meta_file", str(CONFIGS / "metadata.json"),
        "--logging_file", QUIET, "--bundle_root", str(tmp_path / "root"), "--dataset_dir", str(data),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert str(grey) in last and "8-bit RGB" in last, done.stderr[-2000:]


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="no torchrun")
@pytest.mark.parametrize("overlay", ["multi_gpu_train_autoencoder.json", "multi_gpu_train.json"])
def test_multi_gpu_overlays_train_under_torchrun_cpu(trained, tmp_path, overlay) -> None:
    root, data = trained
    other = tmp_path / "root"
    shutil.copytree(root / "models" / "autoencoder", other / "models" / "autoencoder")
    layers = {"multi_gpu_train_autoencoder.json": AE, "multi_gpu_train.json": DIFFUSION}[overlay]
    configs = [str(CONFIGS / name) for name in [*layers, overlay]]
    settings = [f"--{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in TINY.items()]
    command = [
        str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nnodes=1", "--nproc_per_node=2",
        "-m", "monai.bundle", "run", "training", "--config_file", json.dumps(configs),
        "--meta_file", str(CONFIGS / "metadata.json"), "--logging_file", QUIET, "--bundle_root", str(other),
        "--dataset_dir", str(data), "--overwrite", "true", *settings,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    model = "autoencoder" if overlay.endswith("autoencoder.json") else "diffusion"
    assert (other / "models" / model / "model.pt").is_file()


def test_demo_plan_trains_each_model_on_its_base_then_generates_filters_and_evaluates(tmp_path, capsys) -> None:
    from meddiff.demo import run_demo

    steps = demo_plan(BUNDLE)
    assert [s["configs"] for s in steps[:3]] == [AE, DIFFUSION, CLASSIFIER]
    assert [s["run_id"] for s in steps] == ["training"] * 3 + ["run"] * 3 + ["evaluate"]
    assert steps[4]["settings"] == {"classifier_scale": 0}  # the unguided set the guidance check compares with
    demo = json.loads((CONFIGS / "demo.json").read_text())
    assert demo["metrics_file"].endswith("'/metrics.json'")
    data = Path(make_synthetic_histology(str(tmp_path / "data"), classes=CLASSES, per_class=4, size=32))
    settings = {k: v for k, v in TINY.items() if k != "label_fractions"}
    metrics = run_demo(BUNDLE.name, tmp_path / "out", dataset_dir=str(data), **settings)
    out = tmp_path / "out" / BUNDLE.name
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert all((out / "models" / m / "model.pt").is_file() for m in ("autoencoder", "diffusion", "classifier"))
    assert (out / "eval" / "generated" / "filter_scores.json").is_file() and metrics["num_unguided"] == 6
    assert set(metrics["downstream"]) == {"0.25", "1"}  # demo.json's label fractions
    assert capsys.readouterr().out.strip().splitlines()[-1] == metrics["verdict"]


def test_pretraining_reads_any_folder_of_unlabelled_tiles(trained, tmp_path) -> None:
    _, data = trained
    unlabelled = tmp_path / "unlabelled" / "slide_a" / "deep"
    unlabelled.mkdir(parents=True)
    tiles = sorted((data / "NCT-CRC-HE-100K").glob("*/*.tif"))[:5]
    for i, tile in enumerate(tiles):
        shutil.copy(tile, unlabelled / f"tile_{i}.tif")
    root = tmp_path / "root"
    run("training", AE, root, data, pretrain_dir=str(tmp_path / "unlabelled"), val_fraction=0.2)
    checkpoint = torch.load(root / "models" / "autoencoder" / "checkpoint.pt", weights_only=True)
    assert checkpoint["iteration"] == 1  # 4 of the 5 unlabelled tiles (1 held out) in one batch of 8, one epoch
