"""DICOM in and out: read one series (or an NRRD/NIfTI volume), put labels on the image grid, write DICOM SEG.

Array conventions: SimpleITK images turn into numpy arrays indexed (Z, Y, X). For a DICOM series read with
`read_series`, Z follows the slice order SimpleITK/GDCM chose, which is ascending position along the slice normal
(the cross product of the ImageOrientationPatient row and column vectors), the same order `sorted_source_datasets`
returns. `write_seg` expects its masks in that order.

Reading rules (`read_series`, `read_volume`):
- a series folder's files that are not DICOM images (no DICOM preamble, or no SeriesInstanceUID; a DICOMDIR is
  expected) are ignored, with one logged warning listing them; a zero-byte file, a broken symlink, a DICOM file
  whose header cannot be parsed, or a slice that GDCM cannot read is refused;
- a series whose slice positions along the slice normal are not evenly spaced (a missing file leaves a gap; two
  files at one position) is refused, naming the folder and the positions around the gap; slices are evenly spaced
  when every step is within 1 % of the median step;
- volume files are checked before reading (declared size against the file, a cap on voxels, see
  `meddiff.data.readers`); NIfTI voxels are read with nibabel, which keeps NaN and refuses truncated data where ITK
  would read NaN as 0 and fill a truncated file with zeros.

Writing rules (`write_seg`, `write_synthetic_series`, `write_like`):
- every file is written atomically and never replaces an existing one unless asked; a synthetic series is written
  into a staging folder beside its output folder and renamed into place when complete (an existing output folder
  is refused);
- every DICOM file passes David Clunie's ``dciodvfy`` (dicom3tools) without errors (tests/test_dicom.py checks it):
  SEG through highdicom; synthetic images as CT or MR Image instances (the source's modality) of the source's
  study and frame of reference, marked synthetic (Synthetic Data YES, Image Type DERIVED\\SECONDARY, Contributing
  Equipment "meddiff") with their provenance (`meddiff.provenance`) in standard and one private attribute;
- volumes written with a provenance record carry it in the file (a NIfTI header extension, an NRRD/MetaImage
  header field).
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from meddiff.data.errors import DataError
from meddiff.data.readers import (
    check_file,
    file_kind,
    folder_entries,
    itk_reason,
    read_nifti_array,
    unreadable,
    volume_information,
)
from meddiff.io import atomic_write, check_new_output

logger = logging.getLogger(__name__)

__all__ = [
    "DicomSeriesError",
    "NODULE_CODES",
    "TISSUE_CODES",
    "SlicerSegment",
    "find_series",
    "label_on_image_grid",
    "read_series",
    "read_volume",
    "segment_mask",
    "slicer_segments",
    "sorted_source_datasets",
    "vector_label_to_labelmap",
    "write_like",
    "write_seg",
    "write_synthetic_series",
]

VOLUME_EXTENSIONS = (".seg.nrrd", ".nrrd", ".nii.gz", ".nii", ".mha", ".mhd")
WRITE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha")
TISSUE_CODES: tuple[Code, Code] = (codes.SCT.Tissue, codes.SCT.Tissue)
NODULE_CODES: tuple[Code, Code] = (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Nodule)
_GRID_TOL = 1e-3
_STEP_TOL = 0.01


class DicomSeriesError(DataError):
    """Raised when a folder does not hold exactly one readable DICOM series."""


def find_series(folder: str | os.PathLike) -> dict[str, list[str]]:
    """Map SeriesInstanceUID -> sorted file paths for the DICOM files directly in `folder` (others skipped)."""
    return _scan_series(folder)[0]


def _scan_series(
    folder: str | os.PathLike,
) -> tuple[dict[str, list[str]], list[str], dict[str, pydicom.Dataset]]:
    """The DICOM series directly in `folder`, the names of its files that are not DICOM, and each file's header."""
    found: dict[str, list[str]] = {}
    others: list[str] = []
    headers: dict[str, pydicom.Dataset] = {}
    for entry in folder_entries(folder):
        if not entry.is_file():
            continue
        check_file(entry, "DICOM")
        ds = _read_header(entry)
        if ds is not None and "SeriesInstanceUID" in ds:
            found.setdefault(str(ds.SeriesInstanceUID), []).append(str(entry))
            headers[str(entry)] = ds
        elif ds is None or "DirectoryRecordSequence" not in ds:  # a DICOMDIR is expected beside a series
            others.append(entry.name)
    return found, others, headers


