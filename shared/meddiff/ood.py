"""Out-of-distribution scores of synthetic images (PatchCore) and the nuclei method's score-weighted subsampling.

The nuclei method (methods.md §4.5) scores every synthetic H&E patch with PatchCore (Roth et al. 2022, "Towards
Total Recall in Industrial Anomaly Detection") fitted on the real training patches only, then draws the synthetic
training set with probabilities that favour low scores. This module does both, written from the paper's
description.

PatchCore as done here:
- backbone: the shared frozen network of `meddiff.features` (Inception-v3 by default, or a user's TorchScript
  chain); maps of two mid-level layers, by default ``mixed_2`` (N, 288, 35, 35) and ``mixed_7`` (N, 768, 17, 17),
  the Inception analogues of WideResNet-50's layer2 and layer3 (see `meddiff.features`);
- images: (N, C, H, W), C = 1 or 3, in [-1, 1] for float dtypes (0..255 for uint8), through the shared
  preprocessing: mapped to [0, 1], resized bilinearly to 299x299 and mapped to the Inception input range;
- locally aware patch features: each layer's map is averaged over the p x p neighbourhood of each position
  (``avg_pool2d``, kernel p = `patch_size` (odd), stride `patch_stride`, zero padding p // 2 not counted in the
  mean); the coarser maps are resized bilinearly (``align_corners=False``) to the finest map's grid (h, w) and all
  are concatenated along channels (288 + 768 = 1056 by default);
- embedding: a fixed Gaussian random projection (entries N(0, 1 / d), seeded by `seed`) to d = `projection_dim`
  dimensions, when the features have more than d channels; None keeps them as they are. Each image gives h * w
  patch features, float32;
- memory bank: the greedy k-center coreset (`greedy_coreset`) of `coreset_fraction` of all real patch features,
  selected on a second random projection to `coreset_projection_dim` dimensions (128, as in the paper) to make the
  distance updates cheap; the bank keeps the full (projected-to-d) features of the selected patches;
- scores: a patch's score is the mean Euclidean distance to its `num_neighbors` nearest memory-bank features
  (exact search, ``sklearn.neighbors.NearestNeighbors(algorithm="brute")``); an image's score is the largest of its
  patch scores, float64 (N,). 0 means every patch of the image is in the memory bank.

Deviations from the seed (methods.md §4.5), all forced or chosen for speed:
- backbone: the seed's score file used a SAM image encoder (PatchCore's README default is WideResNet-50); neither
  weight file can be downloaded here, so the Inception-v3 of FID is used, at its own 299x299 input resized from any
  patch size (the seed resized to 224 and used no other input size);
- the seed's file name ``PS-9_ST-4`` means patch size 9, stride 4 (on SAM's grid); the defaults here are
  PatchCore's own (3, stride 1) on Inception's 35x35 grid; both are options;
- the seed's reduction of each layer and of the concatenation to 1024 channels is an adaptive average pooling
  along channels in PatchCore's implementation; here it is one random projection (the brief's choice; the channel
  count is already close to 1024, so this mostly fixes the dimension);
- PatchCore's optional re-weighting of the image score by the density around the nearest memory-bank feature
  (paper eq. 7) is not applied: the seed used 1 nearest neighbour and the plain maximum;
- no anomaly-map smoothing: `PatchCoreScorer.patch_scores` returns the raw (h, w) grid of patch scores.

Cost: fitting holds all real patch features (N * h * w, d) float32 in memory (35 * 35 = 1225 per image at stride
1: 1500 images are ~7.5 GB at d = 1024) and the coreset takes count steps of O(N * h * w * 128) each; raise
`patch_stride` (the seed used 4: 9 * 9 = 81 patches per image) or run on a GPU for large sets. Scoring is an exact
k-NN search of (h * w) queries per image against the memory bank on the CPU.

Subsampling (ST:train.py ``get_prob_from_json``/``subsample``, methods.md §4.5)::

    s = clip(score, 0, quantile(score, 0.5));  s' = MinMax(s);  p = (1 - s') / sum(1 - s')
    indices = choice(N, size=n, replace=False, p=p)

so every image scoring at or above the median gets p = 0, and the lowest-scoring image the largest p. Edge cases:
- when every clipped score is equal (all scores equal; or the lowest score is the median itself), MinMax is 0 / 0:
  p is then uniform over the images whose score is not above the median (all images when all scores are equal);
- asking for more images than have p > 0 is an `OptionError` (numpy's ``choice`` would fail too): the method never
  draws a rejected image, so generate more synthetic images or ask for fewer;
- the draw is ``numpy.random.default_rng(seed).choice``; indices come back in draw order, int64;
- the seed also keeps only candidates whose appearance source is a real training image (``filt_from_train``):
  that choice of candidates is the caller's, before scoring.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from meddiff.errors import OptionError, UserError
from meddiff.features import DEFAULT_FEATURE_LAYERS, ImageFeatures
from meddiff.options import Rule, parse

__all__ = [
    "CORESET_PROJECTION_DIM",
    "PatchCoreScorer",
    "greedy_coreset",
    "score_images",
    "subsample",
    "subsample_probabilities",
]

#: dimension of the random projection the coreset selection measures distances in (PatchCore: 128)
CORESET_PROJECTION_DIM = 128
_FRACTION = Rule("float", low=0.0, high=1.0, low_open=True, hint="the share of real patch features kept, e.g. 0.1")
_SIZE = Rule("int", low=1, optional=True, hint="leave it out to use the fraction")
_DIM = Rule("int", low=1, optional=True, hint="leave it out to keep every channel")
_PATCH = Rule("int", low=1, hint="an odd neighbourhood size such as 3")
_POSITIVE = Rule("int", low=1)
_COUNT = Rule("int", low=0)
_ROWS_PER_CHUNK = 65536


# ------------------------------------------------------------------------------------------------------ coreset


def _project(x: torch.Tensor, dim: int | None, seed: int, device: torch.device) -> torch.Tensor:
    """x (M, D) times a seeded Gaussian (D, dim) / sqrt(dim), float32 on `device`; x itself when dim is None or >= D."""
    if dim is None or dim >= x.shape[1]:
        return x.to(device=device, dtype=torch.float32)
    matrix = _gaussian(x.shape[1], dim, seed).to(device)
    return torch.cat(
        [x[i : i + _ROWS_PER_CHUNK].to(device, torch.float32) @ matrix for i in range(0, x.shape[0], _ROWS_PER_CHUNK)]
    )


def _gaussian(rows: int, cols: int, seed: int) -> torch.Tensor:
    """A (rows, cols) float32 matrix of N(0, 1 / cols) entries from a CPU generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=generator) / math.sqrt(cols)


