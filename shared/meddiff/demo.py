"""The demo: train each bundle briefly on built-in (or the user's) data, generate, evaluate, write a report.

Results go to ``OUTPUT_DIR/<bundle>/`` (``grid.png``, ``metrics.json``, ``models/``, the generated data and, with
the built-in data, ``demo_data/``); they appear only when the whole demo finished (see `run_demo`).
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from meddiff.data.errors import DataError
from meddiff.errors import OptionError, UserError
from meddiff.io import OutputExistsError, check_writable, make_staging_dir
from meddiff.options import RULES, parse, parse_all

__all__ = [
    "DEMO_BUNDLES",
    "DEMO_OWNED_SETTINGS",
    "bundles_dir",
    "check_not_demo_owned",
    "demo_plan",
    "run_bundle",
    "run_demo",
]

DEMO_BUNDLES = (
    "breast_mri_seg_guided_generation",
    "histology_augmentation",
    "lidc_ambiguous_segmentation",
    "monuseg_nuclei_generation",
    "polyp_cluster_generation",
)


def bundles_dir() -> Path:
    """The repository's `bundles/` folder (beside the `shared/` package folder), or `./bundles`."""
    candidates = [Path(__file__).resolve().parents[2] / "bundles", Path.cwd() / "bundles"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("bundles/ not found: run from the meddiff checkout or install it with `pip install -e .`.")


QUIET_LOGGING = Path(__file__).with_name("quiet_logging.conf")


def run_bundle(
    bundle_dir: str | Path, run_id: str, configs: list[str], logging_file: str | None = None, **overrides: Any
) -> None:
    """Run `run_id` of a bundle with the named config files merged in order, as `python -m monai.bundle run` does."""
    from monai.bundle import run

    bundle_dir = Path(bundle_dir)
    run(
        run_id=run_id,
        config_file=[str(bundle_dir / "configs" / name) for name in configs],
        meta_file=str(bundle_dir / "configs" / "metadata.json"),
        logging_file=logging_file or str(bundle_dir / "configs" / "logging.conf"),
        **overrides,
    )


# settings the demo itself sets: a user setting them would break the demo's wiring
DEMO_OWNED_SETTINGS = ("bundle_root", "dataset_dir", "logging_file", "meta_file", "config_file")


def check_not_demo_owned(settings: dict) -> None:
    """Refuse settings the demo sets itself (`DEMO_OWNED_SETTINGS`)."""
    owned = [name for name in DEMO_OWNED_SETTINGS if name in settings]
    if owned:
        raise OptionError(f"--{owned[0]} is set by the demo itself; run the bundle directly to choose it.")


def _forbidden_places() -> list[tuple[Path, str, bool]]:
    """(folder, what it is, whether an output inside it is allowed) the demo must never write over."""
    package = Path(__file__).resolve().parent
    places = [(package, "the meddiff package folder", False)]
    try:
        bundles = bundles_dir().resolve()
    except FileNotFoundError:
        return places
    return places + [(bundles.parent, "the repository", True), (bundles, "the bundles folder", False)]


def _check_output_place(out: Path, dataset_dir: str | None) -> None:
    """Refuse an output folder that is, holds or lies inside the dataset, the bundles, the package or the repository.

    Inside the repository is allowed (the README runs the demo from there with ``--output_dir demo_output``).
    """
    real = out.resolve()
    places = _forbidden_places()
    if dataset_dir is not None:
        places.insert(0, (Path(dataset_dir).resolve(), f"the dataset {dataset_dir}", False))
    for place, what, inside_ok in places:
        if real == place or place.is_relative_to(real) or (real.is_relative_to(place) and not inside_ok):
            raise UserError(
                f"the demo's output folder {out} is, holds or lies inside {what} ({place}), which --overwrite "
                "would replace: choose another --output_dir."
            )


def _replace(out: Path, staging: Path) -> None:
    """Put the finished `staging` folder at `out`: the old results are renamed aside first and removed last."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    try:
        os.replace(staging, out)
    except BaseException:
        if old is not None:
            os.replace(old / out.name, out)
            old.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old)


def demo_plan(bundle_dir: str | Path) -> list[dict]:
    """The demo's runs in order: ``demo_plan`` of ``configs/demo.json`` when it has one, else every training
    (``train.json`` then each ``train_*.json``, one model each), inference and evaluation.

    A step is ``{"run_id": ..., "configs": [...], "each_cluster": false, "settings": {...}}``; ``demo.json`` is merged
    last into every step, a step's ``settings`` are given to its runs only (e.g. the one cluster a fine-tuning
    trains; a setting the user passes to the demo replaces them), and an ``each_cluster`` step runs once per cluster
    (`meddiff.workflows.run_each_cluster`).
    """
    bundle_dir = Path(bundle_dir)
    plan = json.loads((bundle_dir / "configs" / "demo.json").read_text()).get("demo_plan")
    if plan:
        return [dict(step) for step in plan]
    extra_trainings = sorted(p.name for p in (bundle_dir / "configs").glob("train_*.json"))
    return [
        *({"run_id": "training", "configs": [name]} for name in ["train.json", *extra_trainings]),
        {"run_id": "run", "configs": ["inference.json"]},
        {"run_id": "evaluate", "configs": ["inference.json", "evaluate.json"]},
    ]


def run_demo(
    bundle: str,
    output_dir: str | Path,
    dataset_dir: str | None = None,
    overwrite: bool = False,
    **overrides: Any,
) -> dict:
    """Train, generate and evaluate one bundle with its `configs/demo.json`; return the metrics it wrote.

    Everything is checked before any work: the bundle has a demo, `dataset_dir` exists, ``OUTPUT_DIR/<bundle>`` is
    not, does not hold and is not inside the dataset, the bundles folder or the package (nor is it or does it hold
    the repository), it can be written, and it is empty or absent unless `overwrite`. The whole demo (the built-in
    data included) then runs into ``OUTPUT_DIR/.<bundle>.staging-<host>-<pid>-<random>/``, which is the configs'
    ``bundle_root``; only when training, inference and evaluation have all finished does it replace
    ``OUTPUT_DIR/<bundle>`` (the old results renamed aside, then removed). A failed or interrupted demo removes its
    staging folder and leaves the old results untouched; a staging folder left by a dead process is removed by the
    next demo of that bundle. `overrides` are further bundle settings, passed to every config.
    """
    overwrite = parse("overwrite", overwrite)
    bundle_dir = bundles_dir() / bundle
    demo_file = bundle_dir / "configs" / "demo.json"
    if not demo_file.is_file():
        raise OptionError(f"bundle {bundle!r} has no demo ({demo_file} missing); choose one of {list(DEMO_BUNDLES)}.")
    check_not_demo_owned(overrides)
    parse_all(**{name: value for name, value in overrides.items() if name in RULES})  # before any training
    if dataset_dir is not None and not Path(dataset_dir).is_dir():
        raise DataError(f"dataset_dir {dataset_dir} does not exist or is not a folder: pass the dataset's folder.")
    out = Path(output_dir) / bundle
    _check_output_place(out, dataset_dir)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} is a file: choose another --output_dir or move it away.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"{out} already holds results: choose another --output_dir or pass --overwrite true to replace them "
            "once the new run has finished."
        )
    check_writable(out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging_dir(out.parent, bundle)
    try:
        if dataset_dir is None:
            demo = json.loads(demo_file.read_text())
            module, name = demo["demo_data"].rsplit(".", 1)
            maker = getattr(importlib.import_module(module), name)
            dataset_dir = str(maker(str(staging / "demo_data"), **demo.get("demo_data_args", {})))
        settings = {
            "bundle_root": str(staging),
            "dataset_dir": str(dataset_dir),
            "logging_file": str(QUIET_LOGGING),
            **overrides,
        }
        for step in demo_plan(bundle_dir):
            configs = [*step["configs"], "demo.json"]
            step_settings = {**step.get("settings", {}), **settings}  # the user's settings win
            if step.get("each_cluster"):
                from meddiff.workflows import run_each_cluster

                run_each_cluster(bundle_dir, step["run_id"], configs, **step_settings)
            else:
                run_bundle(bundle_dir, step["run_id"], configs, **step_settings)
        metrics = json.loads((staging / "metrics.json").read_text())
        _replace(out, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return metrics
