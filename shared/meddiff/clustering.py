"""Clusters of training pairs or patches, as the polyp and nuclei methods train one diffusion model per cluster.

Two methods, both on features of the shared network (`meddiff.features`, Inception-v3 pool3 by default):
- ``"kmeans"`` (the polyp method, Saragih et al. 2024, methods.md §1.3): the pool3 features of the image and of its
  mask, concatenated (2 x 2048 = 4096-d), clustered with ``sklearn.cluster.KMeans(n_clusters=k, random_state=0)`` for
  k in 10, 20, 30, 40. Every pair gets a cluster (the seed's cluster files held 348 of the 1000 pairs);
- ``"umap_hdbscan"`` (the nuclei method, methods.md §4.2): per-patch image features -> ``StandardScaler`` ->
  ``umap.UMAP(n_components=3, random_state=42)`` -> HDBSCAN(min_samples=10, min_cluster_size=50), the configuration
  its training used (with ResNet50 features there; here the shared Inception pool3, 2048-d). HDBSCAN is
  scikit-learn's ``sklearn.cluster.HDBSCAN`` (same algorithm as the ``hdbscan`` package the seed imports, which is
  not needed). HDBSCAN finds the number of clusters itself, and leaves low-density points out as noise.

Conventions:
- features: `meddiff.features.ImageFeatures` (Inception-v3 pool3 by default, or a user's TorchScript file), or any
  callable with its interface: ``features(images)`` takes float32 (n, 3, H, W) images in ``features.value_range``
  ((-1, 1) when the callable has no such attribute) and returns (n, D) numbers. ``features_of="image+mask"``: a
  pair's feature vector is ``[features(image), features(mask)]``, 2D long; the mask is given as a 3-channel grey
  image, 0 as the low end and 1 as the high end of the value range (-1 and +1 by default), like the method's mask
  "converted to RGB". ``features_of="image"``: ``features(image)`` alone, D long;
- readers: a pair reader ``reader(image_file, label_file, img_size)`` -> (image (3, S, S) float in [-1, 1], mask
  (1, S, S) in {0, 1}) reads items with "name", "image" and "label" (the polyp datalists; default
  `meddiff.data.polyp.read_pair`); an item reader ``item_reader(item)`` -> (image (3, S, S) float in [-1, 1], label
  (S, S) or (1, S, S) instance ids with 0 = background, or None) reads the whole item, so items need only "name" and
  "image" here (the nuclei patches: a tile, a "box" and an "annotation" or "label", read by
  `meddiff.data.monuseg.read_patch`). S must equal ``img_size``. An item reader's mask is ``label > 0``;
- k-means: ``KMeans(n_clusters=k, random_state=seed, n_init=10)``;
- UMAP + HDBSCAN: ``StandardScaler()`` (zero mean, unit variance per feature column), then ``umap.UMAP(n_components,
  n_neighbors=15, min_dist=0.1, metric="euclidean", random_state=seed, n_jobs=1)`` (a random_state makes UMAP run
  single-threaded and repeatable: the same seed and features give the same embedding on one machine), then
  ``HDBSCAN(min_samples, min_cluster_size)`` on the embedding (euclidean, excess-of-mass selection, no single
  cluster). Noise points are labelled -1 and keep -1 in the assignments: they belong to no cluster, are in no
  cluster's members and train no cluster model. The silhouette (Rousseeuw 1987, mean over points of
  (b - a) / max(a, b), a the mean distance to the own cluster, b to the nearest other one) is computed in the UMAP
  embedding on the non-noise points, when there are at least 2 clusters (otherwise null);
- cluster labels renamed by first appearance: the cluster of the first clustered item is 0, the next cluster met in
  datalist order is 1, and so on (noise stays -1). Renaming never changes which items share a cluster, and makes the
  labels independent of the order sklearn happens to number its clusters in;
- every cluster holds at least one item: for k-means, fewer pairs than clusters, or fewer distinct feature vectors
  than clusters (duplicate pairs), is refused, since each cluster trains a model; for UMAP + HDBSCAN, fewer items
  than 2 x min_cluster_size, or than min_samples or n_neighbors + 1, is refused before any feature is computed, and
  a run where HDBSCAN finds no cluster (all noise) is refused;
- files, written with `meddiff.io.StagedOutput` (checked before any work, existing files refused unless
  ``overwrite``, both moved into place at the end): ``clusters.json`` = ``{"method", "num_clusters", "seed",
  "img_size", "features", "features_of", "sizes": {cluster: count}, "assignments": {name: cluster}}`` plus, for
  k-means, ``"n_init"``, and for UMAP + HDBSCAN, ``"umap": {"n_components", "n_neighbors", "min_dist", "metric",
  "random_state"}``, ``"hdbscan": {"min_samples", "min_cluster_size"}``, ``"silhouette"`` (or null) and
  ``"num_noise"`` (items assigned -1; "sizes" counts clusters 0 to num_clusters - 1 only). Files without "method"
  are k-means files. ``clusters.png`` has one row per cluster, then a "noise" row when there is noise (a caption
  tile, then up to 6 members in datalist order, each the image with its mask's outline in green: a pair's mask
  outline 2 px wide, or every instance's 1 px boundary for an item reader's instance map; the image alone when the
  reader gave no label);
- errors: bad options are `OptionError`, bad datalists and clusters files `UserError`; each names the option or the
  file and the fix.
"""

