"""Selective filtering of class-guided synthetic tiles by their distance to the real classes' feature centroids.

HistoDiffusion (methods.md §5.5) keeps a generated tile only when it lies nearest to the centroid of the class it
was generated for, then keeps per class the tiles closest to their own centroid. This module does that, written
from the paper's description and the seed's ``selective_filtering.py``.

Conventions:
- features: the shared frozen network of `meddiff.features` (Inception-v3 pool3, 2048-d, by default; a user's
  TorchScript file through `feature_weights`), with its preprocessing (images in [-1, 1], resized to 299 x 299).
  The seed used an unreleased self-supervised ViT-S/16 (DINO teacher trained on the 5 % labelled split, fed
  ``ToTensor()`` 224 px inputs); that checkpoint is not available, so the features differ from the seed's. A user
  who has such a network may pass it as a TorchScript file returning (N, D) features;
- every feature vector is L2-normalised: ``f / |f|`` (a zero vector stays zero);
- centroids (`class_centroids`): per class the mean of the normalised features of the **real labelled** tiles of
  that class only (the paper: "centroids from the labelled data"; the seed's pickle name suggests fakes were mixed
  in, which is not done here). The centroid itself is not re-normalised, as in the seed. A class without a real
  tile is refused;
- distances (`centroid_distances`): ``d_ik = mean_over_dims((f_i / |f_i| - c_k) ** 2)``, float64 (N, K);
- selection (`select`): tile i is a candidate iff ``argmin_k d_ik`` (the first of tied classes) is its intended
  class; the candidates of each class are sorted by their own-class distance, ascending (ties by generation
  order), and the first `top_k` are kept (None keeps every candidate; the seed kept <= 501 per class);
- generated tiles (`read_generated`): the folder written by `meddiff.histology_generation.HistologyWriter`,
  ``<generated_dir>/<CLASS>/<name>.png`` listed in ``<generated_dir>/generation.json``; real tiles: labelled
  datalist items (`meddiff.data.histology.histology_datalist`). Both are read with
  `meddiff.data.histology.read_tile` at one `image_size` (shorter side resized, centre crop, float32 in [-1, 1]);
- the scores file (`filter_generated`) is written atomically and never replaces an existing file unless
  ``overwrite``; it records the SHA-256 of the ``generation.json`` it scored, so a later reader can refuse scores of
  an earlier generation (`read_kept`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from meddiff.data.errors import DataError
from meddiff.errors import OptionError
from meddiff.io import check_new_output, save_json
from meddiff.options import parse

__all__ = [
    "GENERATION_FILE",
    "centroid_distances",
    "check_generated_classes",
    "class_centroids",
    "filter_generated",
    "generation_digest",
    "normalise",
    "read_generated",
    "read_kept",
    "read_real_tiles",
    "real_classes",
    "select",
    "summary",
]

logger = logging.getLogger(__name__)

GENERATION_FILE = "generation.json"


def _image_size(image_size: Any) -> int | None:
    return None if image_size is None else parse("image_size", image_size)


# ---------------------------------------------------------------------------------------------- reading tiles


def _read_tile(path: str | os.PathLike, image_size: int) -> np.ndarray:
    from meddiff.data.histology import read_tile

    return read_tile(path, image_size)


def _read_native(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.float32)
    except OSError as err:
        raise DataError(f"{path} cannot be read as an image ({err}): run inference.json again.") from err
    return np.moveaxis(rgb / 127.5 - 1.0, -1, 0)


def generation_digest(generated_dir: str | os.PathLike) -> str:
    """SHA-256 (hex) of ``<generated_dir>/generation.json``: identifies one generation run's samples."""
    return hashlib.sha256((Path(generated_dir) / GENERATION_FILE).read_bytes()).hexdigest()


def _manifest(generated_dir: str | os.PathLike) -> tuple[Path, dict]:
    manifest = Path(generated_dir) / GENERATION_FILE
    if not manifest.is_file():
        raise DataError(f"{manifest} does not exist: run inference.json first, or pass its --output_dir.")
    try:
        record = json.loads(manifest.read_text())
    except ValueError as err:
        raise DataError(f"{manifest} is not valid JSON ({err}): run inference.json again.") from err
    if not isinstance(record, dict) or record.get("kind", "histology") != "histology":
        raise DataError(f"{manifest} was not written by the histology bundle's inference: pass its own output folder.")
    classes, items = record.get("classes"), record.get("items")
    if not isinstance(classes, list) or not classes or not isinstance(items, list):
        raise DataError(f"{manifest} lists no classes or items: run inference.json again.")
    return manifest, record


