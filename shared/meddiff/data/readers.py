"""Read data files safely: every failure to read a file the user gave becomes one `DataError` naming the file.

Rules:
- a folder entry that is a dangling symlink or a symlink loop is refused, never skipped;
- a zero-byte file, a file that cannot be opened, or a file whose content is not what its suffix says is refused
  with ``<path> is not a readable <KIND> file (<reason>): replace or remove it.``;
- a volume header is checked before any voxel is allocated: more than `MAX_VOXELS` voxels is refused outright, an
  uncompressed file must hold at least the bytes its header declares, and a gzip/zlib-compressed one may declare at
  most `MAX_DEFLATE_RATIO` times its compressed size (deflate cannot compress more than about 1032:1, so a larger
  claim means a corrupt or truncated file);
- images are decoded in full (a truncated PNG/JPEG is refused); PIL's decompression-bomb error is refused the same
  way;
- NIfTI voxels are read with nibabel, which keeps NaN and refuses truncated data (ITK turns NaN into 0 and fills a
  truncated file with zeros).
"""

from __future__ import annotations

import errno
import os
import re
import struct
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from meddiff.data.errors import DataError

__all__ = [
    "read_mask_channel",
    "MAX_DEFLATE_RATIO",
    "MAX_VOXELS",
    "check_declared_size",
    "check_file",
    "file_kind",
    "files_by_stem",
    "folder_entries",
    "listing",
    "stem",
    "itk_reason",
    "read_image",
    "read_nifti_array",
    "unreadable",
    "volume_information",
]

MAX_VOXELS = 2**31
MAX_DEFLATE_RATIO = 1100
_KINDS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".nii.gz": "NIfTI",
    ".nii": "NIfTI",
    ".nrrd": "NRRD",
    ".nhdr": "NRRD",
    ".mha": "MetaImage",
    ".mhd": "MetaImage",
    ".dcm": "DICOM",
}
# What the decoders raise on a bad file; MemoryError and KeyboardInterrupt are deliberately not here.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    EOFError,
    ValueError,
    RuntimeError,
    SyntaxError,
    TypeError,
    IndexError,
    KeyError,
    struct.error,
    zlib.error,
)


def file_kind(path: str | os.PathLike) -> str:
    """The file format its suffix promises ("PNG", "NIfTI", ...); "DICOM" for other names."""
    name = Path(path).name.lower()
    return next((kind for suffix, kind in _KINDS.items() if name.endswith(suffix)), "DICOM")


def unreadable(path: str | os.PathLike, reason: object, kind: str | None = None) -> DataError:
    """The error for a file that cannot be read: ``<path> is not a readable <KIND> file (<reason>): ...``."""
    reason = " ".join(str(reason).split()) or type(reason).__name__
    if len(reason) > 200:
        reason = reason[:197] + "..."
    return DataError(f"{path} is not a readable {kind or file_kind(path)} file ({reason}): replace or remove it.")


def _broken_link(path: Path) -> DataError | None:
    if not path.is_symlink():
        return None
    try:
        path.stat()
    except OSError as err:
        target = os.readlink(path)
        if err.errno == errno.ELOOP:
            return DataError(f"{path} is a symlink loop (-> {target}): replace the link with the file, or remove it.")
        return DataError(f"{path} is a dangling symlink (-> {target} does not exist): fix the link, or remove it.")
    return None


def check_file(path: str | os.PathLike, kind: str | None = None) -> Path:
    """Refuse a path that is missing, a broken symlink, not a regular file, empty, or cannot be opened."""
    path = Path(path)
    broken = _broken_link(path)
    if broken is not None:
        raise broken
    if not path.exists():
        raise DataError(f"{path} does not exist: add the file, or fix the path that names it.")
    if not path.is_file():
        raise unreadable(path, "not a regular file", kind)
    if path.stat().st_size == 0:
        raise unreadable(path, "empty file, 0 bytes", kind)
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as err:
        raise unreadable(path, err.strerror or err, kind) from err
    return path


def folder_entries(folder: str | os.PathLike, suffixes: tuple[str, ...] | None = None) -> list[Path]:
    """The entries of `folder`, sorted, refusing broken symlinks (among names ending with `suffixes`, if given)."""
    entries = sorted(Path(folder).iterdir())
    for entry in entries:
        if suffixes is None or entry.name.lower().endswith(suffixes):
            broken = _broken_link(entry)
            if broken is not None:
                raise broken
    return entries