def _read_header(path: str | os.PathLike) -> pydicom.Dataset | None:
    """The header of a DICOM file, None for a file without the DICOM preamble; a broken DICOM file is refused."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True, force=False)
    except InvalidDicomError:
        return None
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise unreadable(path, err, "DICOM") from err


def _describe(files: list[str]) -> str:
    ds = _read_header(files[0])
    description = str(ds.get("SeriesDescription", "")) if ds is not None else ""
    return f"'{description}'" if description else "(no SeriesDescription)"


def read_series(folder: str | os.PathLike, series_uid: str | None = None) -> sitk.Image:
    """Read one DICOM series from `folder` as a float32 image (rescale slope/intercept applied), checked in full."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DicomSeriesError(
            f"DICOM folder {folder} does not exist or is not a folder. Pass the folder that directly holds the "
            "DICOM files of one series."
        )
    series, others, headers = _scan_series(folder)
    if not series:
        raise DicomSeriesError(
            f"No DICOM files found in {folder} (subfolders are not searched; files need the DICOM preamble). "
            "Pass the folder that directly holds the .dcm files of one series."
        )
    if others:
        logger.warning("ignoring %d non-DICOM file(s) in %s: %s", len(others), folder, _listing(others))
    if series_uid is None:
        if len(series) > 1:
            listing = "; ".join(f"{uid} {_describe(files)} ({len(files)} files)" for uid, files in series.items())
            raise DicomSeriesError(
                f"{folder} holds several series: {listing}. Move each series into its own folder, or pass "
                "series_uid to choose one."
            )
        series_uid = next(iter(series))
    elif series_uid not in series:
        raise DicomSeriesError(f"Series {series_uid} is not in {folder}; the folder holds {sorted(series)}.")
    _check_slice_steps(folder, [headers[f] for f in series[series_uid]])
    reader = sitk.ImageSeriesReader()
    names = list(reader.GetGDCMSeriesFileNames(str(folder), series_uid))
    dropped = sorted({Path(f).name for f in series[series_uid]} - {Path(f).name for f in names})
    if dropped:
        raise DicomSeriesError(
            f"GDCM cannot read {len(dropped)} file(s) of series {series_uid} in {folder} ({_listing(dropped)}; "
            "truncated or damaged?): replace or remove them."
        )
    reader.SetFileNames(names)
    try:
        image = reader.Execute()
    except RuntimeError as err:
        reason = itk_reason(err)[:200]
        raise DicomSeriesError(
            f"SimpleITK could not read series {series_uid} in {folder} ({reason}): replace or remove its broken files."
        ) from err
    pixel = sitk.sitkFloat32 if image.GetNumberOfComponentsPerPixel() == 1 else sitk.sitkVectorFloat32
    return sitk.Cast(image, pixel)


