"""Validation during training: the held-out split, fixed noise and timesteps, and the best-model checkpoint."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.bundle import ConfigParser
from test_breast_mri_bundle import BUNDLE as MRI
from test_breast_mri_bundle import TINY as TINY_MRI
from test_lidc_workflow import BUNDLE as LIDC
from test_lidc_workflow import TINY as TINY_LIDC

from meddiff.data.errors import DataError
from meddiff.data.lidc import make_synthetic_lidc
from meddiff.engines import CIMDPrepareBatch, ConditionedPrepareBatch
from meddiff.errors import OptionError, UserError
from meddiff.handlers import BestModelCheckpoint, TrainingCheckpoint
from meddiff.validation import (
    FixedNoisePrepareBatch,
    SelectRaterd,
    fixed_noise_items,
    hold_out_cases,
    timestep_grid,
)


def slices(cases: int, per_case: int = 3) -> list[dict]:
    """Items of `cases` volumes, `per_case` slices each, named by their case's label file."""
    return [
        {"label_file": f"/data/labelsTr/case{c:02d}.nii.gz", "name": f"case{c:02d}_z{z:03d}"}
        for c in range(cases)
        for z in range(per_case)
    ]


def test_hold_out_cases_holds_out_whole_cases_by_a_fixed_rule() -> None:
    items = slices(10)
    train, held = hold_out_cases(items, 0.2, case_key="label_file")
    held_cases = {i["label_file"] for i in held}
    assert held_cases == {"/data/labelsTr/case02.nii.gz", "/data/labelsTr/case07.nii.gz"}  # evenly spaced
    assert len(held) == 6 and not held_cases & {i["label_file"] for i in train}  # every slice of a case together
    assert len(train) + len(held) == len(items)
    shuffled = random.Random(0).sample(items, len(items))
    assert {i["name"] for i in hold_out_cases(shuffled, 0.2, "label_file")[1]} == {i["name"] for i in held}


@pytest.mark.parametrize(("cases", "fraction", "expected"), [(2, 0.1, 1), (3, 0.9, 2), (19, 0.1, 2), (50, 0.1, 5)])
def test_hold_out_cases_keeps_at_least_one_case_on_each_side(cases: int, fraction: float, expected: int) -> None:
    train, held = hold_out_cases(slices(cases, 1), fraction, case_key="label_file")
    assert len(held) == expected and len(train) == cases - expected


def test_hold_out_cases_refuses_a_single_case_and_accepts_no_validation() -> None:
    with pytest.raises(UserError, match="needs at least 2.*--val_fraction 0"):
        hold_out_cases(slices(1), 0.1, case_key="label_file")
    train, held = hold_out_cases(slices(1), 0, case_key="label_file")
    assert len(train) == 3 and held == []
    with pytest.raises(OptionError, match="--val_fraction"):
        hold_out_cases(slices(4), 1.0, case_key="label_file")


def test_timestep_grid_is_evenly_spaced_within_the_training_timesteps() -> None:
    assert timestep_grid(4, 1000) == [125, 375, 625, 875]
    assert timestep_grid(3, 3) == [0, 1, 2]
    with pytest.raises(OptionError, match="--num_val_timesteps"):
        timestep_grid(11, 10)


def test_fixed_noise_items_pair_each_item_with_every_timestep_and_its_own_seed() -> None:
    items = [{"image": np.zeros((1, 4, 4)), "name": "a"}, {"image": np.ones((1, 4, 4)), "name": "b"}]
    entries = fixed_noise_items(items, 2, 10, seed=7)
    assert [(e["name"], e["timestep"], e["timestep_index"], e["noise_seed"]) for e in entries] == [
        ("a", 2, 0, 7), ("a", 7, 1, 8), ("b", 2, 0, 9), ("b", 7, 1, 10)
    ]  # fmt: skip


