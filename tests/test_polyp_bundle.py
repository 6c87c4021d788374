"""The polyp_cluster_generation bundle run as users run it: cluster -> train each cluster -> generate -> evaluate."""

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

from meddiff.data.polyp import make_synthetic_polyps, read_pair
from meddiff.demo import run_bundle
from meddiff.errors import OptionError, find_user_error
from meddiff.workflows import run_each_cluster

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "polyp_cluster_generation"
CONFIGS = BUNDLE / "configs"
QUIET = str(Path(__file__).resolve().parents[1] / "shared" / "meddiff" / "quiet_logging.conf")

# a tiny network and the cheapest schedules that still run every stage
TINY = {
    "img_size": 32,
    "num_clusters": 2,
    "network_channels": [8, 16],
    "attention_levels": [False, False],
    "num_res_blocks": 1,
    "num_head_channels": 8,
    "norm_num_groups": 8,
    "resblock_updown": False,
    "batch_size": 4,
    "num_epochs": 1,
    "num_targets": 2,
    "num_inference_steps": 6,
    "jump_length": 2,
    "jump_n_sample": 2,
    "style_steps": 4,
    "style_skip_steps": 2,
    "mask_dilation": 3,
    "mask_opening": 2,
    "zecon_lambda": 0.0,
    "progress": False,
}


def run(run_id: str, configs: list[str], root: Path, data: Path, **overrides) -> None:
    run_bundle(BUNDLE, run_id, configs, logging_file=QUIET, bundle_root=str(root), dataset_dir=str(data), **overrides)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """Synthetic polyps clustered into 2 clusters, one tiny model trained per cluster: (bundle_root, dataset)."""
    tmp = tmp_path_factory.mktemp("polyp")
    data = make_synthetic_polyps(tmp / "data", num_cases=12, size=48, seed=0)
    root = tmp / "root"
    torch.set_num_threads(1)
    run("run", ["cluster.json"], root, data, **TINY)
    run_each_cluster(BUNDLE, "training", ["train.json"], root, logging_file=QUIET, dataset_dir=str(data), **TINY)
    return root, data


def test_every_training_pair_gets_a_cluster_and_each_cluster_a_model(trained) -> None:
    root, _ = trained
    clusters = json.loads((root / "clusters" / "clusters.json").read_text())
    assert clusters["num_clusters"] == 2 and sum(clusters["sizes"].values()) == len(clusters["assignments"])
    assert len(clusters["assignments"]) == 9  # 12 pairs, 3 (20%, rounded up) held out for the downstream test
    assert (root / "clusters" / "clusters.png").is_file()
    datalist = json.loads((root / "clusters" / "datalist.json").read_text())  # the assignment as a datalist field
    assert {i["name"]: i["cluster"] for i in datalist["training"]} == clusters["assignments"]
    assert len(datalist["testing"]) == 3 and all("cluster" not in i for i in datalist["testing"])
    for index in (0, 1):
        folder = root / "models" / f"cluster_{index}"
        settings = json.loads((folder / "model.json").read_text())["settings"]
        assert settings["cluster_index"] == index and settings["img_size"] == 32
        state = torch.load(folder / "checkpoint.pt", weights_only=True)
        assert set(state) >= {"model", "ema", "optimizer"}
        final = torch.load(folder / "model.pt", weights_only=True)
        assert all(torch.equal(final[k], state["ema"][k]) for k in final)  # the weight average is what is written
        assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())