from __future__ import annotations

import functools
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
    "METHODS",
    "NOISE",
    "UMAP_MIN_DIST",
    "cluster_members",
    "cluster_pairs",
    "kmeans",
    "pair_features",
    "read_clusters",
    "silhouette",
    "umap_hdbscan",
]

CLUSTERS_FILE = "clusters.json"
CLUSTERS_GRID = "clusters.png"
METHODS = ("kmeans", "umap_hdbscan")
FEATURES_OF = ("image+mask", "image")
#: the label HDBSCAN gives points in no cluster, kept in the assignments
NOISE = -1
#: k-means restarts; the best of them (lowest inertia) is kept. sklearn's own default changed from 10 to "auto"
#: (1 run for k-means++) in 1.4, so the method's ``KMeans(n_clusters=k, random_state=0)`` meant 10 when written.
KMEANS_N_INIT = 10
#: UMAP's min_dist, its default, which the nuclei method kept
UMAP_MIN_DIST = 0.1
#: how many members of each cluster the grid shows
GRID_MEMBERS = 6
_GRID_TILE = 128
_OUTLINE = (0, 255, 0)
_INCEPTION_NAMES = {
    "image+mask": "inception-v3 pool3 of image + mask (4096-d)",
    "image": "inception-v3 pool3 of image (2048-d)",
}
_NUM_CLUSTERS = Rule("int", low=1, hint="k of k-means; the polyp method uses 10, 20, 30 or 40")
_CLUSTER_INDEX = Rule("int", low=0)
_METHOD = Rule("choice", choices=METHODS)
_FEATURES_OF = Rule("choice", choices=FEATURES_OF)
_SEED = Rule("int", low=0, high=2**32 - 1, hint="sklearn and UMAP take random states below 2**32")
_UMAP_COMPONENTS = Rule("int", low=1, hint="the UMAP embedding's dimension; the nuclei method uses 3")
_UMAP_NEIGHBORS = Rule("int", low=2, hint="UMAP's n_neighbors; 15 is its default")
_MIN_SAMPLES = Rule("int", low=1, hint="HDBSCAN's min_samples; the nuclei method uses 10")
_MIN_CLUSTER_SIZE = Rule("int", low=2, hint="HDBSCAN's min_cluster_size; the nuclei method uses 50")

Reader = Callable[[str, str, int], tuple[Any, Any]]
ItemReader = Callable[[Mapping[str, Any]], tuple[Any, Any]]


# ------------------------------------------------------------------------------------------------------ features


def _value_range(features: Any) -> tuple[float, float]:
    lo, hi = getattr(features, "value_range", (-1.0, 1.0))
    return float(lo), float(hi)


