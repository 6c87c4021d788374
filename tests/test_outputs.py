"""All-or-nothing outputs, strict options, exclusive and checked training checkpoints, weights with their settings.

The runs here use stand-in inferers (no sampling) so each test checks one rule in a second or two.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from bundle_helpers import LIDC, MRI, inference_parser, parsed, run_inference
from ignite.engine import Engine
from PIL import Image

import meddiff.io
from meddiff import demo
from meddiff.errors import OptionError, UserError
from meddiff.evaluation import evaluate_mask_conditioned_generation
from meddiff.handlers import StopOnNonFiniteLoss, TrainingCheckpoint
from meddiff.io import (
    OutputExistsError,
    StagedOutput,
    atomic_write,
    load_trained_weights,
    save_json,
    save_png,
    settings_file,
    trained_settings,
)

HOST = meddiff.io._HOST


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones included) with its bytes; empty when the folder does not exist."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class ImageInferer:
    """Stands in for a sampling inferer: a constant image per mask; raises `error` at call `fail_at`."""

    def __init__(self, value: float = 0.0, fail_at: int | None = None, error: type[BaseException] = RuntimeError):
        self.value, self.fail_at, self.error, self.calls = value, fail_at, error, 0

    def __call__(self, cond: torch.Tensor, network: torch.nn.Module, seed: int = 0) -> torch.Tensor:
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise self.error("stopped on purpose")
        return torch.full((cond.shape[0], 1, *cond.shape[2:]), self.value)


class EnsembleInferer:
    """Stands in for `EnsembleSamplingInferer`: a centred square of side `half` * 2 in every member."""

    num_samples, sampler, num_inference_steps = 2, "ddim", 1

    def __init__(self, half: int = 4, fail_at: int | None = None, error: type[BaseException] = RuntimeError):
        self.half, self.fail_at, self.error, self.calls = half, fail_at, error, 0

    def __call__(self, image: torch.Tensor, network: torch.nn.Module, seed: int = 0, output: str = "samples"):
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise self.error("stopped on purpose")
        b, _, h, w = image.shape
        out = torch.zeros(b, self.num_samples, h, w)
        out[..., h // 2 - self.half : h // 2 + self.half, w // 2 - self.half : w // 2 + self.half] = 1
        return out


NET = torch.nn.Linear(1, 1)


def png_masks(folder: Path, count: int = 3) -> Path:
    folder.mkdir(parents=True)
    for i in range(count):
        mask = np.zeros((16, 16), np.uint8)
        mask[4:12, 4 + i : 10 + i] = 1
        Image.fromarray(mask).save(folder / f"case{i}.png")
    return folder


def generation(mask_dir: Path, output_dir: Path, inferer: ImageInferer, **overrides) -> dict:
    """Run the MRI bundle's inference config on PNG masks with the stand-in `inferer`; its writer's result."""
    settings = {"num_classes": 2, "img_size": 8, "batch_size": 1, **overrides}
    bundle_root = mask_dir.parent / "bundle"  # never written: the stand-in network has no weights to load
    objects = {"inferer": inferer, "network": NET}
    return run_inference(MRI, bundle_root, objects, output_dir=str(output_dir), mask_dir=str(mask_dir), **settings)


def ensembles(dataset_dir: Path, output_dir: Path, inferer: EnsembleInferer, **overrides) -> dict:
    """Run the LIDC bundle's inference config with the stand-in `inferer`; the manifest it wrote."""
    settings = {"dataset_dir": str(dataset_dir), "output_dir": str(output_dir), "img_size": 16, **overrides}
    return run_inference(LIDC, dataset_dir.parent / "bundle", {"inferer": inferer, "network": NET}, **settings)


# ---------------------------------------------------------------- 1. all-or-nothing outputs


