"""Stage 1 of latent diffusion: a KL autoencoder trained with MONAI's `AdversarialTrainer`, and its latent scale factor.

The pieces plug into ``monai.engines.AdversarialTrainer`` (g = ``monai.networks.nets.AutoencoderKL``, d =
``monai.networks.nets.PatchDiscriminator``), whose iteration is: G forward through ``g_inferer``, D on the fakes,
``recon_loss_function(fakes, targets).mean() + g_loss_function(fake_logits).mean()`` backward, G step; then D on the
reals and the detached fakes, ``d_loss_function(real_logits, fake_logits).mean()`` backward, D step.

- `AutoencoderPrepareBatch`: ``(image, image)``, the target of an autoencoder is its input (MONAI's default would
  take a class ``label`` as the target).
- `AutoencoderKLInferer`: runs the autoencoder, returns the reconstruction and keeps the last call's ``z_mu`` and
  ``z_sigma`` for `AutoencoderLoss`. ``sample=True`` decodes a posterior sample (training), ``sample=False`` the mean
  (a deterministic validation).
- `AutoencoderLoss`: ``L1 + kl_weight * KL + perceptual_weight * perceptual`` with
  ``KL = 0.5 * sum(mu^2 + sigma^2 - log sigma^2 - 1)`` over the latent dimensions, mean over the batch (CompVis'
  ``DiagonalGaussianDistribution.kl``, MONAI's tutorials); L1 is the mean absolute error over all elements.
- Perceptual term: no ImageNet network can be downloaded here (MONAI's ``PerceptualLoss`` needs ``lpips`` or
  torchvision and torch hub weights), so it takes a user's local TorchScript feature network (option
  ``--perceptual_weights``), read with ``torch.jit.load``, frozen. It receives the images as they are ((N, 3, H, W)
  in [-1, 1]) and returns a feature map (N, C, ...) or a list/tuple of them; the distance is LPIPS without its learned
  linear heads: per map, features unit-normalised along channels, squared differences summed over channels and
  averaged over positions; summed over maps, averaged over the batch. ``perceptual_weight > 0`` without a network is
  an `OptionError`; CompVis' LPIPS-VGG needs such a file made by the user.
- Adversarial terms, MONAI's ``PatchAdversarialLoss(criterion="hinge")`` on the last element of
  ``PatchDiscriminator``'s output list (its logits). MONAI's hinge passes the logits through tanh first:
  generator ``weight * mean(relu(1 - tanh(fake)))``, discriminator
  ``weight * 0.5 * (mean(relu(1 - tanh(real))) + mean(relu(1 + tanh(fake))))``. CompVis' hinge has no tanh
  (generator ``-mean(fake)``). As CompVis, the generator term can be scaled by the adaptive weight from the last
  decoder layer's gradient norms (`GeneratorAdversarialLoss` ``adaptive_layer``; the bundle's default); without it
  the weight is fixed (``--adversarial_weight``), as in MONAI's tutorials.
- Both adversarial losses are 0 until `start_iteration` iterations have completed (CompVis ``disc_start``: the
  discriminator factor is 0 before it). They read the iteration from the trainer: list them in the trainer's
  ``train_handlers`` (their `attach`). While inactive they return a zero leaf tensor that needs grad, so the
  trainer's ``backward()`` runs but no gradient reaches the discriminator: its optimizer skips parameters without a
  gradient, so neither the discriminator's weights nor its optimizer state move before the start (batch-norm
  running statistics still follow the batches it sees).
- `LatentScaleRecorder`: at the end of training, 1 / std of the (unscaled) posterior samples of the first
  `num_batches` batches of a data loader (Rombach et al. 2022: the first batch; `meddiff.latent.latent_scale_factor`)
  is added to the `TrainingCheckpoint`'s settings as ``scale_factor``, so it is written into ``model.json`` beside the
  final weights: ``meddiff.io.trained_setting(".../model.pt", "scale_factor")`` returns it. The posterior noise comes
  from a generator seeded by `seed`, so with a loader that does not shuffle the value depends on the weights only: a
  resumed run that trains no further writes the same value, one that trains on writes its new weights' value. The
  run's own settings never hold ``scale_factor``, so `meddiff.io.settings_mismatch` does not compare it on resume.
  ``model_best.json`` (written during training) does not hold it.
- `generator_loss_of`: the generator's total loss in the trainer's output (MONAI sets ``output["loss"]`` only under
  amp), for `meddiff.handlers.StopOnNonFiniteLoss` and stats handlers; give the trainer ``decollate=False``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines import PrepareBatch
from monai.inferers import Inferer
from monai.losses import PatchAdversarialLoss

from meddiff.errors import OptionError
from meddiff.features import load_torchscript
from meddiff.latent import latent_scale_factor
from meddiff.options import Rule, parse
from meddiff.precision import autocast, check_precision

__all__ = [
    "AutoencoderKLInferer",
    "AutoencoderLoss",
    "AutoencoderPrepareBatch",
    "DiscriminatorAdversarialLoss",
    "GeneratorAdversarialLoss",
    "LatentScaleRecorder",
    "generator_loss_of",
    "kl_divergence",
    "perceptual_distance",
]

logger = logging.getLogger(__name__)

_NUM_BATCHES = Rule("int", low=1, hint="batches whose latents set the scale factor; Rombach et al. use 1")


class AutoencoderPrepareBatch(PrepareBatch):
    """``(batch[image_name], batch[image_name])`` on the device: an autoencoder's target is its input.

    Args:
        image_name: batch key of the images.
    """

    def __init__(self, image_name: str = "image") -> None:
        self.image_name = image_name

    def __call__(
        self,
        batchdata: dict[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.image_name not in batchdata:
            raise ValueError(f"every autoencoder batch needs {self.image_name!r}; this one has {sorted(batchdata)}.")
        images = torch.as_tensor(batchdata[self.image_name]).to(device=device, non_blocking=non_blocking, **kwargs)
        return images, images


class AutoencoderKLInferer(Inferer):
    """Run an `AutoencoderKL`: return the reconstruction, keep ``z_mu`` and ``z_sigma`` of the last call.

    Args:
        sample: decode a posterior sample ``z_mu + z_sigma * eps`` (training); False decodes ``z_mu`` (validation).
        precision: "fp32", "bf16", "fp16" or "auto": the network runs under that autocast; outputs are float32.
    """

    def __init__(self, sample: bool = True, precision: str = "fp32") -> None:
        super().__init__()
        self.sample, self.precision = bool(sample), check_precision(precision)
        self.z_mu: torch.Tensor | None = None
        self.z_sigma: torch.Tensor | None = None

    def __call__(self, inputs: torch.Tensor, network: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        module = getattr(network, "module", network)
        with autocast(inputs.device, self.precision):
            if self.sample:
                reconstruction, z_mu, z_sigma = network(inputs)
            else:
                z_mu, z_sigma = module.encode(inputs)
                reconstruction = module.decode(z_mu)
        self.z_mu, self.z_sigma = z_mu.float(), z_sigma.float()
        return reconstruction.float()


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) = 0.5 * sum(mu^2 + sigma^2 - log sigma^2 - 1) over non-batch dims, batch mean."""
    z_mu, z_sigma = z_mu.float(), z_sigma.float()
    per_element = z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2)) - 1.0
    return 0.5 * per_element.flatten(1).sum(dim=1).mean()


