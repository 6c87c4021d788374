"""`python -m meddiff ...`: the demo, outside of a bundle run."""

from __future__ import annotations

import argparse
import json
import sys
import time

from meddiff.precision import reexec_with_malloc_tuning

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    from meddiff.demo import DEMO_BUNDLES

    parser = argparse.ArgumentParser(prog="python -m meddiff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train each bundle briefly, generate synthetic labelled data, evaluate it")
    demo.add_argument("--bundle", action="append", choices=DEMO_BUNDLES, help="bundle to run (repeatable; all)")
    demo.add_argument("--dataset_dir", default=None, help="your data instead of the built-in demo data")
    demo.add_argument("--output_dir", default="demo_output", help="results go to OUTPUT_DIR/<bundle>/")
    demo.add_argument("--overwrite", action="store_true", help="replace earlier results in OUTPUT_DIR/<bundle>/")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m meddiff`."""
    if argv is None:
        reexec_with_malloc_tuning()
    args = _parser().parse_args(argv)
    from meddiff.demo import DEMO_BUNDLES, run_demo

    for bundle in args.bundle or DEMO_BUNDLES:
        start = time.perf_counter()
        print(f"== {bundle}: training, generating, evaluating (results in {args.output_dir}/{bundle}/)", flush=True)
        try:
            metrics = run_demo(bundle, args.output_dir, args.dataset_dir, overwrite=args.overwrite)
        except (FileExistsError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(json.dumps(metrics, indent=2, sort_keys=True))
        print(f"== {bundle} done in {time.perf_counter() - start:.0f} s", flush=True)
    return 0