@pytest.mark.parametrize(
    ("fail_at", "error"),
    [(3, RuntimeError), (4, KeyboardInterrupt)],  # at the last mask, or at the first diversity sample (at COMPLETED)
)
def test_failed_png_generation_leaves_output_as_before_and_rerun_completes(
    tmp_path: Path, fail_at: int, error: type[BaseException]
) -> None:
    masks, out = png_masks(tmp_path / "masks"), tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    failing = ImageInferer(fail_at=fail_at, error=error)
    with pytest.raises(error, match="on purpose"):
        generation(masks, out, failing, diversity_masks=1, samples_per_mask=2)
    assert snapshot(out) == before and failing.calls == fail_at
    result = generation(masks, out, ImageInferer())
    assert len(result["outputs"]) == 3 and (out / "grid.png").is_file()
    assert sorted(p.name for p in (out / "images").iterdir()) == ["case0.png", "case1.png", "case2.png"]
    manifest = json.loads((out / "generation.json").read_text())
    assert manifest["outputs"] == ["images/case0.png", "images/case1.png", "images/case2.png"]
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_interrupted_volume_generation_leaves_nothing_and_stale_staging_is_removed(
    tmp_path: Path, phantom_dir: Path
) -> None:
    out, bundle_root = tmp_path / "generated", tmp_path / "bundle"
    run = {"output_dir": str(out), "dataset_dir": str(phantom_dir), "split": "train", "num_classes": 4, "img_size": 8}
    inferer = ImageInferer(fail_at=2, error=KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        run_inference(MRI, bundle_root, {"inferer": inferer, "network": NET}, **run)
    assert inferer.calls == 2  # one call per label volume: the first volume was done when the second was stopped
    assert not out.exists()  # the folder this run created is gone again
    stale = out / f".meddiff.staging-{HOST}-{dead_pid()}-abcd_123"
    (stale / "imagesTs").mkdir(parents=True)
    (stale / "imagesTs" / "half_written.nii.gz").write_bytes(b"partial")
    live = out / f".meddiff.staging-{HOST}-{os.getppid()}-abcd_123"
    live.mkdir()
    run_inference(MRI, bundle_root, {"inferer": ImageInferer(), "network": NET}, **run)
    assert not stale.exists() and live.exists()  # a live process's staging is never touched
    assert len(list((out / "imagesTs").iterdir())) == 3 and (out / "generation.json").is_file()


def test_existing_outputs_refused_with_count_and_overwrite_false_string(tmp_path: Path) -> None:
    from meddiff.data.lidc import make_synthetic_lidc

    data = make_synthetic_lidc(tmp_path / "data", num_train=1, num_test=2, size=16, seed=1)
    out = tmp_path / "ensembles"
    ensembles(data, out, EnsembleInferer())
    before = snapshot(out)
    refused = EnsembleInferer(half=2)
    with pytest.raises(OutputExistsError, match=r"and 9 other output\(s\) of this run already exists"):
        ensembles(data, out, refused, overwrite="false")
    assert snapshot(out) == before and refused.calls == 0
    failing = EnsembleInferer(half=2, fail_at=2)
    with pytest.raises(RuntimeError, match="on purpose"):
        ensembles(data, out, failing, overwrite="TRUE")
    assert snapshot(out) == before and failing.calls == 2  # the first case was written (staged) before the failure
    ensembles(data, out, EnsembleInferer(half=2), overwrite="TRUE")
    assert snapshot(out) != before and set(snapshot(out)) == set(before)


def test_output_overlapping_input_or_unwritable_is_refused_before_work(tmp_path: Path) -> None:
    masks = png_masks(tmp_path / "masks")
    before = snapshot(masks)
    inferer = ImageInferer()
    with pytest.raises(UserError, match="inside the input"):
        generation(masks, masks / "generated", inferer)
    with pytest.raises(UserError, match="would overwrite or hold the input"):
        generation(masks, tmp_path, inferer, overwrite=True)  # tmp_path/masks/*.png are the inputs
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot be created"):
        generation(masks, tmp_path / "file" / "out", inferer)
    assert inferer.calls == 0 and snapshot(masks) == before


def test_ensemble_output_overlapping_dataset_is_refused_before_work(tmp_path: Path) -> None:
    from meddiff.data.lidc import make_synthetic_lidc

    data = make_synthetic_lidc(tmp_path / "data", num_train=1, num_test=1, size=16, seed=1)
    before, inferer = snapshot(data), EnsembleInferer()
    with pytest.raises(UserError, match="inside the input"):
        ensembles(data, data / "ensembles", inferer)
    with pytest.raises(UserError, match="grid.png would overwrite or hold the input"):  # the grid is an output too
        ensembles(data, tmp_path / "ensembles", inferer, grid_file=str(data / "grid.png"))
    assert inferer.calls == 0 and snapshot(data) == before


def test_dicom_overwrite_replaces_nifti_and_seg_together(tmp_path: Path) -> None:
    from dicom_helpers import write_series

    from meddiff.ensembles import DicomNoduleEnsembles

    pixels = np.full((3, 40, 40), 200, np.int16)
    write_series(tmp_path / "ct", pixels)
    out = tmp_path / "nodules"
    common = {
        "dicom_dir": str(tmp_path / "ct"),
        "centres": [[20, 20, 1], [12, 12, 1]],
        "output_dir": str(out),
        "img_size": 16,
        "crop_size": 16,
        "crop_spacing_mm": None,
    }
    DicomNoduleEnsembles(NET, EnsembleInferer(half=4), **common).run()
    before = snapshot(out)
    with pytest.raises(KeyboardInterrupt):
        DicomNoduleEnsembles(
            NET, EnsembleInferer(half=2, fail_at=2, error=KeyboardInterrupt), overwrite=True, **common
        ).run()
    assert snapshot(out) == before  # nodule_00 was done before the interruption, and is still the old one
    DicomNoduleEnsembles(NET, EnsembleInferer(half=2), overwrite=True, **common).run()
    after = snapshot(out)
    assert set(after) == set(before)
    assert all(after[name] != before[name] for name in after if name != "nodules.json")


def test_atomic_write_temporaries_are_named_and_stale_ones_removed(tmp_path: Path) -> None:
    stale = tmp_path / f".a.png.meddiff-tmp-{HOST}-{dead_pid()}-abcdefgh.tmp.png"
    live = tmp_path / f".b.png.meddiff-tmp-{HOST}-{os.getppid()}-abcdefgh.tmp.png"
    other_host = tmp_path / f".c.png.meddiff-tmp-elsewhere-{dead_pid()}-abcdefgh.tmp.png"
    for f in (stale, live, other_host):
        f.write_bytes(b"partial")
    seen = []

    def write(tmp: str) -> None:
        seen.append(Path(tmp).name)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "d.png", write)
    assert seen[0].startswith(f".d.png.meddiff-tmp-{HOST}-{os.getpid()}-") and seen[0].endswith(".tmp.png")
    assert not stale.exists() and live.exists() and other_host.exists()
    assert not (tmp_path / seen[0]).exists()
    save_png(np.zeros((4, 4), np.uint8), tmp_path / "d.png")