def test_generation_writes_pairs_with_records_and_reproduces(trained, tmp_path) -> None:
    root, data = trained
    out_a, out_b, out_c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    run("run", ["inference.json"], root, data, cluster_index=0, output_dir=str(out_a), **TINY)
    run("run", ["inference.json"], root, data, cluster_index=0, output_dir=str(out_b), **TINY)
    run("run", ["inference.json"], root, data, cluster_index=0, output_dir=str(out_c), seed=5, **TINY)
    manifest = json.loads((out_a / "generation.json").read_text())
    assert len(manifest["pairs"]) == 2 and (out_a / "grid.png").is_file()
    clusters = json.loads((root / "clusters" / "clusters.json").read_text())
    for pair in manifest["pairs"]:
        image = np.asarray(Image.open(out_a / pair["image"]))
        mask = np.asarray(Image.open(out_a / pair["mask"]))
        record = json.loads((out_a / pair["record"]).read_text())
        assert image.shape == (32, 32, 3) and mask.shape == (32, 32) and set(np.unique(mask)) <= {0, 255}
        assert record["cluster"] == 0 and clusters["assignments"][record["target"]] == 0
        assert record["settings"]["num_inference_steps"] == 6 and record["provenance"]["seed"] == record["seed"]
        assert np.array_equal(pixels(out_b / pair["image"]), image)  # same seed, same pair
        assert np.array_equal(pixels(out_b / pair["mask"]), mask)
    first = manifest["pairs"][0]["image"]
    assert not np.array_equal(pixels(out_c / first), pixels(out_a / first))
    with pytest.raises(Exception) as err:  # nothing is silently replaced
        run("run", ["inference.json"], root, data, cluster_index=0, output_dir=str(out_a), **TINY)
    assert "already" in str(find_user_error(err.value))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_inpainting_keeps_the_target_outside_its_dilated_polyp(trained, tmp_path, sampler) -> None:
    root, data = trained
    out = tmp_path / "inpainted"
    settings = {**TINY, "style": False, "use_colormatch": False, "mask_opening": 0, "sampler": sampler}
    if sampler != "ddpm":  # RePaint's resampling is the ancestral sampler's; DDIM inpaints without it
        with pytest.raises(Exception) as err:
            run("run", ["inference.json"], root, data, cluster_index=1, output_dir=str(out), **settings)
        assert "use --sampler ddpm, or --jump_n_sample 1" in str(find_user_error(err.value)) and not out.exists()
        settings["jump_n_sample"] = 1
    run("run", ["inference.json"], root, data, cluster_index=1, output_dir=str(out), **settings)
    from meddiff.morphology import dilate

    for name in (p.stem for p in (out / "records").glob("*.json")):
        record = json.loads((out / "records" / f"{name}.json").read_text())
        target, mask = read_pair(record["target_image"], record["target_mask"], 32)
        keep = ~dilate(mask[0].astype(bool), 3)
        generated = np.asarray(Image.open(out / "images" / f"{name}.png"), dtype=np.float32)
        expected = (np.moveaxis(target, 0, -1) + 1.0) * 127.5
        assert keep.sum() > 500
        assert np.abs(generated[keep] - expected[keep]).max() <= 1.0  # the target itself, up to 8-bit rounding
        generated_mask = np.asarray(Image.open(out / "masks" / f"{name}.png")) > 0
        assert not (generated_mask & keep & ~mask[0].astype(bool)).any()  # the mask outside the region is the target's


def test_evaluation_scores_fid_diversity_and_the_downstream_arms(trained, tmp_path) -> None:
    root, data = trained
    generated = tmp_path / "generated"
    for index in (0, 1):
        out = str(generated / f"cluster_{index}")
        run("run", ["inference.json"], root, data, cluster_index=index, output_dir=out, **TINY)
    settings = {**TINY, "downstream_seeds": [0, 1], "downstream_epochs": 1, "downstream_features": [4, 4, 8, 8, 8, 4]}
    metrics_file = tmp_path / "metrics.json"
    run(
        "evaluate", ["inference.json", "evaluate.json"], root, data, generated_dir=str(generated),
        metrics_file=str(metrics_file), grid_file=str(tmp_path / "grid.png"), **settings,
    )  # fmt: skip
    metrics = json.loads(metrics_file.read_text())
    assert metrics["num_generated"] == 4 and metrics["num_real_training"] == 9 and metrics["num_real_test"] == 3
    assert metrics["fid"]["overall"] > 0 and set(metrics["fid"]["per_cluster"]) == {"cluster_0", "cluster_1"}
    assert 0 < metrics["ms_ssim"]["generated"] <= 1 and 0 < metrics["ms_ssim"]["real"] <= 1
    arms = metrics["downstream"]["arms"]
    assert set(arms) == {"real", "synthetic", "real+synthetic"}
    for arm in arms.values():
        dice = arm["mean"]["dice"]
        assert set(arm["per_seed"]) == {"0", "1"} and dice["low"] <= dice["mean"] <= dice["high"]
    assert set(metrics["downstream"]["differences"]) == {"synthetic", "real+synthetic"}
    assert (tmp_path / "grid.png").is_file()


