"""The weight average (`meddiff.handlers.EMAWeights`): its update rule, and the weights a training writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events

from meddiff.errors import OptionError
from meddiff.handlers import EMAWeights, TrainingCheckpoint


class Scaled(torch.nn.Module):
    """One weight and one buffer, to follow by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0]))
        self.register_buffer("count", torch.tensor([0.0]))


def trainer_of(net: torch.nn.Module, steps: list[float], ema: EMAWeights) -> Engine:
    """An engine whose i-th iteration sets the weight to ``steps[i]`` and bumps the buffer, with `ema` attached."""

    def step(engine: Engine, batch: float) -> None:
        with torch.no_grad():
            net.w.fill_(batch)
            net.count.add_(1.0)

    engine = Engine(step)
    ema.attach(engine)
    return engine


def test_average_follows_the_warm_up_rule_by_hand() -> None:
    net = Scaled()
    ema = EMAWeights(net, decay=0.5)
    trainer_of(net, [3.0, 5.0, 9.0], ema).run([3.0, 5.0, 9.0], max_epochs=1)
    # iteration n uses d = min(0.5, (1 + n) / (10 + n)): n=1 -> 2/11, n=2 -> 3/12 = 0.25, n=3 -> 4/13
    expected = 1.0
    for n, w in enumerate([3.0, 5.0, 9.0], start=1):
        d = min(0.5, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * w
    assert ema.model.w.item() == pytest.approx(expected, rel=1e-6)
    assert ema.model.w.item() != pytest.approx(net.w.item())  # an average, not a copy
    assert ema.model.count.item() == 3.0  # buffers are copied
    assert not ema.model.w.requires_grad and net.w.requires_grad
    assert set(ema.state_dict()) == set(net.state_dict())


def test_long_trainings_reach_the_set_decay() -> None:
    net = Scaled()
    ema = EMAWeights(net, decay=0.9)
    engine = trainer_of(net, [], ema)
    engine.state.iteration = 1000  # (1 + n) / (10 + n) = 0.991 > 0.9: the decay itself
    with torch.no_grad():
        net.w.fill_(11.0)
    ema(engine)
    assert ema.model.w.item() == pytest.approx(0.9 * 1.0 + 0.1 * 11.0)


def test_decay_zero_is_no_average_and_bad_decays_are_refused() -> None:
    net = Scaled()
    ema = EMAWeights(net, decay=0)
    assert ema.model is net
    trainer_of(net, [4.0], ema).run([4.0], max_epochs=1)
    assert ema.state_dict()["w"].item() == 4.0
    with pytest.raises(OptionError, match="ema_decay"):
        EMAWeights(net, decay=1.0)


def test_training_writes_the_average_and_resumes_it(tmp_path: Path) -> None:
    net = Scaled()
    ema = EMAWeights(net, decay=0.5)
    ckpt = tmp_path / "models"
    handler = TrainingCheckpoint(str(ckpt), {"model": net, "ema": ema}, final_key="ema")
    engine = trainer_of(net, [], ema)
    handler.attach(engine)
    engine.run([3.0, 5.0], max_epochs=1)
    final = torch.load(ckpt / "model.pt", weights_only=True)
    assert final["w"].item() == pytest.approx(ema.model.w.item()) and final["w"].item() != 5.0
    state = torch.load(ckpt / "checkpoint.pt", weights_only=True)
    assert state["model"]["w"].item() == 5.0 and state["ema"]["w"].item() == pytest.approx(ema.model.w.item())

    net2 = Scaled()
    ema2 = EMAWeights(net2, decay=0.5)
    resumed = TrainingCheckpoint(str(ckpt), {"model": net2, "ema": ema2}, final_key="ema")
    engine2 = trainer_of(net2, [], ema2)
    resumed.attach(engine2)
    engine2.run([9.0, 7.0], max_epochs=2)  # epoch 1 is restored; epoch 2 runs iterations 3 and 4
    expected = ema.model.w.item()
    for n, w in enumerate([9.0, 7.0], start=3):
        d = min(0.5, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * w
    assert ema2.model.w.item() == pytest.approx(expected, rel=1e-6)


def test_a_sparse_checkpoint_interval_still_checkpoints_the_last_epoch(tmp_path: Path) -> None:
    net = Scaled()
    ema = EMAWeights(net, decay=0.5)
    handler = TrainingCheckpoint(str(tmp_path), {"model": net, "ema": ema}, final_key="ema", save_interval=3)
    engine = trainer_of(net, [], ema)
    handler.attach(engine)
    saved = []
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: saved.append((tmp_path / "checkpoint.pt").is_file()))
    engine.run([3.0], max_epochs=4)
    assert saved == [False, False, True, True]  # written at epoch 3 by the interval, then at completion (epoch 4)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 4


def test_fine_tuning_starts_from_pretrained_weights_and_then_resumes_its_own(tmp_path: Path) -> None:
    pre = Scaled()
    with torch.no_grad():
        pre.w.fill_(4.0)
    from meddiff.errors import UserError
    from meddiff.io import save_trained_weights

    save_trained_weights(pre.state_dict(), tmp_path / "pre" / "model.pt", {"width": 1, "cluster_index": None})
    net = Scaled()
    ema = EMAWeights(net, decay=0.5)
    seen = []
    tune = TrainingCheckpoint(
        str(tmp_path / "tuned"),
        {"model": net, "ema": ema},
        final_key="ema",
        settings={"width": 1, "cluster_index": 0},
        init_from=str(tmp_path / "pre" / "model.pt"),
        init_settings={"width": 1},
    )
    engine = trainer_of(net, [], ema)
    tune.attach(engine)
    engine.add_event_handler(Events.ITERATION_STARTED, lambda e: seen.append((net.w.item(), ema.model.w.item())))
    engine.run([6.0], max_epochs=1)
    assert seen == [(4.0, 4.0)]  # both the network and the average start from the pre-trained weight
    assert ema.model.w.item() == pytest.approx(min(0.5, 2 / 11) * 4.0 + (1 - min(0.5, 2 / 11)) * 6.0)

    net2 = Scaled()
    ema2 = EMAWeights(net2, decay=0.5)
    again = TrainingCheckpoint(
        str(tmp_path / "tuned"),
        {"model": net2, "ema": ema2},
        final_key="ema",
        settings={"width": 1, "cluster_index": 0},
        init_from=str(tmp_path / "pre" / "model.pt"),
        init_settings={"width": 1},
    )
    engine2 = trainer_of(net2, [], ema2)
    again.attach(engine2)
    first = []
    engine2.add_event_handler(Events.ITERATION_STARTED, lambda e: first.append(net2.w.item()))
    engine2.run([8.0], max_epochs=2)
    assert first == [6.0]  # resumed from its own checkpoint, not re-initialised from the pre-trained weights

    wrong = TrainingCheckpoint(
        str(tmp_path / "other"),
        {"model": Scaled()},
        settings={"width": 2},
        init_from=str(tmp_path / "pre" / "model.pt"),
    )
    with pytest.raises(UserError, match="width=1"):
        wrong.attach(engine3 := Engine(lambda e, b: None))
        engine3.run([0.0], max_epochs=1)
