"""Stage 1 of latent diffusion (`meddiff.autoencoder`): the losses by hand, and MONAI's `AdversarialTrainer` with the
checkpoint, validation and latent scale factor of ``train_autoencoder.json``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import DataLoader
from monai.engines import AdversarialTrainer, SupervisedEvaluator
from monai.handlers import MeanAbsoluteError, ValidationHandler, from_engine
from monai.networks.nets import AutoencoderKL, PatchDiscriminator

from meddiff.autoencoder import (
    AutoencoderKLInferer,
    AutoencoderLoss,
    AutoencoderPrepareBatch,
    DiscriminatorAdversarialLoss,
    GeneratorAdversarialLoss,
    LatentScaleRecorder,
    generator_loss_of,
    kl_divergence,
)
from meddiff.data.errors import DataError
from meddiff.errors import OptionError, UserError
from meddiff.handlers import BestModelCheckpoint, StopOnNonFiniteLoss, TrainingCheckpoint
from meddiff.io import load_torch, trained_setting
from meddiff.latent import latent_scale_factor
from meddiff.validation import lower_is_better

SETTINGS = {"latent_channels": 3, "image_size": 16}


class _Latents:
    """A stand-in for the inferer: only its last ``z_mu``, ``z_sigma`` are read by the loss."""

    def __init__(self, z_mu: torch.Tensor, z_sigma: torch.Tensor) -> None:
        self.z_mu, self.z_sigma = z_mu, z_sigma


class _Identity(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_kl_by_hand_on_two_elements() -> None:
    mu = torch.tensor([[0.5, -1.0], [0.0, 0.0]])
    sigma = torch.tensor([[1.0, 0.5], [1.0, 1.0]])
    # item 0: 0.5 * ((0.25 + 1 - 0 - 1) + (1 + 0.25 - log 0.25 - 1)); item 1: 0; batch mean
    first = 0.5 * (0.25 + 0.25 - math.log(0.25))
    assert kl_divergence(mu, sigma).item() == pytest.approx(first / 2, rel=1e-6)


def test_loss_is_l1_plus_weighted_kl_and_perceptual(tmp_path: Path) -> None:
    recon, target = torch.tensor([[[[3.0]], [[4.0]]]]), torch.tensor([[[[0.0]], [[1.0]]]])  # (1, 2, 1, 1)
    latents = _Latents(torch.tensor([[0.5, -1.0]]), torch.tensor([[1.0, 0.5]]))
    kl = 0.5 * (0.25 + 0.25 - math.log(0.25))
    loss = AutoencoderLoss(latents, kl_weight=0.1)  # type: ignore[arg-type]
    assert loss(recon, target).item() == pytest.approx(3.0 + 0.1 * kl, rel=1e-6)  # L1 = mean(3, 3)
    # perceptual with an identity "feature network": [3, 4] -> [0.6, 0.8], [0, 1] -> [0, 1]; 0.36 + 0.04
    path = tmp_path / "features.pt"
    torch.jit.save(torch.jit.script(_Identity()), str(path))
    loss = AutoencoderLoss(latents, kl_weight=0.0, perceptual_weight=0.5, perceptual_network=str(path))  # type: ignore[arg-type]
    assert loss(recon, target).item() == pytest.approx(3.0 + 0.5 * 0.4, rel=1e-5)
    assert loss.state_dict() == {}  # the frozen feature network is not saved with the loss


def test_perceptual_options_are_checked(tmp_path: Path) -> None:
    latents = _Latents(torch.zeros(1, 1), torch.ones(1, 1))
    with pytest.raises(OptionError, match="--perceptual_weight is 0.5 but no --perceptual_weights"):
        AutoencoderLoss(latents, perceptual_weight=0.5)  # type: ignore[arg-type]
    with pytest.raises(DataError, match="--perceptual_weights .*missing.pt not found"):
        AutoencoderLoss(latents, perceptual_weight=0.5, perceptual_network=str(tmp_path / "missing.pt"))  # type: ignore[arg-type]
    (tmp_path / "junk.pt").write_text("not torchscript")
    with pytest.raises(DataError, match="torch.jit.load"):
        AutoencoderLoss(latents, perceptual_weight=0.5, perceptual_network=str(tmp_path / "junk.pt"))  # type: ignore[arg-type]
    with pytest.raises(OptionError, match="kl_weight"):
        AutoencoderLoss(latents, kl_weight=-1.0)  # type: ignore[arg-type]


def _run_iterations(handler: object, iterations: int) -> list[float | None]:
    """Attach `handler` to a plain engine; at each iteration record what ``handler.active()`` says."""
    seen: list[float | None] = []
    engine = Engine(lambda e, b: seen.append(handler.active()))  # type: ignore[attr-defined]
    handler.attach(engine)  # type: ignore[attr-defined]
    engine.run(range(iterations), max_epochs=1)
    return seen


def test_adversarial_terms_start_after_start_iteration_and_match_the_hinge_by_hand() -> None:
    g, d = GeneratorAdversarialLoss(weight=0.1, start_iteration=2), DiscriminatorAdversarialLoss(0.1, 2)
    assert _run_iterations(g, 4) == [False, False, True, True]  # 0 and 1 completed: off; 2 completed: on
    assert _run_iterations(d, 4) == [False, False, True, True]
    fake = torch.atanh(torch.tensor([[0.0, 0.5]]))
    real = torch.atanh(torch.tensor([[0.5, -0.5]]))
    features = torch.full((1, 5), 7.0)  # PatchDiscriminator: intermediate features first, logits last
    # generator: mean(relu(1 - tanh(fake))) = mean(1, 0.5) = 0.75
    assert g([features, fake]).item() == pytest.approx(0.1 * 0.75, rel=1e-5)
    # discriminator: 0.5 * (mean(relu(1 - [0.5, -0.5])) + mean(relu(1 + [0, 0.5]))) = 0.5 * (1.0 + 1.25)
    assert d([features, real], [features, fake]).item() == pytest.approx(0.1 * 1.125, rel=1e-5)
    g.completed = d.completed = 1
    assert g([features, fake]).item() == 0.0 and d([features, real], [features, fake]).item() == 0.0
    assert g([features, fake]).requires_grad  # the trainer's backward() must still run
    with pytest.raises(RuntimeError, match="train_handlers"):
        GeneratorAdversarialLoss(0.1, start_iteration=3)(fake)
    assert GeneratorAdversarialLoss(0.1, start_iteration=0)(fake).item() == pytest.approx(0.075, rel=1e-5)
    with pytest.raises(OptionError, match="adversarial_start"):
        GeneratorAdversarialLoss(0.1, start_iteration=-1)


def tiny_autoencoder() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        spatial_dims=2,
        in_channels=3,
        out_channels=3,
        channels=(8, 8),
        attention_levels=(False, False),
        num_res_blocks=1,
        latent_channels=3,
        norm_num_groups=4,
        with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
    )


def tiny_discriminator() -> PatchDiscriminator:
    torch.manual_seed(1)
    return PatchDiscriminator(spatial_dims=2, channels=8, in_channels=3, num_layers_d=2)


def tiles(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.rand((3, 16, 16), generator=g) * 2 - 1, "label": i % 2} for i in range(n)]


def _params(net: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def _moved(before: list[torch.Tensor], after: list[torch.Tensor]) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, after))


def test_adversarial_trainer_moves_each_network_only_when_its_loss_is_active() -> None:
    ae, disc = tiny_autoencoder(), tiny_discriminator()
    inferer = AutoencoderKLInferer()
    g_loss, d_loss = GeneratorAdversarialLoss(0.1, start_iteration=1), DiscriminatorAdversarialLoss(0.1, 1)
    trainer = AdversarialTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=DataLoader(tiles(4, 0), batch_size=2),
        g_network=ae,
        g_optimizer=torch.optim.AdamW(ae.parameters(), 1e-3),
        g_loss_function=g_loss,
        recon_loss_function=AutoencoderLoss(inferer),
        d_network=disc,
        d_optimizer=torch.optim.AdamW(disc.parameters(), 1e-3, weight_decay=0.01),
        d_loss_function=d_loss,
        prepare_batch=AutoencoderPrepareBatch(),
        g_inferer=inferer,
        train_handlers=[g_loss, d_loss],
        decollate=False,
    )
    snapshots = [(_params(ae), _params(disc))]
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: snapshots.append((_params(ae), _params(disc))))
    losses: list[dict] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(dict(e.state.output)))
    trainer.run()
    assert len(snapshots) == 3
    assert _moved(snapshots[0][0], snapshots[1][0])  # iteration 1: the autoencoder learns (L1 + KL)
    assert not _moved(snapshots[0][1], snapshots[1][1])  # ... the discriminator does not, weight decay included
    assert losses[0]["generator_loss"].item() == 0.0 and losses[0]["discriminator_loss"].item() == 0.0
    assert _moved(snapshots[1][0], snapshots[2][0]) and _moved(snapshots[1][1], snapshots[2][1])  # iteration 2: both
    assert losses[1]["discriminator_loss"].item() > 0.0
    total = losses[1]["reconstruction_loss"] + losses[1]["generator_loss"]
    assert generator_loss_of(losses[1]).item() == pytest.approx(total.item())
    assert inferer.z_mu is not None and inferer.z_mu.shape == (2, 3, 8, 8)


def autoencoder_training(
    ckpt_dir: Path, max_epochs: int, save_interval: int = 1, recorder_first: bool = True
) -> tuple[AdversarialTrainer, TrainingCheckpoint, LatentScaleRecorder, AutoencoderKL]:
    """The objects of ``train_autoencoder.json`` (report of helper B), built in Python: 2 training tiles per epoch
    (one batch), 2 validation tiles."""
    device = torch.device("cpu")
    autoencoder, discriminator = tiny_autoencoder().to(device), tiny_discriminator().to(device)
    g_optimizer = torch.optim.AdamW(autoencoder.parameters(), lr=1e-4)
    d_optimizer = torch.optim.AdamW(discriminator.parameters(), lr=1e-4)
    train_loader = DataLoader(tiles(2, 0), batch_size=2, shuffle=True)
    scale_loader = DataLoader(tiles(2, 0), batch_size=2, shuffle=False)
    val_loader = DataLoader(tiles(2, 1), batch_size=2, shuffle=False)
    checkpoint = TrainingCheckpoint(
        str(ckpt_dir),
        {
            "autoencoder": autoencoder,
            "discriminator": discriminator,
            "g_optimizer": g_optimizer,
            "d_optimizer": d_optimizer,
        },
        final_key="autoencoder",
        save_interval=save_interval,
        settings=dict(SETTINGS),
        best_filename="model_best.pt",
    )
    evaluator = SupervisedEvaluator(
        device=device,
        val_data_loader=val_loader,
        network=autoencoder,
        prepare_batch=AutoencoderPrepareBatch(),
        inferer=AutoencoderKLInferer(sample=False),
        key_val_metric={"val_l1": MeanAbsoluteError(output_transform=from_engine(["pred", "label"]))},
        metric_cmp_fn=lower_is_better,
        val_handlers=[BestModelCheckpoint(checkpoint)],
    )
    inferer = AutoencoderKLInferer(sample=True)
    g_loss = GeneratorAdversarialLoss(weight=0.01, start_iteration=1)
    d_loss = DiscriminatorAdversarialLoss(weight=0.01, start_iteration=1)
    recorder = LatentScaleRecorder(autoencoder, scale_loader, checkpoint, num_batches=1)
    handlers = [
        g_loss,
        d_loss,
        ValidationHandler(validator=evaluator, interval=1, epoch_level=True),
        StopOnNonFiniteLoss(output_transform=generator_loss_of),
    ]
    handlers += [recorder, checkpoint] if recorder_first else [checkpoint, recorder]
    trainer = AdversarialTrainer(
        device=device,
        max_epochs=max_epochs,
        train_data_loader=train_loader,
        g_network=autoencoder,
        g_optimizer=g_optimizer,
        g_loss_function=g_loss,
        recon_loss_function=AutoencoderLoss(inferer, kl_weight=1e-6),
        d_network=discriminator,
        d_optimizer=d_optimizer,
        d_loss_function=d_loss,
        prepare_batch=AutoencoderPrepareBatch(),
        g_inferer=inferer,
        train_handlers=handlers,
        decollate=False,
    )
    return trainer, checkpoint, recorder, autoencoder


def test_autoencoder_config_objects_train_validate_and_store_the_scale_factor(tmp_path: Path) -> None:
    ckpt = tmp_path / "models" / "autoencoder"
    trainer, checkpoint, recorder, autoencoder = autoencoder_training(ckpt, max_epochs=2)
    trainer.run()
    assert trainer.state.iteration == 2
    final = ckpt / "model.pt"
    assert {p.name for p in ckpt.iterdir()} >= {"model.pt", "model.json", "model_best.pt", "model_best.json"}
    state = load_torch(ckpt / "checkpoint.pt")
    assert set(state) >= {"autoencoder", "discriminator", "g_optimizer", "d_optimizer", "epoch", "best_metric"}
    assert "scale_factor" not in json.loads((ckpt / "model_best.json").read_text())["settings"]
    # the stored value is 1 / std of the first (unshuffled) batch's posterior samples, noise seeded 0, final weights
    with torch.no_grad():
        z_mu, z_sigma = autoencoder.eval().encode(torch.stack([t["image"] for t in tiles(2, 0)]))
        z = z_mu + z_sigma * torch.randn(z_mu.shape, generator=torch.Generator().manual_seed(0))
    expected = latent_scale_factor(z)
    stored = trained_setting(final, "scale_factor")
    assert stored == pytest.approx(expected, rel=1e-6) and stored == recorder.scale_factor
    assert trained_setting(final, "latent_channels") == 3
    assert torch.equal(load_torch(final)["encoder.blocks.0.conv.weight"], autoencoder.encoder.blocks[0].conv.weight)

    # resumed at max_epochs: no training, the same weights, the same scale factor
    trainer, *_ = autoencoder_training(ckpt, max_epochs=2)
    trainer.run()
    assert trainer.state.iteration == 2
    assert trained_setting(final, "scale_factor") == stored


def test_scale_factor_survives_a_resume_that_trains_on(tmp_path: Path) -> None:
    ckpt = tmp_path / "models"
    # epoch 3 % save_interval 2: the final save also rewrites checkpoint.pt, whose settings then hold scale_factor
    trainer, *_ = autoencoder_training(ckpt, max_epochs=3, save_interval=2)
    trainer.run()
    assert load_torch(ckpt / "checkpoint.pt")["settings"]["scale_factor"] == trained_setting(
        ckpt / "model.pt", "scale_factor"
    )
    before = trained_setting(ckpt / "model.pt", "scale_factor")
    trainer, _, recorder, _ = autoencoder_training(ckpt, max_epochs=4, save_interval=2)  # no settings mismatch
    trainer.run()
    assert trainer.state.iteration == 4
    after = trained_setting(ckpt / "model.pt", "scale_factor")
    assert after == recorder.scale_factor and after != before  # the new weights' own value
    assert json.loads((ckpt / "model.json").read_text())["settings"]["latent_channels"] == 3
    # other settings are still compared on resume
    trainer, checkpoint, *_ = autoencoder_training(ckpt, max_epochs=5, save_interval=2)
    checkpoint.settings = {**SETTINGS, "latent_channels": 4}
    with pytest.raises(UserError, match="latent_channels=3"):
        trainer.run()


def test_recorder_after_the_checkpoint_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="list it before that handler"):
        autoencoder_training(tmp_path / "models", max_epochs=1, recorder_first=False)


def test_recorder_needs_a_batch(tmp_path: Path) -> None:
    checkpoint = TrainingCheckpoint(str(tmp_path), {"model": tiny_autoencoder()})
    recorder = LatentScaleRecorder(checkpoint.save_dict["model"], [], checkpoint)
    with pytest.raises(ValueError, match="gave no batch"):
        recorder.compute()
    with pytest.raises(OptionError, match="num_batches"):
        LatentScaleRecorder(checkpoint.save_dict["model"], [], checkpoint, num_batches=0)


def test_adaptive_weight_balances_the_gradients_at_the_last_layer_by_hand() -> None:
    """CompVis' adaptive weight: |grad_w rec| / (|grad_w adv| + 1e-4) at the last layer w, here by hand.

    With w = [1, 2], rec = sum(3 w) (gradient [3, 3], norm 3 sqrt 2) and the generator hinge on the logit
    x = 0.1 w_1 + 0.2 w_2 = 0.5 (MONAI: relu(1 - tanh(x)), gradient -(1 - tanh^2 x) [0.1, 0.2]).
    """
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    loss = GeneratorAdversarialLoss(weight=0.5, adaptive_layer=w)
    engine = Engine(lambda e, b: None)
    loss.attach(engine)
    logit = (torch.tensor([0.1, 0.2]) * w).sum().view(1, 1, 1, 1)
    engine.state.output = {"reconstruction_loss": (3.0 * w).sum()}
    got = loss([logit])
    sech2 = 1.0 - math.tanh(0.5) ** 2
    adv_norm = sech2 * math.hypot(0.1, 0.2)
    scale = 3.0 * math.sqrt(2.0) / (adv_norm + 1e-4)
    assert loss.last_adaptive_weight == pytest.approx(scale, rel=1e-5)
    assert float(got) == pytest.approx(0.5 * scale * (1.0 - math.tanh(0.5)), rel=1e-5)
    got.backward()
    assert w.grad is not None and torch.allclose(w.grad, -0.5 * scale * sech2 * torch.tensor([0.1, 0.2]), rtol=1e-5)
    engine.state.output = {}
    with pytest.raises(RuntimeError, match="reconstruction loss"):
        loss([logit])
