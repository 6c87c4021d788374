"""Does training a task network on synthetic data help? The downstream test, written once for every method.

The test (Saragih et al. 2024, methods.md §1.6; also the MoNuSeg nuclei test of §4.6 and the NCT-CRC-HE
classification test of §5.6): train the same task network on several *arms* (training sets; the paper's are
"real", "synthetic" and "real+synthetic", see `arm_datasets`), once per seed, score each run on one held-out real
test split, and report per arm the mean over seeds with a confidence interval, and per arm the paired-by-seed
difference to the reference arm ("real").

Conventions:
- items are ``(image, target)`` pairs of tensors already loaded: the image ``(C, H, W)`` float; the target a
  ``(1, H, W)`` binary mask for segmentation or a 0-d integer class index for classification. `train_and_score`
  stacks items batch by batch, so every image of one set has one shape, and so has every target;
- a network that returns a list or tuple (MONAI's `BasicUNetPlusPlus`, deep-supervision networks) is trained and
  scored on its first element, the full-resolution output;
- one seed fixes everything of a run on CPU: network initialisation and dropout (torch's global generator, seeded
  inside `torch.random.fork_rng`, so the caller's random state is left as it was), the shuffling order and the
  augmentation draws (a CPU `torch.Generator` of its own). On CUDA some kernels are not deterministic, so runs of
  one seed may differ slightly there;
- each run trains for a fixed number of epochs and is scored after its last epoch (no checkpoint selection: the
  paper picks the best validation IoU, and selecting on the test split would leak it);
- scores: each metric is computed per test item on ``postprocess(network(image))`` and averaged over the items;
  ``dataset_metrics`` (macro F1, dataset-level instance F1) see all predictions and targets at once;
- intervals (`mean_ci`): the Student-t interval for the mean over seeds,
  ``mean +- t_{(1+confidence)/2, n-1} * s / sqrt(n)`` with the sample standard deviation ``s`` (ddof 1). With a
  single value there is no interval: ``std``, ``low`` and ``high`` are NaN (JSON files then hold ``NaN``);
- differences (`compare_arms`): per seed ``arm - reference``, then `mean_ci` of those differences (the paired
  t-interval); every arm must have been run on the same seeds and scored with the same metrics. Seeds are written
  as strings (JSON object keys), so a result reads back unchanged;
- binary segmentation (`segmentation_comparison`): one sigmoid output channel; prediction foreground where the
  probability is > 0.5, target foreground where the mask is > 0.5 (float masks) or != 0 (integer or boolean masks,
  so 0/255 masks work); Dice ``2|P∩T| / (|P|+|T|)`` and IoU ``|P∩T| / |P∪T|`` per image, and an image where both
  prediction and target are empty scores 1 for both (the network was right that there is no polyp);
- deviations from the paper's segmenter (smp ``UnetPlusPlus(encoder='se_resnext50_32x4d',
  encoder_weights='imagenet')``, 2-channel softmax, smp DiceLoss without background, lr 1e-4 dropped to 1e-5 at
  epoch 50, ShiftScaleRotate augmentation, best-validation checkpoint): MONAI `BasicUNetPlusPlus` trained from
  scratch, because ImageNet encoder weights cannot be downloaded here; one sigmoid channel with MONAI
  ``DiceLoss(sigmoid=True)`` (the same Dice on the foreground; ``loss="dice_bce"`` adds BCE); a constant learning
  rate; random horizontal and vertical flips as the only augmentation; the last epoch scored. Absolute Dice/IoU
  are therefore not comparable to the paper's; the comparison between arms is what this test measures;
- classification (`classification_comparison`): K-class logits, cross entropy; ``accuracy`` is the share of test
  images whose arg-max is their class, ``macro_f1`` the unweighted mean of per-class F1 over the classes present in
  the targets or predictions (sklearn's ``f1_score(average="macro")``: a class never predicted scores 0);
- deviations from HistoDiffusion's classifier (ViT-S/16 from scratch with the DeiT recipe, methods.md §5.6): a
  MONAI DenseNet121 from scratch by default (``vit_s16``, MONAI's ViT at ViT-S/16 sizes, is available), Adam at a
  constant learning rate with the paper's weight decay 0.05, flips as the only augmentation (no mixup, cutmix,
  RandAugment, random erasing or label smoothing), the last epoch scored.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy import stats
from tqdm import tqdm

from meddiff.errors import OptionError, UserError
from meddiff.io import check_new_output, save_json
from meddiff.metrics.ambiguity import dice, iou
from meddiff.options import Rule, parse

__all__ = [
    "CLASSIFIERS",
    "DEFAULT_FEATURES",
    "SEGMENTATION_LOSSES",
    "SmallCNN",
    "accuracy",
    "arm_datasets",
    "classification_comparison",
    "compare_arms",
    "fit_epochs",
    "macro_f1",
    "make_classifier",
    "mean_ci",
    "predict_classes",
    "random_flips",
    "segmentation_comparison",
    "train_and_score",
]

Item = tuple[torch.Tensor, torch.Tensor]
Metric = Callable[[torch.Tensor, torch.Tensor], float]

DEFAULT_FEATURES = (32, 32, 64, 128, 256, 32)  # MONAI's BasicUNetPlusPlus default
SEGMENTATION_LOSSES = {"dice": "DiceLoss(sigmoid=True)", "dice_bce": "DiceCELoss(sigmoid=True), BCE for 1 channel"}
MIN_SEGMENTATION_SIZE = 32  # BasicUNetPlusPlus pools 4 times; instance norm needs more than 1 pixel at the bottom
THRESHOLD = 0.5


# ---------------------------------------------------------------------------------------------- statistics


# options of this module only (the shared ones are parsed by their names in meddiff.options.RULES)
_CONFIDENCE = Rule("float", low=0.0, high=1.0, low_open=True, high_open=True, hint="e.g. 0.95")
_FEATURES = Rule("ints", low=1, length=6, hint=f"BasicUNetPlusPlus features, e.g. {list(DEFAULT_FEATURES)}")
_SEEDS = Rule("ints", low=0, hint="one run per arm and seed, e.g. [0, 1, 2]")
_LOSS = Rule("choice", choices=tuple(SEGMENTATION_LOSSES))
_BOOL = Rule("bool")


def _confidence(confidence: Any) -> float:
    return _CONFIDENCE("confidence", confidence)


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean of `values` with its Student-t confidence interval (see the module docstring).

    Args:
        values: one number per run (e.g. per seed); at least one, all finite.
        confidence: the interval's coverage, strictly between 0 and 1.

    Returns:
        ``{"mean", "low", "high", "std", "n"}``; ``std`` is the sample standard deviation (ddof 1). For a single
        value ``std``, ``low`` and ``high`` are NaN.
    """
    confidence = _confidence(confidence)
    array = np.asarray([float(v) for v in values], dtype=np.float64)
    if array.size == 0:
        raise UserError("mean_ci got no values: give at least one score (one per seed).")
    if not np.isfinite(array).all():
        raise UserError(f"mean_ci got non-finite scores {array.tolist()}: check the runs that produced them.")
    n, mean = int(array.size), float(array.mean())
    if n == 1:
        return {"mean": mean, "low": math.nan, "high": math.nan, "std": math.nan, "n": 1}
    std = float(array.std(ddof=1))
    half = float(stats.t.ppf((1.0 + confidence) / 2.0, n - 1)) * std / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "std": std, "n": n}


