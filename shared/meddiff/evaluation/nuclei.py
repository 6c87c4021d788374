"""Downstream nuclei instance segmentation: does adding synthetic patches to the real ones help (methods.md 4.6)?

The test (issue 13 "Evaluation"; the seed's ST stage): a nuclei instance segmenter is trained on the real training
patches ("real") and on the real patches plus k times as many synthetic ones ("real+<k>x", k = 1..5), once per
seed, and each run is scored on the held-out real test patches. `meddiff.evaluation.downstream`'s `compare_arms`
then gives per arm the mean over seeds with its Student-t interval and the paired-by-seed difference to "real".

Conventions:
- items are ``(image, inst)`` pairs, numpy or torch: the image float (C, H, W), RGB in [-1, 1] as
  `meddiff.data.monuseg.read_patch` gives it, the instance map integer (H, W) or (1, H, W), 0 = background (dicts
  with "image" and "label", as `meddiff.data.monuseg.LoadNucleiPatchd` returns them, are read the same); every
  item of one comparison has one shape, and H and W are multiples of 8 and at least 16 (see `PaddedHoVerNet`);
- targets (`hovernet_targets`, HoVer-Net's, Graham et al. 2019, Med. Image Anal. 58:101563): NP = one-hot
  ``[background, nucleus]`` (2, H, W) of ``inst > 0``; HV = `meddiff.nuclei.hv_map` (2, H, W), channel 0 x
  (horizontal), channel 1 y, in [-1, 1]. Nuclei smaller than ``hv_min_size`` pixels (30, the seed's) stay nuclei in
  NP but get HV 0, as in HoVer-Net's targets. Targets are built after augmentation, from the flipped instance map,
  so a flip never leaves an hv map pointing the wrong way;
- network: `PaddedHoVerNet`, MONAI ``HoVerNet(mode="fast", decoder_padding=True, out_classes=0,
  np_out_channels=2)`` (no type branch), trained from scratch with MONAI ``HoVerNetLoss`` (NP: Dice + cross-entropy,
  HV: 2 x MSE + MSE of the Sobel gradients inside nuclei), Adam at a constant learning rate, random horizontal and
  vertical flips (`random_flips`), the last epoch scored;
- prediction to instances (`predict_instances`): MONAI ``HoVerNetInstanceMapPostProcessing`` with its defaults
  (softmax + argmax of NP, objects under 10 px removed, Sobel border of HV, marker threshold 0.4, marker opening
  radius 2, watershed). Two cases MONAI does not handle are decided here: no nucleus pixel gives an empty map; an
  HV channel that is constant over the image (MONAI raises "Not a valid hover map") gives the connected components
  of the NP mask;
- scores (`nuclei_scores`, formulas in `meddiff.metrics.instances`): per test image instance F1 at IoU >= 0.5
  (``f1``), AJI (Kumar et al. 2017), AJI+, binary Dice, PQ/SQ/RQ (MONAI, pairs at IoU > 0.5), each averaged over
  the test images; and ``dataset_f1`` from TP/FP/FN summed over the test set (the seed's reported F1, StarDist's
  ``matching_dataset`` at 0.5);
- synthetic subsets: per seed one random order of the synthetic items, drawn without replacement with
  probabilities proportional to ``synthetic_weights`` (the OOD filter's p, methods.md 4.5; items of weight 0 are
  never drawn) or uniformly; arm "real+<k>x" takes the first ``k * len(real)`` items of that order, so the arms of
  one seed are nested. With fewer drawable items than that, the arm takes all of them and the settings record the
  number used;
- seeding: as `meddiff.evaluation.downstream.train_and_score` (torch's global generator seeded inside
  ``torch.random.fork_rng`` for the initialisation, a CPU generator of the run for shuffling and flips; the same
  seed gives every arm the same initial network); the synthetic order of a seed comes from
  ``numpy.random.default_rng(seed)``.

Deviations from the seed (methods.md 4.6):
- segmenter: MONAI HoVerNet instead of StarDist2D (``n_rays=32``, ``grid=(2, 2)``, 500 epochs, percentile
  normalisation, flips, rotations, intensity and noise augmentation); HoVerNet predicts the hv maps the generator is
  conditioned on, and needs no TensorFlow. Absolute F1 is therefore not comparable to StarDist's; the difference
  between arms is what the test measures. No pretrained encoder (HoVer-Net starts from ImageNet ResNet50 weights,
  which cannot be downloaded here), one training stage instead of HoVer-Net's frozen-encoder stage then fine-tuning,
  flips as the only augmentation, images used as they are in [-1, 1];
- MONAI's HoVerNet refuses inputs other than 256x256 in fast mode, and with ``decoder_padding=True`` its decoder adds
  only the coarsest skip connection (it adds a skip only when the skip is larger than the decoder output and must be
  cropped). `PaddedHoVerNet` keeps MONAI's layers and weights and overrides ``forward`` to take any multiple of 8 and
  add all three skips, as the padded HoVer-Net of the CoNIC challenge code does;
- F1: the seed's StarDist matching at IoU >= 0.5; an image with no true and no predicted nucleus scores 1 here
  (StarDist gives 0);
- no validation set and no checkpoint selection (the seed validates on cluster test patches; the last epoch is
  scored here, as everywhere in `meddiff.evaluation.downstream`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.networks.nets import HoVerNet
from monai.utils.enums import HoVerNetBranch
from scipy import ndimage
from tqdm import tqdm

from meddiff.errors import OptionError, UserError
from meddiff.evaluation.downstream import compare_arms, fit_epochs, random_flips
from meddiff.io import check_new_output, save_json
from meddiff.metrics.instances import (
    aji,
    aji_plus,
    as_instance_map,
    binary_dice,
    dataset_f1,
    instance_f1,
    panoptic_quality,
)
from meddiff.nuclei import hv_map
from meddiff.options import Rule, parse

__all__ = [
    "NUCLEI_METRICS",
    "PaddedHoVerNet",
    "hovernet_targets",
    "nuclei_scores",
    "nuclei_segmentation_comparison",
    "predict_instances",
    "train_hovernet",
]

NP, HV, NC = HoVerNetBranch.NP.value, HoVerNetBranch.HV.value, HoVerNetBranch.NC.value
SIZE_MULTIPLE = 8  # three stride-2 stages in the encoder
MIN_SIZE = 16  # the deepest features are then at least 2x2, which batch norm needs for a batch of one
NUCLEI_METRICS = ("f1", "aji", "aji_plus", "dice", "pq", "sq", "rq", "dataset_f1")

_SEEDS = Rule("ints", low=0, hint="one run per arm and seed, e.g. [0, 1, 2]")
_RATIOS = Rule("ints", low=1, hint="synthetic items per real item of each real+synthetic arm, e.g. [1, 2, 3, 4, 5]")
_HV_MIN_SIZE = Rule("int", low=0, hint="nuclei smaller than this many pixels get no hv target; the seed uses 30")
_CONFIDENCE = Rule("float", low=0.0, high=1.0, low_open=True, high_open=True, hint="e.g. 0.95")
_IOU_THRESHOLD = Rule("float", low=0.0, high=1.0, low_open=True, hint="the IoU a matched pair needs, e.g. 0.5")
_BOOL = Rule("bool")

Item = tuple[torch.Tensor, torch.Tensor]


# ---------------------------------------------------------------------------------------------- network


def _decode(branch: torch.nn.Module, x: torch.Tensor, short_cuts: Sequence[torch.Tensor]) -> torch.Tensor:
    """A padded MONAI ``_DecoderBranch`` with all skips: the coarsest first, then one after each block and upsample."""
    x = x + short_cuts[-1]
    for block, skip in zip(branch.decoder_blocks, reversed(short_cuts[:-1])):
        x = branch.upsample(block(x)) + skip
    return branch.output_features(x)


class PaddedHoVerNet(HoVerNet):
    """MONAI ``HoVerNet`` in fast mode with padded decoders, for any input size that is a multiple of 8.

    The layers, parameter names and initialisation are MONAI's (its state dict loads into
    ``HoVerNet(mode="fast", decoder_padding=True)`` and back); only ``forward`` differs: no 256x256 requirement, and
    the two finer skip connections, which MONAI's padded decoder leaves out, are added. The output is MONAI's dict
    ``{"nucleus_prediction": (B, np_out_channels, H, W), "horizontal_vertical": (B, 2, H, W)}`` (plus
    ``"type_prediction"`` when `out_classes` > 0), the size of the input.

    Args:
        in_channels: image channels.
        np_out_channels: channels of the nucleus (NP) branch; 2 for HoVerNetLoss's softmax Dice + cross-entropy.
        out_classes: nuclear type classes; 0 for no type branch.
        dropout_prob: dropout after each dense layer of the encoder.
    """

    def __init__(
        self, in_channels: int = 3, np_out_channels: int = 2, out_classes: int = 0, dropout_prob: float = 0.0
    ) -> None:
        super().__init__(
            mode=HoVerNet.Mode.FAST,
            in_channels=in_channels,
            np_out_channels=np_out_channels,
            out_classes=out_classes,
            decoder_padding=True,
            dropout_prob=dropout_prob,
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        height, width = x.shape[-2:]
        if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE or min(height, width) < MIN_SIZE:
            raise ValueError(
                f"PaddedHoVerNet needs H and W multiples of {SIZE_MULTIPLE} and at least {MIN_SIZE}, "
                f"got {height}x{width}."
            )
        x = self.conv0(x)
        short_cuts = []
        for i, block in enumerate(self.res_blocks):
            x = block(x)
            if i <= 2:
                short_cuts.append(x)
        x = self.upsample(self.bottleneck(x))
        output = {
            NP: _decode(self.nucleus_prediction, x, short_cuts),
            HV: _decode(self.horizontal_vertical, x, short_cuts),
        }
        if self.type_prediction is not None:
            output[NC] = _decode(self.type_prediction, x, short_cuts)
        return output


# ---------------------------------------------------------------------------------------------- targets


def hovernet_targets(inst: Any, min_size: int = 30) -> dict[str, torch.Tensor]:
    """HoVer-Net's training targets of one instance map (H, W) or (1, H, W) (see the module docstring).

    Args:
        inst: the instance map, 0 = background.
        min_size: nuclei with fewer pixels get HV 0 (they stay nuclei in NP).

    Returns:
        ``{"nucleus_prediction": float32 (2, H, W) one-hot [background, nucleus], "horizontal_vertical": float32
        (2, H, W) [x, y] in [-1, 1]}``.
    """
    min_size = _HV_MIN_SIZE("hv_min_size", min_size)
    inst = as_instance_map(inst, "target")
    nucleus = torch.as_tensor(inst > 0, dtype=torch.float32)
    return {NP: torch.stack([1.0 - nucleus, nucleus]), HV: torch.from_numpy(hv_map(inst, min_size=min_size))}


def _batch_targets(insts: torch.Tensor, min_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    targets = [hovernet_targets(inst, min_size) for inst in insts]
    return {key: torch.stack([t[key] for t in targets]).to(device) for key in (NP, HV)}


# ---------------------------------------------------------------------------------------------- items


def _items(items: Any, name: str) -> list[Item]:
    """``(image float32 (C, H, W), inst int64 (1, H, W))`` tensors of `items`, checked; refuses mixed shapes."""
    if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Iterable):
        raise UserError(f"{name} must be a list of (image, instance map) pairs, got {type(items).__name__}.")
    out: list[Item] = []
    shapes = set()
    for index, item in enumerate(items):
        if isinstance(item, Mapping) and "image" in item and "label" in item:
            item = (item["image"], item["label"])
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise UserError(
                f"{name}[{index}] is a {type(item).__name__}: give (image, instance map) pairs or dicts with "
                '"image" and "label".'
            )
        image = item[0] if isinstance(item[0], torch.Tensor) else torch.as_tensor(np.asarray(item[0]))
        image = image.detach().cpu().float().as_subclass(torch.Tensor)  # a MetaTensor's metadata is not needed
        if image.ndim != 3:
            raise UserError(f"{name}[{index}] has an image of shape {tuple(image.shape)}: give images as (C, H, W).")
        if not torch.isfinite(image).all():
            raise UserError(f"{name}[{index}] has an image with NaN or infinite values: check how it was written.")
        inst = torch.from_numpy(as_instance_map(item[1], f"{name}[{index}]"))[None]
        if inst.shape[-2:] != image.shape[-2:]:
            raise UserError(
                f"{name}[{index}] has an image of {tuple(image.shape[-2:])} but an instance map of "
                f"{tuple(inst.shape[-2:])}: give both at one size."
            )
        shapes.add(tuple(image.shape))
        out.append((image, inst))
    if len(shapes) > 1:
        raise UserError(f"{name} mixes image shapes {sorted(shapes)}: bring every patch to one size.")
    return out


def _check_size(shape: Sequence[int], name: str) -> None:
    height, width = shape[-2:]
    if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE or min(height, width) < MIN_SIZE:
        raise UserError(
            f"{name} patches are {height}x{width} but HoVerNet needs sides that are multiples of {SIZE_MULTIPLE} and "
            f"at least {MIN_SIZE}: extract patches of such a size (e.g. 128)."
        )


# ---------------------------------------------------------------------------------------------- training


def train_hovernet(
    items: Sequence[Any],
    epochs: int = 100,
    batch_size: int = 8,
    learning_rate: float = 1e-4,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    *,
    weight_decay: float = 0.0,
    augment: bool = True,
    hv_min_size: int = 30,
) -> PaddedHoVerNet:
    """Train a fresh `PaddedHoVerNet` on ``(image, inst)`` items with HoVerNetLoss and Adam; returned in eval mode.

    Args:
        items: the training ``(image (C, H, W), inst (H, W) or (1, H, W))`` pairs, shuffled every epoch.
        epochs: passes over `items`.
        batch_size: items per step (the last batch of an epoch may be smaller).
        learning_rate: Adam's learning rate, constant.
        seed: fixes initialisation, shuffling and flips (see the module docstring).
        device: where the network trains; batches are drawn, flipped and turned into targets on CPU.
        progress: show a progress bar over the epochs.
        weight_decay: Adam's weight decay.
        augment: random horizontal and vertical flips of each item (image and instance map together).
        hv_min_size: nuclei smaller than this get no hv target.
    """
    from monai.apps.pathology.losses import HoVerNetLoss

    seed, epochs, batch_size = parse("seed", seed), parse("num_epochs", epochs), parse("batch_size", batch_size)
    learning_rate, weight_decay = parse("learning_rate", learning_rate), parse("weight_decay", weight_decay)
    progress, augment = parse("progress", progress), _BOOL("augment", augment)
    hv_min_size = _HV_MIN_SIZE("hv_min_size", hv_min_size)
    train_items = _items(items, "the training items")
    if not train_items:
        raise UserError("the training items are empty: give at least one (image, instance map) pair.")
    _check_size(train_items[0][0].shape, "the training")
    device = torch.device(device)
    criterion = HoVerNetLoss()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        network = PaddedHoVerNet(in_channels=train_items[0][0].shape[0]).to(device)
        generator = torch.Generator().manual_seed(seed)

        def batch_loss(index: list[int]) -> torch.Tensor:
            images = torch.stack([train_items[i][0] for i in index])
            insts = torch.stack([train_items[i][1] for i in index])
            if augment:
                images, insts = random_flips(images, insts, generator)
            return criterion(network(images.to(device)), _batch_targets(insts, hv_min_size, device))

        fit_epochs(
            network, len(train_items), batch_loss, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
            weight_decay=weight_decay, generator=generator, desc=f"HoVerNet (seed {seed})", progress=progress,
        )  # fmt: skip
    return network.eval()


def _instances(nucleus: torch.Tensor, hover: torch.Tensor, postprocessing: Callable) -> np.ndarray:
    """Instance map int32 (H, W) of one output: NP logits (2, H, W) and HV (2, H, W) (see the module docstring)."""
    mask = nucleus.argmax(0) > 0
    if not mask.any():
        return np.zeros(mask.shape, dtype=np.int32)
    flat = hover.flatten(1)
    if bool((flat.amax(1) == flat.amin(1)).any()):
        return ndimage.label(mask.numpy())[0].astype(np.int32)
    with warnings.catch_warnings():  # MONAI 1.6 calls scikit-image 0.26's remove_small_objects(min_size=...)
        warnings.filterwarnings("ignore", message=".*min_size.*deprecated", category=FutureWarning)
        _, inst = postprocessing(nucleus, hover)
    return np.asarray(torch.as_tensor(inst).cpu().numpy()[0], dtype=np.int32)


def predict_instances(
    network: torch.nn.Module,
    images: Sequence[Any],
    batch_size: int = 8,
    device: str | torch.device | None = None,
    postprocessing: Callable | None = None,
) -> list[np.ndarray]:
    """Instance maps int32 (H, W) predicted by a HoVerNet for each image (C, H, W).

    Args:
        network: a trained HoVerNet (e.g. from `train_hovernet`), returning MONAI's NP and HV branches; run in eval
            mode.
        images: images (C, H, W), numpy or torch, one shape.
        batch_size: images per forward pass.
        device: where the network runs; None for the device of its parameters.
        postprocessing: ``fn(np_logits (2, H, W), hv (2, H, W)) -> (info, inst (1, H, W))``; None for MONAI's
            ``HoVerNetInstanceMapPostProcessing()`` with its defaults.
    """
    from monai.apps.pathology.transforms.post.array import HoVerNetInstanceMapPostProcessing

    batch_size = parse("batch_size", batch_size)
    if postprocessing is None:
        postprocessing = HoVerNetInstanceMapPostProcessing()
    if device is None:
        device = next(network.parameters()).device
    stacked = [torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float() for x in images]
    network.eval()
    results: list[np.ndarray] = []
    with torch.no_grad():
        for start in range(0, len(stacked), batch_size):
            output = network(torch.stack(stacked[start : start + batch_size]).to(device))
            for nucleus, hover in zip(output[NP].float().cpu(), output[HV].float().cpu()):
                results.append(_instances(nucleus, hover, postprocessing))
    return results


def nuclei_scores(trues: Sequence[Any], preds: Sequence[Any], iou_threshold: float = 0.5) -> dict[str, float]:
    """The test scores of one run: per-image means of F1, AJI, AJI+, Dice, PQ, SQ, RQ and the dataset F1.

    Args:
        trues: the true instance maps of the test images.
        preds: the predicted instance maps, in the same order.
        iou_threshold: the IoU a matched pair needs for ``f1`` and ``dataset_f1`` (PQ is MONAI's, at 0.5).

    Returns:
        ``{name: score}`` for every name of `NUCLEI_METRICS`.
    """
    if len(trues) != len(preds) or not trues:
        raise UserError(
            f"nuclei_scores got {len(trues)} true maps and {len(preds)} predictions: give one prediction per test map."
        )
    sums = dict.fromkeys(NUCLEI_METRICS[:-1], 0.0)
    for true, pred in zip(trues, preds):
        quality = panoptic_quality(true, pred)
        sums["f1"] += instance_f1(true, pred, iou_threshold)
        sums["aji"] += aji(true, pred)
        sums["aji_plus"] += aji_plus(true, pred)
        sums["dice"] += binary_dice(true, pred)
        for name in ("pq", "sq", "rq"):
            sums[name] += quality[name]
    scores = {name: total / len(trues) for name, total in sums.items()}
    scores["dataset_f1"] = dataset_f1(trues, preds, iou_threshold)
    return scores


# ---------------------------------------------------------------------------------------------- comparison


def _synthetic_weights(weights: Any, count: int) -> np.ndarray:
    if weights is None:
        return np.ones(count)
    if isinstance(weights, (str, bytes)):
        raise OptionError(f"--synthetic_weights must be a list of numbers, got {weights!r}.")
    try:
        array = np.asarray(weights, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise OptionError("--synthetic_weights must be a list of numbers, one per synthetic item.") from None
    if array.size != count:
        raise OptionError(
            f"--synthetic_weights has {array.size} values but there are {count} synthetic items: give one per item."
        )
    if not np.isfinite(array).all() or (array < 0).any() or array.sum() <= 0:
        raise OptionError(
            "--synthetic_weights must be finite, >= 0 and not all 0 (they are sampling probabilities up to a factor)."
        )
    return array


def _synthetic_order(weights: np.ndarray, seed: int) -> list[int]:
    """The seed's weighted random order of the drawable synthetic items (weight > 0), without replacement."""
    drawable = np.flatnonzero(weights > 0)
    p = weights[drawable] / weights[drawable].sum()
    rng = np.random.default_rng(seed)
    return [int(i) for i in rng.choice(drawable, size=len(drawable), replace=False, p=p)]


def nuclei_segmentation_comparison(
    real: Sequence[Any],
    synthetic: Sequence[Any],
    test: Sequence[Any],
    ratios: Sequence[int] = (1, 2, 3, 4, 5),
    seeds: Sequence[int] = (0, 1, 2),
    *,
    synthetic_weights: Sequence[float] | None = None,
    epochs: int = 100,
    batch_size: int = 8,
    learning_rate: float = 1e-4,
    weight_decay: float = 0.0,
    augment: bool = True,
    hv_min_size: int = 30,
    iou_threshold: float = 0.5,
    confidence: float = 0.95,
    device: str | torch.device = "cpu",
    output_file: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """HoVerNet trained on "real" and on "real+<k>x" for each ratio k and seed, scored on the real test patches.

    The defaults follow HoVer-Net's recipe where it carries over (Adam, lr 1e-4, batch 8); the module docstring lists
    the deviations from the seed and the conventions.

    Args:
        real: the real training ``(image, inst)`` items.
        synthetic: the synthetic ``(image, inst)`` items the real+synthetic arms draw from.
        test: the real test ``(image, inst)`` items.
        ratios: one arm "real+<k>x" per k, with ``k * len(real)`` synthetic items; empty for the real arm alone.
        seeds: one run per arm and seed; differences to "real" are paired by seed.
        synthetic_weights: one sampling weight >= 0 per synthetic item (the OOD filter's p); None for uniform.
        epochs: training epochs per run.
        batch_size: items per step.
        learning_rate: Adam's learning rate, constant.
        weight_decay: Adam's weight decay.
        augment: random horizontal and vertical flips.
        hv_min_size: nuclei smaller than this get no hv target (the seed's 30).
        iou_threshold: the IoU a matched pair needs for ``f1`` and ``dataset_f1``.
        confidence: the intervals' coverage.
        device: where the networks train.
        output_file: where to write the result as JSON; None writes nothing. Refused before any training when it
            exists, unless `overwrite`.
        overwrite: replace an existing `output_file`.
        progress: show progress bars.

    Returns:
        `compare_arms`'s result (per arm ``per_seed`` and ``mean`` of every metric of `NUCLEI_METRICS`;
        ``differences`` to "real") plus ``settings``, which records per arm the synthetic items asked for and used.
    """
    seeds = _SEEDS("seeds", seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise OptionError(f"--seeds must list distinct seeds such as [0, 1, 2], got {seeds!r}.")
    ratios = _RATIOS("ratios", ratios)
    if len(set(ratios)) != len(ratios):
        raise OptionError(f"--ratios must list distinct ratios such as [1, 2, 3, 4, 5], got {ratios!r}.")
    epochs, batch_size = parse("num_epochs", epochs), parse("batch_size", batch_size)
    learning_rate, weight_decay = parse("learning_rate", learning_rate), parse("weight_decay", weight_decay)
    augment, progress = _BOOL("augment", augment), parse("progress", progress)
    hv_min_size, confidence = _HV_MIN_SIZE("hv_min_size", hv_min_size), _CONFIDENCE("confidence", confidence)
    iou_threshold = _IOU_THRESHOLD("iou_threshold", iou_threshold)
    if output_file is not None:
        check_new_output(output_file, parse("overwrite", overwrite))
    real_items, test_items = _items(real, "the real items"), _items(test, "the test items")
    synthetic_items = _items(synthetic, "the synthetic items")
    if not real_items:
        raise UserError("the real items are empty: give the real training patches the reference arm trains on.")
    if not test_items:
        raise UserError("the test items are empty: hold out some real patches for testing.")
    if ratios and not synthetic_items:
        raise UserError("the synthetic items are empty: give synthetic patches, or ratios=[] for the real arm alone.")
    shape = tuple(real_items[0][0].shape)
    for name, items in (("test", test_items), ("synthetic", synthetic_items)):
        if items and tuple(items[0][0].shape) != shape:
            raise UserError(
                f"the {name} images are {tuple(items[0][0].shape)} but the real ones {shape}: bring every patch to "
                "one channel count and size."
            )
    _check_size(shape, "the")
    weights = _synthetic_weights(synthetic_weights, len(synthetic_items))
    drawable = int((weights > 0).sum())
    requested = {f"real+{k}x": k * len(real_items) for k in ratios}
    used = {arm: min(n, drawable) for arm, n in requested.items()}

    runs = [(arm, seed) for seed in seeds for arm in ("real", *requested)]
    scores: dict[str, dict[int, dict[str, float]]] = {arm: {} for arm in ("real", *requested)}
    trues = [inst for _, inst in test_items]
    test_images = [image for image, _ in test_items]
    orders = {seed: _synthetic_order(weights, seed) if synthetic_items else [] for seed in seeds}
    for arm, seed in tqdm(runs, desc="nuclei downstream runs", disable=not progress):
        train = real_items + [synthetic_items[i] for i in orders[seed][: used.get(arm, 0)]]
        network = train_hovernet(
            train,
            epochs=epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            seed=seed,
            device=device,
            progress=progress,
            weight_decay=weight_decay,
            augment=augment,
            hv_min_size=hv_min_size,
        )
        predictions = predict_instances(network, test_images, batch_size=batch_size)
        scores[arm][seed] = nuclei_scores(trues, predictions, iou_threshold)
        del network
    result = compare_arms(scores, reference="real", confidence=confidence)
    result["settings"] = {
        "task": "nuclei instance segmentation",
        "network": "PaddedHoVerNet: monai HoVerNet(mode='fast', decoder_padding=True, out_classes=0, "
        "np_out_channels=2), every skip added, trained from scratch",
        "seed_network": "StarDist2D(n_rays=32, grid=(2, 2)), 500 epochs",
        "loss": "monai HoVerNetLoss (defaults)",
        "postprocessing": "monai HoVerNetInstanceMapPostProcessing (defaults)",
        "optimizer": "Adam",
        "learning_rate": learning_rate,
        "weight_decay": weight_decay,
        "epochs": epochs,
        "batch_size": batch_size,
        "augment": "random horizontal and vertical flips" if augment else None,
        "hv_min_size": hv_min_size,
        "checkpoint": "last epoch",
        "iou_threshold": iou_threshold,
        "pq_matching": "IoU > 0.5 (monai PanopticQualityMetric)",
        "empty_vs_empty": 1.0,
        "seeds": seeds,
        "ratios": ratios,
        "num_real": len(real_items),
        "num_synthetic_available": len(synthetic_items),
        "num_synthetic_drawable": drawable,
        "synthetic_sampling": "uniform" if synthetic_weights is None else "weighted by synthetic_weights",
        "num_synthetic": {arm: {"requested": requested[arm], "used": used[arm]} for arm in requested},
        "num_test": len(test_items),
        "image_shape": list(shape),
        "device": str(device),
    }
    if output_file is not None:
        save_json(result, output_file, overwrite=True)  # checked above, before the work
    return result