def _as_float(array: Any, name: str, channels: int) -> torch.Tensor:
    x = array.detach().cpu() if isinstance(array, torch.Tensor) else torch.as_tensor(np.asarray(array))
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"Expected {name} of shape (N, {channels}, H, W), got {tuple(x.shape)}.")
    return x.float()


def _network(images: torch.Tensor, features: Any) -> np.ndarray:
    """features(images) of float32 (n,3,H,W) images in [-1,1] or grey masks already in the network's range."""
    out = np.asarray(features(images), dtype=np.float64)
    n = images.shape[0]
    if out.ndim != 2 or out.shape[0] != n:
        raise ValueError(f"the feature network returned shape {out.shape} for {n} images; expected (n, D).")
    return out


def _to_range(images: torch.Tensor, features: Any) -> torch.Tensor:
    lo, hi = _value_range(features)
    return images if (lo, hi) == (-1.0, 1.0) else (images + 1.0) / 2.0 * (hi - lo) + lo


def _features_of(images: torch.Tensor, masks: torch.Tensor | None, features: Any) -> np.ndarray:
    """[features(image), features(mask)] of float32 images (n,3,H,W) in [-1,1] and masks (n,1,H,W) in [0,1];
    features(image) alone when masks is None."""
    image_features = _network(_to_range(images, features), features)
    if masks is None:
        return image_features
    lo, hi = _value_range(features)
    grey = (lo + masks * (hi - lo)).repeat(1, 3, 1, 1)
    return np.concatenate([image_features, _network(grey, features)], axis=1)


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


# ---------------------------------------------------------------------------------------------------- clustering


def _first_appearance(labels: np.ndarray) -> np.ndarray:
    """Rename labels so they count up in the order they first appear (0 for the first clustered row's cluster);
    NOISE (-1) stays -1."""
    labels = np.asarray(labels, dtype=np.int64)
    clustered = labels != NOISE
    if not clustered.any():
        return labels.copy()
    used, first = np.unique(labels[clustered], return_index=True)
    rename = np.zeros(int(used.max()) + 1, dtype=np.int64)
    rename[used[np.argsort(first)]] = np.arange(len(used))
    out = np.full_like(labels, NOISE)
    out[clustered] = rename[labels[clustered]]
    return out