def compare_arms(
    scores: Mapping[str, Mapping[Any, Mapping[str, float]]], reference: str = "real", confidence: float = 0.95
) -> dict:
    """Per arm and metric the mean over seeds with its interval, and each arm's paired difference to `reference`.

    Args:
        scores: ``{arm: {seed: {metric: value}}}``; every arm run on the same seeds with the same metrics.
        reference: the arm every other arm is compared with (``arm - reference``, paired by seed).
        confidence: the intervals' coverage.

    Returns:
        ``{"reference", "confidence", "arms": {arm: {"per_seed": {seed: {metric: value}}, "mean": {metric:
        mean_ci}}}, "differences": {arm: {metric: {**mean_ci, "per_seed": {seed: difference}}}}}`` with seeds as
        strings; ``differences`` has every arm but the reference.
    """
    confidence = _confidence(confidence)
    if not scores:
        raise UserError("compare_arms got no arms: pass scores as {arm: {seed: {metric: value}}}.")
    if reference not in scores:
        raise OptionError(f"--reference {reference!r} is not one of the arms {sorted(scores)}: pass one of them.")
    table = {arm: _seed_table(arm, per_seed) for arm, per_seed in scores.items()}
    seeds, metrics = list(table[reference]), sorted(next(iter(table[reference].values())))
    for arm, per_seed in table.items():
        if sorted(per_seed) != sorted(seeds):
            raise UserError(
                f"arm {arm!r} was run on seeds {sorted(per_seed)} but the reference arm {reference!r} on "
                f"{sorted(seeds)}: run every arm on the same seeds, the differences are paired by seed."
            )
        for seed, values in per_seed.items():
            if sorted(values) != metrics:
                raise UserError(
                    f"arm {arm!r} seed {seed} has metrics {sorted(values)} but the reference arm {reference!r} has "
                    f"{metrics}: score every run with the same metrics."
                )
    result: dict = {"reference": reference, "confidence": confidence, "arms": {}, "differences": {}}
    for arm, per_seed in table.items():
        result["arms"][arm] = {
            "per_seed": per_seed,
            "mean": {m: mean_ci([per_seed[s][m] for s in seeds], confidence) for m in metrics},
        }
        if arm == reference:
            continue
        result["differences"][arm] = {}
        for m in metrics:
            paired = {s: per_seed[s][m] - table[reference][s][m] for s in seeds}
            result["differences"][arm][m] = {**mean_ci(list(paired.values()), confidence), "per_seed": paired}
    return result