def perceptual_distance(network: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LPIPS without learned heads: per feature map, channel-normalised squared differences summed over channels,
    averaged over positions; summed over maps; mean over the batch."""
    fx, fy = network(x), network(y)
    fx = list(fx) if isinstance(fx, (list, tuple)) else [fx]
    fy = list(fy) if isinstance(fy, (list, tuple)) else [fy]
    total = x.new_zeros(x.shape[0], dtype=torch.float32)
    for a, b in zip(fx, fy):
        a, b = a.float(), b.float()
        a = a / (a.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
        b = b / (b.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
        total = total + (a - b).pow(2).sum(dim=1).reshape(x.shape[0], -1).mean(dim=1)
    return total.mean()


class AutoencoderLoss(torch.nn.Module):
    """``(reconstruction, target) -> L1 + kl_weight * KL + perceptual_weight * perceptual`` (module docstring).

    Args:
        inferer: the trainer's `AutoencoderKLInferer`; its last ``z_mu``, ``z_sigma`` give the KL term.
        kl_weight: weight of the KL term (option ``--kl_weight``; CompVis and MONAI's tutorials use 1e-6).
        perceptual_weight: weight of the perceptual term (option ``--perceptual_weight``); > 0 needs
            `perceptual_network`.
        perceptual_network: a local TorchScript feature network file (option ``--perceptual_weights``) or a module;
            None for none.
    """

    def __init__(
        self,
        inferer: AutoencoderKLInferer,
        kl_weight: float = 1e-6,
        perceptual_weight: float = 0.0,
        perceptual_network: str | Path | torch.nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.inferer = inferer
        self.kl_weight = parse("kl_weight", kl_weight)
        self.perceptual_weight = parse("perceptual_weight", perceptual_weight)
        if self.perceptual_weight > 0 and perceptual_network is None:
            raise OptionError(
                f"--perceptual_weight is {self.perceptual_weight:g} but no --perceptual_weights is given: pass a local "
                "TorchScript feature network file, or --perceptual_weight 0."
            )
        if isinstance(perceptual_network, (str, Path)):
            perceptual_network = load_torchscript(perceptual_network, "cpu", "--perceptual_weights")
        # a plain attribute, not a submodule: the feature network is not part of the loss's state dict
        self.__dict__["perceptual_network"] = perceptual_network if self.perceptual_weight > 0 else None

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.inferer.z_mu is None or self.inferer.z_sigma is None:
            raise RuntimeError("AutoencoderLoss needs the trainer's g_inferer to be its AutoencoderKLInferer.")
        loss = (reconstruction.float() - target.float()).abs().mean()
        if self.kl_weight:
            loss = loss + self.kl_weight * kl_divergence(self.inferer.z_mu, self.inferer.z_sigma)
        network = self.perceptual_network
        if network is not None:
            network.to(reconstruction.device)
            loss = loss + self.perceptual_weight * perceptual_distance(network, reconstruction, target)
        return loss


class _AdversarialTerm:
    """What both adversarial losses share: the weight, the start and the trainer's iteration."""

    def __init__(self, weight: float, start_iteration: int) -> None:
        self.weight = parse("adversarial_weight", weight)
        self.start_iteration = parse("adversarial_start", start_iteration)
        self.loss = PatchAdversarialLoss(criterion="hinge")
        self.completed: int | None = None  # iterations completed before the current one, from the engine

    def attach(self, engine: Engine) -> None:
        """Read the engine's iteration at the start of every iteration."""
        engine.add_event_handler(Events.ITERATION_STARTED, self.update)

    def update(self, engine: Engine) -> None:
        """Record how many iterations have completed (ignite counts the current one already)."""
        self.completed = engine.state.iteration - 1

    def active(self) -> bool:
        """True once `start_iteration` iterations have completed and the weight is not 0."""
        if self.weight == 0:
            return False
        if self.start_iteration == 0:
            return True
        if self.completed is None:
            raise RuntimeError(
                f"{type(self).__name__} with start_iteration {self.start_iteration} needs the trainer's iteration: "
                "list it in the trainer's train_handlers."
            )
        return self.completed >= self.start_iteration

    @staticmethod
    def logits(output: Any) -> torch.Tensor:
        """The logits of a `PatchDiscriminator` output: the last element of its list (a tensor is taken as is)."""
        return output[-1] if isinstance(output, (list, tuple)) else output

    @staticmethod
    def inactive(like: torch.Tensor) -> torch.Tensor:
        return torch.zeros((), device=like.device, requires_grad=True)


class GeneratorAdversarialLoss(_AdversarialTerm):
    """``fake_logits -> weight [* adaptive] * hinge(fake as real)``, 0 before `start_iteration` (the trainer's
    ``g_loss_function``).

    With `adaptive_layer` (CompVis ``LPIPSWithDiscriminator.calculate_adaptive_weight``, Esser et al. 2021 eq. 7) the
    term is further scaled by ``clamp(|grad_L rec| / (|grad_L adv| + 1e-4), 0, 1e4)``, detached, with ``L`` the
    decoder's last layer and ``rec`` the trainer's reconstruction loss of this iteration (the `AdversarialTrainer`
    computes it before this loss): the adversarial gradient at the output is kept at ``weight`` times the
    reconstruction's, whatever the scales of the two losses.

    Args:
        weight: the adversarial term's weight (option ``--adversarial_weight``; 0 turns it off).
        start_iteration: iterations completed before it joins (option ``--adversarial_start``, CompVis ``disc_start``).
        adaptive_layer: the weight tensor of the decoder's last layer for the adaptive scale (None: a fixed weight).
    """

    def __init__(
        self, weight: float = 0.01, start_iteration: int = 0, adaptive_layer: torch.Tensor | None = None
    ) -> None:
        super().__init__(weight, start_iteration)
        self.adaptive_layer, self.engine = adaptive_layer, None
        self.last_adaptive_weight: float | None = None

    def attach(self, engine: Engine) -> None:  # noqa: D102
        super().attach(engine)
        self.engine = engine

    def __call__(self, fake_output: Any) -> torch.Tensor:
        fake = self.logits(fake_output)
        if not self.active():
            return self.inactive(fake)
        loss = self.loss(fake.float(), target_is_real=True, for_discriminator=False)
        if self.adaptive_layer is None:
            return self.weight * loss
        return self.weight * self.adaptive_weight(loss) * loss

    def adaptive_weight(self, adversarial: torch.Tensor) -> torch.Tensor:
        """``clamp(|grad_L rec| / (|grad_L adv| + 1e-4), 0, 1e4)`` at the last layer ``L``, detached."""
        output = None if self.engine is None else getattr(self.engine.state, "output", None)
        reconstruction = None if not isinstance(output, Mapping) else output.get("reconstruction_loss")
        if reconstruction is None:
            raise RuntimeError(
                "GeneratorAdversarialLoss with adaptive_layer needs the AdversarialTrainer's reconstruction loss of "
                "the iteration: list it in the trainer's train_handlers."
            )
        layer = self.adaptive_layer
        rec_grad = torch.autograd.grad(reconstruction, layer, retain_graph=True)[0]
        adv_grad = torch.autograd.grad(adversarial, layer, retain_graph=True)[0]
        scale = torch.clamp(rec_grad.norm() / (adv_grad.norm() + 1e-4), 0.0, 1e4).detach()
        self.last_adaptive_weight = float(scale)
        return scale


class DiscriminatorAdversarialLoss(_AdversarialTerm):
    """``(real_logits, fake_logits) -> weight * 0.5 * (hinge(real) + hinge(fake))``, 0 before `start_iteration`.

    Args:
        weight: the adversarial term's weight (option ``--adversarial_weight``; 0 turns it off).
        start_iteration: iterations completed before it joins (option ``--adversarial_start``, CompVis ``disc_start``).
    """

    def __init__(self, weight: float = 0.01, start_iteration: int = 0) -> None:
        super().__init__(weight, start_iteration)

    def __call__(self, real_output: Any, fake_output: Any) -> torch.Tensor:
        real, fake = self.logits(real_output), self.logits(fake_output)
        if not self.active():
            return self.inactive(real)
        loss_real = self.loss(real.float(), target_is_real=True, for_discriminator=True)
        loss_fake = self.loss(fake.float(), target_is_real=False, for_discriminator=True)
        return self.weight * 0.5 * (loss_real + loss_fake)


def generator_loss_of(output: Any) -> torch.Tensor:
    """The generator's total loss (reconstruction + adversarial) in an `AdversarialTrainer`'s output."""
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], Mapping):
        output = output[0]
    if "loss" in output:
        return output["loss"]
    return output["reconstruction_loss"] + output["generator_loss"]


