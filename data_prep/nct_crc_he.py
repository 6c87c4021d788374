"""List NCT-CRC-HE colorectal H&E tiles (Kather et al. 2018) as a MONAI datalist with a stratified, seeded split.

Input (as downloaded from Zenodo 10.5281/zenodo.1214456 and unzipped, any of):
    <dataset_dir>/<CLASS>/<name>.tif                               class folders (NCT-CRC-HE-100K/ or CRC-VAL-HE-7K/)
    <dataset_dir>/{NCT-CRC-HE-100K[-NONORM],CRC-VAL-HE-7K}/...     the Zenodo parent: both = training and testing
    <dataset_dir>/<CLASS>-<rest>.png                               flat files, the class is the file-name prefix
    a folder holding one of these as its only sub-folder
With --labelled false, every tile under <dataset_dir> (recursively) is listed without labels, for pre-training.

Output:
    <output_dir>/datalist.json   {"training": [...], "testing": [...], "classes": [...]}; items {"image" (absolute
                                 path), "label" (index in "classes"), "class_name", "name" (file stem)}
    <output_dir>/report.json     layout found, tile size, tiles per class and split, the options

Method (see `meddiff.data.histology`): classes are the sorted class folder names (or --classes); one set is split per
class (--test_fraction, --split_seed; each class keeps a training tile); --label_fraction keeps that share of each
class's training tiles (--label_seed), the paper's 5 % / 10 % labelled settings. Every tile is decoded and checked
(readable to its end, 8-bit RGB, one size) before anything is written. Existing outputs are kept unless --overwrite;
the output folder may not be inside the dataset folder.

Usage:
    python data_prep/nct_crc_he.py --dataset_dir NCT-CRC-HE/ --output_dir data/nct_crc_he
    python data_prep/nct_crc_he.py --dataset_dir CRC-VAL-HE-7K-png/ --output_dir data/crc5 --label_fraction 0.05
    python data_prep/nct_crc_he.py --dataset_dir tiles/ --output_dir data/pretrain --labelled false
"""

from __future__ import annotations

import argparse
import sys

from meddiff.data.histology import parse_classes, prepare_nct_crc_he
from meddiff.errors import report_user_errors
from meddiff.options import parse


@report_user_errors
def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", required=True, help="the folder of tiles (class folders, Zenodo, or flat)")
    parser.add_argument("--output_dir", required=True, help="the folder to write (outside --dataset_dir)")
    parser.add_argument("--classes", default=None, help='the classes the data must hold, e.g. "ADI,DEB,LYM"')
    parser.add_argument(
        "--labelled", default="true", help="false: every tile under --dataset_dir, no labels (pre-training)"
    )
    parser.add_argument("--test_fraction", default="0.2", help="share of each class held out when there is one set")
    parser.add_argument("--split_seed", default="0", help="seed of that split")
    parser.add_argument("--label_fraction", default="1.0", help="share of each class's training tiles kept")
    parser.add_argument("--label_seed", default="0", help="seed of that choice")
    parser.add_argument(
        "--overwrite", nargs="?", const="true", default="false", help="replace existing outputs (--overwrite [true])"
    )
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    for name in ("test_fraction", "split_seed", "overwrite"):
        parse(name, getattr(args, name))  # refuse bad options before any file is read
    report = prepare_nct_crc_he(
        args.dataset_dir,
        args.output_dir,
        classes=parse_classes(args.classes),
        labelled=args.labelled,
        test_fraction=args.test_fraction,
        split_seed=args.split_seed,
        label_fraction=args.label_fraction,
        label_seed=args.label_seed,
        overwrite=parse("overwrite", args.overwrite),
        progress=not args.no_progress,
    )
    counts = report["num_tiles"]
    classes = f" of {len(report['classes'])} classes" if report["classes"] else ""
    print(
        f"wrote {args.output_dir}/datalist.json: {counts['training']} training and {counts['testing']} testing "
        f"tiles{classes} ({report['layout']}, {report['tile_size'][1]}x{report['tile_size'][0]} px; see "
        f"{args.output_dir}/report.json)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
