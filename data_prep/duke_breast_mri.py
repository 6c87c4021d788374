"""Convert Duke-Breast-Cancer-MRI (TCIA) + its 3D breast/FGT/vessel segmentations into the bundle's layout.

Input (as downloaded from TCIA):
    <dicom_root>/Breast_MRI_001/<study folder>/<series folder>/*.dcm   several series per patient
    <seg_root>/Breast_MRI_001/Segmentation_Breast_MRI_001_Breast.seg.nrrd
    <seg_root>/Breast_MRI_001/Segmentation_Breast_MRI_001_Dense_and_Vessels.seg.nrrd

Output (read by the breast_mri_seg_guided_generation bundle):
    <out>/<case>/image/          the pre-contrast series' DICOM files, copied
    <out>/<case>/label.nii.gz    0 background, 1 breast, 2 blood vessels, 3 FGT, on the pre-contrast grid
    <out>/datalist.json          {"training": [{"image": "<case>/image", "label": "<case>/label.nii.gz"}, ...]}

Assumptions to verify against the segmentation release's readme:
  * The pre-contrast series is the one whose SeriesDescription matches --series_regex (default "pre",
    case-insensitive), e.g. "ax dyn pre"; each series sits in its own folder (TCIA layout).
  * The Breast file marks the breast with any nonzero value.
  * The Dense_and_Vessels file holds two segments. When its 3D Slicer header names them (Segment<i>_Name matching
    "vessel" and "dense"/"fgt"/"fibroglandular"), the header's Segment<i>_LabelValue/_Layer are used, because the
    segment order and values differ between cases. Otherwise (or with --ignore_segment_names) voxel value
    --vessel_value (default 1) is vessels and --fgt_value (default 2) is FGT; a layered file without segment names
    has layer i read as value i + 1.
  * Vessels and FGT override breast; where vessels and FGT overlap, FGT wins.
  * Segmentations are on the pre-contrast grid; if not, they are resampled onto it (nearest neighbour) when they
    overlap it physically.

Usage:
    python data_prep/duke_breast_mri.py --dicom_root DUKE/ --seg_root SEGS/ --out data/duke_breast
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from meddiff.data.errors import DataError
from meddiff.dicom import (
    DicomSeriesError,
    find_series,
    label_on_image_grid,
    read_series,
    segment_mask,
    slicer_segments,
    vector_label_to_labelmap,
    write_like,
)
from meddiff.errors import OptionError, report_user_errors
from meddiff.io import OutputExistsError, atomic_write, check_new_output, save_json

logger = logging.getLogger(__name__)

BREAST_FILE = "Segmentation_{case}_Breast.seg.nrrd"
DENSE_VESSELS_FILE = "Segmentation_{case}_Dense_and_Vessels.seg.nrrd"
BREAST, VESSELS, FGT = 1, 2, 3
VESSEL_NAME = re.compile(r"vessel", re.IGNORECASE)
FGT_NAME = re.compile(r"dense|fgt|fibroglandular", re.IGNORECASE)


@dataclass(frozen=True)
class CasePlan:
    """Everything needed to convert one patient: the chosen series and its two segmentation files."""

    case: str
    series_dir: Path
    series_uid: str
    series_files: tuple[str, ...]
    breast_path: Path
    dense_vessels_path: Path


def series_folders(patient_dir: str | os.PathLike) -> list[tuple[Path, str, str]]:
    """List (folder, SeriesInstanceUID, SeriesDescription) for every folder under `patient_dir` holding DICOM.

    Only the first DICOM file of each folder is read (TCIA puts one series per folder).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    found = []
    for root, dirs, files in os.walk(patient_dir):
        dirs.sort()
        for name in sorted(files):
            try:
                ds = pydicom.dcmread(os.path.join(root, name), stop_before_pixels=True, force=False)
            except InvalidDicomError:
                continue
            if "SeriesInstanceUID" in ds:
                found.append((Path(root), str(ds.SeriesInstanceUID), str(ds.get("SeriesDescription", ""))))
                break
    return found


def find_precontrast_series(patient_dir: str | os.PathLike, series_regex: str = "pre") -> tuple[Path, str]:
    """Return (folder, SeriesInstanceUID) of the one series whose SeriesDescription matches `series_regex`."""
    pattern = re.compile(series_regex, re.IGNORECASE)
    candidates = series_folders(patient_dir)
    matches = [c for c in candidates if pattern.search(c[2])]
    listing = ", ".join(f"'{desc}' ({folder.name})" for folder, _, desc in candidates) or "no DICOM series"
    if not matches:
        raise DicomSeriesError(
            f"No series in {patient_dir} has a SeriesDescription matching /{series_regex}/i (found: {listing}). "
            "Pass --series_regex to pick the pre-contrast series."
        )
    if len(matches) > 1:
        raise DicomSeriesError(
            f"Several series in {patient_dir} match /{series_regex}/i: "
            + ", ".join(f"'{desc}' ({folder})" for folder, _, desc in matches)
            + ". Pass a more specific --series_regex (e.g. '^ax dyn pre$')."
        )
    return matches[0][0], matches[0][1]


