"""The monuseg_nuclei_generation bundle run as users run it: cluster -> pre-train -> fine-tune -> generate -> OOD ->
evaluate, on synthetic tiles in the MoNuSeg release layout."""

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

from meddiff.data.monuseg import make_synthetic_nuclei, read_patch
from meddiff.demo import run_bundle
from meddiff.errors import find_user_error

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "monuseg_nuclei_generation"
CONFIGS = BUNDLE / "configs"
QUIET = str(Path(__file__).resolve().parents[1] / "shared" / "meddiff" / "quiet_logging.conf")

# a tiny network, the cheapest schedules and a one-epoch downstream test that still run every stage
TINY = {
    "patch_size": 32,
    "cluster_method": "kmeans",
    "num_clusters": 2,
    "network_channels": [8, 16],
    "attention_levels": [False, False],
    "num_res_blocks": 1,
    "num_head_channels": 8,
    "norm_num_groups": 8,
    "resblock_updown": False,
    "spade_intermediate_channels": 8,
    "batch_size": 4,
    "num_epochs": 1,
    "val_interval": 1,
    "num_inference_steps": 4,
    "num_structures": 3,
    "progress": False,
    "downstream_ratios": [1],
    "downstream_seeds": [0],
    "downstream_epochs": 1,
    "downstream_batch_size": 4,
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
    """Synthetic tiles (2 training, 1 test of 64 px: 8 + 4 patches of 32 px), 2 k-means clusters, the pre-trained
    model and cluster 0 fine-tuned from it: (bundle_root, dataset)."""
    tmp = tmp_path_factory.mktemp("nuclei")
    data = make_synthetic_nuclei(tmp / "data", num_train=2, num_test=1, size=64, seed=0)
    root = tmp / "root"
    torch.set_num_threads(1)
    run("run", ["cluster.json"], root, data)
    run("training", ["train.json"], root, data)
    run("training", ["train.json", "finetune.json"], root, data, cluster_index=0)
    return root, data


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def test_pretraining_then_fine_tuning_from_the_pretrained_weights(trained, tmp_path) -> None:
    root, data = trained
    clusters = json.loads((root / "clusters" / "clusters.json").read_text())
    assert clusters["method"] == "kmeans" and clusters["features_of"] == "image"
    assert len(clusters["assignments"]) == 8 and sum(clusters["sizes"].values()) == 8
    pre = root / "models" / "pretrained"
    assert json.loads((pre / "model.json").read_text())["settings"]["cluster_index"] is None
    tuned = json.loads((root / "models" / "cluster_0" / "model.json").read_text())["settings"]
    assert tuned["cluster_index"] == 0 and tuned["patch_size"] == 32
    assert tuned["drop_rate"] == 0.2  # the seed pre-trains without condition dropout and fine-tunes with 0.2
    state = weights(root / "models" / "cluster_0" / "checkpoint.pt")
    assert set(state) >= {"model", "ema", "optimizer"}

    # with a vanishing learning rate the fine-tuned weights stay the pre-trained ones; from scratch they do not
    near = tmp_path / "near"
    shutil.copytree(root / "clusters", near / "clusters")
    shutil.copytree(pre, near / "models" / "pretrained")
    run("training", ["train.json", "finetune.json"], near, data, cluster_index=1, learning_rate=1e-12)
    start, after = weights(pre / "model.pt"), weights(near / "models" / "cluster_1" / "model.pt")
    assert all(torch.allclose(after[k].float(), start[k].float(), atol=1e-6) for k in start)
    run("training", ["train.json"], near, data, cluster_index=1, resume=False, overwrite=True, learning_rate=1e-12)
    scratch = weights(near / "models" / "cluster_1" / "model.pt")
    assert not all(torch.allclose(scratch[k].float(), start[k].float(), atol=1e-6) for k in start)


def test_fine_tuning_needs_the_pretrained_weights_and_without_a_cluster_tunes_every_patch(trained, tmp_path) -> None:
    root, data = trained
    other = tmp_path / "b"
    shutil.copytree(root / "clusters", other / "clusters")
    with pytest.raises(Exception) as err:
        run("training", ["train.json", "finetune.json"], other, data, cluster_index=0)
    message = user_error(err)
    assert "pretrained" in message and "does not exist" in message
    shutil.copytree(root / "models" / "pretrained", other / "models" / "pretrained")
    run("training", ["train.json", "finetune.json"], other, data)
    settings = json.loads((other / "models" / "finetuned" / "model.json").read_text())["settings"]
    assert settings["cluster_index"] is None and settings["drop_rate"] == 0.2
    with pytest.raises(Exception) as err:  # pre-trained without condition dropout (drop_rate 0): nothing to guide with
        run("run", ["inference.json"], root, data, output_dir=str(tmp_path / "c"), guidance_scale=1.5)
    assert "--guidance_scale 1" in user_error(err) and not (tmp_path / "c").exists()
    run("run", ["inference.json"], root, data, output_dir=str(tmp_path / "c"))  # its default: s = 1
    samples = json.loads((tmp_path / "c" / "generation.json").read_text())["samples"]
    assert len(samples) == 3 and json.loads((tmp_path / "c" / samples[0]["record"]).read_text())["guidance_scale"] == 1


def test_generation_writes_images_instance_maps_conditions_and_records(trained, tmp_path) -> None:
    root, data = trained
    out_a, out_b, out_c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    run("run", ["inference.json"], root, data, cluster_index=0, output_dir=str(out_a))
    run("run", ["inference.json"], root, data, cluster_index=0, output_dir=str(out_b))
    run("run", ["inference.json"], root, data, cluster_index=0, output_dir=str(out_c), seed=5)
    manifest = json.loads((out_a / "generation.json").read_text())
    clusters = json.loads((root / "clusters" / "clusters.json").read_text())
    members = sorted(n for n, c in clusters["assignments"].items() if c == 0)
    assert manifest["kind"] == "nuclei" and len(manifest["samples"]) == min(3, len(members))
    assert (out_a / "grid.png").is_file()
    for sample in manifest["samples"]:
        record = json.loads((out_a / sample["record"]).read_text())
        assert record["structure"] in members and record["appearance"] in members
        assert record["settings"]["guidance_scale"] == 1.5 and record["provenance"]["seed"] == record["seed"]
        image = np.asarray(Image.open(out_a / sample["sample"]))
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        inst = np.asarray(Image.open(out_a / sample["inst_mask"]))
        _, expected = read_patch(record["structure_patch"])
        assert np.array_equal(inst, expected)  # the sample's label is its structure's instance map
        appearance, _ = read_patch(record["appearance_patch"])
        shown = np.asarray(Image.open(out_a / sample["appearance_image"]), dtype=np.float32)
        assert np.abs(shown - (np.moveaxis(appearance, 0, -1) + 1.0) * 127.5).max() <= 1.0
        assert np.asarray(Image.open(out_a / sample["condition"])).shape == (32, 32, 3)
        assert np.array_equal(np.asarray(Image.open(out_b / sample["sample"])), image)  # same seed, same sample
    first = manifest["samples"][0]["sample"]
    assert not np.array_equal(np.asarray(Image.open(out_c / first)), np.asarray(Image.open(out_a / first)))
    with pytest.raises(Exception) as err:  # nothing is silently replaced
        run("run", ["inference.json"], root, data, cluster_index=0, output_dir=str(out_a))
    assert "already" in user_error(err)


def test_a_sweep_over_guidance_scales_labels_every_sample_with_its_scale(trained, tmp_path) -> None:
    root, data = trained
    out = tmp_path / "sweep"
    run("run", ["inference.json"], root, data, cluster_index=0, output_dir=str(out), num_structures=2,
        guidance_scales=[1.0, 3.0])  # fmt: skip
    samples = json.loads((out / "generation.json").read_text())["samples"]
    records = [json.loads((out / s["record"]).read_text()) for s in samples]
    assert [r["guidance_scale"] for r in records] == [1.0, 1.0, 3.0, 3.0]
    assert [r["name"].rsplit("_", 2)[1] for r in records] == ["s1", "s1", "s3", "s3"]
    assert records[0]["structure"] == records[2]["structure"] and records[0]["appearance"] == records[2]["appearance"]
    with pytest.raises(Exception) as err:
        run("run", ["inference.json"], root, data, cluster_index=0, output_dir=str(tmp_path / "x"),
            guidance_scales=[1.5, -1])  # fmt: skip
    assert "--guidance_scales" in user_error(err)


def test_ood_scores_then_evaluation_with_the_downstream_arms(trained, tmp_path) -> None:
    root, data = trained
    out = tmp_path / "generated"
    run(
        "run",
        ["inference.json"],
        root,
        data,
        cluster_index=0,
        output_dir=str(out),
        num_structures=2,
        samples_per_structure=2,
    )
    metrics_file = tmp_path / "metrics.json"
    settings = {"cluster_index": 0, "output_dir": str(out), "metrics_file": str(metrics_file)}
    with pytest.raises(Exception) as err:  # the OOD scores come first
        run("run", ["inference.json", "evaluate.json"], root, data, **settings)
    assert "ood.json" in user_error(err)
    run("run", ["inference.json", "ood.json"], root, data, **settings)
    scores = json.loads((out / "ood_scores.json").read_text())
    assert len(scores["samples"]) == 4 and scores["kept"] == 2  # scores at or above the median get p = 0
    p = [s["p"] for s in scores["samples"].values()]
    assert sum(p) == pytest.approx(1.0) and sorted(p)[:2] == [0.0, 0.0]
    run("run", ["inference.json", "evaluate.json"], root, data, **settings)
    metrics = json.loads(metrics_file.read_text())
    assert metrics["num_generated"] == 4 and metrics["num_real_test"] == 4 and metrics["patch_size"] == 32
    assert metrics["fid"]["generated_vs_training"] > 0 and metrics["ood_filter"].endswith("ood_scores.json")
    assert metrics["nuclear_contrast"]["real"] > 0.05  # the synthetic tiles' nuclei are darker than their stroma
    arms = metrics["downstream"]["arms"]
    assert set(arms) == {"real", "real+1x"}
    drawn = metrics["downstream"]["settings"]["num_synthetic"]["real+1x"]
    n_real = metrics["num_real_training"]
    assert drawn == {"requested": n_real, "used": min(n_real, 2)}  # only the 2 patches with p > 0 can be drawn
    for arm in arms.values():
        assert 0.0 <= arm["mean"]["f1"]["mean"] <= 1.0 and 0.0 <= arm["mean"]["aji"]["mean"] <= 1.0
    assert metrics["verdict"]


def test_a_tile_without_its_annotation_is_refused_before_training(tmp_path) -> None:
    data = make_synthetic_nuclei(tmp_path / "data", num_train=2, num_test=1, size=64, seed=1)
    xml = next((data / "MoNuSegTrainingData" / "Annotations").glob("*.xml"))
    xml.unlink()
    with pytest.raises(Exception) as err:
        run("training", ["train.json"], tmp_path / "root", data)
    message = user_error(err)
    assert xml.stem in message and not (tmp_path / "root" / "models").exists()


def test_an_unparsable_annotation_is_one_line_naming_it(tmp_path) -> None:
    data = make_synthetic_nuclei(tmp_path / "data", num_train=2, num_test=1, size=64, seed=2)
    xml = next((data / "MoNuSegTrainingData" / "Annotations").glob("*.xml"))
    xml.write_text("<Annotations><Annotation>")
    with pytest.raises(Exception) as err:
        run("run", ["cluster.json"], tmp_path / "root", data)
    message = user_error(err)
    assert str(xml) in message and "\n" not in message


@pytest.mark.slow
def test_umap_hdbscan_clusters_as_the_seed(tmp_path) -> None:
    data = make_synthetic_nuclei(tmp_path / "data", num_train=4, num_test=1, size=96, seed=3)
    root = tmp_path / "root"
    options = {"cluster_method": "umap_hdbscan", "num_clusters": None, "min_cluster_size": 4, "min_samples": 2,
               "umap_neighbors": 5}  # fmt: skip
    run("run", ["cluster.json"], root, data, **options)
    clusters = json.loads((root / "clusters" / "clusters.json").read_text())
    assert clusters["method"] == "umap_hdbscan" and clusters["num_clusters"] >= 1
    assert len(clusters["assignments"]) == 36 and clusters["umap"]["random_state"] == 42
    assert sum(clusters["sizes"].values()) + clusters["num_noise"] == 36


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="no torchrun")
def test_multi_gpu_overlay_fine_tunes_one_cluster_under_torchrun_cpu(trained, tmp_path) -> None:
    root, data = trained
    other = tmp_path / "root"
    shutil.copytree(root / "clusters", other / "clusters")
    shutil.copytree(root / "models" / "pretrained", other / "models" / "pretrained")
    configs = [str(CONFIGS / c) for c in ("train.json", "finetune.json", "multi_gpu_train.json")]
    network = ("patch_size", "network_channels", "attention_levels", "num_res_blocks", "num_head_channels")
    more = ("norm_num_groups", "resblock_updown", "spade_intermediate_channels")
    overrides = [f"--{k}={json.dumps(TINY[k])}" for k in (*network, *more)]
    command = [
        str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nnodes=1", "--nproc_per_node=2",
        "-m", "monai.bundle", "run", "training", "--config_file", str(configs),
        "--meta_file", str(CONFIGS / "metadata.json"), "--logging_file", str(CONFIGS / "logging.conf"),
        "--bundle_root", str(other), "--dataset_dir", str(data), "--cluster_index", "1", "--num_epochs", "1",
        "--batch_size", "2", "--val_interval", "1", *overrides,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    folder = other / "models" / "cluster_1"
    state = torch.load(folder / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state)  # saved unwrapped, loadable by inference.json
    assert (result.stdout + result.stderr).count("Metrics -- val_loss") == 1  # only rank 0 logs
    settings = json.loads((other / "models" / "cluster_1" / "model.json").read_text())["settings"]
    assert settings["cluster_index"] == 1


def test_demo_plan_runs_every_stage_and_ends_with_the_summary(tmp_path, capsys) -> None:
    from meddiff.demo import run_demo

    data = make_synthetic_nuclei(tmp_path / "data", num_train=2, num_test=1, size=64, seed=4)
    settings = {k: v for k, v in TINY.items() if k not in ("downstream_seeds", "downstream_ratios")}
    metrics = run_demo("monuseg_nuclei_generation", tmp_path / "out", dataset_dir=str(data), **settings)
    out = tmp_path / "out" / "monuseg_nuclei_generation"
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert (out / "models" / "cluster_0" / "model.pt").is_file() and (
        out / "models" / "pretrained" / "model.pt"
    ).is_file()
    assert (out / "eval" / "generated" / "cluster_0" / "ood_scores.json").is_file()
    assert "downstream" not in metrics and metrics["verdict"]  # the demo skips HoVerNet (minutes per epoch on CPU)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == metrics["verdict"]
