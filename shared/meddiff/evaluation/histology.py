"""Class-guided synthetic histology tiles scored: realism, whether guidance worked, and the downstream test.

`evaluate_histology_augmentation` (``evaluate.json`` of ``histology_augmentation``; methods.md §5.5-5.6) reads the
generated tiles (`meddiff.centroid_filter.read_generated`), the real labelled training tiles and the real test
tiles, all at one `image_size` (`meddiff.data.histology.read_tile`), and reports:

- FID (Inception pool3, `meddiff.features`; `feature_weights` for a user's TorchScript network) of the generated
  tiles against the real labelled training tiles, overall and per intended class; the same for the tiles the
  centroid filter kept (`filter_file`) and, overall only, for an unguided generation (`unguided_dir`); and the real
  test tiles against the training tiles (the floor a generator cannot beat on this data). A value is None, with a
  reason, when a side has fewer than 2 tiles. FID of a few hundred tiles in 2048 dimensions is biased upwards: the
  per-class values compare runs of one size, not published numbers;
- the guidance check: a classifier trained on all the real training tiles (the first downstream seed, or seed 0)
  assigns each generated tile a class; per intended class and overall, the share of tiles it assigns to their
  intended class, for the guided tiles, the kept ones and the unguided ones (the same classifier), beside chance
  (1 / K) and the classifier's own accuracy on the real test tiles. When label fraction 1.0 is among
  `label_fractions`, the classifier is that fraction's "real" arm run of the first seed (not trained twice);
- the downstream test (`meddiff.evaluation.downstream.classification_comparison`): per label fraction f the "real"
  arm is a stratified share f of the real training tiles (`meddiff.data.histology.stratified_subset`: at least one
  per class, seeded by `fraction_seed`) and the "real+synthetic" arm adds every kept synthetic tile (all generated
  tiles without a filter) with its intended class as label; accuracy and macro F1 on the real test tiles, with
  Student-t intervals over `downstream_seeds` and paired differences. No downstream test when the seeds are empty.

Every tile is held in memory as float32 (3, S, S): 100,000 tiles at 224 px are 60 GB, so evaluate label fractions
of NCT-CRC-HE-100K or a subset of it. The metrics file is checked before any work and written atomically; an
existing one is refused unless ``overwrite``.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from meddiff.centroid_filter import (
    GENERATION_FILE,
    check_generated_classes,
    read_generated,
    read_kept,
    read_real_tiles,
    real_classes,
)
from meddiff.data.errors import DataError
from meddiff.errors import OptionError
from meddiff.io import check_new_output, save_json
from meddiff.options import Rule, parse
from meddiff.verdicts import verdict

__all__ = ["evaluate_histology_augmentation", "fid_entry", "guidance_rates", "histology_verdict", "summary"]

logger = logging.getLogger(__name__)

_FRACTION_SEED = Rule("int", low=0, high=2**63 - 1)
_DEVICE = Rule("choice", choices=("cpu", "cuda"), optional=True, hint="leave it out for CUDA when available")
_PREDICT_BATCH = 32


def fid_entry(real_features: np.ndarray, features: np.ndarray) -> dict:
    """``{"fid", "num_images", "num_real", "reason"}``: the FID of two feature sets, or None with the reason."""
    from meddiff.metrics.fid import frechet_inception_distance

    entry: dict[str, Any] = {"fid": None, "num_images": int(len(features)), "num_real": int(len(real_features))}
    if len(features) < 2 or len(real_features) < 2:
        entry["reason"] = f"FID needs at least 2 tiles on each side, got {len(features)} and {len(real_features)} real"
        return entry
    with warnings.catch_warnings():  # scipy's sqrtm warns on the rank-deficient covariances of small sets
        warnings.simplefilter("ignore")
        entry["fid"] = float(frechet_inception_distance(real_features, features))
    entry["reason"] = None
    return entry


def _fids(real: np.ndarray, real_labels: np.ndarray, fake: np.ndarray, labels: np.ndarray, classes: Sequence[str]):
    return {
        "overall": fid_entry(real, fake),
        "per_class": {c: fid_entry(real[real_labels == k], fake[labels == k]) for k, c in enumerate(classes)},
    }


def guidance_rates(predicted: Sequence[int], intended: Sequence[int], classes: Sequence[str]) -> dict:
    """Share of tiles whose predicted class is their intended one, overall and per intended class.

    Returns:
        ``{"overall", "num_images", "per_class": {class: {"rate", "num_images", "predicted": {class: count}}}}``;
        a rate is None for a class (or a set) without tiles.
    """
    predicted, intended = np.asarray(predicted, np.int64), np.asarray(intended, np.int64)
    per_class = {}
    for k, c in enumerate(classes):
        mine = predicted[intended == k]
        per_class[c] = {
            "rate": float(np.mean(mine == k)) if len(mine) else None,
            "num_images": int(len(mine)),
            "predicted": {other: int(np.sum(mine == j)) for j, other in enumerate(classes)},
        }
    overall = float(np.mean(predicted == intended)) if len(intended) else None
    return {"overall": overall, "num_images": int(len(intended)), "per_class": per_class}


def _labels(items: Sequence[dict]) -> np.ndarray:
    return np.asarray([int(item["label"]) for item in items], dtype=np.int64)


def evaluate_histology_augmentation(
    train_items: Sequence[dict],
    test_items: Sequence[dict],
    generated_dir: str | os.PathLike,
    metrics_file: str | os.PathLike,
    *,
    image_size: int,
    filter_file: str | os.PathLike | None = None,
    unguided_dir: str | os.PathLike | None = None,
    label_fractions: Sequence[float] = (0.05, 0.1, 1.0),
    fraction_seed: int = 0,
    downstream_seeds: Sequence[int] = (0, 1, 2),
    downstream_epochs: int = 100,
    downstream_batch_size: int = 32,
    downstream_learning_rate: float = 1e-4,
    downstream_weight_decay: float = 0.05,
    downstream_network: str = "densenet121",
    classes: Sequence[str] | None = None,
    feature_weights: str | os.PathLike | None = None,
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Score the generated tiles (module docstring); write `metrics_file` (JSON) and return the metrics.

    Args:
        train_items: the real labelled training items (``image``, ``label``, ``class_name``, ``name``).
        test_items: the real labelled test items of the downstream test and the guidance check's classifier.
        generated_dir: the guided generation's output folder (``generation.json``).
        metrics_file: the JSON written.
        image_size: the side every tile (real and generated) is read at, and the classifiers' input.
        filter_file: the centroid filter's scores (`meddiff.centroid_filter.filter_generated`) of this generation:
            only its kept tiles join the real+synthetic arms. None: every generated tile.
        unguided_dir: an unguided generation (guidance scale 0) of the same classes, for comparison.
        label_fractions: shares of the labelled training tiles of the downstream arms, each in (0, 1].
        fraction_seed: the seed of the stratified shares.
        downstream_seeds: one classifier per arm, fraction and seed (empty: no downstream test).
        downstream_epochs: the classifiers' epochs.
        downstream_batch_size: the classifiers' batch size.
        downstream_learning_rate: the classifiers' (Adam) learning rate.
        downstream_weight_decay: the classifiers' weight decay.
        downstream_network: "densenet121", "vit_s16" or "small_cnn" (`meddiff.evaluation.downstream.CLASSIFIERS`).
        classes: the data's class names in label order (the datalist's ``classes``); None: from the items' labels.
        feature_weights: a TorchScript feature network instead of Inception-v3 for FID.
        device: where the classifiers train: "cpu", "cuda", or None for CUDA when available.
        overwrite: replace an existing metrics file.
        progress: show progress bars.
    """
    from meddiff.data.histology import stratified_subset
    from meddiff.evaluation.downstream import (
        CLASSIFIERS,
        accuracy,
        classification_comparison,
        macro_f1,
        make_classifier,
        predict_classes,
        random_flips,
        train_and_score,
    )
    from meddiff.features import ImageFeatures

    overwrite, progress = parse("overwrite", overwrite), parse("progress", progress)
    image_size = parse("image_size", image_size)
    fractions = parse("label_fractions", list(label_fractions))
    if not fractions or len(set(fractions)) != len(fractions):
        raise OptionError(f"--label_fractions must list distinct shares such as [0.05, 0.1, 1.0], got {fractions}.")
    fraction_seed = _FRACTION_SEED("fraction_seed", fraction_seed)
    seeds = parse("downstream_seeds", list(downstream_seeds))
    if len(set(seeds)) != len(seeds):
        raise OptionError(f"--downstream_seeds must list distinct seeds such as [0, 1, 2], got {seeds}.")
    train_settings = {
        "epochs": parse("downstream_epochs", downstream_epochs),
        "batch_size": parse("batch_size", downstream_batch_size),
        "learning_rate": parse("learning_rate", downstream_learning_rate),
        "weight_decay": parse("weight_decay", downstream_weight_decay),
    }
    network = Rule("choice", choices=tuple(CLASSIFIERS))("downstream_network", downstream_network)
    device = _DEVICE("device", device) or ("cuda" if torch.cuda.is_available() else "cpu")
    metrics_file = check_new_output(metrics_file, overwrite)

    # --- every input read and checked before any training
    items, fake, gen_classes = read_generated(generated_dir, image_size, progress)
    manifest = os.path.join(generated_dir, GENERATION_FILE)
    check_generated_classes(gen_classes, real_classes(train_items, classes), manifest)
    if not test_items:
        raise DataError(
            "no real test tiles: the downstream test and the guidance check are scored on them; pass a datalist "
            "with a testing split (--test_fraction > 0 or a CRC-VAL-HE-7K folder)."
        )
    real_classes(test_items, gen_classes)  # each test label names its class (a class may lack test tiles)
    num_classes = len(gen_classes)
    intended = _labels(items)
    kept_names = None if filter_file is None else read_kept(filter_file, generated_dir)
    kept = np.asarray([kept_names is None or item["name"] in kept_names for item in items], dtype=bool)
    unguided = None
    if unguided_dir is not None:
        u_items, u_fake, u_classes = read_generated(unguided_dir, image_size, progress)
        check_generated_classes(gen_classes, u_classes, os.path.join(unguided_dir, GENERATION_FILE))
        unguided = (u_items, u_fake)
    real = read_real_tiles(train_items, image_size, "labelled training", progress)
    test = read_real_tiles(test_items, image_size, "test", progress)
    real_labels, test_labels = _labels(train_items), _labels(test_items)

    # --- FID
    extractor = ImageFeatures(feature_weights)
    real_f, fake_f, test_f = extractor.extract(real), extractor.extract(fake), extractor.extract(test)
    fid: dict[str, Any] = {
        "guided": _fids(real_f, real_labels, fake_f, intended, gen_classes),
        "kept": None if filter_file is None else _fids(real_f, real_labels, fake_f[kept], intended[kept], gen_classes),
        "unguided": None if unguided is None else {"overall": fid_entry(real_f, extractor.extract(unguided[1]))},
        "real_test": fid_entry(real_f, test_f),
        "feature_network": str(extractor.path),
    }

    # --- downstream test, catching the guidance check's classifier on the way
    first_seed = seeds[0] if seeds else 0
    predictions: dict[str, np.ndarray] = {}

    def predict(network_: torch.nn.Module) -> None:
        predictions["guided"] = predict_classes(network_, fake, _PREDICT_BATCH)
        if unguided is not None:
            predictions["unguided"] = predict_classes(network_, unguided[1], _PREDICT_BATCH)

    real_items_all = list(zip(real, real_labels))  # views of `real`, nothing copied
    synthetic = [(fake[i], intended[i]) for i in np.flatnonzero(kept)]
    by_name = {item["name"]: i for i, item in enumerate(train_items)}
    downstream: dict[str, Any] = {}
    classifier: dict[str, Any] | None = None
    for fraction in fractions if seeds else []:
        chosen = [by_name[item["name"]] for item in stratified_subset(train_items, fraction, fraction_seed)]
        real_arm = [real_items_all[i] for i in chosen]
        arms = {"real": _pair(real_arm), "real+synthetic": _pair(real_arm + synthetic)}
        full = fraction == 1.0

        def hook(arm: str, seed: int, network_: torch.nn.Module, full: bool = full) -> None:
            if full and arm == "real" and seed == first_seed:
                predict(network_)

        result = classification_comparison(
            arms, (test, test_labels), seeds, num_classes=num_classes, network=network, device=device,
            progress=progress, on_trained=hook, **train_settings,
        )  # fmt: skip
        downstream[f"{fraction:g}"] = {
            "label_fraction": fraction,
            "num_real": len(real_arm),
            "num_synthetic": len(synthetic),
            **result,
        }
        if full:
            scores = result["arms"]["real"]["per_seed"][str(first_seed)]
            classifier = {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"], "trained_for": "downstream"}
    if classifier is None:  # label fraction 1.0 was not run: train the check's classifier on its own
        shape = tuple(real.shape[1:])
        scores = train_and_score(
            real_items_all, list(zip(test, test_labels)),
            lambda: make_classifier(network, shape[0], num_classes, shape[1:]), first_seed,
            loss=torch.nn.CrossEntropyLoss(), metrics={"accuracy": accuracy}, dataset_metrics={"macro_f1": macro_f1},
            augment=random_flips, device=device, progress=progress, on_trained=predict, **train_settings,
        )  # fmt: skip
        classifier = {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"], "trained_for": "guidance check"}

    guided = guidance_rates(predictions["guided"], intended, gen_classes)
    guidance = {
        "classifier": {
            "network": network,
            "seed": first_seed,
            "num_train": len(real),
            "test_accuracy": classifier["accuracy"],
            "test_macro_f1": classifier["macro_f1"],
            "trained_for": classifier["trained_for"],
            **train_settings,
        },
        "chance": 1.0 / num_classes,
        "guided": guided,
        "kept": None
        if filter_file is None
        else guidance_rates(predictions["guided"][kept], intended[kept], gen_classes),
        "unguided": None
        if unguided is None
        else guidance_rates(predictions["unguided"], _labels(unguided[0]), gen_classes),
    }
    metrics: dict[str, Any] = {
        "classes": gen_classes,
        "image_size": image_size,
        "num_generated": len(items),
        "num_kept": int(kept.sum()),
        "num_unguided": None if unguided is None else len(unguided[0]),
        "num_real_training": len(real),
        "num_real_test": len(test),
        "generated_dir": str(generated_dir),
        "filter_file": None if filter_file is None else str(filter_file),
        "unguided_dir": None if unguided_dir is None else str(unguided_dir),
        "fid": fid,
        "guidance": guidance,
        "downstream": downstream or None,
        "settings": {
            "label_fractions": fractions,
            "fraction_seed": fraction_seed,
            "downstream_seeds": seeds,
            "network": network,
            "device": device,
            **train_settings,
        },
    }
    metrics["verdict"] = histology_verdict(metrics)
    (logger.warning if metrics["verdict"].startswith("undertrained") else logger.info)(metrics["verdict"])
    save_json(metrics, metrics_file, overwrite=overwrite)
    return metrics


def _pair(items: Sequence[tuple[np.ndarray, Any]]) -> tuple[list[np.ndarray], np.ndarray]:
    return [image for image, _ in items], np.asarray([int(label) for _, label in items], dtype=np.int64)


def histology_verdict(metrics: dict) -> str:
    """A plain sentence: are the guided tiles recognised as their intended class more often than without guidance?

    The baseline is the unguided tiles' rate when there are some, else chance (1 / K). No verdict when the check's
    own classifier is no better than chance on the real test tiles; "not shown yet" when the guided rate exceeds the
    baseline by less than twice the binomial standard error of the difference,
    sqrt(p_g (1 - p_g) / n_g + p_u (1 - p_u) / n_u) (the unguided term is 0 against chance).
    """
    guidance = metrics["guidance"]
    chance, accuracy = guidance["chance"], guidance["classifier"]["test_accuracy"]
    if accuracy <= chance:
        return (
            f"no verdict: the guidance check's classifier is at chance on the real test tiles (accuracy "
            f"{accuracy:.2f}, chance {chance:.2f}); raise --downstream_epochs or use more labelled tiles."
        )
    rate, n = guidance["guided"]["overall"], guidance["guided"]["num_images"]
    unguided = guidance["unguided"]
    base, what = (unguided["overall"], "the unguided tiles") if unguided else (chance, "chance")
    problems = []
    if rate <= base:
        problems.append(
            f"the guided tiles are their intended class no more often ({rate:.2f}) than {what} ({base:.2f})"
        )
    # binomial standard error of the difference (of the guided rate alone against chance)
    spread = rate * (1 - rate) / n + (base * (1 - base) / unguided["num_images"] if unguided else 0.0)
    if not problems and rate - base < 2 * math.sqrt(spread):
        return (
            f"not shown yet: {rate:.0%} of the {n} guided tiles are recognised as their intended class against "
            f"{base:.0%} for {what}, a difference within twice its standard error ({math.sqrt(spread):.2f}); "
            "generate more tiles (--samples_per_class) or train longer."
        )
    return verdict(
        problems,
        f"guidance works: {rate:.0%} of the guided tiles are recognised as their intended class ({what}: "
        f"{base:.0%}; the classifier's test accuracy {accuracy:.0%}).",
    )


def _interval(d: dict) -> str:
    if math.isnan(d["low"]):
        return f"{d['mean']:+.3f} (one seed, no interval)"
    return f"{d['mean']:+.3f} (95% CI {d['low']:+.3f} to {d['high']:+.3f}, {d['n']} seeds)"


def _effect(d: dict) -> str:
    if math.isnan(d["low"]):
        return "too few seeds to tell"
    if d["low"] > 0:
        return "synthetic tiles helped"
    if d["high"] < 0:
        return "synthetic tiles hurt"
    return "no clear difference"


def summary(metrics: dict) -> str:
    """The lines a person reads last: FID beside its floor, the guidance check, the downstream arms, the verdict."""

    def show(entry: dict | None) -> str:
        return "n/a" if entry is None or entry["fid"] is None else f"{entry['fid']:.1f}"

    fid = metrics["fid"]
    line = (
        f"{metrics['num_generated']} generated tiles of {len(metrics['classes'])} classes: FID "
        f"{show(fid['guided']['overall'])} against {metrics['num_real_training']} real training tiles (real test "
        f"tiles: {show(fid['real_test'])})"
    )
    if fid["kept"] is not None:
        line += f"; the {metrics['num_kept']} kept by the filter: {show(fid['kept']['overall'])}"
    if fid["unguided"] is not None:
        line += f"; unguided: {show(fid['unguided']['overall'])}"
    lines = [line]
    g = metrics["guidance"]
    rates = f"guided {g['guided']['overall']:.0%}"
    if g["kept"] is not None and g["kept"]["overall"] is not None:
        rates += f", kept {g['kept']['overall']:.0%}"
    if g["unguided"] is not None:
        rates += f", unguided {g['unguided']['overall']:.0%}"
    lines.append(
        f"intended class recognised by a {g['classifier']['network']} trained on the real tiles (test accuracy "
        f"{g['classifier']['test_accuracy']:.0%}): {rates}; chance {g['chance']:.0%}"
    )
    if not metrics["downstream"]:
        lines.append("no downstream test (--downstream_seeds is empty)")
    for key, run in (metrics["downstream"] or {}).items():
        means = {arm: v["mean"] for arm, v in run["arms"].items()}
        acc, f1 = run["differences"]["real+synthetic"]["accuracy"], run["differences"]["real+synthetic"]["macro_f1"]
        lines.append(
            f"label fraction {key} ({run['num_real']} real + {run['num_synthetic']} synthetic): accuracy real "
            f"{means['real']['accuracy']['mean']:.3f}, real+synthetic {means['real+synthetic']['accuracy']['mean']:.3f}"
            f", difference {_interval(acc)}; macro F1 difference {_interval(f1)}: {_effect(acc)}"
        )
    lines.append(metrics["verdict"])
    return "\n".join(lines)