def _listing(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _check_slice_steps(folder: Path, datasets: list[pydicom.Dataset]) -> None:
    """Refuse a series whose slice positions along the normal are not evenly spaced (a gap or a duplicate)."""
    if len(datasets) < 3 or any(
        "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds for ds in datasets
    ):
        return
    positions = np.sort([_slice_position(ds) for ds in datasets])
    steps = np.diff(positions)
    median = float(np.median(steps))
    bad = np.flatnonzero(np.abs(steps - median) > _STEP_TOL * max(abs(median), 1e-6))
    if bad.size:
        i = int(bad[0])
        raise DicomSeriesError(
            f"DICOM series in {folder} is not evenly spaced: slices {i} and {i + 1} (of {len(positions)}) lie at "
            f"{positions[i]:.2f} and {positions[i + 1]:.2f} mm along the slice normal, a step of {steps[i]:.2f} mm "
            f"where the others are {median:.2f} mm (a missing or duplicate file?): complete the series, or remove it."
        )


def read_volume(path: str | os.PathLike) -> sitk.Image:
    """Read a DICOM series folder, or an NRRD / NIfTI / MetaImage file, as a SimpleITK image (checked in full)."""
    path = Path(path)
    if path.is_dir():
        return read_series(path)
    if not path.name.lower().endswith(VOLUME_EXTENSIONS):
        raise DataError(
            f"Cannot read {path}: unknown extension. Supported: a DICOM series folder, or a file ending in "
            f"{', '.join(VOLUME_EXTENSIONS)}."
        )
    reader = volume_information(path)
    if file_kind(path) == "NIfTI":
        return _nifti_to_sitk(path, reader)
    try:
        return reader.Execute()
    except RuntimeError as err:
        raise unreadable(path, itk_reason(err)) from err


def _nifti_to_sitk(path: Path, reader: sitk.ImageFileReader) -> sitk.Image:
    """The NIfTI voxels as nibabel reads them, on the grid (and in the pixel type) ITK reads from the header."""
    array = read_nifti_array(path)
    size, components = tuple(reader.GetSize()), reader.GetNumberOfComponents()
    if array.size != int(np.prod(size)) * components:
        raise unreadable(path, f"nibabel reads shape {array.shape}, ITK size {size} x {components} components")
    if components > 1:
        array = array.reshape(size + (components,), order="F").transpose(*reversed(range(len(size))), len(size))
    else:
        array = array.reshape(size, order="F").T
    image = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=components > 1)
    if image.GetPixelID() != reader.GetPixelID():
        image = sitk.Cast(image, reader.GetPixelID())
    image.SetOrigin(reader.GetOrigin())
    image.SetSpacing(reader.GetSpacing())
    image.SetDirection(reader.GetDirection())
    return image


@dataclass(frozen=True)
class SlicerSegment:
    """One segment described in a 3D Slicer `.seg.nrrd` header (Segment<i>_Name/_LabelValue/_Layer)."""

    index: int
    name: str
    layer: int
    label_value: int


def slicer_segments(image: sitk.Image) -> list[SlicerSegment]:
    """Return the 3D Slicer segments described in an image's NRRD header fields (empty if none)."""
    keys = set(image.GetMetaDataKeys())

    def field(i: int, name: str, default: str) -> str:
        key = f"Segment{i}_{name}"
        return image.GetMetaData(key).strip() if key in keys else default

    segments = []
    i = 0
    while f"Segment{i}_Name" in keys or f"Segment{i}_ID" in keys:
        name = field(i, "Name", field(i, "ID", f"Segment_{i}"))
        segments.append(SlicerSegment(i, name, int(field(i, "Layer", "0")), int(field(i, "LabelValue", "1"))))
        i += 1
    return segments


def segment_mask(image: sitk.Image, segment: SlicerSegment) -> np.ndarray:
    """Boolean (Z,Y,X) mask of one Slicer segment: voxels whose layer component equals its label value."""
    array = sitk.GetArrayViewFromImage(image)
    if image.GetNumberOfComponentsPerPixel() > 1:
        array = array[..., segment.layer]
    elif segment.layer != 0:
        raise ValueError(f"segment '{segment.name}' is on layer {segment.layer} but the image has one layer")
    return np.asarray(array == segment.label_value)


def vector_label_to_labelmap(label: sitk.Image) -> sitk.Image:
    """Turn a multi-component label (a layered Slicer `.seg.nrrd`) into one label map on the same grid.

    With Slicer segment fields in the header, voxels of segment i (0-based) get value i + 1; without them,
    component i is taken as one segment and its nonzero voxels get i + 1. Where segments overlap, the lowest
    index wins.
    """
    k = label.GetNumberOfComponentsPerPixel()
    if k == 1:
        return label
    array = sitk.GetArrayViewFromImage(label)
    segments = slicer_segments(label)
    masks = [segment_mask(label, s) for s in segments] if segments else [array[..., c] != 0 for c in range(k)]
    out = np.zeros(array.shape[:-1], dtype=np.uint8 if len(masks) < 255 else np.uint16)
    for i in reversed(range(len(masks))):
        out[masks[i]] = i + 1
    result = sitk.GetImageFromArray(out)
    result.CopyInformation(label)
    return result


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=_GRID_TOL, rtol=_GRID_TOL)
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=_GRID_TOL, rtol=_GRID_TOL)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=_GRID_TOL, rtol=_GRID_TOL)
    )