def read_generated(
    generated_dir: str | os.PathLike, image_size: int | None = None, progress: bool = False
) -> tuple[list[dict], np.ndarray, list[str]]:
    """The tiles of a `HistologyWriter` folder: its items, images (N, 3, S, S) float32 in [-1, 1], its classes.

    Args:
        generated_dir: the inference output folder (it holds ``generation.json``).
        image_size: read every tile with `meddiff.data.histology.read_tile` at this side; None keeps the tiles as
            written (RGB / 127.5 - 1).
        progress: show a progress bar.

    Returns:
        ``(items, images, classes)``: the manifest's items (``name``, ``class_name``, ``label``, ``file`` made
        absolute, ``seed``, ``guidance_scale``) in its order, their images, and the class names in label order.
    """
    image_size = _image_size(image_size)
    folder = Path(generated_dir)
    manifest, record = _manifest(folder)
    classes = [str(c) for c in record["classes"]]
    items, seen = [], set()
    for entry in record["items"]:
        if not isinstance(entry, dict) or any(k not in entry for k in ("name", "class_name", "label", "file")):
            raise DataError(f"{manifest} has an item without name, class_name, label and file: run inference again.")
        name, cls, label = str(entry["name"]), str(entry["class_name"]), entry["label"]
        if name in seen:
            raise DataError(f"{manifest} lists the sample {name!r} twice: run inference.json again.")
        if cls not in classes or label != classes.index(cls):
            raise DataError(
                f"{manifest}: sample {name!r} has class {cls!r} and label {label!r}, which do not match its classes "
                f"{classes}: run inference.json again."
            )
        path = folder / entry["file"]
        if not path.is_file():
            raise DataError(f"{path} is listed in {manifest} but missing: run inference.json again.")
        seen.add(name)
        items.append({**entry, "name": name, "class_name": cls, "label": int(label), "file": str(path)})
    if not items:
        raise DataError(f"{manifest} lists no generated samples: run inference.json with --samples_per_class >= 1.")
    bar = tqdm(items, desc="reading generated tiles", disable=not progress, leave=False)
    images = [_read_native(Path(i["file"])) if image_size is None else _read_tile(i["file"], image_size) for i in bar]
    shapes = sorted({tuple(im.shape) for im in images})
    if len(shapes) > 1:
        raise DataError(f"{folder} holds tiles of shapes {shapes}: pass --image_size to read them at one size.")
    return items, np.stack(images).astype(np.float32, copy=False), classes


def read_real_tiles(items: Sequence[dict], image_size: int, what: str = "training", progress: bool = False):
    """Images (N, 3, S, S) float32 in [-1, 1] of labelled datalist items, read with `read_tile` at `image_size`."""
    if not items:
        raise DataError(f"no real {what} tiles: pass the --dataset_dir (labelled tiles) the model was trained on.")
    image_size = _image_size(image_size)
    bar = tqdm(items, desc=f"reading real {what} tiles", disable=not progress, leave=False)
    return np.stack([_read_tile(item["image"], image_size) for item in bar]).astype(np.float32, copy=False)


def real_classes(items: Sequence[dict], classes: Sequence[str] | None = None) -> list[str]:
    """The class names in label order of labelled items (or `classes` when given, checked against the items)."""
    found: dict[int, str] = {}
    for item in items:
        if "label" not in item or "class_name" not in item:
            raise DataError(
                f"real item {item.get('image', item)!r} has no label: pass labelled tiles (class folders, or "
                "file names <CLASS>-<rest>), not an unlabelled folder."
            )
        label, name = int(item["label"]), str(item["class_name"])
        if found.setdefault(label, name) != name:
            raise DataError(
                f"the real items give label {label} to both {found[label]!r} and {name!r} ({item['image']}): "
                "write the datalist again (data_prep)."
            )
    if classes is not None:
        classes = [str(c) for c in classes]
        wrong = [f"{found[k]!r} as {k}" for k in sorted(found) if k >= len(classes) or classes[k] != found[k]]
        if wrong:
            raise DataError(
                f"the real items label {', '.join(wrong)}, which does not match their classes {classes}: write the "
                "datalist again (data_prep)."
            )
        return classes
    return [found[k] for k in sorted(found)]


