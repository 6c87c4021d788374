"""Check a Kvasir-SEG / HyperKvasir polyp dataset and write its training/testing datalist.

Input (either release, as downloaded, or the folder holding it):
    <dataset_dir>/images/<id>.jpg          Kvasir-SEG (kvasir-seg.zip unpacks to Kvasir-SEG/images, .../masks)
    <dataset_dir>/masks/<id>.jpg
    or HyperKvasir's segmented-images/ with images/ (or masked-images/) and masks/

Output:
    <output>    {"training": [{"name", "image", "label"}, ...], "testing": [...]}, absolute paths

Every pair is read once first (mask size, 0/255 masks, empty masks, unreadable files, wildly different image sizes;
see `meddiff.data.polyp`); any problem stops the run with one line naming the first bad file, the fix, and the other
failing pairs. The split is the seed's: scikit-learn's train_test_split(test_size=0.2, random_state=0) over the
name-sorted pairs.

Usage:
    python data_prep/hyperkvasir.py --dataset_dir kvasir-seg/ --output data/polyp_datalist.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from meddiff.data.polyp import check_polyp_pairs, find_polyp_pairs, split_pairs
from meddiff.errors import report_user_errors
from meddiff.io import OutputExistsError, save_json


@report_user_errors
def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", required=True, help="the Kvasir-SEG or segmented-images folder")
    parser.add_argument("--output", required=True, help="the datalist JSON file to write")
    parser.add_argument("--test_fraction", default="0.2", help="share of pairs held out for testing, in (0, 1)")
    parser.add_argument("--seed", default="0", help="seed of the split (0, as the seed's code)")
    parser.add_argument("--max_size_ratio", default="4.0", help="largest/smallest image side ratio allowed")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    split_pairs([], args.test_fraction, args.seed)  # the options, checked before anything is read
    check_polyp_pairs([], args.max_size_ratio)
    output = Path(args.output)
    if output.is_dir():
        raise OutputExistsError(
            f"--output {output} is a folder: name the datalist file to write, e.g. {output}/datalist.json."
        )
    if output.exists() and not args.overwrite:
        raise OutputExistsError(f"{output} already exists: choose another --output, remove it, or pass --overwrite.")
    pairs = find_polyp_pairs(args.dataset_dir)
    check_polyp_pairs(pairs, args.max_size_ratio, progress=not args.no_progress)
    datalist = split_pairs(pairs, args.test_fraction, args.seed)
    save_json(datalist, output, overwrite=args.overwrite)
    print(f"wrote {output}: {len(datalist['training'])} training and {len(datalist['testing'])} testing pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