def _extent(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    size = image.GetSize()
    corners = np.array(np.meshgrid(*[(-0.5, s - 0.5) for s in size], indexing="ij")).reshape(len(size), -1).T
    points = np.array([image.TransformContinuousIndexToPhysicalPoint(c.tolist()) for c in corners])
    return points.min(axis=0), points.max(axis=0)


def label_on_image_grid(label: sitk.Image, image: sitk.Image, path_for_errors: str | os.PathLike) -> sitk.Image:
    """Return `label` on `image`'s voxel grid: unchanged if the grids match, else resampled (nearest neighbour).

    A multi-component label (3D Slicer `.seg.nrrd` with several layers) is first turned into one label map with
    `vector_label_to_labelmap`. Raises DataError naming `path_for_errors` if the label does not overlap the image.
    """
    label = vector_label_to_labelmap(label)
    if label.GetDimension() != image.GetDimension():
        raise DataError(
            f"The label {path_for_errors} is {label.GetDimension()}D but the image is {image.GetDimension()}D: "
            "save the label as one volume on its series' grid."
        )
    if _same_grid(label, image):
        return label
    (label_lo, label_hi), (image_lo, image_hi) = _extent(label), _extent(image)
    if not np.all(np.maximum(label_lo, image_lo) < np.minimum(label_hi, image_hi)):
        raise DataError(
            f"The label {path_for_errors} does not overlap its image in physical space (label spans "
            f"{label_lo.round(1).tolist()}..{label_hi.round(1).tolist()} mm, image spans "
            f"{image_lo.round(1).tolist()}..{image_hi.round(1).tolist()} mm). Check that the segmentation "
            "belongs to this series and that its header keeps the origin/direction."
        )
    return sitk.Resample(label, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, label.GetPixelID())


def _slice_position(ds: pydicom.Dataset) -> float:
    orientation = np.asarray(ds.ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    return float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=float)))


def sorted_source_datasets(folder: str | os.PathLike, series_uid: str | None = None) -> list[pydicom.Dataset]:
    """Headers of one series in `folder`, sorted by ImagePositionPatient along the slice normal (ascending)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DicomSeriesError(f"DICOM folder {folder} does not exist or is not a folder.")
    series = find_series(folder)
    if not series:
        raise DicomSeriesError(f"No DICOM files found in {folder}; pass the folder holding the source series.")
    if series_uid is None and len(series) > 1:
        raise DicomSeriesError(
            f"{folder} holds several series ({', '.join(series)}). Move each series into its own folder, or pass "
            "series_uid."
        )
    uid = series_uid or next(iter(series))
    if uid not in series:
        raise DicomSeriesError(f"Series {uid} is not in {folder}; the folder holds {sorted(series)}.")
    datasets = [_read_header(f) for f in series[uid]]
    missing = [f for f, ds in zip(series[uid], datasets, strict=True) if "ImagePositionPatient" not in ds]
    if missing:
        raise DicomSeriesError(f"{missing[0]} has no ImagePositionPatient; cannot order the slices of {folder}.")
    return sorted(datasets, key=_slice_position)


def write_seg(
    mask_volumes: Mapping[str, np.ndarray],
    source_folder: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    algorithm_name: str,
    algorithm_version: str,
    series_description: str,
    manufacturer: str = "meddiff",
    segment_codes: tuple[Code, Code] | Mapping[str, tuple[Code, Code]] | None = None,
    series_number: int = 900,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write a BINARY DICOM SEG (one segment per entry) referencing the series in `source_folder`; never overwrites.

    Each mask is (Z, Y, X) with Z in the order of `sorted_source_datasets(source_folder)`. `segment_codes` is a
    (category, type) pair for all segments, or a dict label -> pair; the default is `TISSUE_CODES`. A `provenance`
    record (`meddiff.provenance`) goes into the private element that synthetic series carry it in.
    """
    import highdicom as hd

    from meddiff import __version__

    output_path = check_new_output(output_path)
    if not mask_volumes:
        raise ValueError(f"write_seg for {output_path} got no masks: pass at least one label -> (Z,Y,X) array.")
    datasets = sorted_source_datasets(source_folder)
    expected = (len(datasets), int(datasets[0].Rows), int(datasets[0].Columns))
    masks = []
    for label, mask in mask_volumes.items():
        mask = np.asarray(mask)
        if mask.shape != expected:
            raise ValueError(
                f"mask '{label}' has shape {mask.shape} but the series in {source_folder} is {expected} (Z,Y,X)."
            )
        masks.append(mask != 0)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, family=codes.cid7162.ArtificialIntelligence, version=algorithm_version
    )
    descriptions = []
    for number, label in enumerate(mask_volumes, start=1):
        if isinstance(segment_codes, Mapping):
            category, prop = segment_codes.get(label, TISSUE_CODES)
        else:
            category, prop = segment_codes or TISSUE_CODES
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=label,
                segmented_property_category=category,
                segmented_property_type=prop,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
            )
        )
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=np.stack(masks, axis=-1),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name=algorithm_name,
        software_versions=f"meddiff {__version__}",
        device_serial_number="0",
        series_description=series_description,
    )
    if provenance is not None:
        _add_provenance(seg, provenance)
    return atomic_write(output_path, lambda tmp: pydicom.dcmwrite(tmp, seg, enforce_file_format=True), overwrite=False)