def check_generated_classes(generated: Sequence[str], real: Sequence[str], manifest: str | os.PathLike) -> None:
    """Refuse a generation whose class list (`manifest`) is not the real labelled tiles' class list."""
    from meddiff.data.histology import check_same_classes

    check_same_classes(
        generated,
        real,
        f"{manifest} vs the real labelled tiles",
        "pass the --dataset_dir (and --classes) the model was trained on, or generate again with its classifier.",
    )


# ---------------------------------------------------------------------------------------------- the filter


def normalise(features: Any) -> np.ndarray:
    """Rows of features (N, D) divided by their Euclidean norm, float64 (a zero row stays zero)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must have shape (N, D), got {f.shape}.")
    norms = np.linalg.norm(f, axis=1, keepdims=True)
    return np.divide(f, norms, out=np.zeros_like(f), where=norms > 0)


def class_centroids(
    features: Any, labels: Sequence[int], num_classes: int, classes: Sequence[str] | None = None
) -> np.ndarray:
    """Per class the mean of the L2-normalised features of its real tiles: float64 (num_classes, D).

    Args:
        features: (N, D) features of real labelled tiles.
        labels: (N,) class indices in 0 .. num_classes - 1.
        num_classes: K.
        classes: the class names, for the error naming a class without tiles.
    """
    f = normalise(features)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(labels) != len(f):
        raise ValueError(f"{len(f)} feature rows but {len(labels)} labels.")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, got {sorted(set(labels.tolist()))}.")
    counts = np.bincount(labels, minlength=num_classes)
    empty = [int(k) for k in np.flatnonzero(counts == 0)]
    if empty:
        names = [classes[k] if classes is not None else str(k) for k in empty]
        raise DataError(
            f"no real labelled tile of class {', '.join(names)}: a centroid needs at least one; add labelled tiles "
            "of it to the dataset, or leave it out of --classes."
        )
    sums = np.zeros((num_classes, f.shape[1]), np.float64)
    np.add.at(sums, labels, f)
    return sums / counts[:, None]


def centroid_distances(features: Any, centroids: Any) -> np.ndarray:
    """d_ik = mean over dims of (f_i / |f_i| - c_k)^2: float64 (N, K)."""
    f, c = normalise(features), np.asarray(centroids, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] != f.shape[1]:
        raise ValueError(f"centroids must have shape (K, {f.shape[1]}), got {c.shape}.")
    return ((f[:, None, :] - c[None, :, :]) ** 2).mean(axis=2)


def select(distances: Any, intended: Sequence[int], top_k: int | None = None) -> dict[int, list[int]]:
    """Indices kept per class (every class 0..K-1 a key), each list in ascending own-class distance.

    Tile i is a candidate iff the argmin over classes of its distances (the first of tied ones) is `intended[i]`;
    per class the `top_k` candidates nearest their own centroid are kept (None: all); equal distances keep the
    generation order.
    """
    d = np.asarray(distances, dtype=np.float64)
    intended = np.asarray(intended, dtype=np.int64).reshape(-1)
    top_k = parse("top_k", top_k)
    if d.ndim != 2 or len(d) != len(intended):
        raise ValueError(f"distances must be (N, K) for the {len(intended)} intended labels, got {d.shape}.")
    nearest = d.argmin(axis=1) if len(d) else np.zeros(0, np.int64)
    kept: dict[int, list[int]] = {}
    for k in range(d.shape[1]):
        candidates = np.flatnonzero((intended == k) & (nearest == k))
        ordered = candidates[np.argsort(d[candidates, k], kind="stable")]
        kept[k] = [int(i) for i in (ordered if top_k is None else ordered[:top_k])]
    return kept


def filter_generated(
    generated_dir: str | os.PathLike,
    real_items: Sequence[dict],
    output_file: str | os.PathLike,
    image_size: int,
    top_k: int | None = None,
    feature_weights: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
    *,
    classes: Sequence[str] | None = None,
) -> dict:
    """Score every generated tile against the real classes' centroids, select, and write `output_file` (JSON).

    Args:
        generated_dir: the inference output folder (``generation.json`` and the class folders).
        real_items: labelled real training items (``image``, ``label``, ``class_name``): the centroids.
        output_file: the JSON written, e.g. ``<generated_dir>/filter_scores.json`` (module docstring); refused
            before any work when it exists, unless `overwrite`.
        image_size: the side real and generated tiles are read at.
        top_k: tiles kept per class, nearest their own centroid first; None keeps every candidate.
        feature_weights: a TorchScript feature network instead of Inception-v3 (`meddiff.features`).
        overwrite: replace an existing `output_file`.
        progress: show progress bars.
        classes: the data's class names in label order (the datalist's ``classes``); None derives them from the
            items' labels.

    Returns:
        The written record: ``{"settings", "classes", "centroids_from", "samples", "kept", "counts"}``.
    """
    from meddiff.features import ImageFeatures

    overwrite, progress = parse("overwrite", overwrite), parse("progress", progress)
    top_k, image_size = parse("top_k", top_k), _image_size(image_size)
    if image_size is None:
        raise OptionError("--image_size must be set: the side real and generated tiles are read at.")
    output_file = check_new_output(output_file, overwrite)
    manifest, _ = _manifest(generated_dir)
    digest = generation_digest(generated_dir)
    items, fake, gen_classes = read_generated(generated_dir, image_size, progress)
    if not real_items:
        raise DataError("no real labelled tiles for the centroids: pass the --dataset_dir the model was trained on.")
    check_generated_classes(gen_classes, real_classes(real_items, classes), manifest)
    real = read_real_tiles(real_items, image_size, "labelled training", progress)
    features = ImageFeatures(feature_weights)
    labels = [int(item["label"]) for item in real_items]
    centroids = class_centroids(features.extract(real), labels, len(gen_classes), gen_classes)
    distances = centroid_distances(features.extract(fake), centroids)
    intended = [item["label"] for item in items]
    kept = select(distances, intended, top_k)
    kept_index = {i for indices in kept.values() for i in indices}
    nearest = distances.argmin(axis=1)
    samples = {}
    for i, item in enumerate(items):
        samples[item["name"]] = {
            "intended": item["class_name"],
            "nearest": gen_classes[int(nearest[i])],
            "distances": {c: float(distances[i, k]) for k, c in enumerate(gen_classes)},
            "own_distance": float(distances[i, item["label"]]),
            "kept": i in kept_index,
        }
    counts = np.bincount(labels, minlength=len(gen_classes))
    record = {
        "settings": {
            "generated_dir": str(Path(generated_dir).resolve()),
            "generation_sha256": digest,
            "image_size": image_size,
            "top_k": top_k,
            "feature_network": str(features.path),
            "distance": "mean over dims of (f/|f| - c_k)^2, c_k the mean of the real tiles' f/|f| of class k",
        },
        "classes": gen_classes,
        "centroids_from": {c: int(counts[k]) for k, c in enumerate(gen_classes)},
        "samples": samples,
        "kept": {c: [items[i]["name"] for i in kept[k]] for k, c in enumerate(gen_classes)},
        "counts": {
            c: {
                "generated": sum(1 for i in intended if i == k),
                "nearest_is_intended": int(sum(1 for i, n in zip(intended, nearest) if i == k and n == k)),
                "kept": len(kept[k]),
            }
            for k, c in enumerate(gen_classes)
        },
    }
    save_json(record, output_file, overwrite=overwrite)
    logger.info(f"{len(kept_index)} of {len(items)} generated tiles kept by the centroid filter: {output_file}")
    return record


def read_kept(filter_file: str | os.PathLike, generated_dir: str | os.PathLike) -> set[str]:
    """Names of the tiles `filter_file` keeps, refused when it scored another ``generation.json`` than this one."""
    path = Path(filter_file)
    if not path.is_file():
        raise DataError(f"{path} does not exist: run the filter (filter.json) first, or leave --filter_file out.")
    try:
        record = json.loads(path.read_text())
        kept, digest = record["kept"], record["settings"]["generation_sha256"]
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path} is not a centroid filter's scores file ({err!r}): run the filter again.") from err
    if digest != generation_digest(generated_dir):
        raise DataError(
            f"{path} scored another generation than {Path(generated_dir) / GENERATION_FILE} (generated again since): "
            "run the filter again on this generation."
        )
    return {str(name) for names in kept.values() for name in names}


def summary(result: dict) -> str:
    """One line for the user: tiles kept per class, and how many had another class's centroid nearest."""
    counts = result["counts"]
    generated = sum(c["generated"] for c in counts.values())
    kept = sum(c["kept"] for c in counts.values())
    astray = generated - sum(c["nearest_is_intended"] for c in counts.values())
    per_class = ", ".join(f"{name} {c['kept']}/{c['generated']}" for name, c in counts.items())
    return (
        f"centroid filter: kept {kept} of {generated} generated tiles ({per_class}); {astray} lay nearer another "
        "class's real centroid than their own and were dropped."
    )