def test_cluster_index_out_of_range_is_one_clear_error(trained) -> None:
    root, data = trained
    with pytest.raises(Exception) as err:
        run("training", ["train.json"], root, data, cluster_index=2, **TINY)
    found = find_user_error(err.value)
    assert isinstance(found, OptionError) and "--cluster_index 2" in str(found) and "0 to 1" in str(found)


def test_more_clusters_than_pairs_is_refused_before_any_work(tmp_path) -> None:
    data = make_synthetic_polyps(tmp_path / "data", num_cases=4, size=48, seed=0)
    with pytest.raises(Exception) as err:
        run("run", ["cluster.json"], tmp_path / "root", data, **{**TINY, "num_clusters": 5})
    assert "--num_clusters" in str(find_user_error(err.value))
    assert not (tmp_path / "root" / "clusters").exists()


def test_clusters_command_trains_every_cluster_and_resumes(trained, tmp_path) -> None:
    root, data = trained
    copy = tmp_path / "root"
    shutil.copytree(root / "clusters", copy / "clusters")
    settings = [f"--{k}={json.dumps(v)}" for k, v in TINY.items() if k != "num_clusters"]
    command = [sys.executable, "-m", "meddiff", "clusters", "training", "--bundle_root", str(copy), "--dataset_dir"]
    first = subprocess.run([*command, str(data), *settings], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "training done for 2 model(s)" in first.stdout
    checkpoints = [copy / "models" / f"cluster_{i}" / "checkpoint.pt" for i in (0, 1)]
    assert [torch.load(c, weights_only=True)["epoch"] for c in checkpoints] == [1, 1]
    more = [s if not s.startswith("--num_epochs") else "--num_epochs=2" for s in settings]
    second = subprocess.run([*command, str(data), *more], capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert [torch.load(c, weights_only=True)["epoch"] for c in checkpoints] == [2, 2]  # each from its checkpoint
    bad = subprocess.run([*command, str(data), "--num_epoch", "2"], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: --num_epoch is not")


def test_verdict_says_plainly_when_pairs_lack_polyps() -> None:
    from meddiff.evaluation.pairs import pair_verdict

    good = {"mask_fraction": {"generated": 0.10, "real": 0.12}, "pairs_with_a_polyp": 0.9}
    assert not pair_verdict(good).startswith("undertrained") and "90%" in pair_verdict(good)
    empty = {"mask_fraction": {"generated": 0.01, "real": 0.12}, "pairs_with_a_polyp": 0.25}
    verdict = pair_verdict(empty)
    assert verdict.startswith("undertrained") and "25%" in verdict and "1.00%" in verdict and "12.00%" in verdict
    too_big = {"mask_fraction": {"generated": 0.40, "real": 0.12}, "pairs_with_a_polyp": 1.0}
    assert pair_verdict(too_big).startswith("undertrained: generated masks cover 40.00%")
    speckle = {**good, "mask_largest_piece": {"generated": 0.2, "real": 0.98}}
    assert pair_verdict(speckle).startswith("undertrained: the generated masks are speckle") and "20%" in pair_verdict(
        speckle
    )


def test_largest_piece_by_hand() -> None:
    from meddiff.evaluation.pairs import largest_piece

    blob = np.zeros((1, 1, 8, 8))
    blob[0, 0, 1:4, 1:4] = 1  # 9 pixels in one piece
    two = blob.copy()
    two[0, 0, 6, 6] = 1  # 9 + 1: the largest piece holds 90%
    dots = np.zeros((1, 1, 8, 8))
    dots[0, 0, ::3, ::3] = 1  # 9 isolated pixels: 1/9 each
    assert largest_piece(blob) == 1.0 and largest_piece(two) == pytest.approx(0.9)
    assert largest_piece(dots) == pytest.approx(1 / 9)
    assert largest_piece(np.concatenate([blob, dots, np.zeros((1, 1, 8, 8))])) == pytest.approx((1 + 1 / 9) / 2)
    assert largest_piece(np.zeros((2, 1, 4, 4))) is None


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None, reason="no torchrun")
def test_multi_gpu_overlay_trains_one_cluster_under_torchrun_cpu(trained, tmp_path) -> None:
    root, data = trained
    copy = tmp_path / "root"
    shutil.copytree(root / "clusters", copy / "clusters")
    configs = [str(CONFIGS / c) for c in ("train.json", "multi_gpu_train.json")]
    network = ("img_size", "network_channels", "attention_levels", "num_res_blocks", "num_head_channels")
    overrides = [f"--{k}={json.dumps(TINY[k])}" for k in (*network, "norm_num_groups", "resblock_updown")]
    command = [
        str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nnodes=1", "--nproc_per_node=2",
        "-m", "monai.bundle", "run", "training", "--config_file", str(configs),
        "--meta_file", str(CONFIGS / "metadata.json"), "--logging_file", str(CONFIGS / "logging.conf"),
        "--bundle_root", str(copy), "--dataset_dir", str(data), "--cluster_index", "1", "--num_epochs", "1",
        "--batch_size", "2", "--val_interval", "1", *overrides,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    folder = copy / "models" / "cluster_1"
    state = torch.load(folder / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state)  # saved unwrapped, loadable by inference.json
    assert torch.load(folder / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert (folder / "model_best.pt").is_file()
    assert (result.stdout + result.stderr).count("Metrics -- val_loss") == 1  # only rank 0 logs


def test_targets_cycle_as_the_seed_or_are_drawn_with_a_seed() -> None:
    from meddiff.pairs import pair_targets

    items = [{"name": n, "image": f"/d/images/{n}.jpg", "label": f"/d/masks/{n}.jpg"} for n in ("a", "b", "c")]
    cycled = pair_targets(items, samples_per_image=2, num_targets=2, seed=10, cluster_index=4)
    # iteration it takes files[it % 3]: a, b, c, a for 2 targets x 2 samples
    assert [t["target"] for t in cycled] == ["a", "b", "c", "a"]
    assert [t["name"] for t in cycled] == ["a_0", "b_0", "c_0", "a_1"]
    assert [t["seed"] for t in cycled] == [10, 11, 12, 13]
    assert {t["cluster"] for t in cycled} == {4}
    every = pair_targets(items)
    assert [t["name"] for t in every] == ["a_0", "b_0", "c_0"] and every[0]["cluster"] == -1
    drawn = pair_targets(items, samples_per_image=2, num_targets=3, target_selection="random", seed=3)
    again = pair_targets(items, samples_per_image=2, num_targets=3, target_selection="random", seed=3)
    assert drawn == again and len(drawn) == 6
    assert [t["target"] for t in drawn[::2]] == [t["target"] for t in drawn[1::2]]  # each drawn target sampled twice
    with pytest.raises(OptionError, match="target_selection"):
        pair_targets(items, target_selection="first")


def test_style_weights_keep_the_seeds_pull_per_pixel_at_other_sizes(monkeypatch) -> None:
    import meddiff.sampling.styling as styling
    from meddiff.inferers import InpaintStyleInferer

    seen = {}

    def fake_style(network, scheduler, source, target, generator, **kwargs):
        seen.update(kwargs)
        return source

    monkeypatch.setattr(styling, "style", fake_style)
    inferer = InpaintStyleInferer(
        sampler="ddpm", inpaint=False, use_colormatch=False, mask_opening=0, num_inference_steps=4, style_steps=4,
        style_skip_steps=1,
        style_loss={"l2_target": 10000.0, "range": 200.0, "zecon": 0.0, "dino_weights": None}, clip_sample=False,
        scheduler_args={"variance_type": "learned_range"},
    )  # fmt: skip

    class Net(torch.nn.Conv2d):  # pass A's network: (x, timesteps) -> (eps, v)
        def forward(self, x, timesteps=None):
            return super().forward(x)

    net = Net(4, 8, 1)
    inferer(torch.zeros(1, 4, 32, 32), net)
    assert seen["l2_target"] == pytest.approx(10000.0 / 64) and seen["range"] == pytest.approx(200.0 / 64)
    assert seen["zecon"] == 0.0 and seen["dino_weights"] is None
    assert seen["mse_source"] == pytest.approx(5000.0 / 64)  # a weight left at StylingLoss's default is scaled too
    inferer(torch.zeros(1, 4, 256, 256), net)
    assert seen["l2_target"] == pytest.approx(10000.0)  # the seed's weights at the seed's size