# ---------------------------------------------------------------- synthetic images as a DICOM series

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
_SYNTHETIC_SOP_CLASSES = {"CT": CT_IMAGE_STORAGE, "MR": MR_IMAGE_STORAGE}
_FLOAT_STORED_MAX = 4095  # float slices are stored as 0..4095 (12 bits)
# copied from the source series when present (Patient, Clinical Trial, General Study, Patient Study modules; the
# General Series and Frame of Reference attributes that describe the patient and the geometry, not the acquisition)
_COPIED = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "OtherPatientIDsSequence",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "ClinicalTrialSponsorName",
    "ClinicalTrialProtocolID",
    "ClinicalTrialProtocolName",
    "ClinicalTrialSiteID",
    "ClinicalTrialSiteName",
    "ClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID",
    "ClinicalTrialTimePointID",
    "ClinicalTrialTimePointDescription",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
    "EthnicGroup",
    "PatientComments",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "AdditionalPatientHistory",
    "SmokingStatus",
    "PregnancyStatus",
    "Laterality",
    "PatientPosition",
    "BodyPartExamined",
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
)
# Type 2 attributes of the modules above: written empty when the source lacks them
_EMPTY_IF_MISSING = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "PatientPosition",
    "PositionReferenceIndicator",
)
_GEOMETRY = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "SliceLocation")


def _text(value: object, limit: int) -> str:
    """A value for a DICOM short string (LO/SH): no backslash (the value separator), no control characters."""
    clean = "".join(c if c.isprintable() and c != "\\" else " " for c in str(value))
    return clean.strip()[:limit]


def _synthetic_pixels(
    slices: np.ndarray | Sequence[np.ndarray], value_range: tuple[float, float]
) -> tuple[np.ndarray, int]:
    """The stored uint16 pixels (N,Y,X) of the slices and the stored value their input range's top maps to."""
    array = np.stack([np.asarray(s) for s in slices]) if not isinstance(slices, np.ndarray) else slices
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ValueError(f"synthetic slices have shape {array.shape}: pass (N, Y, X) or (N, 1, Y, X) slices.")
    if array.dtype == np.uint8 or array.dtype == np.uint16:
        return array.astype(np.uint16), int(np.iinfo(array.dtype).max)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(
            f"synthetic slices are {array.dtype}: pass floats in value_range {tuple(value_range)}, or uint8/uint16."
        )
    if not np.all(np.isfinite(array)):
        raise ValueError("synthetic slices hold NaN or infinite values: they cannot be written as DICOM.")
    low, high = (float(v) for v in value_range)
    if not high > low:
        raise ValueError(f"value_range {tuple(value_range)} is empty: pass (low, high) with low < high.")
    scaled = np.clip((array.astype(np.float64) - low) / (high - low), 0.0, 1.0)
    return np.round(scaled * _FLOAT_STORED_MAX).astype(np.uint16), _FLOAT_STORED_MAX


