"""What a user reads: bad input and bad options end a run with one line, exit status 2 and no traceback.

Through the commands a user types (`python -m monai.bundle run ...`, `python -m meddiff demo ...`) as subprocesses
where the last line of stderr is the point, and in-process (the same config runs, faster) for the option rules.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from test_breast_mri_bundle import TINY

from meddiff.cli import demo_grids, metrics_table, parse_settings
from meddiff.demo import bundles_dir, run_bundle
from meddiff.errors import OptionError, find_user_error, format_user_error

MRI = bundles_dir() / "breast_mri_seg_guided_generation"
LIDC = bundles_dir() / "lidc_ambiguous_segmentation"
TINY_MRI = {**TINY, "num_inference_steps": 2}


def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run `python <args>` as a user would, capturing what they read."""
    env = {k: v for k, v in os.environ.items() if k != "MEDDIFF_DEBUG"}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=900, check=False
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit status 2, no traceback, and the last line of stderr is our message holding every fragment."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), last
    for fragment in fragments:
        assert fragment in last, last
    return last


def bundle_args(bundle: Path, run_id: str, configs: list[str], **settings: object) -> list[str]:
    """`-m monai.bundle run ...` words with settings as --name value."""
    config = configs[0] if len(configs) == 1 else json.dumps(configs)
    words = ["-m", "monai.bundle", "run", run_id, "--config_file", config, "--meta_file", "configs/metadata.json"]
    words += ["--logging_file", "configs/logging.conf"]
    for name, value in settings.items():
        words += [f"--{name}", value if isinstance(value, str) else json.dumps(value)]
    return words


def write_msd_classes(root: Path, num_classes: int, cases: int = 2, size: int = 16) -> Path:
    """A Decathlon-layout dataset (train and test) whose labels hold every class 0..num_classes-1."""
    rng = np.random.default_rng(0)
    for split in ("Tr", "Ts"):
        (root / f"images{split}").mkdir(parents=True)
        (root / f"labels{split}").mkdir(parents=True)
        for i in range(cases):
            label = np.zeros((size, size, 4), np.uint8)
            for k in range(1, num_classes):
                label[(k * 2) % size : (k * 2) % size + 2, 2:12, :] = k
            image = (label * 20.0 + rng.normal(0, 5, label.shape)).astype(np.float32)
            for sub, array in ((f"images{split}", image), (f"labels{split}", label)):
                nib.save(nib.Nifti1Image(array, np.eye(4)), root / sub / f"case{i}.nii.gz")
    return root


def test_bundle_run_class_values_outside_num_classes_one_line(tmp_path: Path) -> None:
    data = write_msd_classes(tmp_path / "data", num_classes=7)
    args = bundle_args(MRI, "training", ["configs/train.json"], bundle_root=str(tmp_path / "run"), **TINY_MRI)
    proc = cli([*args, "--dataset_dir", str(data), "--num_classes", "4"], cwd=MRI)
    assert_one_line_error(proc, "labelsTr/case0.nii.gz", "outside 0..3", "at least 7")
    assert not (tmp_path / "run" / "models" / "model.pt").exists()


def test_bundle_run_refuses_infinite_learning_rate_one_line(tmp_path: Path) -> None:
    args = bundle_args(MRI, "training", ["configs/train.json"], bundle_root=str(tmp_path), learning_rate="1e400")
    assert_one_line_error(cli(args, cwd=MRI), "--learning_rate", "finite")


def test_debug_switch_shows_the_traceback(tmp_path: Path) -> None:
    args = bundle_args(MRI, "training", ["configs/train.json"], bundle_root=str(tmp_path), learning_rate="1e400")
    proc = subprocess.run(
        [sys.executable, *args], cwd=MRI, capture_output=True, text=True, env={**os.environ, "MEDDIFF_DEBUG": "1"}
    )
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "OptionError" in proc.stderr


def _user_error(bundle: Path, run_id: str, configs: list[str], tmp_path: Path, **settings: object) -> str:
    with pytest.raises(Exception) as info:
        run_bundle(bundle, run_id, configs, bundle_root=str(tmp_path), **settings)
    err = find_user_error(info.value)
    assert err is not None, f"not a user error: {info.value!r}"
    return format_user_error(err)