def read_image(path: str | os.PathLike):  # -> PIL.Image.Image
    """Open a PNG/JPEG/TIFF file and decode it in full (a truncated or mislabelled file is refused)."""
    from PIL import Image

    path = check_file(path)
    try:
        with Image.open(path) as im:
            im.load()
        return im
    except DataError:
        raise
    except Image.DecompressionBombError as err:
        raise unreadable(path, f"too many pixels: {err}") from err
    except _DECODE_ERRORS as err:
        raise unreadable(path, err) from err


def read_mask_channel(path: str | os.PathLike, fix: str) -> tuple[np.ndarray, str]:
    """A mask file's one channel (H,W) and PIL mode; colour masks need equal channels (alpha is ignored).

    Args:
        path: the mask file.
        fix: what to do instead, ending the error raised for a colour mask whose channels differ.
    """
    im = read_image(path)
    array = np.asarray(im)
    if array.ndim == 3:
        if im.mode.endswith("A"):
            array = array[..., :-1]
        if not (array == array[..., :1]).all():
            raise DataError(f"mask {path} is a colour image whose channels differ: {fix}")
        array = array[..., 0]
    return array, im.mode


def check_declared_size(
    path: str | os.PathLike,
    shape: tuple[int, ...],
    itemsize: int,
    data_file: str | os.PathLike | None = None,
    compression: str | None = None,
    offset: int = 0,
) -> None:
    """Refuse a header that declares more voxels than `MAX_VOXELS` or more data than `data_file` can hold.

    `compression` is None (raw: the file holds at least `offset` + the declared bytes), "deflate" (gzip/zlib: at most
    `MAX_DEFLATE_RATIO` declared bytes per file byte) or "other" (only the voxel cap is checked).
    """
    voxels = int(np.prod([int(s) for s in shape], dtype=object)) if shape else 1
    size = "x".join(str(int(s)) for s in shape)
    if voxels > MAX_VOXELS:
        raise DataError(
            f"{path} declares {size} = {voxels} voxels, more than the {MAX_VOXELS} this reader accepts (a corrupt "
            "header, or a volume to crop or downsample first): replace or remove it."
        )
    declared = voxels * itemsize
    data_file = Path(data_file or path)
    actual = data_file.stat().st_size if data_file.is_file() else None
    if actual is None:
        raise DataError(f"{path} names the data file {data_file}, which does not exist: add it, or replace {path}.")
    if compression is None and actual < offset + declared:
        raise unreadable(
            path, f"header declares {size} voxels = {offset + declared} bytes, the file holds {actual}: truncated"
        )
    if compression == "deflate" and declared > MAX_DEFLATE_RATIO * actual:
        raise unreadable(
            path,
            f"header declares {size} voxels = {declared} bytes, more than {MAX_DEFLATE_RATIO} times the "
            f"{actual} compressed bytes: corrupt header or truncated file",
        )


def _nifti_image(path: Path):  # -> nibabel image
    import nibabel as nib

    try:
        image = nib.load(path)
        header = image.header
        shape = tuple(int(s) for s in header.get_data_shape())
        itemsize = header.get_data_dtype().itemsize
        offset = int(header["vox_offset"]) if "vox_offset" in header else 0
    except DataError:
        raise
    except (*_DECODE_ERRORS, nib.filebasedimages.ImageFileError, nib.spatialimages.HeaderDataError) as err:
        raise unreadable(path, err, "NIfTI") from err
    compressed = path.name.lower().endswith(".gz")
    check_declared_size(path, shape, itemsize, compression="deflate" if compressed else None, offset=offset)
    return image


def read_nifti_array(path: str | os.PathLike) -> np.ndarray:
    """The voxel array of a NIfTI file as nibabel indexes it (x, y, z, ...), scaling applied, after header checks."""
    import nibabel as nib

    path = check_file(path, "NIfTI")
    image = _nifti_image(path)
    try:
        return np.asarray(image.dataobj)
    except (*_DECODE_ERRORS, nib.filebasedimages.ImageFileError) as err:
        raise unreadable(path, err, "NIfTI") from err