def _dicom_now(when: dt.datetime, offset: str | None) -> tuple[str, str, str]:
    """(DA, TM, DT) of `when` in the source's timezone offset ("+HHMM"), or in UTC when it has none."""
    zone = dt.timezone.utc
    if offset and len(offset) == 5 and offset[0] in "+-" and offset[1:].isdigit():
        minutes = int(offset[1:3]) * 60 + int(offset[3:])
        zone = dt.timezone(dt.timedelta(minutes=minutes if offset[0] == "+" else -minutes))
    local = when.astimezone(zone)
    suffix = local.strftime("%z") or "+0000"
    return local.strftime("%Y%m%d"), local.strftime("%H%M%S"), local.strftime("%Y%m%d%H%M%S") + suffix


def _code_item(code: Code) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code.value, code.scheme_designator, code.meaning
    return item


def write_synthetic_series(
    slices: np.ndarray | Sequence[np.ndarray],
    source_folder: str | os.PathLike,
    output_folder: str | os.PathLike,
    *,
    provenance: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    slice_indices: Sequence[int] | None = None,
    value_range: tuple[float, float] = (-1.0, 1.0),
    output_range: tuple[float, float] | None = None,
    series_description: str | None = None,
    series_number: int = 901,
    source_series_uid: str | None = None,
) -> list[Path]:
    """Write generated slices as a new CT or MR series of the source's study, one file per slice; never overwrites.

    The images are marked synthetic (Synthetic Data YES, Image Type DERIVED\\SECONDARY, Derivation Description and
    Image Comments naming model, version, weights and seed, Contributing Equipment "meddiff", Burned In Annotation
    NO) and carry the whole provenance record in a private element (see `meddiff.provenance`). Each slice takes the
    geometry (position, orientation, spacing, frame of reference) of its source slice, and the patient and study of
    the source; the Series and SOP Instance UIDs are new. Acquisition attributes the generator did not use are
    written empty (MR: Scanning Sequence RM, research mode; Sequence Variant NONE).

    Args:
        slices: (N, Y, X) or (N, 1, Y, X) slices on the source grid: floats in `value_range` (clipped; stored as
            0..4095), or uint8 / uint16 (stored unchanged).
        source_folder: the folder of the source series (the series the masks were drawn on); CT or MR.
        output_folder: a new folder for the series (refused if it exists); files ``IM0001.dcm``... in ascending
            slice position, written in a staging folder beside it that is renamed into place when complete.
        provenance: one record (`meddiff.provenance.make_provenance`) for every slice, or one per slice.
        slice_indices: for each slice, its source slice (index into `sorted_source_datasets`); default: all source
            slices in order (N must then equal the source's slice count).
        value_range: (low, high) of float slices.
        output_range: CT only, required there: the Hounsfield units the ends of the input range stand for (the
            model's HU window; for uint8/uint16 slices the ends are 0 and the dtype's maximum). Written as Rescale
            Slope/Intercept. MR images carry no rescale: leave it None.
        series_description: default ``SYNTHETIC <model> <version>``.
        series_number: the new series' number.
        source_series_uid: the source series, when `source_folder` holds several.
    """
    from meddiff import __version__
    from meddiff.io import OutputExistsError, make_staging_dir
    from meddiff.provenance import (
        check_provenance,
        provenance_summary,
    )

    output_folder = Path(output_folder)
    if output_folder.exists():
        raise OutputExistsError(
            f"output folder {output_folder} already exists: write the synthetic series into a new folder (choose "
            "another one, or move this one away)."
        )
    datasets = sorted_source_datasets(source_folder, source_series_uid)
    modality = str(datasets[0].get("Modality", ""))
    if modality not in _SYNTHETIC_SOP_CLASSES:
        raise DicomSeriesError(
            f"the source series in {source_folder} has modality '{modality}'; synthetic series are written as CT or "
            "MR images: pass the CT or MR series the masks were drawn on."
        )
    if modality == "CT" and output_range is None:
        raise ValueError(
            "synthetic CT needs output_range=(low, high): the Hounsfield units the ends of the input range stand for "
            "(the model's HU window)."
        )
    if modality == "MR" and output_range is not None:
        raise ValueError("synthetic MR images carry no rescale: leave output_range None.")
    pixels, stored_max = _synthetic_pixels(slices, value_range)
    count = len(pixels)
    indices = list(range(len(datasets))) if slice_indices is None else [int(i) for i in slice_indices]
    if len(indices) != count:
        raise ValueError(
            f"{count} synthetic slices for {len(indices)} source slices of {source_folder}: pass one slice per source "
            "slice, or slice_indices naming the source slice of each."
        )
    if any(not 0 <= i < len(datasets) for i in indices) or len(set(indices)) != count:
        raise ValueError(
            f"slice_indices {indices} must be distinct indices into the {len(datasets)} slices of {source_folder} "
            "(write several samples of one slice as separate series)."
        )
    for k, i in enumerate(indices):
        expected = (int(datasets[i].Rows), int(datasets[i].Columns))
        if pixels.shape[1:] != expected:
            raise ValueError(
                f"synthetic slice {k} is {pixels.shape[1:]} but its source slice in {source_folder} is {expected} "
                "(rows, columns): resample the slices to the source grid first."
            )
    records = [provenance] * count if isinstance(provenance, Mapping) else list(provenance)
    if len(records) != count:
        raise ValueError(f"{len(records)} provenance records for {count} slices: pass one record, or one per slice.")
    records = [check_provenance(r, f"provenance of synthetic slice {k}") for k, r in enumerate(records)]

    if output_range is not None:
        slope = (float(output_range[1]) - float(output_range[0])) / stored_max
        intercept = float(output_range[0])
    else:
        slope, intercept = 1.0, 0.0
    if stored_max == _FLOAT_STORED_MAX or pixels.size == 0:
        window = (intercept, intercept + slope * stored_max)
    else:  # integer slices: the window spans the data
        window = (intercept + slope * float(pixels.min()), intercept + slope * float(pixels.max()))
    width = max(window[1] - window[0], 1.0)
    first = records[0]
    offset = str(datasets[0].get("TimezoneOffsetFromUTC", "")) or None
    now = _dicom_now(dt.datetime.now(dt.timezone.utc), offset)
    series_uid = pydicom.uid.generate_uid()
    description = series_description or f"SYNTHETIC {first['model']} {first['model_version']}"
    order = sorted(range(count), key=lambda k: indices[k])  # instance numbers follow slice position
    width_digits = max(4, len(str(count)))
    names = [f"IM{n + 1:0{width_digits}d}.dcm" for n in range(count)]

    def dataset(number: int, k: int) -> pydicom.Dataset:
        source, record = datasets[indices[k]], records[k]
        created = dt.datetime.fromisoformat(record["created_utc"].replace("Z", "+00:00"))
        content = _dicom_now(created, offset)
        summary = provenance_summary(record)
        ds = pydicom.Dataset()
        for keyword in _COPIED:
            if keyword in source:
                ds[keyword] = copy.deepcopy(source[keyword])
            elif keyword in _EMPTY_IF_MISSING:
                setattr(ds, keyword, "")
        if offset:
            ds.TimezoneOffsetFromUTC = offset
        ds.SOPClassUID = _SYNTHETIC_SOP_CLASSES[modality]
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.InstanceCreationDate, ds.InstanceCreationTime = now[0], now[1]
        ds.SyntheticData = "YES"
        equipment = pydicom.Dataset()
        equipment.PurposeOfReferenceCodeSequence = [_code_item(codes.DCM.ProcessingEquipment)]
        equipment.Manufacturer = "meddiff"
        equipment.ManufacturerModelName = _text(record["model"], 64)
        equipment.SoftwareVersions = [
            _text(f"meddiff {__version__}", 64),
            _text(f"{record['model']} {record['model_version']}", 64),
        ]
        equipment.ContributionDateTime = content[2]
        equipment.ContributionDescription = summary[:1024]
        ds.ContributingEquipmentSequence = [equipment]
        # General Series, General Equipment
        ds.Modality = modality
        ds.SeriesInstanceUID, ds.SeriesNumber = series_uid, int(series_number)
        ds.SeriesDate, ds.SeriesTime = now[0], now[1]
        ds.SeriesDescription = _text(description, 64)
        ds.Manufacturer = "meddiff"
        ds.ManufacturerModelName = _text(record["model"], 64)
        ds.SoftwareVersions = list(equipment.SoftwareVersions)
        # General Image, Image Plane
        ds.InstanceNumber = number
        ds.ContentDate, ds.ContentTime = content[0], content[1]
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL" if modality == "CT" else "OTHER"]
        ds.DerivationDescription = summary[:1024]
        ds.ImageComments = summary
        ds.BurnedInAnnotation = "NO"
        for keyword in (*_GEOMETRY, "ImageLaterality"):
            if keyword in source:
                ds[keyword] = copy.deepcopy(source[keyword])
        if not {"Laterality", "ImageLaterality", "BodyPartExamined"} & set(source.dir()):
            ds.Laterality = ""  # unknown; the source names no body part that would tell whether it is paired
        if modality == "MR" and "SpacingBetweenSlices" in source:
            ds.SpacingBetweenSlices = source.SpacingBetweenSlices
        # Image Pixel, VOI LUT
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = pixels.shape[1:]
        ds.BitsAllocated = 16
        ds.BitsStored = 12 if stored_max == _FLOAT_STORED_MAX else 16
        ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, 0
        ds.WindowCenter = f"{(window[0] + window[1]) / 2:.6g}"
        ds.WindowWidth = f"{width:.6g}"
        ds.WindowCenterWidthExplanation = "FULL RANGE"
        # CT Image / MR Image: what the generator did not use is empty
        if modality == "CT":
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = f"{intercept:.8g}", f"{slope:.8g}", "HU"
            ds.KVP, ds.AcquisitionNumber = "", ""
        else:
            ds.ScanningSequence, ds.SequenceVariant = "RM", "NONE"
            ds.ScanOptions, ds.MRAcquisitionType = "", ""
            ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = "", "", ""
        ds.PixelData = pixels[k].astype("<u2").tobytes()
        _add_provenance(ds, record)
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
        return ds

    output_folder.parent.mkdir(parents=True, exist_ok=True)
    staging = make_staging_dir(output_folder.parent, "meddiff-dicom")
    try:
        for number, k in enumerate(order, start=1):
            pydicom.dcmwrite(staging / names[number - 1], dataset(number, k), enforce_file_format=True)
        if output_folder.exists():  # made while we wrote
            raise OutputExistsError(
                f"output folder {output_folder} was created while the synthetic series was written: choose another "
                "folder, or move it away."
            )
        os.rename(staging, output_folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [output_folder / name for name in names]


def _add_provenance(ds: pydicom.Dataset, record: Mapping[str, Any]) -> None:
    """Put the whole provenance record into the private element `meddiff.provenance` reads it from."""
    from meddiff.provenance import (
        DICOM_PRIVATE_CREATOR,
        DICOM_PRIVATE_ELEMENT,
        DICOM_PRIVATE_GROUP,
        check_provenance,
        provenance_json,
    )

    block = ds.private_block(DICOM_PRIVATE_GROUP, DICOM_PRIVATE_CREATOR, create=True)
    block.add_new(DICOM_PRIVATE_ELEMENT, "UT", provenance_json(check_provenance(dict(record))))


def write_like(
    array: np.ndarray,
    reference: sitk.Image,
    path: str | os.PathLike,
    overwrite: bool = False,
    *,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write a (Z,Y,X) array as NIfTI/NRRD/MHA (by extension) with `reference`'s geometry, atomically.

    A `provenance` record (`meddiff.provenance.make_provenance`) goes into the file: a NIfTI header extension, or an
    NRRD/MetaImage header field (see `meddiff.provenance`).
    """
    path = Path(path)
    if not path.name.lower().endswith(WRITE_EXTENSIONS):
        raise ValueError(f"Cannot write {path}: use one of {', '.join(WRITE_EXTENSIONS)}.")
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    expected = tuple(reversed(reference.GetSize()))
    if array.shape != expected:
        raise ValueError(f"array for {path} has shape {array.shape}, the reference image is {expected} (Z,Y,X).")
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    if provenance is None:
        return atomic_write(path, lambda tmp: sitk.WriteImage(image, tmp, True), overwrite)
    from meddiff.provenance import ITK_KEY, embed_nifti_provenance, provenance_json

    text = provenance_json(provenance)
    if path.name.lower().endswith((".nii", ".nii.gz")):

        def write(tmp: str) -> None:
            sitk.WriteImage(image, tmp, True)
            embed_nifti_provenance(tmp, provenance)

        return atomic_write(path, write, overwrite)
    image.SetMetaData(ITK_KEY, text)
    return atomic_write(path, lambda tmp: sitk.WriteImage(image, tmp, True), overwrite)
