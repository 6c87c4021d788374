"""`python -m meddiff ...`: the demo, outside of a bundle run.

Any bundle setting passes through as ``--name value`` (``--num_classes 7``, ``--img_size 64``, ``--ablated_classes
"[2]"``): the value is read as JSON when it parses as JSON (numbers, true/false, lists), else as text, and the bundle
parses it strictly by name (`meddiff.options`). A name that no config of the bundle has is refused with the closest
names. Errors caused by the input are printed as one line and exit with status 2 (`meddiff.errors`).
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

from meddiff.errors import OptionError, report_user_errors
from meddiff.precision import reexec_with_malloc_tuning

__all__ = ["main", "metrics_table", "parse_settings"]


def _parser() -> argparse.ArgumentParser:
    from meddiff.demo import DEMO_BUNDLES

    parser = argparse.ArgumentParser(prog="python -m meddiff", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="train each bundle briefly, generate synthetic labelled data, evaluate it",
        epilog="Any bundle setting passes through: --num_classes 7 --img_size 64 --num_epochs 50 ...",
        allow_abbrev=False,
    )
    demo.add_argument("--bundle", action="append", choices=DEMO_BUNDLES, help="bundle to run (repeatable; all)")
    demo.add_argument("--dataset_dir", default=None, help="your data instead of the built-in demo data")
    demo.add_argument("--output_dir", default="demo_output", help="results go to OUTPUT_DIR/<bundle>/")
    demo.add_argument(
        "--overwrite",
        nargs="?",
        const="true",
        default="false",
        help="replace earlier results in OUTPUT_DIR/<bundle>/ once the new run has finished (true/false)",
    )
    demo.add_argument("--debug", action="store_true", help="show full tracebacks")
    clusters = sub.add_parser(
        "clusters",
        help="run a per-cluster bundle config once for every cluster (resumable cluster by cluster)",
        epilog="Any bundle setting passes through: --dataset_dir D --num_epochs 500 ...",
        allow_abbrev=False,
    )
    clusters.add_argument("stage", choices=sorted(CLUSTER_STAGES), help="training: train.json; run: inference.json")
    clusters.add_argument("--bundle", default="polyp_cluster_generation", help="the bundle (default: %(default)s)")
    clusters.add_argument("--bundle_root", required=True, help="where clusters/ and models/ are (the bundle's root)")
    clusters.add_argument(
        "--include_full", nargs="?", const="true", default="false", help="also the full model on every image"
    )
    clusters.add_argument("--debug", action="store_true", help="show full tracebacks")
    return parser


# `python -m meddiff clusters STAGE`: the run id and config files of each stage
CLUSTER_STAGES = {"training": ("training", ["train.json"]), "run": ("run", ["inference.json"])}


def _config_keys(bundle: str) -> set[str]:
    from meddiff.demo import bundles_dir

    keys: set[str] = set()
    for config in sorted((bundles_dir() / bundle / "configs").glob("*.json")):
        if config.name != "metadata.json":
            keys.update(json.loads(config.read_text()))
    return keys


def parse_settings(extra: list[str]) -> dict[str, Any]:
    """Turn ``--name value`` / ``--name=value`` words into {name: value}, values read as JSON where they parse."""
    settings: dict[str, Any] = {}
    words = list(extra)
    while words:
        word = words.pop(0)
        if not word.startswith("--") or len(word) < 3:
            raise OptionError(f"unexpected argument {word!r}: bundle settings are given as --name value.")
        name, _, value = word[2:].partition("=")
        if not _:
            if not words or words[0].startswith("--"):
                raise OptionError(f"--{name} needs a value, for example --{name} 1 (or true/false).")
            value = words.pop(0)
        try:
            settings[name] = json.loads(value)
        except json.JSONDecodeError:
            settings[name] = value
    return settings


def _check_settings(bundle: str, settings: dict[str, Any], demo: bool = True) -> None:
    from meddiff.demo import check_not_demo_owned

    if demo:
        check_not_demo_owned(settings)
    known = _config_keys(bundle)
    for name in settings:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f" Did you mean {', '.join('--' + c for c in close)}?" if close else ""
            raise OptionError(f"--{name} is not a setting of {bundle}.{hint}")


def _scalars(metrics: dict, prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in metrics.items():
        if key in ("per_image", "per_seed", "settings"):
            continue
        if key == "verdict":
            continue
        if isinstance(value, dict):
            rows += _scalars(value, f"{prefix}{key}." if key != "mean" else prefix)
        elif isinstance(value, (int, float, str, bool)) and value is not None:
            rows.append((prefix + key, value))
    return rows


def metrics_table(metrics: dict) -> str:
    """The demo's metrics as a two-column table a person reads (nested means flattened, per-image rows left out)."""
    rows = [(name, f"{value:.4f}" if isinstance(value, float) else str(value)) for name, value in _scalars(metrics)]
    width = max((len(name) for name, _ in rows), default=6)
    lines = [f"  {'metric':<{width}}  value", f"  {'-' * width}  {'-' * 10}"]
    lines += [f"  {name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)


def _quiet_bundle_runner() -> None:
    """The demo runs its own configs: MONAI's input summaries and its warning about untrusted configs are noise."""
    import monai.bundle.scripts
    import monai.bundle.workflows

    for module in (monai.bundle.scripts, monai.bundle.workflows):
        logging.getLogger(module.__name__).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="parsing config_file", category=UserWarning)