@pytest.mark.parametrize(
    "bundle, run_id, configs, settings, expected",
    [
        (MRI, "training", ["train.json"], {"learning_rate": float("inf")}, "--learning_rate must be a finite"),
        (MRI, "training", ["train.json"], {"grad_clip_norm": -1}, "--grad_clip_norm must be > 0"),
        (MRI, "training", ["train.json"], {"ablation_prob": 2}, "--ablation_prob must be >= 0 and <= 1"),
        (MRI, "training", ["train.json"], {"resume": "perhaps"}, "--resume must be true or false"),
        (MRI, "training", ["train.json"], {"use_ablated_segmentations": "yes"}, "must be true or false"),
        (MRI, "training", ["train.json"], {"batch_size": 0}, "--batch_size must be >= 1"),
        (LIDC, "training", ["train.json"], {"kl_weight": -1000}, "--kl_weight must be >= 0"),
        (LIDC, "run", ["inference.json"], {"hu_window": [2000, -1024]}, "--hu_window must be increasing"),
        (LIDC, "run", ["inference.json"], {"crop_spacing_mm": -1}, "--crop_spacing_mm must be > 0"),
        (LIDC, "run", ["inference.json"], {"frequency_thresholds": [2, -1]}, "--frequency_thresholds must be > 0"),
        (LIDC, "run", ["inference.json"], {"max_items": -1}, "--max_items must be >= 1"),
        (LIDC, "run", ["inference.json"], {"progress": "no"}, "--progress must be true or false"),
        (LIDC, "run", ["inference.json"], {"num_inference_steps": 2000}, "at most the model's --num_train_timesteps"),
        (MRI, "run", ["inference.json"], {"overwrite": "maybe"}, "--overwrite must be true or false"),
        (MRI, "run", ["inference.json"], {"sampler": "euler"}, "--sampler must be one of"),
    ],
)
def test_options_refused_before_any_work(
    tmp_path: Path, bundle: Path, run_id: str, configs: list[str], settings: dict, expected: str
) -> None:
    line = _user_error(bundle, run_id, configs, tmp_path, **settings)
    assert expected in line
    assert not (tmp_path / "models").exists() and not (tmp_path / "eval").exists()


def test_demo_takes_num_classes_from_the_data_and_passes_settings_through(tmp_path: Path) -> None:
    data = write_msd_classes(tmp_path / "data", num_classes=7)
    settings = [w for k, v in TINY_MRI.items() for w in (f"--{k}", json.dumps(v))]
    base = ["-m", "meddiff", "demo", "--bundle", "breast_mri_seg_guided_generation", "--dataset_dir", str(data)]
    proc = cli([*base, "--output_dir", str(tmp_path / "out"), *settings], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "num_classes=7" in proc.stdout
    assert "faithfulness_dice" in proc.stdout and "metric" in proc.stdout  # the table a person reads
    out = tmp_path / "out" / "breast_mri_seg_guided_generation"
    stored = json.loads((out / "models" / "model.json").read_text())["settings"]
    assert stored["num_classes"] == 7 and stored["img_size"] == 16
    with Image.open(out / "grid.png") as grid:
        assert grid.height >= 128 and grid.width >= 2 * 128  # tiles upscaled from 16 px
    refused = cli([*base, "--output_dir", str(tmp_path / "out2"), *settings, "--num_classes", "4"], cwd=tmp_path)
    assert_one_line_error(refused, "case0.nii.gz", "outside 0..3", "at least 7")
    assert not (tmp_path / "out2" / "breast_mri_seg_guided_generation").exists()


def test_demo_empty_dataset_folder_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    base = [
        "-m",
        "meddiff",
        "demo",
        "--bundle",
        "lidc_ambiguous_segmentation",
        "--dataset_dir",
        str(tmp_path / "empty"),
    ]
    assert_one_line_error(cli([*base, "--output_dir", str(tmp_path / "out")], cwd=tmp_path), str(tmp_path / "empty"))


def test_demo_refuses_unknown_setting_with_suggestion(tmp_path: Path) -> None:
    proc = cli(["-m", "meddiff", "demo", "--bundle", "breast_mri_seg_guided_generation", "--num_clases", "7"], tmp_path)
    assert_one_line_error(proc, "--num_clases is not a setting", "--num_classes")


def test_demo_refuses_a_bad_inference_setting_before_training(tmp_path: Path) -> None:
    """--sampler is read by inference only; the demo checks it before it trains (and writes nothing)."""
    proc = cli(["-m", "meddiff", "demo", "--bundle", "lidc_ambiguous_segmentation", "--sampler", "euler",
                "--output_dir", str(tmp_path / "out")], tmp_path)  # fmt: skip
    assert_one_line_error(proc, "--sampler", "dpmpp_2m")
    assert not (tmp_path / "out").exists()


def test_demo_points_to_the_grid_of_every_bundle_layout(tmp_path: Path) -> None:
    def grids(*names: str) -> list[str]:
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        for name in names:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(b"png")
        return [str(p.relative_to(out)) for p in demo_grids(out)]

    assert grids("grid.png", "eval/generated/cluster_0/grid.png") == ["grid.png"]  # the bundle's own grid first
    assert grids("eval/generated/grid.png", "eval/unguided/grid.png") == ["eval/generated/grid.png"]  # histology
    clusters = ["eval/generated/cluster_0/grid.png", "eval/generated/cluster_1/grid.png"]
    assert grids(*reversed(clusters)) == clusters  # one per cluster (polyps, nuclei), in order
    assert grids("metrics.json") == []


def test_parse_settings_reads_json_values() -> None:
    assert parse_settings(["--num_classes", "7", "--ablated_classes=[2]", "--sampler", "ddpm", "--x", "false"]) == {
        "num_classes": 7,
        "ablated_classes": [2],
        "sampler": "ddpm",
        "x": False,
    }
    with pytest.raises(OptionError, match="--img_size needs a value"):
        parse_settings(["--img_size"])


def test_metrics_table_flattens_means() -> None:
    table = metrics_table({"num_images": 3, "mean": {"ged": 0.5, "ci": 0.25}, "per_image": {"a": {"ged": 1.0}}})
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "value"]
    assert [line.split() for line in lines[2:]] == [["num_images", "3"], ["ged", "0.5000"], ["ci", "0.2500"]]


