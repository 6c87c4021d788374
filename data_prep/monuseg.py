"""Convert MoNuSeg 2018 tiles and their Aperio XML nuclei outlines into the seed's instance maps and 128 px patches.

Input (as downloaded, any of):
    <dataset_dir>/Tissue_Images/<id>.tif + Annotations/<id>.xml     the training folder (Binary_masks/ is ignored)
    <dataset_dir>/<id>.tif + <id>.xml                               the test folder
    <dataset_dir>/{MoNuSegTrainingData,MoNuSegTestData}/...         the folder holding both (or one level further down)

Output (the layout the seed's SDM loader reads; ``<S>`` is --patch_size):
    <output_dir>/MoNuSegTrainingData/bin_masks/<id>.png           whole tile, 0/255
    <output_dir>/MoNuSegTrainingData/inst_masks/<id>.tif          whole tile, uint16 instance ids (0 background)
    <output_dir>/MoNuSegTestData/...                              the same for the test tiles
    <output_dir>/patches_valid_inst_<S>x<S>_<S>x<S>/{MoNuSegTrainingData,MoNuSegTestData}/
        images/<id>_<idx:03d>.png, bin_masks/<id>_<idx:03d>.png, inst_masks/<id>_<idx:03d>.tif
    <output_dir>/report.json      per tile: size, regions, degenerate regions (Id and why) and regions left empty
    <output_dir>/datalist.json    {"training": [...], "testing": [...]} items of the written patches (MONAI datalist)

Method (see `meddiff.data.monuseg`): each <Region> is one nucleus, filled on pixel centres inside or on its outline,
ids 1..K in file order, a later region winning where regions overlap; regions with fewer than 3 vertices, zero area or
NegativeROA=1 are reported, not drawn. Patches are the seed's "valid" extraction (window = step = S, no padding, plus
the patches flush with the bottom and right edges): 64 per 1000 px tile at S = 128. Training and test folders give
the split; one set alone is split by slide (--test_fraction, --split_seed). Every tile and XML is read and checked
before anything is written; nothing is written when a check fails, and existing outputs are kept unless --overwrite.

Usage:
    python data_prep/monuseg.py --dataset_dir MoNuSeg/ --output_dir data/monuseg
    python data_prep/monuseg.py --dataset_dir MoNuSegTrainingData/ --output_dir data/monuseg_256 --patch_size 256
"""

from __future__ import annotations

import argparse
import sys

from meddiff.data.monuseg import prepare_monuseg
from meddiff.errors import report_user_errors
from meddiff.options import parse


@report_user_errors
def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--dataset_dir", required=True, help="the MoNuSeg training/test folder, or the one holding them"
    )
    parser.add_argument("--output_dir", required=True, help="the folder to write (outside --dataset_dir)")
    parser.add_argument("--patch_size", default="128", help="side of the square patches (the seed's 128)")
    parser.add_argument("--test_fraction", default="0.2", help="share of slides held out when there is one set only")
    parser.add_argument("--split_seed", default="0", help="seed of that split")
    parser.add_argument(
        "--overwrite", nargs="?", const="true", default="false", help="replace existing outputs (--overwrite [true])"
    )
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    for name in ("patch_size", "test_fraction", "split_seed"):
        parse(name, getattr(args, name))  # refuse bad options before any file is read
    overwrite = parse("overwrite", args.overwrite)
    report = prepare_monuseg(
        args.dataset_dir,
        args.output_dir,
        patch_size=args.patch_size,
        test_fraction=args.test_fraction,
        split_seed=args.split_seed,
        overwrite=overwrite,
        progress=not args.no_progress,
    )
    counts = report["num_patches"]
    print(
        f"wrote {report['patch_dir']}: {counts.get('training', 0)} training and {counts.get('testing', 0)} testing "
        f"patches from {len(report['tiles'])} tile(s); {report['num_degenerate']} degenerate region(s) skipped "
        f"(see {args.output_dir}/report.json)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