def _feature_rows(features: Any) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"Expected features of shape (N, D), got {x.shape}.")
    if not np.isfinite(x).all():
        raise ValueError("features hold NaN or infinite values; check the feature network and the images.")
    return x


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
        seed: k-means' random_state, 0 to 2**32 - 1; the same seed and features give the same labels.

    Returns:
        int64 (N,) labels in [0, m), m the number of non-empty clusters: num_clusters, unless the rows hold fewer
        distinct points than that (sklearn then warns and leaves clusters empty; `cluster_pairs` refuses it).
    """
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    k = _NUM_CLUSTERS("num_clusters", num_clusters)
    seed = _SEED("seed", seed)
    x = _feature_rows(features)
    if k > x.shape[0]:
        raise OptionError(f"--num_clusters {k} is more than the {x.shape[0]} feature rows: lower --num_clusters.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # fewer distinct points than clusters: reported by callers
        labels = KMeans(n_clusters=k, random_state=seed, n_init=KMEANS_N_INIT).fit_predict(x)
    return _first_appearance(np.asarray(labels, dtype=np.int64))


def _import_umap() -> Any:
    try:
        import umap
    except ImportError as err:
        raise UserError(
            f"--method umap_hdbscan needs umap-learn, which is not importable here ({err}): install it with "
            "`pip install -r requirements.txt`."
        ) from err
    return umap


def _check_umap_hdbscan_size(
    n: int, n_neighbors: int, min_samples: int, min_cluster_size: int, what: str, noun: str
) -> None:
    """Refuse, before any work, a number of rows UMAP + HDBSCAN cannot cluster; `what` and `noun` name them."""
    if n < 2 * min_cluster_size:
        raise UserError(
            f"{what} are too few for HDBSCAN to find clusters of at least --min_cluster_size {min_cluster_size} (it "
            f"needs 2 x {min_cluster_size} = {2 * min_cluster_size}): lower --min_cluster_size, or give more {noun}."
        )
    if n <= n_neighbors:
        raise UserError(f"{what} are too few for UMAP's --umap_neighbors {n_neighbors}: lower it below {n}.")
    if n < min_samples:
        raise UserError(f"{what} are fewer than HDBSCAN's --min_samples {min_samples}: lower it to at most {n}.")


def umap_hdbscan(
    features: Any,
    n_components: int = 3,
    n_neighbors: int = 15,
    min_samples: int = 10,
    min_cluster_size: int = 50,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """HDBSCAN cluster labels (N,) of feature rows in their UMAP embedding, numbered by first appearance, noise -1.

    ``StandardScaler()`` -> ``umap.UMAP(n_components, n_neighbors, min_dist=0.1, random_state=seed, n_jobs=1)`` ->
    ``sklearn.cluster.HDBSCAN(min_samples, min_cluster_size)`` (module docstring). UMAP with a random_state runs on
    one thread and repeats itself: the same seed and features give the same labels. The first call in a process
    compiles UMAP's numba code (about half a minute on one CPU core).

    Args:
        features: (N, D) finite numbers, one row per item.
        n_components: the UMAP embedding's dimension (the nuclei method: 3).
        n_neighbors: UMAP's neighbourhood size, less than N.
        min_samples: HDBSCAN's min_samples (the nuclei method: 10), at most N.
        min_cluster_size: HDBSCAN's smallest cluster (the nuclei method: 50), at most N / 2.
        seed: UMAP's random_state, 0 to 2**32 - 1 (the nuclei method: 42).

    Returns:
        int64 (N,) labels, -1 for noise and [0, m) for the m clusters HDBSCAN found (m = 0: all noise, which
        `cluster_pairs` refuses); float32 (N, n_components) embedding.
    """
    from sklearn.cluster import HDBSCAN
    from sklearn.preprocessing import StandardScaler

    n_components = _UMAP_COMPONENTS("umap_components", n_components)
    n_neighbors = _UMAP_NEIGHBORS("umap_neighbors", n_neighbors)
    min_samples = _MIN_SAMPLES("min_samples", min_samples)
    min_cluster_size = _MIN_CLUSTER_SIZE("min_cluster_size", min_cluster_size)
    seed = _SEED("seed", seed)
    x = _feature_rows(features)
    what = f"{x.shape[0]} feature rows"
    _check_umap_hdbscan_size(x.shape[0], n_neighbors, min_samples, min_cluster_size, what, "rows")
    umap = _import_umap()
    scaled = StandardScaler().fit_transform(x)
    reducer = umap.UMAP(
        n_components=n_components,
        n_neighbors=n_neighbors,
        min_dist=UMAP_MIN_DIST,
        metric="euclidean",
        random_state=seed,
        n_jobs=1,
    )
    embedding = np.asarray(reducer.fit_transform(scaled), dtype=np.float32)
    labels = HDBSCAN(min_samples=min_samples, min_cluster_size=min_cluster_size, copy=True).fit_predict(embedding)
    return _first_appearance(labels), embedding


def silhouette(embedding: Any, labels: Any) -> float | None:
    """Mean silhouette of the non-noise rows (labels != -1), or None with fewer than 2 clusters among them.

    Args:
        embedding: (N, d) points (the UMAP embedding).
        labels: (N,) cluster labels, -1 for noise.
    """
    from sklearn.metrics import silhouette_score

    labels = np.asarray(labels)
    keep = labels != NOISE
    if not 2 <= len(np.unique(labels[keep])) < keep.sum():
        return None
    return float(silhouette_score(np.asarray(embedding)[keep], labels[keep]))


# ------------------------------------------------------------------------------------------------ datalist items


def _file_keys(item: Mapping[str, Any]) -> list[str]:
    return [str(item[key]) for key in ("image", "label", "annotation") if isinstance(item.get(key), (str, os.PathLike))]


def _dataset(items: Sequence[Mapping[str, Any]]) -> str:
    """The folder holding every file of `items`, to name in messages."""
    folders = {os.path.dirname(os.path.abspath(path)) for item in items for path in _file_keys(item)}
    try:
        return os.path.commonpath(sorted(folders)) if folders else "the datalist"
    except ValueError:
        return sorted(folders)[0]


def _check_items(items: Sequence[Mapping[str, Any]], needs: Sequence[str] = ("name", "image", "label")) -> list[dict]:
    """Items as new dicts, each with every key of `needs` and a unique "name"."""
    noun = "pair" if "label" in needs else "item"
    checked, seen = [], set()
    for i, item in enumerate(items):
        missing = [key for key in needs if not isinstance(item, Mapping) or key not in item]
        if missing:
            wanted = {3: "a name, an image and a label file", 2: "a name and an image file"}.get(len(needs), "a name")
            raise UserError(
                f"{noun} {i} of the datalist has no {', '.join(repr(k) for k in missing)}: every {noun} needs {wanted}."
            )
        name = str(item["name"])
        if name in seen:
            raise UserError(f"two {noun}s of the datalist are named {name!r}: {noun} names must be unique.")
        seen.add(name)
        checked.append(dict(item))
    return checked


def _read(
    reader: Reader | ItemReader, item: Mapping[str, Any], img_size: int, whole_item: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(image float32 (3, S, S), label float32 (1, S, S) or None) of one item: a pair's {0, 1} mask, or an item
    reader's instance ids."""
    if whole_item:
        image, label = reader(item)
    else:
        image, label = reader(str(item["image"]), str(item["label"]), img_size)
    image = torch.as_tensor(np.asarray(image, dtype=np.float32))
    size = (img_size, img_size)
    if label is not None:
        label = torch.as_tensor(np.asarray(label, dtype=np.float32))
        if whole_item and label.ndim == 2:
            label = label[None]
    if tuple(image.shape) != (3, *size) or (label is not None and tuple(label.shape) != (1, *size)):
        got = "no label" if label is None else f"a label {tuple(label.shape)}"
        fix = f": pass --img_size {image.shape[-1]}" if whole_item and image.ndim == 3 and image.shape[0] == 3 else ""
        expected = f"(S, S) or (1, S, S), S = {img_size}" if whole_item else f"(1, {img_size}, {img_size})"
        raise ValueError(
            f"the reader returned an image {tuple(image.shape)} and {got} for {item['image']}; expected "
            f"(3, {img_size}, {img_size}) and {expected}{fix}."
        )
    return image, label


