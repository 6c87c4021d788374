"""K-means clusters of image/mask training pairs, as the polyp method trains one diffusion model per cluster.

Saragih et al. 2024 (methods.md §1.3) cluster the training pairs on the Inception-v3 pool3 features of the image and
of its mask, concatenated (2 x 2048 = 4096-d), with ``sklearn.cluster.KMeans(n_clusters=k, random_state=0)`` for
k in 10, 20, 30, 40. This module does the same, and every pair gets a cluster (the seed's cluster files held 348 of
the 1000 pairs).

Conventions:
- features: `meddiff.features.ImageFeatures` (Inception-v3 pool3 by default, or a user's TorchScript file), or any
  callable with its interface: ``features(images)`` takes float32 (n, 3, H, W) images in ``features.value_range``
  ((-1, 1) when the callable has no such attribute) and returns (n, D) numbers. A pair's feature vector is
  ``[features(image), features(mask)]``, 2D long; the mask is given as a 3-channel grey image, 0 as the low end
  and 1 as the high end of the value range (-1 and +1 by default), like the method's mask "converted to RGB";
- k-means: ``KMeans(n_clusters=k, random_state=seed, n_init=10)``, and cluster labels renamed by first appearance:
  the cluster of pair 0 is 0, the next cluster met in datalist order is 1, and so on. Renaming never changes which
  pairs share a cluster, and makes the labels independent of the order sklearn happens to number its centres in;
- every cluster holds at least one pair: fewer pairs than clusters, or fewer distinct feature vectors than
  clusters (duplicate pairs), is refused, since each cluster trains a model;
- files, written with `meddiff.io.StagedOutput` (checked before any work, existing files refused unless
  ``overwrite``, both moved into place at the end): ``clusters.json`` = ``{"num_clusters", "seed", "img_size",
  "features", "n_init", "sizes": {cluster: count}, "assignments": {name: cluster}}`` and ``clusters.png``, one row
  per cluster (a caption tile, then up to 6 members in datalist order, each the image with its mask's outline in
  green);
- errors: bad options are `OptionError`, bad datalists and clusters files `UserError`; each names the option or the
  file and the fix.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from meddiff.errors import OptionError, UserError
from meddiff.options import Rule, parse

__all__ = [
    "CLUSTERS_FILE",
    "CLUSTERS_GRID",
    "KMEANS_N_INIT",
    "cluster_members",
    "cluster_pairs",
    "kmeans",
    "pair_features",
    "read_clusters",
]

CLUSTERS_FILE = "clusters.json"
CLUSTERS_GRID = "clusters.png"
#: k-means restarts; the best of them (lowest inertia) is kept. sklearn's own default changed from 10 to "auto"
#: (1 run for k-means++) in 1.4, so the method's ``KMeans(n_clusters=k, random_state=0)`` meant 10 when written.
KMEANS_N_INIT = 10
#: how many members of each cluster the grid shows
GRID_MEMBERS = 6
_GRID_TILE = 128
_OUTLINE = (0, 255, 0)
_INCEPTION_NAME = "inception-v3 pool3 of image + mask (4096-d)"
_NUM_CLUSTERS = Rule("int", low=1, hint="k of k-means; the polyp method uses 10, 20, 30 or 40")
_CLUSTER_INDEX = Rule("int", low=0)

Reader = Callable[[str, str, int], tuple[Any, Any]]


# ------------------------------------------------------------------------------------------------------ features


def _value_range(features: Any) -> tuple[float, float]:
    lo, hi = getattr(features, "value_range", (-1.0, 1.0))
    return float(lo), float(hi)


def _as_float(array: Any, name: str, channels: int) -> torch.Tensor:
    x = array.detach().cpu() if isinstance(array, torch.Tensor) else torch.as_tensor(np.asarray(array))
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"Expected {name} of shape (N, {channels}, H, W), got {tuple(x.shape)}.")
    return x.float()


def _features_of(images: torch.Tensor, masks: torch.Tensor, features: Any) -> np.ndarray:
    """[features(image), features(mask)] of float32 images (n,3,H,W) in [-1,1] and masks (n,1,H,W) in [0,1]."""
    lo, hi = _value_range(features)
    if (lo, hi) != (-1.0, 1.0):
        images = (images + 1.0) / 2.0 * (hi - lo) + lo
    grey = (lo + masks * (hi - lo)).repeat(1, 3, 1, 1)
    image_features = np.asarray(features(images), dtype=np.float64)
    mask_features = np.asarray(features(grey), dtype=np.float64)
    n = images.shape[0]
    for got in (image_features, mask_features):
        if got.ndim != 2 or got.shape[0] != n:
            raise ValueError(f"the feature network returned shape {got.shape} for {n} images; expected (n, D).")
    return np.concatenate([image_features, mask_features], axis=1)


def _default_features(features: Any) -> Any:
    """`features` itself, or ImageFeatures for None (Inception-v3) or a weights path."""
    if features is None or isinstance(features, (str, os.PathLike)):
        from meddiff.features import ImageFeatures

        return ImageFeatures(features)
    return features


def pair_features(
    images: Any, masks: Any, features: Any = None, batch_size: int = 32, progress: bool | None = False
) -> np.ndarray:
    """Features (N, 2D) of image/mask pairs: the image's features, then those of its mask as a grey image.

    Args:
        images: (N, 3, H, W) numpy array or tensor, values in [-1, 1].
        masks: (N, 1, H, W) binary masks, values in {0, 1}.
        features: a `meddiff.features.ImageFeatures`, any callable with its interface (see the module docstring),
            the path of a TorchScript file, or None for Inception-v3 pool3 (D = 2048).
        batch_size: pairs sent to the network at once; the features do not depend on it.
        progress: show a progress bar (None: only on a terminal).

    Returns:
        float64 (N, 2D): columns [0, D) from the images, [D, 2D) from the masks.
    """
    x = _as_float(images, "images", 3)
    m = _as_float(masks, "masks", 1)
    if x.shape[0] != m.shape[0]:
        raise ValueError(f"got {x.shape[0]} images but {m.shape[0]} masks; give one mask per image.")
    if m.numel() and (m.min() < 0 or m.max() > 1):
        raise ValueError(f"masks must hold 0 and 1, got values in [{float(m.min()):g}, {float(m.max()):g}].")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise OptionError(f"batch_size must be a positive whole number, got {batch_size!r}.")
    features = _default_features(features)
    chunks = [
        _features_of(x[start : start + batch_size], m[start : start + batch_size], features)
        for start in tqdm(range(0, x.shape[0], batch_size), desc="pair features", disable=_disable(progress))
    ]
    if not chunks:
        dim = getattr(features, "dim", 0)
        return np.zeros((0, 2 * dim), np.float64)
    return np.concatenate(chunks, axis=0)


def _disable(progress: bool | None) -> bool | None:
    """tqdm's `disable`: None hides the bar when stderr is not a terminal."""
    return None if progress is None else not parse("progress", progress)