def demo_grids(out: Path) -> list[Path]:
    """The sample grids a finished demo points to: the bundle's ``grid.png``, else the generated set's under
    ``eval/generated/`` (one per cluster where the bundle trains one model per cluster)."""
    if (out / "grid.png").is_file():
        return [out / "grid.png"]
    return sorted(out.glob("eval/generated/**/grid.png"))


def _run(args: argparse.Namespace, extra: list[str]) -> int:
    from meddiff.demo import DEMO_BUNDLES, run_demo
    from meddiff.options import parse

    _quiet_bundle_runner()
    overwrite = parse("overwrite", args.overwrite)
    settings = parse_settings(extra)
    bundles = args.bundle or list(DEMO_BUNDLES)
    for bundle in bundles:
        _check_settings(bundle, settings)
    for bundle in bundles:
        start = time.perf_counter()
        out = Path(args.output_dir) / bundle
        print(f"== {bundle}: training, generating, evaluating (results in {out}/)", flush=True)
        run_demo(bundle, args.output_dir, args.dataset_dir, overwrite=overwrite, **settings)  # prints its metrics
        elapsed = time.perf_counter() - start
        shown = ", ".join(str(p) for p in [*demo_grids(out), out / "metrics.json"])
        print(f"== {bundle} done in {elapsed:.0f} s: {shown}", flush=True)
    return 0


@report_user_errors
def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m meddiff`; returns the exit status (2 for a user error)."""
    if argv is None:
        reexec_with_malloc_tuning()
    args, extra = _parser().parse_known_args(argv)
    if args.debug:
        os.environ["MEDDIFF_DEBUG"] = "1"
    if args.command == "clusters":
        return _run_clusters(args, extra)
    return _run(args, extra)


def _run_clusters(args: argparse.Namespace, extra: list[str]) -> int:
    from meddiff.demo import bundles_dir
    from meddiff.options import parse
    from meddiff.workflows import run_each_cluster

    settings = parse_settings(extra)
    _check_settings(args.bundle, settings, demo=False)
    run_id, configs = CLUSTER_STAGES[args.stage]
    done = run_each_cluster(
        bundles_dir() / args.bundle,
        run_id,
        configs,
        args.bundle_root,
        include_full=parse("include_full", args.include_full),
        **settings,
    )
    print(f"== {args.stage} done for {len(done)} model(s) in {args.bundle_root}", flush=True)
    return 0
