"""Validation during training: a held-out split, and a denoising loss at fixed noise and fixed timesteps.

A diffusion model's training loss draws new noise and new timesteps at every step, so two evaluations of it are not
comparable. The bundles' ``validate#`` sections score the held-out cases the same way at every validation:

- `hold_out_cases`: the held-out split. Neither data loader has a validation split, so whole cases (one volume's
  slices, one LIDC nodule's crop) are held out of the training split by a fixed rule (see there); at least one
  case is held out and one kept, and ``val_fraction`` 0 holds out nothing (no validation).
- `fixed_noise_items`: each held-out item once per timestep of an evenly spaced grid (`timestep_grid`), each entry
  with its own noise seed. `FixedNoisePrepareBatch` draws that noise (on the CPU, so every device sees the same
  numbers) and hands the training inferer these timesteps instead of random ones.
- The evaluator's key metric is then the mean squared error between the noise and the network's prediction over
  all entries, in the units of the training loss; lower is better (`lower_is_better`).
- CIMD: `CIMDDenoisingInferer` scores the denoiser on the label alone (no KL term); timestep k of a case reads the
  mask of rater ``k mod R`` (`SelectRaterd`), the same pairing at every validation.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.engines import PrepareBatch
from monai.transforms import MapTransform
from torch import nn

from meddiff.cimd import CIMDTrainingInferer
from meddiff.errors import UserError
from meddiff.options import check, parse
from meddiff.precision import autocast, to_memory_format

__all__ = [
    "CIMDDenoisingInferer",
    "FixedNoisePrepareBatch",
    "SelectRaterd",
    "fixed_noise",
    "fixed_noise_items",
    "hold_out_cases",
    "lower_is_better",
    "timestep_grid",
]

_SEED_RANGE = 2**63


def hold_out_cases(
    items: Sequence[Mapping[str, Any]], fraction: float = 0.1, case_key: str = "name"
) -> tuple[list[dict], list[dict]]:
    """Split training items into (training, held-out) by case.

    The rule: the distinct values of ``item[case_key]`` (the case; e.g. the label file that all slices of a volume
    share) are sorted; ``n_val = max(1, round(fraction * n))`` of the ``n`` cases, evenly spaced through that order
    (case ``(2j + 1) * n // (2 n_val)`` for ``j < n_val``), are held out with all their items, and at least one case
    is kept. The same cases give the same split on every run and machine. ``fraction`` 0 holds out nothing.

    Args:
        items: the training split as the data loader lists it.
        fraction: the fraction of cases held out (option ``--val_fraction``), in [0, 1).
        case_key: the item key that names an item's case.
    """
    fraction = parse("val_fraction", fraction)
    items = [dict(item) for item in items]
    if fraction == 0:
        return items, []
    missing = next((item for item in items if case_key not in item), None)
    if missing is not None:
        raise ValueError(f"hold_out_cases: an item has no {case_key!r} to name its case (keys {sorted(missing)}).")
    cases = sorted({str(item[case_key]) for item in items})
    if len(cases) < 2:
        shown = f" ({cases[0]})" if cases else ""
        raise UserError(
            f"the training data hold {len(cases)} case{shown}: validation holds out whole cases and needs at least "
            "2; add training cases, or pass --val_fraction 0 to train without validation."
        )
    n_val = min(len(cases) - 1, max(1, round(fraction * len(cases))))
    held = {cases[(2 * j + 1) * len(cases) // (2 * n_val)] for j in range(n_val)}
    return (
        [item for item in items if str(item[case_key]) not in held],
        [item for item in items if str(item[case_key]) in held],
    )


def timestep_grid(num_timesteps: int, num_train_timesteps: int) -> list[int]:
    """``num_timesteps`` evenly spaced timesteps, the middles of equal bins of 0..T-1: ``(2k + 1) * T // (2K)``."""
    k_total = parse("num_val_timesteps", num_timesteps)
    total = parse("num_train_timesteps", num_train_timesteps)
    check(
        k_total <= total,
        f"--num_val_timesteps ({k_total}) must be at most the model's --num_train_timesteps ({total}).",
    )
    return [(2 * k + 1) * total // (2 * k_total) for k in range(k_total)]


def fixed_noise_items(
    items: Sequence[Mapping[str, Any]],
    num_timesteps: int,
    num_train_timesteps: int,
    seed: int = 0,
    num_classes: int | None = None,
) -> list[dict]:
    """Each held-out item once per timestep of `timestep_grid`, with that entry's timestep and noise seed.

    Entry ``j = i * K + k`` (item i, timestep k) is the item plus ``"timestep"``, ``"timestep_index"`` (k) and
    ``"noise_seed"`` (``seed + j``): the same noise and timesteps at every validation of a run.

    Args:
        items: the held-out items (`hold_out_cases`).
        num_timesteps: timesteps per item, K (option ``--num_val_timesteps``).
        num_train_timesteps: the model's training timesteps, T.
        seed: the run's seed; entry j draws its noise from ``seed + j``.
        num_classes: when given, every item's ``"label"`` is checked to hold classes below it (the training part's
            count): a class that only the held-out cases hold is refused, naming the file.
    """
    grid = timestep_grid(num_timesteps, num_train_timesteps)
    seed = parse("seed", seed)
    if num_classes is not None:
        from meddiff.data import check_num_classes

        check_num_classes(list(items), num_classes)
    entries = []
    for item in items:
        for k, t in enumerate(grid):
            entries.append(
                {**item, "timestep": t, "timestep_index": k, "noise_seed": (seed + len(entries)) % _SEED_RANGE}
            )
    return entries


def fixed_noise(seeds: Sequence[int] | torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """One standard normal tensor of `shape` per seed, drawn on the CPU, stacked: (len(seeds), *shape)."""
    seeds = torch.as_tensor(seeds).reshape(-1).tolist()
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds])


class FixedNoisePrepareBatch(PrepareBatch):
    """The training prepare-batch's inputs, target and condition, at the batch's own timesteps and seeded noise.

    Returns ``(x_0, target, (), {"noise", "timesteps"[, "condition"]})`` as MONAI's `DiffusionPrepareBatch` does, with
    ``timesteps = batch[timestep_key]`` and the noise of item b drawn from ``batch[seed_key][b]`` (`fixed_noise`),
    so no random number of the training is drawn.

    Args:
        prepare_batch: the training's prepare-batch (a `meddiff.engines.ConditionedPrepareBatch`: its
            ``get_images``, ``get_condition`` and ``get_target`` hooks).
        timestep_key: batch key of the timesteps.
        seed_key: batch key of the noise seeds.
    """

    def __init__(self, prepare_batch: Any, timestep_key: str = "timestep", seed_key: str = "noise_seed") -> None:
        self.prepare_batch, self.timestep_key, self.seed_key = prepare_batch, timestep_key, seed_key

    def __call__(
        self,
        batchdata: dict[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        for key in (self.timestep_key, self.seed_key):
            if key not in batchdata:
                raise ValueError(
                    f"a validation batch needs {key!r} (from meddiff.validation.fixed_noise_items); it has "
                    f"{sorted(batchdata)}."
                )
        images = self.prepare_batch.get_images(batchdata).to(device, non_blocking=non_blocking, **kwargs)
        noise = fixed_noise(batchdata[self.seed_key], images.shape[1:]).to(device=images.device, dtype=images.dtype)
        timesteps = torch.as_tensor(batchdata[self.timestep_key]).long().to(images.device)
        infer_kwargs = {"noise": noise, "timesteps": timesteps}
        condition = self.prepare_batch.get_condition(batchdata)
        if condition is not None:
            infer_kwargs["condition"] = condition.to(device, non_blocking=non_blocking, **kwargs)
        return images, self.prepare_batch.get_target(images, noise, timesteps), (), infer_kwargs


class SelectRaterd(MapTransform):
    """Keep one rater's mask (1, H, W) of the raters' masks (R, H, W): rater ``item[index_key] mod R``.

    Args:
        keys: keys of the raters' masks.
        index_key: item key of the index (``"timestep_index"`` from `fixed_noise_items`).
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self, keys: KeysCollection = "label", index_key: str = "timestep_index", allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.index_key = index_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            rater = int(d[self.index_key]) % d[key].shape[0]
            d[key] = d[key][rater : rater + 1]
        return d


class CIMDDenoisingInferer(CIMDTrainingInferer):
    """The noise prediction of a `meddiff.networks.CIMDNetwork`'s denoiser for the noisy label, without random draws.

    ``__call__(x_0, network, noise, timesteps, condition=image)`` noises the label as in training and returns the
    denoiser's prediction (float32). The paper design's denoiser takes no latent; the cVAE design's gets the
    posterior mean of q(z | image, x_0), not a draw. The KL term of the training loss is left out.

    Args:
        scheduler: the training noise scheduler (its `add_noise`).
        precision: "fp32", "bf16", "fp16" or "auto".
        channels_last: run the network in channels-last memory format.
    """

    def __init__(self, scheduler: Any, precision: str = "fp32", channels_last: bool = False) -> None:
        super().__init__(scheduler, precision=precision, channels_last=channels_last)

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        diffusion_model: nn.Module,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        condition: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if condition is None:
            raise ValueError("CIMDDenoisingInferer needs the image as `condition`.")
        network = getattr(diffusion_model, "module", diffusion_model)
        noisy = self.scheduler.add_noise(original_samples=inputs, noise=noise, timesteps=timesteps)
        noisy = to_memory_format(noisy, self.channels_last)
        latent = network.encoders(condition, inputs)[0].mean if network.injects_latent else None
        with autocast(inputs.device, self.precision):
            eps = network.denoise(noisy, timesteps, condition, latent)
        return eps.float()


def lower_is_better(current: float, best: float) -> bool:
    """MONAI's ``metric_cmp_fn`` for a loss: the current value is a new best when it is below the best so far."""
    return current < best