def test_fixed_noise_items_refuse_a_class_only_the_held_out_cases_hold() -> None:
    items = [{"label": np.full((1, 4, 4), 5), "label_file": "/data/labelsTr/case9.nii.gz", "name": "case9"}]
    with pytest.raises(DataError, match=r"case9\.nii\.gz holds class values \[5\] outside 0\.\.3"):
        fixed_noise_items(items, 2, 10, num_classes=4)


def test_fixed_noise_prepare_batch_is_the_same_for_every_call_and_draws_no_training_randomness() -> None:
    batch = {
        "image": torch.rand(3, 1, 8, 8),
        "mask": torch.rand(3, 2, 8, 8),
        "timestep": torch.tensor([5, 50, 500]),
        "noise_seed": torch.tensor([0, 1, 2]),
    }
    prepare = FixedNoisePrepareBatch(ConditionedPrepareBatch(1000, condition_name="mask"))
    state = torch.random.get_rng_state()
    images, target, args, kwargs = prepare(batch)
    assert torch.equal(torch.random.get_rng_state(), state)
    again = prepare(batch)
    assert torch.equal(again[1], target) and torch.equal(again[3]["noise"], kwargs["noise"])
    assert torch.equal(kwargs["timesteps"], batch["timestep"]) and torch.equal(kwargs["condition"], batch["mask"])
    assert torch.equal(images, batch["image"]) and torch.equal(target, kwargs["noise"]) and args == ()
    # an item's noise is its seed's, whichever batch it is in
    alone = prepare({k: v[1:2] for k, v in batch.items()})
    assert torch.equal(alone[3]["noise"][0], kwargs["noise"][1])
    assert not torch.equal(kwargs["noise"][0], kwargs["noise"][1])


def test_cimd_validation_diffuses_the_selected_rater_and_conditions_on_the_image() -> None:
    raters = torch.stack([torch.full((4, 4), float(r)) for r in range(4)])
    picked = [SelectRaterd("label")({"label": raters, "timestep_index": k})["label"] for k in range(6)]
    assert [int(p[0, 0, 0]) for p in picked] == [0, 1, 2, 3, 0, 1]
    batch = {"label": picked[2][None], "image": torch.ones(1, 1, 4, 4), "timestep": [3], "noise_seed": [4]}
    images, _, _, kwargs = FixedNoisePrepareBatch(CIMDPrepareBatch(10))(batch)
    assert torch.equal(images, picked[2][None]) and torch.equal(kwargs["condition"], batch["image"])


def bundle_parser(bundle: Path, root: Path, data: Path, configs: list[str], **settings: object) -> ConfigParser:
    """The bundle's training config on `data`, with the tiny settings."""
    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / name) for name in configs])
    parser.update({"bundle_root": str(root), "dataset_dir": str(data), **settings})
    return parser


@pytest.mark.parametrize("case", ["mri", "lidc_paper", "lidc_cvae"])
def test_validation_loss_is_the_same_for_the_same_weights(case: str, tmp_path: Path, phantom_dir: Path) -> None:
    if case == "mri":
        parser = bundle_parser(MRI, tmp_path, phantom_dir, ["train.json"], **TINY_MRI)
    else:
        data = make_synthetic_lidc(tmp_path / "data", num_train=4, num_test=1, size=32, seed=1)
        design = case.split("_")[1]
        parser = bundle_parser(LIDC, tmp_path, data, ["train.json", "demo.json"], **TINY_LIDC, cimd_design=design)
    evaluator = parser.get_parsed_content("validate#evaluator")

    def perturb() -> None:  # a fresh DiffusionModelUNet predicts 0 whatever its input: move every weight
        with torch.no_grad():  # of the network validated (LIDC: the weight average)
            for p in evaluator.network.parameters():
                p.add_(0.05 * torch.randn_like(p))

    torch.manual_seed(0)
    perturb()
    losses = []
    for epoch in (1, 2):
        torch.manual_seed(epoch)  # training moves the random stream between validations
        evaluator.run(epoch)
        losses.append(evaluator.state.metrics["val_loss"])
    assert losses[0] == losses[1] and np.isfinite(losses[0])
    perturb()
    evaluator.run(3)
    assert evaluator.state.metrics["val_loss"] != losses[0]