# ------------------------------------------------------------------------------------------------------- k-means


def _first_appearance(labels: np.ndarray) -> np.ndarray:
    """Rename labels so they count up in the order they first appear (0 for the first row's cluster)."""
    used, first = np.unique(labels, return_index=True)
    rename = np.zeros(int(used.max()) + 1, dtype=np.int64)
    rename[used[np.argsort(first)]] = np.arange(len(used))
    return rename[labels]


def kmeans(features: Any, num_clusters: int, seed: int = 0) -> np.ndarray:
    """K-means cluster labels (N,) of feature rows, numbered by first appearance.

    ``sklearn.cluster.KMeans(n_clusters=num_clusters, random_state=seed, n_init=10)``: ten k-means++ starts, the
    one with the lowest inertia kept. n_init is pinned because sklearn's default changed (10 until 1.3, "auto" = 1
    start since 1.4), which would change the clusters with the installed version; 10 is what the method's
    ``KMeans(n_clusters=k, random_state=0)`` ran with when it was written, and is the steadier choice. The labels are
    then renamed by first appearance (row 0's cluster is 0, the next new one 1, ...): a renaming only, every row keeps
    the same companions, so the assignment is sklearn's up to the names, which no longer depend on its internals.

    Args:
        features: (N, D) finite numbers, one row per pair.
        num_clusters: k, at least 1 and at most N.
        seed: k-means' random_state; the same seed and features give the same labels.

    Returns:
        int64 (N,) labels in [0, m), m the number of non-empty clusters: num_clusters, unless the rows hold fewer
        distinct points than that (sklearn then warns and leaves clusters empty; `cluster_pairs` refuses it).
    """
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    k = _NUM_CLUSTERS("num_clusters", num_clusters)
    seed = parse("seed", seed)
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"Expected features of shape (N, D), got {x.shape}.")
    if not np.isfinite(x).all():
        raise ValueError("features hold NaN or infinite values; check the feature network and the images.")
    if k > x.shape[0]:
        raise OptionError(f"--num_clusters {k} is more than the {x.shape[0]} feature rows: lower --num_clusters.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # fewer distinct points than clusters: reported by callers
        labels = KMeans(n_clusters=k, random_state=seed, n_init=KMEANS_N_INIT).fit_predict(x)
    return _first_appearance(np.asarray(labels, dtype=np.int64))


# ------------------------------------------------------------------------------------------------ datalist pairs


def _dataset(items: Sequence[Mapping[str, Any]]) -> str:
    """The folder holding every image and mask of `items`, to name in messages."""
    folders = {os.path.dirname(os.path.abspath(str(item[key]))) for item in items for key in ("image", "label")}
    try:
        return os.path.commonpath(sorted(folders)) if folders else "the datalist"
    except ValueError:
        return sorted(folders)[0]


def _check_items(items: Sequence[Mapping[str, Any]]) -> list[dict]:
    checked, seen = [], set()
    for i, item in enumerate(items):
        missing = [key for key in ("name", "image", "label") if not isinstance(item, Mapping) or key not in item]
        if missing:
            raise UserError(
                f"pair {i} of the datalist has no {', '.join(repr(k) for k in missing)}: every pair needs a name, "
                "an image and a label file."
            )
        name = str(item["name"])
        if name in seen:
            raise UserError(f"two pairs of the datalist are named {name!r}: pair names must be unique.")
        seen.add(name)
        checked.append(dict(item))
    return checked


def _read(reader: Reader, item: Mapping[str, Any], img_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    image, mask = reader(str(item["image"]), str(item["label"]), img_size)
    image = torch.as_tensor(np.asarray(image, dtype=np.float32))
    mask = torch.as_tensor(np.asarray(mask, dtype=np.float32))
    size = (img_size, img_size)
    if tuple(image.shape) != (3, *size) or tuple(mask.shape) != (1, *size):
        raise ValueError(
            f"the reader returned an image {tuple(image.shape)} and a mask {tuple(mask.shape)} for {item['image']}; "
            f"expected (3, {img_size}, {img_size}) and (1, {img_size}, {img_size})."
        )
    return image, mask


def _features_name(features: Any) -> str:
    path = getattr(features, "path", None)
    if path is None:
        return f"{type(features).__name__} of image + mask"
    try:
        from meddiff.features import default_inception_weights

        if Path(path) == default_inception_weights():
            return _INCEPTION_NAME
    except (ImportError, FileNotFoundError):
        pass
    return str(path)


def cluster_pairs(
    items: Sequence[Mapping[str, Any]],
    num_clusters: int,
    seed: int = 0,
    img_size: int = 256,
    reader: Reader | None = None,
    features: Any = None,
    output_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> list[dict]:
    """Cluster every image/mask pair of a datalist with k-means on image + mask features; optionally write the result.

    Args:
        items: the datalist, dicts with "name" (unique), "image" and "label" (mask) file paths.
        num_clusters: k; every cluster gets at least one pair (the polyp method uses 10, 20, 30 or 40).
        seed: k-means' random_state (the method's is 0).
        img_size: side the reader resizes pairs to before the features (the method: 256).
        reader: ``reader(image_file, label_file, img_size)`` -> (image (3, S, S) in [-1, 1], mask (1, S, S) in
            {0, 1}); None for `meddiff.data.polyp.read_pair`.
        features: a `meddiff.features.ImageFeatures` or a callable with its interface, the path of a TorchScript
            file, or None for Inception-v3 pool3 (2 x 2048 = 4096-d pair features).
        output_dir: where to write ``clusters.json`` and ``clusters.png``; None writes nothing.
        overwrite: replace existing ``clusters.json``/``clusters.png``; without it they refuse the run.
        progress: show a progress bar while extracting features (None: only on a terminal).

    Returns:
        new items, in datalist order, each with an int "cluster" added.
    """
    k = _NUM_CLUSTERS("num_clusters", num_clusters)
    seed, img_size, overwrite = parse("seed", seed), parse("img_size", img_size), parse("overwrite", overwrite)
    items = _check_items(items)
    if len(items) < k:
        raise UserError(
            f"{len(items)} pair(s) in {_dataset(items)} cannot fill {k} clusters: lower --num_clusters to at most "
            f"{len(items)}, or give a larger dataset."
        )
    stage = None
    if output_dir is not None:
        from meddiff.io import StagedOutput

        out = Path(output_dir)
        inputs = [path for item in items for path in (item["image"], item["label"])]
        stage = StagedOutput(out, [out / CLUSTERS_FILE, out / CLUSTERS_GRID], inputs, overwrite, out / CLUSTERS_FILE)
    if reader is None:
        from meddiff.data.polyp import read_pair as reader
    features = _default_features(features)

    batch = int(getattr(features, "batch_size", 32))
    chunks = []
    with tqdm(total=len(items), desc="cluster features", unit="pair", disable=_disable(progress)) as bar:
        for start in range(0, len(items), batch):
            pairs = [_read(reader, item, img_size) for item in items[start : start + batch]]
            images, masks = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
            chunks.append(pair_features(images, masks, features, batch_size=batch))
            bar.update(len(pairs))
    labels = kmeans(np.concatenate(chunks, axis=0), k, seed)
    found = int(labels.max()) + 1
    if found < k:
        raise UserError(
            f"the {len(items)} pairs in {_dataset(items)} hold only {found} distinct feature vectors (duplicate "
            f"pairs), too few for {k} clusters: lower --num_clusters to at most {found}, or remove the duplicates."
        )
    clustered = [{**item, "cluster": int(c)} for item, c in zip(items, labels)]
    if stage is not None:
        record = {
            "num_clusters": k,
            "seed": seed,
            "img_size": img_size,
            "features": _features_name(features),
            "n_init": KMEANS_N_INIT,
            "sizes": {str(c): int(n) for c, n in enumerate(np.bincount(labels, minlength=k))},
            "assignments": {item["name"]: item["cluster"] for item in clustered},
        }
        with stage:
            _save_cluster_grid(clustered, k, reader, img_size, stage.path(out / CLUSTERS_GRID))
            from meddiff.io import save_json

            save_json(record, stage.path(out / CLUSTERS_FILE))
    return clustered


# ---------------------------------------------------------------------------------------------------------- grid


def _thumbnail(image: torch.Tensor, mask: torch.Tensor, size: int) -> np.ndarray:
    """An (size, size, 3) uint8 tile: the image with its mask's outline."""
    from PIL import Image
    from scipy.ndimage import binary_erosion

    from meddiff.visualize import to_rgb_tile

    rgb = Image.fromarray(to_rgb_tile(image.numpy())).resize((size, size), Image.Resampling.BILINEAR)
    binary = Image.fromarray((mask[0].numpy() > 0.5).astype(np.uint8) * 255).resize((size, size), Image.NEAREST)
    inside = np.asarray(binary) > 0
    tile = np.array(rgb)
    tile[inside & ~binary_erosion(inside, iterations=2)] = _OUTLINE
    return tile


def _caption(lines: Sequence[str], size: int) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    font_size = max(10, size // 8)
    font = ImageFont.load_default(size=font_size)
    image = Image.new("RGB", (size, size), (64, 64, 64))
    draw = ImageDraw.Draw(image)
    for j, line in enumerate(lines):
        draw.text((4, 4 + j * (font_size + 4)), line, fill=(255, 255, 255), font=font)
    return np.asarray(image)


def _save_cluster_grid(clustered: list[dict], k: int, reader: Reader, img_size: int, path: Path) -> None:
    from meddiff.visualize import save_grid

    size = min(img_size, _GRID_TILE)
    rows = []
    for c in range(k):
        members = [item for item in clustered if item["cluster"] == c]
        row = [_caption([f"cluster {c}", f"{len(members)} pairs"], size)]
        row += [_thumbnail(*_read(reader, item, img_size), size) for item in members[:GRID_MEMBERS]]
        rows.append(row)
    labels = ["cluster"] + [f"member {j + 1}" for j in range(GRID_MEMBERS)]
    save_grid(rows, path, column_labels=labels, min_tile=size)


# -------------------------------------------------------------------------------------------------- clusters file


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_clusters(path: str | os.PathLike) -> dict:
    """Read and check a ``clusters.json`` written by `cluster_pairs`.

    Args:
        path: the clusters file.

    Returns:
        its contents, with "sizes" keyed by int cluster, and "file" (the path read, for messages) added.
    """
    path = Path(path)
    rerun = "re-run clustering to write it again"
    if not path.is_file():
        raise UserError(f"clusters file {path} does not exist: run clustering first, or pass the right --cluster_file.")
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"clusters file {path} is not readable JSON ({type(err).__name__}): {rerun}.") from err
    if not isinstance(record, dict):
        raise UserError(f"clusters file {path} holds a {type(record).__name__}, not a mapping: {rerun}.")
    kinds = {"num_clusters": int, "seed": int, "img_size": int, "features": str, "sizes": dict, "assignments": dict}
    missing = [key for key in kinds if key not in record]
    if missing:
        raise UserError(f"clusters file {path} lacks {', '.join(missing)}: {rerun}.")
    for key, kind in kinds.items():
        if not (_is_int(record[key]) if kind is int else isinstance(record[key], kind)):
            what = {int: "a whole number", str: "a string", dict: "a mapping"}[kind]
            got = repr(record[key])[:60]
            raise UserError(f"clusters file {path}: {key} must be {what}, got {got}: {rerun}.")
    k = record["num_clusters"]
    if k < 1:
        raise UserError(f"clusters file {path}: num_clusters must be at least 1, got {k}: {rerun}.")
    bad = next((n for n, c in record["assignments"].items() if not _is_int(c) or not 0 <= c < k), None)
    if bad is not None:
        got = record["assignments"][bad]
        raise UserError(f"clusters file {path}: {bad!r} is assigned {got!r}, not a cluster 0 to {k - 1}: {rerun}.")
    counts = np.bincount(np.asarray(list(record["assignments"].values()), dtype=np.int64), minlength=k)
    expected = {str(c): int(n) for c, n in enumerate(counts)}
    if record["sizes"] != expected:
        raise UserError(f"clusters file {path}: sizes do not match the assignments: {rerun}.")
    return {**record, "sizes": {int(c): n for c, n in expected.items()}, "file": str(path)}


def cluster_members(items: Sequence[Mapping[str, Any]], clusters: Mapping[str, Any], cluster_index: int) -> list[dict]:
    """The pairs of a datalist in one cluster, in datalist order, each with its "cluster" added.

    Args:
        items: the datalist, dicts with "name", "image" and "label"; every name must be in the clusters file.
        clusters: what `read_clusters` returned.
        cluster_index: the cluster, 0 to num_clusters - 1.
    """
    source = clusters.get("file", "the clusters file")
    k = int(clusters["num_clusters"])
    index = _CLUSTER_INDEX("cluster_index", cluster_index)
    if index >= k:
        raise OptionError(f"--cluster_index {index} is out of range: {source} has {k} clusters, so pass 0 to {k - 1}.")
    assignments = clusters["assignments"]
    items = _check_items(items)
    missing = [item["name"] for item in items if item["name"] not in assignments]
    if missing:
        raise UserError(
            f"{len(missing)} pair(s) of the datalist (first {missing[0]!r}) are not in {source}, which was made "
            "from another datalist: re-run clustering on this one."
        )
    return [{**item, "cluster": index} for item in items if assignments[item["name"]] == index]