def greedy_coreset(
    features: Any,
    fraction: float = 0.1,
    *,
    size: int | None = None,
    seed: int = 0,
    projection_dim: int | None = CORESET_PROJECTION_DIM,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Indices of a greedy k-center coreset of features (N, D), in the order they were selected.

    Approximate greedy k-center selection as PatchCore's (Roth et al. 2022, Algorithm 1): a random first point
    (seeded), then each step adds the point farthest from the points selected so far, its distance being the one to
    its nearest selected point. Distances are measured after a seeded Gaussian random projection to
    `projection_dim` dimensions (Johnson-Lindenstrauss; skipped when None or when D is not larger), which makes the
    selection approximate. Once every remaining point coincides with a selected one, the rest follow in index order.

    Args:
        features: (N, D) numpy array or tensor.
        fraction: the share of the N points kept, in (0, 1]: floor(fraction * N) points, at least 1.
        size: number of points kept, 1..N; overrides `fraction`.
        seed: seeds the first point and the projection.
        projection_dim: dimension of the projection distances are measured in; None for the features themselves.
        device: where the distances are computed; None for the device `features` is on (the CPU for numpy).

    Returns:
        int64 numpy array of `size` distinct indices (all N indices for fraction 1).
    """
    x = features.detach() if isinstance(features, torch.Tensor) else torch.as_tensor(np.asarray(features))
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"Expected features of shape (N, D) with N >= 1, got {tuple(x.shape)}.")
    n = x.shape[0]
    count = _SIZE("size", size)
    if count is None:
        count = max(1, int(n * _FRACTION("coreset_fraction", fraction)))
    elif count > n:
        raise OptionError(f"--size must be at most the {n} points to choose from, got {size!r}.")
    seed = parse("seed", seed)
    device = torch.device(device) if device is not None else x.device
    points = _project(x, _DIM("coreset_projection_dim", projection_dim), seed, device)
    squared_norms = (points * points).sum(1)

    def squared_distances(i: torch.Tensor) -> torch.Tensor:
        # i is a (1,) index tensor: index_select/index_fill_ keep the loop free of host-device syncs on CUDA
        centre = points.index_select(0, i)
        return (squared_norms - 2.0 * (points @ centre[0]) + squared_norms.index_select(0, i)).clamp_min_(0.0)

    generator = torch.Generator().manual_seed(seed)
    first = torch.randint(n, (1,), generator=generator).to(device)
    selected = torch.empty(count, dtype=torch.long, device=device)
    selected[:1] = first
    nearest = squared_distances(first).index_fill_(0, first, -math.inf)
    for k in range(1, count):
        farthest = torch.argmax(nearest).view(1)
        selected[k : k + 1] = farthest
        torch.minimum(nearest, squared_distances(farthest), out=nearest)
        nearest.index_fill_(0, farthest, -math.inf)
    return selected.cpu().numpy().astype(np.int64)


# ------------------------------------------------------------------------------------------------------ scorer


def _as_images(images: Any, name: str) -> torch.Tensor:
    x = images.detach() if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"Expected {name} of shape (N, 1 or 3, H, W), got {tuple(x.shape)}.")
    return x


class PatchCoreScorer:
    """PatchCore out-of-distribution scores of images against a memory bank of real images' patch features.

    ``fit(real_images)`` builds the memory bank (from real training images only, as the method does);
    ``score(images)`` returns one score per image, higher for images less like the real ones. See the module
    docstring for the features, the coreset, the scores and the deviations from PatchCore and the seed.

    Args:
        features: a `meddiff.features.ImageFeatures`, the path of a TorchScript chain, or None for the shared
            Inception-v3.
        layers: names of the network's chained layers to read (two, as PatchCore; any number works); the
            finest of their grids is the patch grid. Default ("mixed_2", "mixed_7").
        patch_size: odd side p of the neighbourhood each position's features are averaged over.
        patch_stride: stride of the neighbourhood grid; 1 keeps every position of the finest layer.
        projection_dim: dimension d of the random projection of the concatenated features; None keeps them.
        coreset_fraction: share of the real patch features kept in the memory bank, in (0, 1].
        coreset_projection_dim: dimension the coreset selection measures distances in; None for d.
        num_neighbors: k nearest memory-bank features a patch's score averages over.
        seed: seeds both random projections and the coreset's first point.
        batch_size: images embedded at once; the scores do not depend on it.
        device: where the network, the aggregation and the coreset run when `features` is not an ImageFeatures
            (whose own device is used otherwise); None for CUDA when available.
        precision: the network's precision ("fp32", "bf16", "fp16", "auto") when `features` is not an ImageFeatures.
    """

    def __init__(
        self,
        features: ImageFeatures | str | os.PathLike | None = None,
        layers: Any = DEFAULT_FEATURE_LAYERS,
        patch_size: int = 3,
        patch_stride: int = 1,
        projection_dim: int | None = 1024,
        coreset_fraction: float = 0.1,
        coreset_projection_dim: int | None = CORESET_PROJECTION_DIM,
        num_neighbors: int = 1,
        seed: int = 0,
        batch_size: int = 16,
        device: str | torch.device | None = None,
        precision: str = "fp32",
    ) -> None:
        self.patch_size = _PATCH("patch_size", patch_size)
        if self.patch_size % 2 == 0:
            raise OptionError(
                f"--patch_size must be odd (the neighbourhood is centred on its patch), got {patch_size!r}."
            )
        self.patch_stride = _POSITIVE("patch_stride", patch_stride)
        self.projection_dim = _DIM("projection_dim", projection_dim)
        self.coreset_fraction = _FRACTION("coreset_fraction", coreset_fraction)
        self.coreset_projection_dim = _DIM("coreset_projection_dim", coreset_projection_dim)
        self.num_neighbors = _POSITIVE("num_neighbors", num_neighbors)
        self.seed = parse("seed", seed)
        self.batch_size = parse("batch_size", batch_size)
        if not isinstance(features, ImageFeatures):
            features = ImageFeatures(features, batch_size=self.batch_size, precision=precision, device=device)
        self.features = features
        self.layers = features.check_layers(layers)
        self.memory_bank: np.ndarray | None = None
        self.grid: tuple[int, int] | None = None
        self.num_real_patches = 0
        self._projection: torch.Tensor | None = None
        self._index: Any = None

    @property
    def embedding_dim(self) -> int | None:
        """d, the length of a patch feature in the memory bank (None before `fit`)."""
        return None if self.memory_bank is None else int(self.memory_bank.shape[1])

    def _aggregate(self, images: torch.Tensor) -> torch.Tensor:
        """Concatenated neighbourhood-averaged maps (n, C, h, w), float32 on the network's device."""
        device = self.features.device
        p, pad = self.patch_size, self.patch_size // 2
        maps = [
            F.avg_pool2d(m.to(device), p, stride=self.patch_stride, padding=pad, count_include_pad=False)
            for m in self.features.feature_maps(images, self.layers)
        ]
        grid = max((m.shape[-2:] for m in maps), key=lambda hw: hw[0] * hw[1])
        maps = [
            m if m.shape[-2:] == grid else F.interpolate(m, size=grid, mode="bilinear", align_corners=False)
            for m in maps
        ]
        return torch.cat(maps, 1)

    def _batches(self, images: torch.Tensor, fitting: bool = False):
        """Patch features (n, h, w, d) float32 on the CPU per batch of images, projected as fixed by `fit`."""
        for start in range(0, images.shape[0], self.batch_size):
            x = self._aggregate(images[start : start + self.batch_size])
            if fitting and start == 0:
                self.grid = (int(x.shape[-2]), int(x.shape[-1]))
                projected = self.projection_dim is not None and self.projection_dim < x.shape[1]
                self._projection = _gaussian(x.shape[1], self.projection_dim, self.seed) if projected else None
            x = x.permute(0, 2, 3, 1)
            if self._projection is not None:
                x = x @ self._projection.to(x.device)
            yield x.cpu()

    def fit(self, real_images: Any) -> PatchCoreScorer:
        """Build the memory bank from real images (N, C, H, W) (the real training images only); return self."""
        from sklearn.neighbors import NearestNeighbors

        x = _as_images(real_images, "real_images")
        if x.shape[0] == 0:
            raise ValueError("fit needs at least one real image; got none.")
        self.memory_bank = self._index = None
        patches = torch.cat([b.reshape(-1, b.shape[-1]) for b in self._batches(x, fitting=True)])
        self.num_real_patches = patches.shape[0]
        count = max(1, int(patches.shape[0] * self.coreset_fraction))
        if self.num_neighbors > count:
            raise OptionError(
                f"--num_neighbors must be at most the {count} features of the memory bank ({x.shape[0]} real images "
                f"x {self.grid[0] * self.grid[1]} patches x coreset_fraction {self.coreset_fraction:g}), "
                f"got {self.num_neighbors}."
            )
        keep = greedy_coreset(
            patches,
            size=count,
            seed=self.seed,
            projection_dim=self.coreset_projection_dim,
            device=self.features.device,
        )
        self.memory_bank = patches[torch.from_numpy(keep)].numpy()
        self._index = NearestNeighbors(n_neighbors=self.num_neighbors, algorithm="brute").fit(self.memory_bank)
        return self

    def patch_scores(self, images: Any) -> np.ndarray:
        """Scores (N, h, w) float64 of each patch of images (N, C, H, W): mean distance to its k nearest in the bank."""
        if self._index is None:
            raise RuntimeError("PatchCoreScorer has no memory bank yet: call fit(real_images) first.")
        x = _as_images(images, "images")
        if x.shape[0] == 0:
            return np.zeros((0, *self.grid), np.float64)
        out = []
        for batch in self._batches(x):
            distances, _ = self._index.kneighbors(batch.reshape(-1, batch.shape[-1]).numpy())
            out.append(distances.mean(1).reshape(batch.shape[:3]))
        return np.concatenate(out).astype(np.float64)

    def score(self, images: Any) -> np.ndarray:
        """Image scores (N,) float64 of images (N, C, H, W): the largest patch score of each image."""
        patches = self.patch_scores(images)
        return patches.reshape(patches.shape[0], self.grid[0] * self.grid[1]).max(1, initial=0.0)

    __call__ = score


def score_images(real_images: Any, images: Any, **kwargs: Any) -> dict[str, Any]:
    """Fit a `PatchCoreScorer` (built with ``**kwargs``) on real images, score images, and time both.

    Returns:
        {"scores": float64 (N,), "fit_seconds", "score_seconds", "num_real_patches", "memory_bank_size",
        "embedding_dim", "grid": [h, w]}.
    """
    scorer = PatchCoreScorer(**kwargs)
    start = time.perf_counter()
    scorer.fit(real_images)
    fitted = time.perf_counter()
    scores = scorer.score(images)
    done = time.perf_counter()
    return {
        "scores": scores,
        "fit_seconds": fitted - start,
        "score_seconds": done - fitted,
        "num_real_patches": scorer.num_real_patches,
        "memory_bank_size": int(scorer.memory_bank.shape[0]),
        "embedding_dim": scorer.embedding_dim,
        "grid": list(scorer.grid),
    }


# ------------------------------------------------------------------------------------------------- subsampling


def _scores(scores: Any) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or s.size == 0 or not np.isfinite(s).all():
        raise UserError(f"scores must be a non-empty 1-D list of finite numbers, got shape {s.shape} {s[:5]!r}...")
    return s


def subsample_probabilities(scores: Any) -> np.ndarray:
    """Drawing probabilities (N,) float64 of the method: clip at the median, MinMax, 1 - s', normalised.

    Images scoring at or above the median get 0; when all clipped scores are equal, p is uniform over the images
    not above the median (module docstring).
    """
    s = _scores(scores)
    median = np.quantile(s, 0.5)
    clipped = np.clip(s, 0.0, median)
    low, high = clipped.min(), clipped.max()
    if high > low:
        weights = 1.0 - (clipped - low) / (high - low)
    else:
        weights = (s <= median).astype(np.float64)
    return weights / weights.sum()


def subsample(scores: Any, n: int, seed: int = 0) -> np.ndarray:
    """Indices (n,) int64 of n images drawn without replacement with `subsample_probabilities`, in draw order."""
    p = subsample_probabilities(scores)
    n = _COUNT("n", n)
    kept = int((p > 0).sum())
    if n > kept:
        raise OptionError(
            f"--n asks for {n} synthetic images but only {kept} of the {p.size} have p > 0 (scores below the "
            f"median): generate more synthetic images or draw at most {kept}."
        )
    rng = np.random.default_rng(parse("seed", seed))
    return rng.choice(p.size, size=n, replace=False, p=p).astype(np.int64)
