"""The demo: train each bundle briefly on built-in (or the user's) data, generate, evaluate, write a report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from monai.utils import optional_import

from meddiff.data.errors import DataError

__all__ = ["DEMO_BUNDLES", "bundles_dir", "run_bundle", "run_demo"]

DEMO_BUNDLES = ("breast_mri_seg_guided_generation", "lidc_ambiguous_segmentation")


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


def run_demo(
    bundle: str,
    output_dir: str | Path,
    dataset_dir: str | None = None,
    overwrite: bool = False,
    **overrides: Any,
) -> dict:
    """Train, generate and evaluate one bundle with its `configs/demo.json`; return the metrics it wrote."""
    bundle_dir = bundles_dir() / bundle
    demo_file = bundle_dir / "configs" / "demo.json"
    if not demo_file.is_file():
        raise ValueError(f"bundle {bundle!r} has no demo ({demo_file} missing); choose one of {list(DEMO_BUNDLES)}.")
    out = Path(output_dir) / bundle
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} already holds results: choose another --output_dir or pass --overwrite.")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if dataset_dir is None:
        module, name = json.loads(demo_file.read_text())["demo_data"].rsplit(".", 1)
        maker, has_maker = optional_import(module, name=name)
        if not has_maker:
            raise ImportError(f"cannot import the demo data maker named in {demo_file}.")
        dataset_dir = str(maker(str(out / "demo_data")))
    elif not Path(dataset_dir).is_dir():
        raise DataError(f"dataset_dir {dataset_dir} does not exist.")
    settings = {
        "bundle_root": str(out),
        "dataset_dir": str(dataset_dir),
        "logging_file": str(QUIET_LOGGING),
        **overrides,
    }
    run_bundle(bundle_dir, "training", ["train.json", "demo.json"], **settings)
    run_bundle(bundle_dir, "run", ["inference.json", "demo.json"], **settings)
    run_bundle(bundle_dir, "evaluate", ["inference.json", "evaluate.json", "demo.json"], **settings)
    return json.loads((out / "metrics.json").read_text())