def _features_name(features: Any, features_of: str) -> str:
    path = getattr(features, "path", None)
    if path is None:
        return f"{type(features).__name__} of {features_of.replace('+', ' + ')}"
    try:
        from meddiff.features import default_inception_weights

        if Path(path) == default_inception_weights():
            return _INCEPTION_NAMES[features_of]
    except (ImportError, FileNotFoundError):
        pass
    return str(path)


def cluster_pairs(
    items: Sequence[Mapping[str, Any]],
    num_clusters: int | None = None,
    seed: int = 0,
    img_size: int = 256,
    reader: Reader | None = None,
    features: Any = None,
    output_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    *,
    item_reader: ItemReader | None = None,
    features_of: str = "image+mask",
    method: str = "kmeans",
    umap_components: int = 3,
    umap_neighbors: int = 15,
    min_samples: int = 10,
    min_cluster_size: int = 50,
) -> list[dict]:
    """Cluster every pair or patch of a datalist on its image (+ mask) features; optionally write the result.

    Args:
        items: the datalist, dicts with "name" (unique) and "image", and "label" (mask) file paths for `reader`;
            an `item_reader` reads the rest of its items itself.
        num_clusters: k of k-means; every cluster gets at least one pair (the polyp method uses 10, 20, 30 or 40).
            None (and only None) for umap_hdbscan, where HDBSCAN finds the number.
        seed: k-means' or UMAP's random_state (the polyp method's is 0, the nuclei method's 42).
        img_size: side S of the images the reader returns (a pair reader resizes to it; the method: 256).
        reader: ``reader(image_file, label_file, img_size)`` -> (image (3, S, S) in [-1, 1], mask (1, S, S) in
            {0, 1}); None for `meddiff.data.polyp.read_pair` unless an `item_reader` is given.
        features: a `meddiff.features.ImageFeatures` or a callable with its interface, the path of a TorchScript
            file, or None for Inception-v3 pool3 (2048-d per image).
        output_dir: where to write ``clusters.json`` and ``clusters.png``; None writes nothing.
        overwrite: replace existing ``clusters.json``/``clusters.png``; without it they refuse the run.
        progress: show a progress bar while extracting features (None: only on a terminal).
        item_reader: ``item_reader(item)`` -> (image (3, S, S) in [-1, 1], instance ids (S, S) or (1, S, S), or
            None), e.g. `meddiff.data.monuseg.read_patch`; not together with `reader`.
        features_of: "image+mask" (4096-d with Inception, the polyp method) or "image" (2048-d, the nuclei method).
        method: "kmeans" or "umap_hdbscan" (module docstring).
        umap_components: UMAP's n_components (umap_hdbscan; the nuclei method: 3).
        umap_neighbors: UMAP's n_neighbors (umap_hdbscan; its default 15).
        min_samples: HDBSCAN's min_samples (umap_hdbscan; the nuclei method: 10).
        min_cluster_size: HDBSCAN's min_cluster_size (umap_hdbscan; the nuclei method: 50).

    Returns:
        new items, in datalist order, each with an int "cluster" added (-1 for HDBSCAN's noise).
    """
    method = _METHOD("method", method)
    features_of = _FEATURES_OF("features_of", features_of)
    seed, img_size, overwrite = _SEED("seed", seed), parse("img_size", img_size), parse("overwrite", overwrite)
    if reader is not None and item_reader is not None:
        raise OptionError("give a reader or an item_reader, not both: an item_reader reads whole datalist items.")
    whole_item = item_reader is not None
    unit, noun = ("patch", "patches") if whole_item else ("pair", "pairs")
    items = _check_items(items, ("name", "image") if whole_item else ("name", "image", "label"))
    what = f"{len(items)} {'patch(es)' if whole_item else 'pair(s)'} in {_dataset(items)}"
    if method == "kmeans":
        k = _NUM_CLUSTERS("num_clusters", num_clusters)
        if len(items) < k:
            raise UserError(
                f"{what} cannot fill {k} clusters: lower --num_clusters to at most {len(items)}, or give a larger "
                "dataset."
            )
    else:
        if num_clusters is not None:
            raise OptionError(
                f"--num_clusters {num_clusters!r} does not apply to --method umap_hdbscan, where HDBSCAN finds the "
                "number of clusters: leave --num_clusters out (or null)."
            )
        hdbscan_options = {
            "n_components": _UMAP_COMPONENTS("umap_components", umap_components),
            "n_neighbors": _UMAP_NEIGHBORS("umap_neighbors", umap_neighbors),
            "min_samples": _MIN_SAMPLES("min_samples", min_samples),
            "min_cluster_size": _MIN_CLUSTER_SIZE("min_cluster_size", min_cluster_size),
        }
        sizes = [hdbscan_options[key] for key in ("n_neighbors", "min_samples", "min_cluster_size")]
        _check_umap_hdbscan_size(len(items), *sizes, what, noun)
        _import_umap()
    stage = None
    if output_dir is not None:
        from meddiff.io import StagedOutput

        out = Path(output_dir)
        inputs = [path for item in items for path in _file_keys(item)]
        stage = StagedOutput(out, [out / CLUSTERS_FILE, out / CLUSTERS_GRID], inputs, overwrite, out / CLUSTERS_FILE)
    if whole_item:
        reader = item_reader
    elif reader is None:
        from meddiff.data.polyp import read_pair as reader
    features = _default_features(features)

    batch = int(getattr(features, "batch_size", 32))
    chunks = []
    with tqdm(total=len(items), desc="cluster features", unit=unit, disable=_disable(progress)) as bar:
        for start in range(0, len(items), batch):
            read = [_read(reader, item, img_size, whole_item) for item in items[start : start + batch]]
            images = torch.stack([image for image, _ in read])
            if features_of == "image":
                chunks.append(_features_of(images, None, features))
            else:
                unlabelled = next((i for i, (_, label) in enumerate(read) if label is None), None)
                if unlabelled is not None:
                    raise UserError(
                        f"--features_of image+mask needs a mask, but the reader returned no label for "
                        f"{items[start + unlabelled]['image']}: give labelled items, or use --features_of image."
                    )
                masks = torch.stack([(label > 0).float() if whole_item else label for _, label in read])
                chunks.append(pair_features(images, masks, features, batch_size=batch))
            bar.update(len(read))
    x = np.concatenate(chunks, axis=0)
    if method == "kmeans":
        labels = kmeans(x, k, seed)
        found = int(labels.max()) + 1
        if found < k:
            raise UserError(
                f"the {len(items)} pairs in {_dataset(items)} hold only {found} distinct feature vectors (duplicate "
                f"pairs), too few for {k} clusters: lower --num_clusters to at most {found}, or remove the "
                "duplicates."
            )
        extra: dict[str, Any] = {"n_init": KMEANS_N_INIT}
    else:
        labels, embedding = umap_hdbscan(x, seed=seed, **hdbscan_options)
        if (labels == NOISE).all():
            raise UserError(
                f"HDBSCAN found no cluster among the {what} (all noise): lower --min_cluster_size "
                f"({hdbscan_options['min_cluster_size']}) or --min_samples ({hdbscan_options['min_samples']}), or "
                f"give more {noun}."
            )
        k = int(labels.max()) + 1
        extra = {
            "umap": {
                "n_components": hdbscan_options["n_components"],
                "n_neighbors": hdbscan_options["n_neighbors"],
                "min_dist": UMAP_MIN_DIST,
                "metric": "euclidean",
                "random_state": seed,
            },
            "hdbscan": {key: hdbscan_options[key] for key in ("min_samples", "min_cluster_size")},
            "silhouette": silhouette(embedding, labels),
            "num_noise": int((labels == NOISE).sum()),
        }
    clustered = [{**item, "cluster": int(c)} for item, c in zip(items, labels)]
    if stage is not None:
        record = {
            "method": method,
            "num_clusters": k,
            "seed": seed,
            "img_size": img_size,
            "features": _features_name(features, features_of),
            "features_of": features_of,
            **extra,
            "sizes": {str(c): int(n) for c, n in enumerate(np.bincount(labels[labels != NOISE], minlength=k))},
            "assignments": {item["name"]: item["cluster"] for item in clustered},
        }
        with stage:
            read_item = functools.partial(_read, reader, img_size=img_size, whole_item=whole_item)
            _save_cluster_grid(clustered, k, read_item, img_size, stage.path(out / CLUSTERS_GRID), noun, whole_item)
            from meddiff.io import save_json

            save_json(record, stage.path(out / CLUSTERS_FILE))
    return clustered