def test_staged_output_refuses_undeclared_paths_and_commits_manifest_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    order: list[str] = []
    real_replace, out = os.replace, tmp_path / "out"

    def replace(src: str, dst: str) -> None:
        order.append(Path(dst).name)
        real_replace(src, dst)

    with StagedOutput(out, [out / "m.json", out / "a.json"], manifest=out / "m.json") as stage:
        save_json({}, stage.path(out / "m.json"))
        save_json({}, stage.path(out / "a.json"))
        with pytest.raises(ValueError, match="not declared"):
            stage.path(out / "other.json")
        monkeypatch.setattr(os, "replace", replace)
    assert order == ["a.json", "m.json"] and sorted(p.name for p in out.iterdir()) == ["a.json", "m.json"]


# ---------------------------------------------------------------- 2. options parsed strictly


def test_options_are_parsed_at_construction(tmp_path: Path) -> None:
    from meddiff.data.lidc import make_synthetic_lidc
    from meddiff.ensembles import DicomNoduleEnsembles, EnsembleWriter
    from meddiff.generation import GenerationWriter

    dicom = {"dicom_dir": str(tmp_path), "centres": [[1, 1, 1]], "output_dir": str(tmp_path / "o")}
    with pytest.raises(OptionError, match="--hu_window must be increasing"):
        DicomNoduleEnsembles(NET, EnsembleInferer(), hu_window=[2000, -1024], **dicom)
    with pytest.raises(OptionError, match="--crop_spacing_mm"):
        DicomNoduleEnsembles(NET, EnsembleInferer(), crop_spacing_mm=-1, **dicom)
    with pytest.raises(OptionError, match="--frequency_thresholds"):
        DicomNoduleEnsembles(NET, EnsembleInferer(), frequency_thresholds=[2, -1], **dicom)
    data = make_synthetic_lidc(tmp_path / "data", num_train=1, num_test=1, size=16, seed=1)
    masks = png_masks(tmp_path / "masks")
    mri = {"mask_dir": str(masks), "num_classes": 2}
    bundles = ((LIDC, EnsembleInferer, {"dataset_dir": str(data)}), (MRI, ImageInferer, mri))
    for bundle, make_inferer, inputs in bundles:
        for bad, message, piece in (
            ({"max_items": -1}, "--max_items", "datalist"),
            ({"overwrite": "yes"}, "--overwrite must be true or false", "writer"),
        ):
            inferer, settings = make_inferer(), {**inputs, "output_dir": str(tmp_path / "o"), **bad}
            objects = {"inferer": inferer, "network": NET}
            with pytest.raises(OptionError, match=message):  # the piece that takes the value refuses it
                parsed(inference_parser(bundle, tmp_path / "bundle", objects, **settings), piece)
            with pytest.raises(OptionError, match=message):  # and a run refuses it before any sampling
                run_inference(bundle, tmp_path / "bundle", objects, **settings)
            assert inferer.calls == 0 and not (tmp_path / "o").exists()
    with pytest.raises(OptionError, match="--overwrite must be true or false"):  # the writers check it themselves
        GenerationWriter([], str(tmp_path / "o"), 2, 8, overwrite="yes")
    with pytest.raises(OptionError, match="--overwrite must be true or false"):
        EnsembleWriter([], str(data), str(tmp_path / "o"), EnsembleInferer(), overwrite="yes")
    with pytest.raises(OptionError, match="--resume"):
        TrainingCheckpoint(str(tmp_path), {}, resume="no")