def _mask_image(mask: np.ndarray, like: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.CopyInformation(like)
    return image


def dense_vessel_labels(
    dense_vessels: sitk.Image,
    path: str | os.PathLike,
    vessel_value: int = 1,
    fgt_value: int = 2,
    use_segment_names: bool = True,
) -> np.ndarray:
    """(Z,Y,X) uint8 map on the file's own grid: VESSELS (2) and FGT (3); FGT wins where both are set."""
    segments = slicer_segments(dense_vessels) if use_segment_names else []
    vessels = [s for s in segments if VESSEL_NAME.search(s.name)]
    fgt = [s for s in segments if FGT_NAME.search(s.name)]
    if len(vessels) == 1 and len(fgt) == 1:
        vessel_mask, fgt_mask = segment_mask(dense_vessels, vessels[0]), segment_mask(dense_vessels, fgt[0])
    else:
        if segments:
            logger.warning(
                "%s: segment names %s do not name one vessel and one dense/FGT segment; using values "
                "--vessel_value %d and --fgt_value %d",
                path,
                [s.name for s in segments],
                vessel_value,
                fgt_value,
            )
        values = sitk.GetArrayFromImage(vector_label_to_labelmap(dense_vessels))
        unknown = sorted(set(np.unique(values).tolist()) - {0, vessel_value, fgt_value})
        if unknown:
            raise DataError(
                f"{path} holds values {unknown} besides 0, --vessel_value {vessel_value} and --fgt_value "
                f"{fgt_value}. Check the release readme and set --vessel_value/--fgt_value."
            )
        vessel_mask, fgt_mask = values == vessel_value, values == fgt_value
    out = np.zeros(vessel_mask.shape, dtype=np.uint8)
    out[vessel_mask] = VESSELS
    out[fgt_mask] = FGT
    return out


def merged_label(
    image: sitk.Image,
    breast_path: str | os.PathLike,
    dense_vessels_path: str | os.PathLike,
    vessel_value: int = 1,
    fgt_value: int = 2,
    use_segment_names: bool = True,
) -> np.ndarray:
    """Read both Slicer files and merge them into one (Z,Y,X) uint8 label on `image`'s grid."""
    breast = sitk.ReadImage(str(breast_path))
    breast_mask = sitk.GetArrayViewFromImage(breast) != 0
    if breast_mask.ndim == 4:
        breast_mask = breast_mask.any(axis=-1)
    breast_on_image = label_on_image_grid(_mask_image(breast_mask, breast), image, breast_path)
    dense_vessels = sitk.ReadImage(str(dense_vessels_path))
    dv = dense_vessel_labels(dense_vessels, dense_vessels_path, vessel_value, fgt_value, use_segment_names)
    dv_on_image = label_on_image_grid(_mask_image(dv, dense_vessels), image, dense_vessels_path)
    dv_array = sitk.GetArrayFromImage(dv_on_image)
    label = np.where(sitk.GetArrayFromImage(breast_on_image) != 0, BREAST, 0).astype(np.uint8)
    return np.where(dv_array != 0, dv_array, label).astype(np.uint8)


def plan_cases(dicom_root: str | os.PathLike, seg_root: str | os.PathLike, series_regex: str = "pre") -> list[CasePlan]:
    """Pick the series and segmentation files of every patient that has both segmentations (others warned)."""
    dicom_root, seg_root = Path(dicom_root), Path(seg_root)
    for root, flag in ((dicom_root, "--dicom_root"), (seg_root, "--seg_root")):
        if not root.is_dir():
            raise DataError(f"{flag} {root} does not exist or is not a folder.")
    patients = sorted(p for p in dicom_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not patients:
        raise DicomSeriesError(f"No patient folders (e.g. Breast_MRI_001) in --dicom_root {dicom_root}.")
    plans = []
    for patient in patients:
        case = patient.name
        breast = seg_root / case / BREAST_FILE.format(case=case)
        dense_vessels = seg_root / case / DENSE_VESSELS_FILE.format(case=case)
        missing = [p for p in (breast, dense_vessels) if not p.is_file()]
        if missing:
            logger.warning("skipping %s: no segmentation %s", case, ", ".join(str(p) for p in missing))
            continue
        series_dir, uid = find_precontrast_series(patient, series_regex)
        in_folder = find_series(series_dir)
        if len(in_folder) > 1:
            raise DicomSeriesError(
                f"{series_dir} ({case}) holds several series ({', '.join(in_folder)}); move each into its own folder."
            )
        plans.append(CasePlan(case, series_dir, uid, tuple(in_folder[uid]), breast, dense_vessels))
    known = {p.name for p in patients}
    orphans = sorted(p.name for p in seg_root.iterdir() if p.is_dir() and p.name not in known)
    if orphans:
        logger.warning("segmentations without a DICOM patient folder: %s", ", ".join(orphans))
    if not plans:
        raise DicomSeriesError(
            f"Nothing to convert: no patient in {dicom_root} has both {BREAST_FILE} and {DENSE_VESSELS_FILE} "
            f"under {seg_root}/<case>/."
        )
    return plans


def _check_outputs(plans: list[CasePlan], out: Path, overwrite: bool) -> None:
    check_new_output(out / "datalist.json", overwrite)
    for plan in plans:
        check_new_output(out / plan.case / "label.nii.gz", overwrite)
        image_dir = out / plan.case / "image"
        existing = sorted(os.listdir(image_dir)) if image_dir.is_dir() else []
        if existing and not overwrite:
            raise OutputExistsError(
                f"{image_dir} already exists and is not empty. Choose another --out, remove it, or pass --overwrite."
            )
        stale = set(existing) - {os.path.basename(f) for f in plan.series_files}
        if stale:
            raise OutputExistsError(
                f"{image_dir} holds files that are not part of the chosen series (e.g. {sorted(stale)[0]}); "
                "remove the folder before converting again."
            )


def convert(
    dicom_root: str | os.PathLike,
    seg_root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    series_regex: str = "pre",
    vessel_value: int = 1,
    fgt_value: int = 2,
    use_segment_names: bool = True,
    overwrite: bool = False,
) -> list[dict[str, str]]:
    """Convert every patient with segmentations; write images, labels and datalist.json; return the datalist."""
    if vessel_value == fgt_value or 0 in (vessel_value, fgt_value):
        raise OptionError(f"--vessel_value ({vessel_value}) and --fgt_value ({fgt_value}) must differ and be nonzero.")
    out = Path(out)
    plans = plan_cases(dicom_root, seg_root, series_regex)
    _check_outputs(plans, out, overwrite)  # refuse before writing anything
    datalist = []
    for plan in plans:
        image = read_series(plan.series_dir, plan.series_uid)
        label = merged_label(
            image, plan.breast_path, plan.dense_vessels_path, vessel_value, fgt_value, use_segment_names
        )
        for src in plan.series_files:
            dst = out / plan.case / "image" / os.path.basename(src)
            atomic_write(dst, lambda tmp, src=src: shutil.copyfile(src, tmp), overwrite)
        write_like(label, image, out / plan.case / "label.nii.gz", overwrite)
        counts = {name: int((label == value).sum()) for name, value in (("breast", 1), ("vessels", 2), ("fgt", 3))}
        logger.info("%s: %s (%d slices), voxels %s", plan.case, plan.series_dir, image.GetSize()[2], counts)
        datalist.append({"image": f"{plan.case}/image", "label": f"{plan.case}/label.nii.gz"})
    save_json({"training": datalist}, out / "datalist.json", overwrite)
    return datalist


@report_user_errors
def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dicom_root", required=True, help="folder holding Breast_MRI_xxx patient folders")
    parser.add_argument("--seg_root", required=True, help="folder holding Breast_MRI_xxx segmentation folders")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--series_regex", default="pre", help="regex (case-insensitive) on SeriesDescription")
    parser.add_argument("--vessel_value", type=int, default=1, help="vessel value in Dense_and_Vessels (assumed)")
    parser.add_argument("--fgt_value", type=int, default=2, help="FGT value in Dense_and_Vessels (assumed)")
    parser.add_argument(
        "--ignore_segment_names",
        action="store_true",
        help="use --vessel_value/--fgt_value even where the Slicer header names the segments",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    datalist = convert(
        args.dicom_root,
        args.seg_root,
        args.out,
        series_regex=args.series_regex,
        vessel_value=args.vessel_value,
        fgt_value=args.fgt_value,
        use_segment_names=not args.ignore_segment_names,
        overwrite=args.overwrite,
    )
    print(f"converted {len(datalist)} cases into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