# ---------------------------------------------------------------------------------------------------------- grid


def _outline(label: torch.Tensor, size: int, instances: bool) -> np.ndarray:
    """(size, size) bool outline of a (1, S, S) label: a mask's 2 px edge, or every instance's 1 px boundary."""
    from PIL import Image
    from scipy.ndimage import binary_erosion

    if not instances:
        binary = Image.fromarray((label[0].numpy() > 0.5).astype(np.uint8) * 255).resize((size, size), Image.NEAREST)
        inside = np.asarray(binary) > 0
        return inside & ~binary_erosion(inside, iterations=2)
    ids = Image.fromarray(np.rint(label[0].numpy()).astype(np.int32)).resize((size, size), Image.NEAREST)
    ids = np.asarray(ids)
    padded = np.pad(ids, 1, mode="edge")
    centre = padded[1:-1, 1:-1]
    differs = (
        (centre != padded[:-2, 1:-1])
        | (centre != padded[2:, 1:-1])
        | (centre != padded[1:-1, :-2])
        | (centre != padded[1:-1, 2:])
    )
    return (ids > 0) & differs


def _thumbnail(image: torch.Tensor, label: torch.Tensor | None, size: int, instances: bool = False) -> np.ndarray:
    """An (size, size, 3) uint8 tile: the image with its label's outline (the image alone without a label)."""
    from PIL import Image

    from meddiff.visualize import to_rgb_tile

    rgb = Image.fromarray(to_rgb_tile(image.numpy())).resize((size, size), Image.Resampling.BILINEAR)
    tile = np.array(rgb)
    if label is not None:
        tile[_outline(label, size, instances)] = _OUTLINE
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