def test_overwrite_false_string_keeps_existing_generation(tmp_path: Path) -> None:
    masks, out = png_masks(tmp_path / "masks"), tmp_path / "out"
    generation(masks, out, ImageInferer(value=-1.0))
    before = snapshot(out)
    refused = ImageInferer(value=1.0)
    with pytest.raises(OutputExistsError, match="--overwrite true"):
        generation(masks, out, refused, overwrite="false")
    assert snapshot(out) == before and refused.calls == 0


# ---------------------------------------------------------------- 3. training checkpoints


def engine_with(
    ckpt_dir: Path, losses: list[float] | None = None, model: torch.nn.Module | None = None, **kwargs
) -> tuple[Engine, TrainingCheckpoint, torch.nn.Module]:
    model = model or torch.nn.Linear(2, 2)
    losses = losses or [1.0, 1.0]

    def step(engine: Engine, batch: int) -> dict:
        return {"loss": torch.tensor(losses[(engine.state.iteration - 1) % len(losses)])}

    engine = Engine(step)
    handler = TrainingCheckpoint(str(ckpt_dir), {"model": model}, **kwargs)
    handler.attach(engine)
    return engine, handler, model


def test_final_weights_without_checkpoint_are_not_replaced(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    torch.save({"weight": torch.zeros(2, 2)}, models / "model.pt")
    engine, _, _ = engine_with(models)
    with pytest.raises(UserError, match=r"model.pt exists but no checkpoint.pt to resume from: .*--overwrite true"):
        engine.run([0, 1], max_epochs=1)
    assert torch.load(models / "model.pt", weights_only=True)["weight"].sum() == 0
    engine, _, _ = engine_with(models, overwrite="true")
    engine.run([0, 1], max_epochs=1)
    assert set(torch.load(models / "model.pt", weights_only=True)) == {"weight", "bias"}


def test_incomplete_or_corrupt_checkpoint_is_refused(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    torch.save({"optimizer": {}, "epoch": 1, "iteration": 2}, models / "checkpoint.pt")
    engine, _, _ = engine_with(models)
    with pytest.raises(UserError, match=r"checkpoint.pt lacks model"):
        engine.run([0, 1], max_epochs=2)
    (models / "checkpoint.pt").write_bytes(b"not a checkpoint")
    engine, _, _ = engine_with(models)
    with pytest.raises(UserError, match=r"checkpoint.pt cannot be read"):
        engine.run([0, 1], max_epochs=2)
    assert not (models / "model.pt").exists()


def test_second_training_into_one_ckpt_dir_is_refused(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(models / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode()); print('locked', flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        engine, _, _ = engine_with(models)
        with pytest.raises(UserError, match=rf"another training is writing to .*models \(pid {holder.pid}\)"):
            engine.run([0, 1], max_epochs=1)
    finally:
        holder.kill()
        holder.wait()
    engine, _, _ = engine_with(models)
    engine.run([0, 1], max_epochs=1)  # the kernel dropped the dead holder's lock
    assert (models / "model.pt").is_file()
    engine, _, _ = engine_with(models, resume=True)  # and this process released its own at COMPLETED
    engine.run([0, 1], max_epochs=2)


def test_non_finite_loss_stops_training_and_nan_weights_are_never_written(tmp_path: Path) -> None:
    models = tmp_path / "models"
    engine, _, _ = engine_with(models, losses=[1.0, float("nan")])
    StopOnNonFiniteLoss(learning_rate="0.001", grad_clip_norm=1.0).attach(engine)
    with pytest.raises(UserError, match=r"training diverged: loss is nan at epoch 1 iteration 2; .*\(now 0.001\)"):
        engine.run([0, 1, 2], max_epochs=1)
    assert not (models / "model.pt").exists()
    broken = torch.nn.Linear(2, 2)
    with torch.no_grad():
        broken.weight[0, 0] = float("nan")
    engine, _, _ = engine_with(tmp_path / "other", model=broken)
    with pytest.raises(UserError, match="training diverged"):
        engine.run([0], max_epochs=1)
    assert not (tmp_path / "other" / "model.pt").exists() and not (tmp_path / "other" / "checkpoint.pt").exists()


def test_stale_temporaries_in_ckpt_dir_are_removed(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    stale = models / f".checkpoint.pt.meddiff-tmp-{HOST}-{dead_pid()}-abcdefgh.tmp.pt"
    stale.write_bytes(b"partial")
    engine, _, _ = engine_with(models)
    engine.run([0], max_epochs=1)
    assert not stale.exists()


def test_weights_travel_with_their_settings(tmp_path: Path) -> None:
    models = tmp_path / "models"
    settings = {"num_train_timesteps": 1000, "img_size": 32, "network_channels": (8, 16)}
    engine, _, model = engine_with(models, settings=settings)
    engine.run([0, 1], max_epochs=1)
    stored = json.loads(settings_file(models / "model.pt").read_text())
    assert stored["settings"] == {"num_train_timesteps": 1000, "img_size": 32, "network_channels": [8, 16]}
    assert "meddiff_version" in stored and trained_settings(models / "model.pt") == stored["settings"]
    assert trained_settings(tmp_path / "none.pt") == {}
    assert torch.load(models / "model.pt", weights_only=True).keys() == model.state_dict().keys()

    other = {"num_train_timesteps": 500, "img_size": 64, "network_channels": [8, 16]}
    with pytest.raises(UserError) as info:
        load_trained_weights(torch.nn.Linear(2, 2), models / "model.pt", other)
    assert str(info.value) == (
        f"{models / 'model.pt'} was trained with num_train_timesteps=1000, img_size=32; this run has "
        "num_train_timesteps=500, img_size=64: pass --num_train_timesteps 1000 --img_size 32 or use the weights "
        "trained with these settings."
    )
    with pytest.raises(UserError, match="does not exist: train the bundle first"):
        load_trained_weights(torch.nn.Linear(2, 2), models / "missing.pt", settings)
    with pytest.raises(UserError, match="does not fit this network"):
        load_trained_weights(torch.nn.Linear(3, 2), models / "model.pt", settings)
    loaded = load_trained_weights(torch.nn.Linear(2, 2), models / "model.pt", {"img_size": 32, "num_classes": None})
    assert torch.equal(loaded.weight, model.weight)

    engine, _, _ = engine_with(models, settings=other)
    with pytest.raises(UserError, match=r"checkpoint.pt was trained with num_train_timesteps=1000, img_size=32"):
        engine.run([0, 1], max_epochs=2)


# ---------------------------------------------------------------- 4. evaluation


def test_evaluation_refuses_existing_metrics_before_work(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.json"
    metrics.write_text('{"fid": 1.0}')
    with pytest.raises(OutputExistsError, match="metrics.json"):
        evaluate_mask_conditioned_generation(None, 2, 16, str(tmp_path / "missing"), str(metrics), overwrite="false")
    assert metrics.read_text() == '{"fid": 1.0}'


# ---------------------------------------------------------------- 5. the demo


BUNDLE = "breast_mri_seg_guided_generation"


def fake_bundle_runs(monkeypatch: pytest.MonkeyPatch, fail_on: str | None = None) -> list[str]:
    """Replace the bundle runs with ones that write a result file (and fail at `fail_on`)."""
    runs: list[str] = []

    def run_bundle(bundle_dir, run_id, configs, logging_file=None, **settings):
        root = Path(settings["bundle_root"])
        runs.append(run_id)
        (root / "models").mkdir(exist_ok=True)
        (root / f"{run_id}.txt").write_text("new")
        if run_id == fail_on:
            raise RuntimeError("bundle run failed")
        if configs[-2:] == ["evaluate.json", "demo.json"]:
            (root / "metrics.json").write_text('{"fid": 2.0}')

    monkeypatch.setattr(demo, "run_bundle", run_bundle)
    return runs


def test_demo_validates_before_touching_anything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = fake_bundle_runs(monkeypatch)
    data = tmp_path / "out" / BUNDLE / "mydata"
    data.mkdir(parents=True)
    (data / "keep.txt").write_text("data")
    with pytest.raises(UserError, match="holds or lies inside the dataset"):
        demo.run_demo(BUNDLE, tmp_path / "out", dataset_dir=str(data), overwrite=True)
    with pytest.raises(UserError, match="inside the dataset"):
        demo.run_demo(BUNDLE, data, dataset_dir=str(data), overwrite=True)
    fake_bundles = tmp_path / "host" / BUNDLE / "bundles"  # so OUTPUT_DIR host/ gives host/<bundle>, the repository
    (fake_bundles / BUNDLE / "configs").mkdir(parents=True)
    (fake_bundles / BUNDLE / "configs" / "demo.json").write_text('{"demo_data": "x.y"}')
    monkeypatch.setattr(demo, "bundles_dir", lambda: fake_bundles)
    with pytest.raises(UserError, match="the bundles folder"):
        demo.run_demo(BUNDLE, fake_bundles, dataset_dir=str(data), overwrite=True)
    with pytest.raises(UserError, match="the repository"):
        demo.run_demo(BUNDLE, tmp_path / "host", dataset_dir=str(data), overwrite=True)
    assert (data / "keep.txt").read_text() == "data" and (fake_bundles / BUNDLE / "configs" / "demo.json").is_file()
    assert runs == []


def test_demo_replaces_old_results_only_when_finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    data.mkdir()
    out = tmp_path / "out" / BUNDLE
    out.mkdir(parents=True)
    (out / "old.txt").write_text("old")
    fake_bundle_runs(monkeypatch, fail_on="run")
    with pytest.raises(RuntimeError, match="bundle run failed"):
        demo.run_demo(BUNDLE, tmp_path / "out", dataset_dir=str(data), overwrite=True)
    assert snapshot(out) == {"old.txt": b"old"} and sorted(p.name for p in out.parent.iterdir()) == [BUNDLE]
    runs = fake_bundle_runs(monkeypatch)
    with pytest.raises(OutputExistsError, match="--overwrite true"):
        demo.run_demo(BUNDLE, tmp_path / "out", dataset_dir=str(data))
    assert runs == []
    stale = out.parent / f".{BUNDLE}.staging-{HOST}-{dead_pid()}-abcdefgh"
    stale.mkdir()
    assert demo.run_demo(BUNDLE, tmp_path / "out", dataset_dir=str(data), overwrite="true") == {"fid": 2.0}
    assert sorted(snapshot(out)) == ["evaluate.txt", "metrics.json", "run.txt", "training.txt"]
    assert sorted(p.name for p in out.parent.iterdir()) == [BUNDLE]


def test_demo_makes_its_builtin_data_with_demo_data_args(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_bundle_runs(monkeypatch)
    fake_bundles = tmp_path / "bundles"
    (fake_bundles / BUNDLE / "configs").mkdir(parents=True)
    (fake_bundles / BUNDLE / "configs" / "demo.json").write_text(
        json.dumps(
            {
                "demo_data": "meddiff.data.lidc.make_synthetic_lidc",
                "demo_data_args": {"num_train": 2, "num_test": 3, "size": 16},
            }
        )
    )
    monkeypatch.setattr(demo, "bundles_dir", lambda: fake_bundles)
    assert demo.run_demo(BUNDLE, tmp_path / "out") == {"fid": 2.0}
    data = tmp_path / "out" / BUNDLE / "demo_data"
    assert sorted(p.name for p in (data / "testing").iterdir()) == ["2", "3", "4"]  # cases after the 2 training ones
    assert json.loads((data / "synthetic_lidc.json").read_text())["num_test"] == 3
