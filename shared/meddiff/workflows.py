"""Runs of one bundle config for every cluster: one trained model, one generation per cluster.

Conventions:
- the clusters are those of ``<bundle_root>/clusters/clusters.json`` (the bundle's ``cluster.json`` run), unless
  ``num_clusters`` is given;
- cluster i runs the config with ``cluster_index=i``; its checkpoint lives in its own folder
  (``models/cluster_<i>/``), so a run interrupted at cluster j resumes there: clusters whose training reached
  ``num_epochs`` end at once, the interrupted one resumes from its checkpoint;
- with ``include_full`` the full model (``cluster_index`` None, ``models/full/``) runs after the clusters.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from meddiff.clustering import CLUSTERS_FILE, read_clusters

__all__ = ["cluster_indices", "run_each_cluster"]


def cluster_indices(
    bundle_root: str | Path,
    num_clusters: int | None = None,
    include_full: bool = False,
    cluster_file: str | Path | None = None,
) -> list:
    """The cluster indices to run (from `cluster_file`, by default ``<bundle_root>/clusters/clusters.json``, unless
    `num_clusters` is given), then None for the full model with `include_full`."""
    if num_clusters is None:
        cluster_file = cluster_file or Path(bundle_root) / "clusters" / CLUSTERS_FILE
        num_clusters = int(read_clusters(cluster_file)["num_clusters"])
    return [*range(int(num_clusters)), *([None] if include_full else [])]


def run_each_cluster(
    bundle_dir: str | Path,
    run_id: str,
    configs: Sequence[str],
    bundle_root: str | Path,
    num_clusters: int | None = None,
    include_full: bool = False,
    logging_file: str | None = None,
    **settings: Any,
) -> list:
    """Run `run_id` of `configs` once per cluster (module docstring); return the indices run.

    Args:
        bundle_dir: the bundle's folder (holding ``configs/``).
        run_id: the config's run id ("training", "run", ...).
        configs: the config files merged in order (e.g. ``["train.json"]``).
        bundle_root: the bundle root of the runs (where ``clusters/`` and ``models/`` are).
        num_clusters: clusters to run (None: from the clusters file).
        include_full: also run the full model.
        logging_file: the logging config of the runs.
        settings: further bundle settings, given to every run (a ``cluster_file`` also says which clusters run).
    """
    from meddiff.demo import run_bundle

    indices = cluster_indices(bundle_root, num_clusters, include_full, settings.get("cluster_file"))
    for index in indices:
        run_bundle(
            bundle_dir,
            run_id,
            list(configs),
            logging_file=logging_file,
            bundle_root=str(bundle_root),
            cluster_index=index,
            **settings,
        )
    return indices