def _text_header(path: Path, stop: str | None) -> tuple[dict[str, str], int]:
    """`key: value` / `key = value` lines at the start of an NRRD or MetaImage file (lower-case keys), and where
    the header ends (a blank line, or the line starting with `stop`)."""
    fields: dict[str, str] = {}
    with open(path, "rb") as f:
        for _ in range(1000):
            raw = f.readline(10000)
            if not raw.strip():
                break
            line = raw.decode("latin-1").strip()
            for sep in (":=", ":", "="):
                if sep in line:
                    key, value = line.split(sep, 1)
                    fields[key.strip().lower()] = value.strip()
                    break
            if stop and line.lower().startswith(stop):
                break
        return fields, f.tell()


def _declared_data(path: Path, kind: str) -> tuple[Path | None, str | None]:
    """Where the voxel data of an NRRD/MetaImage file lies, and how it is compressed (None: raw)."""
    if kind == "NRRD":
        fields, _ = _text_header(path, None)
        name = fields.get("data file") or fields.get("datafile")
        encoding = fields.get("encoding", "raw").lower()
        compression = None if encoding == "raw" else "deflate" if encoding in ("gzip", "gz") else "other"
    else:
        fields, end = _text_header(path, "elementdatafile")
        name = fields.get("elementdatafile")
        name = None if name is None or name.upper() == "LOCAL" else name
        compression = "deflate" if fields.get("compresseddata", "false").lower() == "true" else None
        stated = fields.get("compresseddatasize", "")
        data_bytes = (path.parent / name).stat().st_size if name and (path.parent / name).is_file() else None
        data_bytes = path.stat().st_size - end if name is None else data_bytes
        if compression and stated.isdigit() and data_bytes is not None and data_bytes < int(stated):
            raise unreadable(path, f"CompressedDataSize is {stated} bytes, the file holds {data_bytes}: truncated")
    if name is not None and (" " in name or "%" in name or name.upper().startswith("LIST")):
        return None, "other"  # a list of slice files: only the voxel cap is checked
    return (path.parent / name if name else path), compression


def _component_bytes(pixel_id: int) -> int:
    """Bytes of one pixel component of a SimpleITK pixel type ("vector of 16-bit signed integer" -> 2)."""
    import SimpleITK as sitk

    name = sitk.GetPixelIDValueAsString(pixel_id)
    bits = re.search(r"(\d+)-bit", name)
    return (int(bits.group(1)) // 8 if bits else 8) * (2 if "complex" in name else 1)


def itk_reason(err: RuntimeError) -> str:
    """The useful part of a SimpleITK exception: the text after ``ITK ERROR: <class>(<address>):``."""
    text = " ".join(str(err).split())
    return re.split(r"ITK ERROR: \w+\(0x[0-9a-f]+\): ", text)[-1]


def volume_information(path: str | os.PathLike):  # -> sitk.ImageFileReader
    """A SimpleITK reader of `path` with its header read and checked (size, declared bytes); no voxels read yet."""
    import SimpleITK as sitk

    path = check_file(path)
    kind = file_kind(path)
    if kind == "NIfTI":
        _nifti_image(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise unreadable(path, itk_reason(err), kind) from err
    if kind in ("NRRD", "MetaImage"):
        data_file, compression = _declared_data(path, kind)
        components = reader.GetNumberOfComponents()
        shape = tuple(reader.GetSize()) + ((components,) if components > 1 else ())
        check_declared_size(path, shape, _component_bytes(reader.GetPixelID()), data_file, compression)
    return reader


def stem(path: str | os.PathLike) -> str:
    """The file name without its last suffix (``a.tif`` -> ``a``, ``b.nii.gz`` -> ``b.nii``)."""
    path = Path(path)
    return path.name[: -len(path.suffix)] if path.suffix else path.name


def files_by_stem(paths: Iterable[Path], what: str = "image") -> dict[str, Path]:
    """`paths` by `stem`; two files with one stem are a `DataError` naming both."""
    files: dict[str, Path] = {}
    for path in paths:
        key = stem(path)
        if key in files:
            raise DataError(
                f"{files[key]} and {path} have the same name: keep one file per {what} (remove or rename one)."
            )
        files[key] = path
    return files


def listing(names: Sequence[str], shown: int = 3) -> str:
    """The first `shown` names, comma-separated, and how many more there are: for one-line error messages."""
    text = ", ".join(str(n) for n in names[:shown])
    return text + (f" (+{len(names) - shown} more)" if len(names) > shown else "")