def checkpointed(root: Path, **kwargs: object) -> tuple[TrainingCheckpoint, torch.nn.Linear]:
    """A TrainingCheckpoint with best weights over a tiny network."""
    torch.manual_seed(0)
    net = torch.nn.Linear(2, 2)
    ck = TrainingCheckpoint(
        str(root / "models"), {"model": net}, settings={"size": 2}, best_filename="model_best.pt", **kwargs
    )
    return ck, net


def evaluated(epoch: int, best: float, best_epoch: int) -> Engine:
    """An engine whose state says what MONAI's evaluator says after comparing its key metric."""
    engine = Engine(lambda e, b: None)
    engine.state.epoch, engine.state.best_metric, engine.state.best_metric_epoch = epoch, best, best_epoch
    return engine


def test_best_model_is_written_only_when_validation_improves(tmp_path: Path) -> None:
    ck, net = checkpointed(tmp_path)
    saver = BestModelCheckpoint(ck)
    saver(evaluated(1, 0.5, 1))
    best = tmp_path / "models" / "model_best.pt"
    first = torch.load(best, weights_only=True)
    assert json.loads((tmp_path / "models" / "model_best.json").read_text())["settings"] == {"size": 2}
    assert (ck.best_metric, ck.best_epoch) == (0.5, 1)
    with torch.no_grad():
        net.weight.add_(1.0)
    saver(evaluated(2, 0.5, 1))  # no new best: the file keeps epoch 1's weights
    assert torch.equal(torch.load(best, weights_only=True)["weight"], first["weight"])
    saver(evaluated(3, 0.4, 3))
    assert torch.equal(torch.load(best, weights_only=True)["weight"], net.weight)
    assert (ck.best_metric, ck.best_epoch) == (0.4, 3)


def test_best_value_survives_a_resume(tmp_path: Path) -> None:
    ck, _ = checkpointed(tmp_path)
    trainer = Engine(lambda e, b: None)
    trainer.state.epoch, trainer.state.iteration, trainer.state.max_epochs = 4, 8, 10
    ck.start(trainer)
    BestModelCheckpoint(ck)(evaluated(4, 0.25, 4))
    ck.save(trainer)
    ck.release()
    resumed, _ = checkpointed(tmp_path)
    engine = Engine(lambda e, b: None)
    engine.state.max_epochs = 10
    resumed.start(engine)
    assert (resumed.best_metric, resumed.best_epoch) == (0.25, 4) and engine.state.epoch == 4
    validator = evaluated(0, -1, -1)
    BestModelCheckpoint(resumed).restore(validator)
    assert (validator.state.best_metric, validator.state.best_metric_epoch) == (0.25, 4)
    resumed.release()


def test_best_weights_are_never_replaced_by_a_run_that_does_not_resume_them(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "model_best.pt").write_bytes(b"an earlier training's best")
    ck, _ = checkpointed(tmp_path)
    with pytest.raises(UserError, match=r"model_best\.pt exists but no checkpoint\.pt to resume from.*--overwrite"):
        ck.start(Engine(lambda e, b: None))
    assert (tmp_path / "models" / "model_best.pt").read_bytes() == b"an earlier training's best"
    ck, _ = checkpointed(tmp_path, overwrite=True)  # from scratch: the earlier best goes, this run keeps its own
    ck.start(Engine(lambda e, b: None))
    assert not (tmp_path / "models" / "model_best.pt").exists()
    ck.release()


def test_best_model_checkpoint_names_a_wrong_config_reference() -> None:
    with pytest.raises(TypeError, match="TrainingCheckpoint with best_filename"):
        BestModelCheckpoint(object())  # type: ignore[arg-type]