def _seed_table(arm: str, per_seed: Mapping[Any, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """`per_seed` with string seeds and float values, refused when it is empty or a seed appears twice."""
    if not per_seed:
        raise UserError(f"arm {arm!r} has no scored seeds: run it on at least one seed or leave it out.")
    table: dict[str, dict[str, float]] = {}
    for seed, values in per_seed.items():
        if str(seed) in table:
            raise UserError(f"arm {arm!r} lists seed {seed!r} twice: give each seed's scores once.")
        table[str(seed)] = {str(m): float(v) for m, v in values.items()}
    return table


# ---------------------------------------------------------------------------------------------- training


def accuracy(logits: torch.Tensor, target: torch.Tensor) -> float:
    """1.0 when the arg-max class of one item's `logits` (K,) is its class index `target` (0-d), else 0.0."""
    return float(int(torch.argmax(logits)) == int(target))


def random_flips(
    images: torch.Tensor, targets: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each item of a batch horizontally and vertically, each with probability 0.5, drawn from `generator`.

    Args:
        images: a batch ``(B, C, H, W)``.
        targets: ``(B, 1, H, W)`` masks, flipped with their images; any other shape (class indices) is left as is.
        generator: the run's CPU generator.
    """
    draws = torch.rand(len(images), 2, generator=generator) < 0.5
    spatial = targets.ndim == images.ndim and targets.shape[-2:] == images.shape[-2:]
    images, targets = images.clone(), targets.clone() if spatial else targets
    for i, (flip_h, flip_v) in enumerate(draws.tolist()):
        dims = [d for d, on in ((-1, flip_h), (-2, flip_v)) if on]
        if dims:
            images[i] = torch.flip(images[i], dims)
            if spatial:
                targets[i] = torch.flip(targets[i], dims)
    return images, targets


def _final(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (list, tuple)) else output


def _check_items(items: Sequence[Item], name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The (image shape, target shape) shared by all `items`; refuses an empty set or mixed shapes."""
    if len(items) == 0:
        raise UserError(f"{name} is empty: give at least one (image, target) pair.")
    shapes = set()
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise UserError(f"{name} holds {type(item).__name__} items: give (image, target) pairs of tensors.")
        shapes.add((tuple(torch.as_tensor(item[0]).shape), tuple(torch.as_tensor(item[1]).shape)))
    if len(shapes) > 1:
        raise UserError(
            f"{name} mixes (image, target) shapes {sorted(shapes)}: bring every item to one size before training."
        )
    return shapes.pop()


def _batch(items: Sequence[Item], index: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([torch.as_tensor(items[i][0], dtype=torch.float32) for i in index])
    return images, torch.stack([torch.as_tensor(items[i][1]) for i in index])


def train_and_score(
    train_items: Sequence[Item],
    test_items: Sequence[Item],
    make_network: Callable[[], torch.nn.Module],
    seed: int,
    *,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    metrics: Mapping[str, Metric],
    epochs: int,
    batch_size: int = 8,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.0,
    device: str | torch.device = "cpu",
    postprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    augment: Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]] | None = None,
    dataset_metrics: Mapping[str, Metric] | None = None,
    progress: bool = True,
    on_trained: Callable[[torch.nn.Module], Any] | None = None,
) -> dict[str, float]:
    """Train a fresh network on `train_items` with Adam for `epochs` epochs, then score it on `test_items`.

    Serves segmentation (targets are masks, metrics Dice/IoU) and classification (targets are class indices,
    metric `accuracy`) alike; the module docstring gives the seeding and scoring rules.

    Args:
        train_items: ``(image, target)`` pairs to train on, shuffled every epoch.
        test_items: ``(image, target)`` pairs to score on.
        make_network: builds the untrained network; called once, after seeding.
        seed: fixes initialisation, shuffling and augmentation.
        loss: ``loss(output, targets)`` on a batch; the output is the raw network output (logits).
        metrics: ``{name: fn(prediction, target) -> float}`` for one test item; averaged over the test items.
        epochs: passes over `train_items`.
        batch_size: items per optimisation step (the last batch of an epoch may be smaller).
        learning_rate: Adam's learning rate, constant.
        weight_decay: Adam's weight decay.
        device: where the network trains; batches are drawn and augmented on CPU.
        postprocess: maps the batch output to predictions before the metrics (e.g. `torch.sigmoid`); None keeps it.
        augment: ``augment(images, targets, generator) -> (images, targets)`` on each training batch, e.g.
            `random_flips`; None for none.
        dataset_metrics: ``{name: fn(predictions, targets) -> float}`` on all test predictions at once.
        progress: show a progress bar over the epochs.
        on_trained: called with the trained network (in eval mode, on `device`) before it is scored, e.g. to
            predict other images with it; its return value is ignored.

    Returns:
        ``{metric name: score}`` for `metrics` and `dataset_metrics`.
    """
    seed = parse("seed", seed)
    epochs, batch_size = parse("num_epochs", epochs), parse("batch_size", batch_size)
    learning_rate, weight_decay = parse("learning_rate", learning_rate), parse("weight_decay", weight_decay)
    progress = parse("progress", progress)
    if not metrics and not dataset_metrics:
        raise OptionError("train_and_score got no metrics: pass metrics={name: fn(prediction, target)}.")
    train_shapes, test_shapes = _check_items(train_items, "train_items"), _check_items(test_items, "test_items")
    if train_shapes != test_shapes:
        raise UserError(
            f"train_items have (image, target) shapes {train_shapes} but test_items {test_shapes}: "
            "bring both sets to one size."
        )
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        network = make_network().to(device)
        generator = torch.Generator().manual_seed(seed)

        def batch_loss(index: list[int]) -> torch.Tensor:
            images, targets = _batch(train_items, index)
            if augment is not None:
                images, targets = augment(images, targets, generator)
            return loss(_final(network(images.to(device))), targets.to(device))

        fit_epochs(
            network, len(train_items), batch_loss, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
            weight_decay=weight_decay, generator=generator, desc=f"training (seed {seed})", progress=progress,
        )  # fmt: skip
        if on_trained is not None:
            network.eval()
            on_trained(network)
        return _score(network, test_items, batch_size, device, postprocess, metrics, dataset_metrics or {})


def fit_epochs(
    network: torch.nn.Module,
    num_items: int,
    batch_loss: Callable[[list[int]], torch.Tensor],
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    weight_decay: float,
    generator: torch.Generator,
    desc: str,
    progress: bool,
) -> torch.nn.Module:
    """Adam at a constant learning rate for `epochs` passes over items ``0 .. num_items - 1``, reshuffled every epoch
    with `generator`; ``batch_loss(index)`` builds a batch of those items and returns its loss. A loss that is not
    finite stops the training with a `UserError` that names the learning rate."""
    # foreach: half the CPU time of Adam's default per-tensor update on CPU, the same update
    optimizer = torch.optim.Adam(network.parameters(), lr=learning_rate, weight_decay=weight_decay, foreach=True)
    bar = tqdm(range(epochs), desc=desc, disable=not progress, leave=False)
    for epoch in bar:
        network.train()
        order = torch.randperm(num_items, generator=generator).tolist()
        total = 0.0
        for start in range(0, num_items, batch_size):
            index = order[start : start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            value = batch_loss(index)
            if not torch.isfinite(value):
                raise UserError(
                    f"the training loss became {value.item()} in epoch {epoch + 1} ({desc}): "
                    f"lower --learning_rate (now {learning_rate:g})."
                )
            value.backward()
            optimizer.step()
            total += value.item() * len(index)
        bar.set_postfix(loss=f"{total / num_items:.4f}")
    return network


def _score(
    network: torch.nn.Module,
    items: Sequence[Item],
    batch_size: int,
    device: torch.device,
    postprocess: Callable[[torch.Tensor], torch.Tensor] | None,
    metrics: Mapping[str, Metric],
    dataset_metrics: Mapping[str, Metric],
) -> dict[str, float]:
    network.eval()
    sums = dict.fromkeys(metrics, 0.0)
    predictions, targets_all = [], []
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            images, targets = _batch(items, range(start, min(start + batch_size, len(items))))
            prediction = _final(network(images.to(device)))
            prediction = (postprocess(prediction) if postprocess is not None else prediction).detach().cpu()
            for name, fn in metrics.items():
                sums[name] += sum(float(fn(p, t)) for p, t in zip(prediction, targets))
            if dataset_metrics:
                predictions.append(prediction)
                targets_all.append(targets)
    scores = {name: total / len(items) for name, total in sums.items()}
    if dataset_metrics:
        stacked, targets = torch.cat(predictions), torch.cat(targets_all)
        scores.update({name: float(fn(stacked, targets)) for name, fn in dataset_metrics.items()})
    return scores


# ---------------------------------------------------------------------------------------------- segmentation


def _concat(a: Any, b: Any, what: str) -> Any:
    try:
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            return torch.cat([a, b])
        if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
            return np.concatenate([a, b])
    except (RuntimeError, ValueError):
        raise UserError(
            f"the real and synthetic {what} have shapes {tuple(a.shape)} and {tuple(b.shape)}: bring them to one "
            "channel count and size before arm_datasets."
        ) from None
    return list(a) + list(b)


def arm_datasets(real: tuple[Any, Any], synthetic: tuple[Any, Any]) -> dict[str, tuple[Any, Any]]:
    """The paper's three arms from ``(images, targets)`` of real and synthetic data.

    Args:
        real: ``(images, targets)``: stacked tensors or arrays (N, ...) or sequences of per-item tensors.
        synthetic: the same for the synthetic data.

    Returns:
        ``{"real": real, "synthetic": synthetic, "real+synthetic": (real then synthetic images, same targets)}``.
    """
    for name, pair in (("real", real), ("synthetic", synthetic)):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise UserError(f"arm_datasets needs {name} as an (images, targets) pair, got {type(pair).__name__}.")
    both = (_concat(real[0], synthetic[0], "images"), _concat(real[1], synthetic[1], "targets"))
    return {"real": real, "synthetic": synthetic, "real+synthetic": both}


def _stack(x: Any, what: str) -> torch.Tensor:
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return torch.as_tensor(x)
    items = [torch.as_tensor(v) for v in x]
    if not items:
        return torch.zeros(0)
    try:
        return torch.stack(items)
    except RuntimeError:
        shapes = sorted({tuple(v.shape) for v in items})
        raise UserError(f"{what} mix shapes {shapes}: bring them to one channel count and size.") from None


def _segmentation_items(pair: Any, name: str) -> list[Item]:
    """(image (C,H,W) float, mask (1,H,W) float 0/1) items of one arm or the test set, checked."""
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise UserError(f"{name} must be an (images, masks) pair, got {type(pair).__name__}.")
    images, masks = _stack(pair[0], f"{name} images"), _stack(pair[1], f"{name} masks")
    if len(images) == 0:
        fix = "leave the arm out" if name.startswith("arm") else "hold out some real images for testing"
        raise UserError(f"{name} has no images: give it at least one image and mask, or {fix}.")
    if len(images) != len(masks):
        raise UserError(f"{name} has {len(images)} images but {len(masks)} masks: give exactly one mask per image.")
    if images.ndim != 4:
        raise UserError(f"{name} images have shape {tuple(images.shape)}: give them as (N, C, H, W).")
    if masks.ndim == 3:
        masks = masks[:, None]
    if masks.ndim != 4 or masks.shape[1] != 1:
        raise UserError(f"{name} masks have shape {tuple(masks.shape)}: give binary masks (N, H, W) or (N, 1, H, W).")
    if masks.shape[-2:] != images.shape[-2:]:
        raise UserError(
            f"{name} images are {tuple(images.shape[-2:])} but its masks {tuple(masks.shape[-2:])}: resample the "
            "masks to the image size."
        )
    foreground = masks > THRESHOLD if masks.is_floating_point() else masks != 0
    return list(zip(images.float(), foreground.float()))


def _check_comparison(
    arms: Mapping[str, Any],
    reference: str,
    seeds: Sequence[int],
    confidence: float,
    output_file: str | None,
    overwrite: bool,
    arms_hint: str,
    **training: Any,
) -> tuple[list[int], float, dict[str, Any]]:
    """A downstream comparison's shared options checked before any work: (seeds, confidence, training settings
    parsed by their option names: epochs, batch_size, learning_rate, weight_decay, progress)."""
    seeds = _SEEDS("seeds", seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise OptionError(f"--seeds must list distinct seeds such as [0, 1, 2], got {seeds!r}.")
    names = {"epochs": "num_epochs"}
    training = {key: parse(names.get(key, key), value) for key, value in training.items()}
    if not arms:
        raise UserError(f"no training arms given: pass arms={{'real': {arms_hint}.")
    if reference not in arms:
        raise OptionError(f"--reference {reference!r} is not one of the arms {sorted(arms)}: pass one of them.")
    confidence = _confidence(confidence)
    if output_file is not None:
        check_new_output(output_file, parse("overwrite", overwrite))
    return seeds, confidence, training


def _train_sets(
    arms: Mapping[str, Any], shape: tuple[int, ...], items_of: Callable[[Any, str], list[Item]]
) -> dict[str, list[Item]]:
    """Each arm's items, refused when its images are not of the test images' `shape`."""
    train_sets = {}
    for arm, pair in arms.items():
        items = items_of(pair, f"arm {arm!r}")
        if tuple(items[0][0].shape) != shape:
            raise UserError(
                f"arm {arm!r} images are {tuple(items[0][0].shape)} but the test images {shape}: bring every "
                "image to one channel count and size."
            )
        train_sets[arm] = items
    return train_sets


def _run_arms(
    train_sets: Mapping[str, Sequence[Item]],
    test_items: Sequence[Item],
    make_network: Callable[[], torch.nn.Module],
    seeds: Sequence[int],
    training: Mapping[str, Any],
    on_trained: Callable[[str, int, torch.nn.Module], Any] | None = None,
    **score: Any,
) -> dict[str, dict[int, dict[str, float]]]:
    """`train_and_score` once per arm and seed: ``{arm: {seed: scores}}``; `score` holds its loss and metrics."""
    runs = [(arm, seed) for arm in train_sets for seed in seeds]
    scores: dict[str, dict[int, dict[str, float]]] = {arm: {} for arm in train_sets}
    for arm, seed in tqdm(runs, desc="downstream runs", disable=not training["progress"]):
        hook = None if on_trained is None else (lambda net, arm=arm, seed=seed: on_trained(arm, seed, net))
        scores[arm][seed] = train_and_score(
            train_sets[arm], test_items, make_network, seed, **training, **score, on_trained=hook
        )
    return scores


def _run_settings(
    training: Mapping[str, Any],
    augment: bool,
    seeds: Sequence[int],
    train_sets: Mapping[str, Sequence[Item]],
    test_items: Sequence[Item],
    shape: tuple[int, ...],
    device: str | torch.device,
) -> dict[str, Any]:
    """The settings every downstream comparison records: optimisation, augmentation, seeds and set sizes."""
    return {
        "optimizer": "Adam",
        **{key: training[key] for key in ("learning_rate", "weight_decay", "epochs", "batch_size")},
        "augment": "random horizontal and vertical flips" if augment else None,
        "checkpoint": "last epoch",
        "seeds": seeds,
        "num_train": {arm: len(items) for arm, items in train_sets.items()},
        "num_test": len(test_items),
        "image_shape": list(shape),
        "device": str(device),
    }


def segmentation_comparison(
    arms: Mapping[str, tuple[Any, Any]],
    test: tuple[Any, Any],
    seeds: Sequence[int] = (0, 1, 2),
    *,
    epochs: int = 100,
    batch_size: int = 32,
    learning_rate: float = 1e-4,
    weight_decay: float = 1e-5,
    features: Sequence[int] = DEFAULT_FEATURES,
    loss: str = "dice",
    augment: bool = True,
    reference: str = "real",
    confidence: float = 0.95,
    device: str | torch.device = "cpu",
    output_file: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Binary segmentation trained on each arm and seed, scored by Dice and IoU on the real test split.

    The defaults follow the paper's recipe where it carries over (Adam, lr 1e-4, weight decay 1e-5, 100 epochs,
    batch 32); the module docstring lists the deviations and the metric conventions.

    Args:
        arms: ``{arm: (images, masks)}``: images (N, C, H, W) float, masks (N, H, W) or (N, 1, H, W) binary; as
            tensors, arrays or sequences of per-item tensors. `arm_datasets` builds the paper's three.
        test: ``(images, masks)`` of the held-out real test split, the same channel count and size.
        seeds: one run per arm and seed; differences are paired by seed.
        epochs: training epochs per run.
        batch_size: images per step.
        learning_rate: Adam's learning rate, constant.
        weight_decay: Adam's weight decay.
        features: the six `BasicUNetPlusPlus` feature counts; MONAI's default, smaller tuples for CPU tests.
        loss: ``"dice"`` (MONAI ``DiceLoss(sigmoid=True)``, the paper's loss) or ``"dice_bce"`` (Dice + BCE).
        augment: random horizontal and vertical flips of the training images and masks.
        reference: the arm the others are compared with.
        confidence: the intervals' coverage.
        device: where the networks train.
        output_file: where to write the result as JSON; None writes nothing. Refused before any training when it
            exists, unless `overwrite`.
        overwrite: replace an existing `output_file`.
        progress: show progress bars.

    Returns:
        `compare_arms`'s result (per arm ``per_seed`` and ``mean``; ``differences``) plus ``settings``.
    """
    from monai.losses import DiceCELoss, DiceLoss
    from monai.networks.nets import BasicUNetPlusPlus

    features, loss, augment = tuple(_FEATURES("features", features)), _LOSS("loss", loss), _BOOL("augment", augment)
    seeds, confidence, training = _check_comparison(
        arms, reference, seeds, confidence, output_file, overwrite, "(images, masks), ...}, e.g. from arm_datasets",
        epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, weight_decay=weight_decay,
        progress=progress,
    )  # fmt: skip
    test_items = _segmentation_items(test, "the test set")
    shape = tuple(test_items[0][0].shape)
    if min(shape[-2:]) < MIN_SEGMENTATION_SIZE:
        raise UserError(
            f"the images are {shape[-2]}x{shape[-1]} but BasicUNetPlusPlus needs at least "
            f"{MIN_SEGMENTATION_SIZE}x{MIN_SEGMENTATION_SIZE}: pad or resize them."
        )
    train_sets = _train_sets(arms, shape, lambda pair, name: _segmentation_items(pair, name))

    def make_network() -> torch.nn.Module:
        return BasicUNetPlusPlus(spatial_dims=2, in_channels=shape[0], out_channels=1, features=features)

    criterion = DiceLoss(sigmoid=True) if loss == "dice" else DiceCELoss(sigmoid=True)
    scores = _run_arms(
        train_sets, test_items, make_network, seeds, training, loss=criterion, metrics={"dice": dice, "iou": iou},
        device=device, postprocess=torch.sigmoid, augment=random_flips if augment else None,
    )  # fmt: skip
    result = compare_arms(scores, reference=reference, confidence=confidence)
    result["settings"] = {
        "task": "binary segmentation",
        "network": "monai BasicUNetPlusPlus, trained from scratch",
        "paper_network": "smp UnetPlusPlus(encoder='se_resnext50_32x4d', encoder_weights='imagenet')",
        "features": list(features),
        "loss": SEGMENTATION_LOSSES[loss],
        "threshold": THRESHOLD,
        "empty_vs_empty": 1.0,
        **_run_settings(training, augment, seeds, train_sets, test_items, shape, device),
    }
    if output_file is not None:
        save_json(result, output_file, overwrite=True)  # checked above, before the work
    return result


# ---------------------------------------------------------------------------------------------- classification


class SmallCNN(torch.nn.Module):
    """A small classifier for CPU tests and demos: two strided 3x3 convolutions, global average pooling, a linear head.

    Args:
        in_channels: image channels.
        num_classes: K, the logits returned (B, K).
        width: channels of the first convolution (the second has twice as many).
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(in_channels, width, 3, stride=2, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
        )
        self.head = torch.nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


#: the classifiers `classification_comparison` trains from scratch, by name
CLASSIFIERS = {
    "densenet121": "monai DenseNet121(spatial_dims=2)",
    "vit_s16": "monai ViT, ViT-S/16 sizes (hidden 384, mlp 1536, 12 layers, 6 heads, patch 16), linear head",
    "small_cnn": "meddiff SmallCNN (2 convolutions, global average pooling, linear head)",
}
_NETWORK = Rule("choice", choices=tuple(CLASSIFIERS))
VIT_PATCH = 16


def make_classifier(name: str, in_channels: int, num_classes: int, image_size: Sequence[int]) -> torch.nn.Module:
    """An untrained classifier `name` of `CLASSIFIERS` for images (in_channels, *image_size) and K classes."""
    name = _NETWORK("network", name)
    if name == "densenet121":
        from monai.networks.nets import DenseNet121

        return DenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=num_classes)
    if name == "vit_s16":
        from monai.networks.nets import ViT

        if any(s % VIT_PATCH for s in image_size):
            raise OptionError(
                f"--network vit_s16 needs an image side divisible by {VIT_PATCH}, got {tuple(image_size)}: pass "
                "--image_size 224 or 256, or another --network."
            )
        return ViT(
            in_channels=in_channels, img_size=tuple(image_size), patch_size=VIT_PATCH, hidden_size=384, mlp_dim=1536,
            num_layers=12, num_heads=6, classification=True, num_classes=num_classes, spatial_dims=2,
            post_activation=None, qkv_bias=True,
        )  # fmt: skip
    return SmallCNN(in_channels, num_classes)


def _class_indices(x: torch.Tensor) -> torch.Tensor:
    """Class indices (N,) of scores (N, K) (their arg-max) or of indices (N,)."""
    x = torch.as_tensor(x)
    return (torch.argmax(x, dim=1) if x.ndim == 2 else x.reshape(-1)).long()


def macro_f1(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """Unweighted mean over classes of F1 = 2 TP / (2 TP + FP + FN) (sklearn ``f1_score(average="macro")``).

    Args:
        predictions: scores (N, K) (their arg-max is the prediction) or class indices (N,).
        targets: class indices (N,).

    The mean runs over the classes present in the targets or the predictions; a class that is never predicted
    (or never right) scores 0, as sklearn's default.
    """
    predicted, truth = _class_indices(predictions), _class_indices(targets)
    if predicted.shape != truth.shape or predicted.numel() == 0:
        raise UserError(f"macro_f1 needs one prediction per target, got {predicted.numel()} and {truth.numel()}.")
    scores = []
    for k in torch.unique(torch.cat([predicted, truth])).tolist():
        tp = int(((predicted == k) & (truth == k)).sum())
        fp = int(((predicted == k) & (truth != k)).sum())
        fn = int(((predicted != k) & (truth == k)).sum())
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def predict_classes(network: torch.nn.Module, images: Any, batch_size: int = 32) -> np.ndarray:
    """Arg-max class (N,) int64 of a trained classifier for images (N, C, H, W), in eval mode on its device."""
    module = getattr(network, "module", network)
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    network.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            batch = torch.as_tensor(batch if isinstance(batch, torch.Tensor) else np.asarray(batch))
            out.append(torch.argmax(_final(network(batch.float().to(device))), dim=1).cpu())
    return torch.cat(out).numpy().astype(np.int64) if out else np.zeros(0, np.int64)


def _classification_items(pair: Any, name: str, num_classes: int) -> list[Item]:
    """(image (C,H,W), label 0-d int64) items of one arm or the test set, checked; images are not copied."""
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise UserError(f"{name} must be an (images, labels) pair, got {type(pair).__name__}.")
    images = pair[0] if isinstance(pair[0], (torch.Tensor, np.ndarray)) else list(pair[0])
    images = [torch.as_tensor(im) for im in images]
    labels = torch.as_tensor(np.asarray(pair[1])).reshape(-1)
    if not images:
        fix = "leave the arm out" if name.startswith("arm") else "hold out some real images for testing"
        raise UserError(f"{name} has no images: give it at least one image and label, or {fix}.")
    if len(images) != len(labels):
        raise UserError(f"{name} has {len(images)} images but {len(labels)} labels: give exactly one label per image.")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise UserError(f"{name} labels are {labels.dtype}: give class indices as whole numbers.")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise UserError(
            f"{name} labels range over {int(labels.min())}..{int(labels.max())} but --num_classes is {num_classes}: "
            "give class indices 0..num_classes-1."
        )
    shapes = sorted({tuple(im.shape) for im in images})
    if len(shapes) > 1 or len(shapes[0]) != 3:
        raise UserError(f"{name} images have shapes {shapes}: give them as (C, H, W), all of one size.")
    return list(zip(images, labels.long()))


def classification_comparison(
    arms: Mapping[str, tuple[Any, Any]],
    test: tuple[Any, Any],
    seeds: Sequence[int] = (0, 1, 2),
    *,
    num_classes: int,
    epochs: int = 100,
    batch_size: int = 32,
    learning_rate: float = 1e-4,
    weight_decay: float = 0.05,
    network: str = "densenet121",
    augment: bool = True,
    reference: str = "real",
    confidence: float = 0.95,
    device: str | torch.device = "cpu",
    output_file: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    on_trained: Callable[[str, int, torch.nn.Module], Any] | None = None,
) -> dict:
    """Image classification trained on each arm and seed, scored by accuracy and macro F1 on the real test split.

    HistoDiffusion's test (methods.md §5.6) trains a ViT-S/16 from scratch with the DeiT recipe (AdamW, weight
    decay 0.05, cosine schedule with warm-up, 300 epochs, label smoothing, mixup/cutmix, RandAugment, random
    erasing). Here: a MONAI classifier from scratch (`CLASSIFIERS`; DenseNet121 by default, which learns from a few
    hundred tiles where a ViT without DeiT's augmentation does not; ``vit_s16`` is the paper's network), cross
    entropy, Adam at a constant learning rate with the paper's weight decay, random horizontal and vertical flips as
    the only augmentation, the last epoch scored. Absolute accuracies are therefore not the paper's; the comparison
    between arms is what this test measures.

    Args:
        arms: ``{arm: (images, labels)}``: images (N, C, H, W) float (stacked, or a sequence of (C, H, W)), labels
            (N,) class indices; images are shared, not copied.
        test: ``(images, labels)`` of the held-out real test split, the same channel count and size.
        seeds: one run per arm and seed; differences are paired by seed.
        num_classes: K; labels lie in 0..K-1.
        epochs: training epochs per run.
        batch_size: images per step.
        learning_rate: Adam's learning rate, constant.
        weight_decay: Adam's weight decay.
        network: one of `CLASSIFIERS`: "densenet121", "vit_s16" or "small_cnn" (CPU tests).
        augment: random horizontal and vertical flips of the training images.
        reference: the arm the others are compared with.
        confidence: the intervals' coverage.
        device: where the networks train.
        output_file: where to write the result as JSON; None writes nothing. Refused before any training when it
            exists, unless `overwrite`.
        overwrite: replace an existing `output_file`.
        progress: show progress bars.
        on_trained: ``on_trained(arm, seed, network)`` after each run's training, before it is scored.

    Returns:
        `compare_arms`'s result (per arm ``per_seed`` and ``mean`` of ``accuracy`` and ``macro_f1``;
        ``differences``) plus ``settings``.
    """
    num_classes = parse("num_classes", num_classes)
    if num_classes is None:
        raise OptionError("--num_classes must be set: the number of classes the labels index.")
    network, augment = _NETWORK("network", network), _BOOL("augment", augment)
    seeds, confidence, training = _check_comparison(
        arms, reference, seeds, confidence, output_file, overwrite, "(images, labels), ...}",
        epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, weight_decay=weight_decay,
        progress=progress,
    )  # fmt: skip
    test_items = _classification_items(test, "the test set", num_classes)
    shape = tuple(test_items[0][0].shape)
    train_sets = _train_sets(arms, shape, lambda pair, name: _classification_items(pair, name, num_classes))
    make_classifier(network, shape[0], num_classes, shape[1:])  # refuses a bad size before any training

    def make_network() -> torch.nn.Module:
        return make_classifier(network, shape[0], num_classes, shape[1:])

    scores = _run_arms(
        train_sets, test_items, make_network, seeds, training, loss=torch.nn.CrossEntropyLoss(),
        metrics={"accuracy": accuracy}, dataset_metrics={"macro_f1": macro_f1}, device=device,
        augment=random_flips if augment else None, on_trained=on_trained,
    )  # fmt: skip
    result = compare_arms(scores, reference=reference, confidence=confidence)
    result["settings"] = {
        "task": "classification",
        "network": f"{CLASSIFIERS[network]}, trained from scratch",
        "paper_network": "ViT-S/16 from scratch, DeiT recipe (methods.md §5.6)",
        "num_classes": num_classes,
        "loss": "CrossEntropyLoss",
        "metrics": {"accuracy": "mean over test images", "macro_f1": "sklearn f1_score(average='macro')"},
        **_run_settings(training, augment, seeds, train_sets, test_items, shape, device),
    }
    if output_file is not None:
        save_json(result, output_file, overwrite=True)  # checked above, before the work
    return result