@pytest.fixture(scope="module")
def trained_lidc(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny LIDC bundle trained for one epoch on the built-in synthetic crops: (bundle_root, dataset_dir)."""
    from test_lidc_workflow import TINY as TINY_LIDC

    from meddiff.data.lidc import make_synthetic_lidc

    root = tmp_path_factory.mktemp("lidc")
    data = Path(make_synthetic_lidc(str(root / "data"), num_train=4, num_test=2, size=32))
    run_bundle(
        LIDC,
        "training",
        ["train.json", "demo.json"],
        bundle_root=str(root),
        dataset_dir=str(data),
        **{**TINY_LIDC, "num_epochs": 1},
    )
    return root, data


def _lidc(run_id: str, configs: list[str], root: Path, data: Path, **settings: object) -> None:
    from test_lidc_workflow import TINY as TINY_LIDC

    run_bundle(
        LIDC, run_id, [*configs, "demo.json"], bundle_root=str(root), dataset_dir=str(data), **{**TINY_LIDC, **settings}
    )


def test_bundle_inference_rerun_with_overwrite_false_keeps_files(trained_lidc: tuple[Path, Path]) -> None:
    root, data = trained_lidc
    _lidc("run", ["inference.json"], root, data, output_dir=str(root / "out"))
    written = {p: p.read_bytes() for p in (root / "out").rglob("*.png")}
    with pytest.raises(Exception) as info:
        _lidc("run", ["inference.json"], root, data, output_dir=str(root / "out"), overwrite="false", seed=5)
    assert "already exist" in format_user_error(find_user_error(info.value))
    assert {p: p.read_bytes() for p in (root / "out").rglob("*.png")} == written
    _lidc("run", ["inference.json"], root, data, output_dir=str(root / "out"), overwrite="TRUE", seed=5)
    assert {p: p.read_bytes() for p in (root / "out").rglob("*.png")} != written


def test_bundle_inference_refuses_settings_the_model_was_not_trained_with(trained_lidc: tuple[Path, Path]) -> None:
    root, data = trained_lidc
    with pytest.raises(Exception) as info:
        _lidc("run", ["inference.json"], root, data, output_dir=str(root / "other"), num_train_timesteps=500)
    line = format_user_error(find_user_error(info.value))
    assert "num_train_timesteps=1000" in line and "num_train_timesteps=500" in line
    assert not (root / "other").exists()


def test_bundle_training_refuses_to_replace_weights_trained_elsewhere(tmp_path: Path) -> None:
    from meddiff.data.lidc import make_synthetic_lidc

    data = Path(make_synthetic_lidc(str(tmp_path / "data"), num_train=2, num_test=1, size=32))
    (tmp_path / "run" / "models").mkdir(parents=True)
    (tmp_path / "run" / "models" / "model.pt").write_bytes(b"weights from elsewhere")
    with pytest.raises(Exception) as info:
        _lidc("training", ["train.json"], tmp_path / "run", data, num_epochs=1)
    assert "no checkpoint" in format_user_error(find_user_error(info.value))
    assert (tmp_path / "run" / "models" / "model.pt").read_bytes() == b"weights from elsewhere"


def test_demo_overwrite_never_deletes_a_dataset_inside_the_output(tmp_path: Path) -> None:
    data = write_msd_classes(tmp_path / "out" / "breast_mri_seg_guided_generation" / "data", num_classes=4)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    base = ["-m", "meddiff", "demo", "--bundle", "breast_mri_seg_guided_generation", "--dataset_dir", str(data)]
    proc = cli([*base, "--output_dir", str(tmp_path / "out"), "--overwrite"], cwd=tmp_path)
    assert_one_line_error(proc, str(data))
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