def _save_cluster_grid(
    clustered: list[dict],
    k: int,
    read: Callable[[Mapping], tuple],
    img_size: int,
    path: Path,
    noun: str = "pairs",
    instances: bool = False,
) -> None:
    from meddiff.visualize import save_grid

    size = min(img_size, _GRID_TILE)
    groups = [(c, f"cluster {c}") for c in range(k)]
    if any(item["cluster"] == NOISE for item in clustered):
        groups.append((NOISE, "noise"))
    rows = []
    for c, title in groups:
        members = [item for item in clustered if item["cluster"] == c]
        row = [_caption([title, f"{len(members)} {noun}"], size)]
        row += [_thumbnail(*read(item), size, instances) for item in members[:GRID_MEMBERS]]
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
        its contents, with "sizes" keyed by int cluster, "method" ("kmeans" for files without it), "num_noise" (0
        for k-means) and "file" (the path read, for messages) added.
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
    method = record.get("method", "kmeans")
    if method not in METHODS:
        raise UserError(f"clusters file {path}: method must be one of {', '.join(METHODS)}, got {method!r}: {rerun}.")
    kinds = {"num_clusters": int, "seed": int, "img_size": int, "features": str, "sizes": dict, "assignments": dict}
    if method == "umap_hdbscan":
        kinds["num_noise"] = int
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
    low = NOISE if method == "umap_hdbscan" else 0
    bad = next((n for n, c in record["assignments"].items() if not _is_int(c) or not low <= c < k), None)
    if bad is not None:
        got = record["assignments"][bad]
        noise = " or -1 (noise)" if low == NOISE else ""
        raise UserError(
            f"clusters file {path}: {bad!r} is assigned {got!r}, not a cluster 0 to {k - 1}{noise}: {rerun}."
        )
    assigned = np.asarray(list(record["assignments"].values()), dtype=np.int64)
    counts = np.bincount(assigned[assigned != NOISE], minlength=k)
    expected = {str(c): int(n) for c, n in enumerate(counts)}
    if record["sizes"] != expected:
        raise UserError(f"clusters file {path}: sizes do not match the assignments: {rerun}.")
    num_noise = int((assigned == NOISE).sum())
    if record.get("num_noise", 0) != num_noise:
        raise UserError(f"clusters file {path}: num_noise does not match the assignments: {rerun}.")
    sizes = {int(c): n for c, n in expected.items()}
    return {**record, "method": method, "num_noise": num_noise, "sizes": sizes, "file": str(path)}


def cluster_members(items: Sequence[Mapping[str, Any]], clusters: Mapping[str, Any], cluster_index: int) -> list[dict]:
    """The items of a datalist in one cluster, in datalist order, each with its "cluster" added.

    Args:
        items: the datalist, dicts with a "name" each (pairs or patches); every name must be in the clusters file.
        clusters: what `read_clusters` returned.
        cluster_index: the cluster, 0 to num_clusters - 1 (HDBSCAN's noise, -1, is no cluster and trains no model).
    """
    source = clusters.get("file", "the clusters file")
    k = int(clusters["num_clusters"])
    index = _CLUSTER_INDEX("cluster_index", cluster_index)
    if index >= k:
        raise OptionError(f"--cluster_index {index} is out of range: {source} has {k} clusters, so pass 0 to {k - 1}.")
    assignments = clusters["assignments"]
    items = _check_items(items, ("name",))
    missing = [item["name"] for item in items if item["name"] not in assignments]
    if missing:
        raise UserError(
            f"{len(missing)} pair(s) of the datalist (first {missing[0]!r}) are not in {source}, which was made "
            "from another datalist: re-run clustering on this one."
        )
    return [{**item, "cluster": index} for item in items if assignments[item["name"]] == index]