class LatentScaleRecorder:
    """At the end of training, store 1 / std of the autoencoder's latents as ``scale_factor`` with the final weights.

    Attach it before the `TrainingCheckpoint` (list it before that handler in ``train#handlers``): both act on
    ``Events.COMPLETED`` and the checkpoint writes ``model.json`` from its settings, which this adds
    ``scale_factor`` to. Attaching it after the checkpoint is refused.

    Args:
        autoencoder: the trained `AutoencoderKL` (any network with ``encode(x) -> (z_mu, z_sigma)``).
        data_loader: batches (dicts with `image_name`) whose posterior samples are measured; use one that does not
            shuffle so the value depends on the weights only.
        checkpoint: the training's `meddiff.handlers.TrainingCheckpoint`.
        num_batches: how many of the loader's first batches are used (Rombach et al. 2022: 1).
        image_name: batch key of the images.
        seed: seed of the posterior noise.
    """

    def __init__(
        self,
        autoencoder: torch.nn.Module,
        data_loader: Iterable,
        checkpoint: Any,
        num_batches: int = 1,
        image_name: str = "image",
        seed: int = 0,
    ) -> None:
        self.autoencoder, self.data_loader, self.checkpoint = autoencoder, data_loader, checkpoint
        self.num_batches = _NUM_BATCHES("num_batches", num_batches)
        self.image_name, self.seed = image_name, parse("seed", seed)
        self.scale_factor: float | None = None

    def attach(self, engine: Engine) -> None:
        """Record at ``Events.COMPLETED``, ahead of the checkpoint's final save."""
        if engine.has_event_handler(self.checkpoint.save_final, Events.COMPLETED):
            raise TypeError(
                "LatentScaleRecorder is attached after the TrainingCheckpoint: list it before that handler in "
                "train#handlers, so the scale factor is recorded before the final weights are written."
            )
        engine.add_event_handler(Events.COMPLETED, self)

    @torch.no_grad()
    def compute(self) -> float:
        """1 / std of posterior samples of the first `num_batches` batches."""
        module = getattr(self.autoencoder, "module", self.autoencoder)
        parameter = next(module.parameters())
        generator = torch.Generator().manual_seed(self.seed)
        was_training = module.training
        module.eval()
        latents: list[torch.Tensor] = []
        try:
            for index, batch in enumerate(self.data_loader):
                if index >= self.num_batches:
                    break
                images = batch[self.image_name] if isinstance(batch, Mapping) else batch
                images = torch.as_tensor(images).to(device=parameter.device, dtype=parameter.dtype)
                z_mu, z_sigma = module.encode(images)
                eps = torch.randn(z_mu.shape, generator=generator).to(device=z_mu.device, dtype=z_mu.dtype)
                latents.append((z_mu + z_sigma * eps).float().cpu())
        finally:
            module.train(was_training)
        if not latents:
            raise ValueError("LatentScaleRecorder's data_loader gave no batch: the latent scale factor needs one.")
        return latent_scale_factor(torch.cat(latents))

    def __call__(self, engine: Engine) -> None:
        self.scale_factor = self.compute()
        self.checkpoint.settings = {**(self.checkpoint.settings or {}), "scale_factor": self.scale_factor}
        logger.info(f"latent scale factor {self.scale_factor:.6g} (1 / std of the latents), stored with the weights")
