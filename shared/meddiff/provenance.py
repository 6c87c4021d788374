"""Provenance of synthetic images: which model, weights, settings and seed made a file, kept inside the file.

The record is a flat JSON object (`make_provenance` builds it, `check_provenance` checks one):

- ``format`` = ``"meddiff-provenance"``, ``format_version`` = 1, ``synthetic`` = true;
- ``model`` and ``model_version``: the bundle (or model) name and its version;
- ``weights`` (the weights file's name, no folder) and ``weights_sha256`` (its SHA-256, lower-case hex), both null
  when no weights file was used; `weights_sha256` reads a file once per (path, mtime, size);
- ``settings``: the run's settings as plain JSON (numpy scalars and arrays, tensors and paths turned into numbers,
  lists and strings; tuples become lists; NaN and infinity are refused);
- ``seed`` (an integer, or null), ``meddiff_version``, ``created_utc`` (``YYYY-MM-DDTHH:MM:SSZ``).

A record is JSON-stable: ``json.loads(provenance_json(r)) == r``, and `provenance_json` is canonical (sorted keys,
no spaces, ASCII only), so the same record always gives the same bytes.

Where the record lives (`read_provenance` reads all of them back, None when a file carries none):

- PNG: an iTXt chunk with keyword ``meddiff:provenance`` (`PNG_KEY`) holding `provenance_json`, written by
  ``meddiff.io.save_png(..., provenance=record)``;
- NIfTI (``.nii``, ``.nii.gz``, NIfTI-1 and NIfTI-2): a header extension with code 6 (``NIFTI_ECODE_COMMENT``, plain
  ASCII text) holding `provenance_json`, padded with NUL bytes to a multiple of 16. SimpleITK writes no extensions,
  so `embed_nifti_provenance` adds it to the file SimpleITK wrote, byte for byte: the header is kept except
  ``vox_offset`` and the extension flag, the voxel bytes are copied unchanged, other extensions are kept (an older
  meddiff record is replaced). No sidecar file is written: a record in the file cannot be separated from it;
- NRRD and MetaImage (``.nrrd``, ``.mha``): a header field ``meddiff_provenance`` (`ITK_KEY`);
  ``meddiff.dicom.write_like(..., provenance=record)`` writes all three volume formats;
- DICOM: ``meddiff.dicom.write_synthetic_series`` puts the key fields into standard attributes (Synthetic Data YES,
  Manufacturer's Model Name, Software Versions, Derivation Description, Image Comments, Contributing Equipment
  Sequence) and the whole record into the private element (0011,xx01) UT of the private block
  ``MEDDIFF PROVENANCE`` (`DICOM_PRIVATE_CREATOR`); de-identification that strips private elements drops the
  record but keeps the standard attributes.
"""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import json
import os
import shutil
import struct
import threading
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

from meddiff.data.readers import check_file, unreadable
from meddiff.errors import UserError
from meddiff.io import atomic_write

__all__ = [
    "DICOM_PRIVATE_CREATOR",
    "DICOM_PRIVATE_GROUP",
    "ITK_KEY",
    "NIFTI_ECODE",
    "PNG_KEY",
    "check_provenance",
    "embed_nifti_provenance",
    "make_provenance",
    "provenance_json",
    "provenance_summary",
    "read_provenance",
    "weights_sha256",
]

FORMAT = "meddiff-provenance"
FORMAT_VERSION = 1
PNG_KEY = "meddiff:provenance"
ITK_KEY = "meddiff_provenance"
NIFTI_ECODE = 6  # NIFTI_ECODE_COMMENT: plain ASCII text
DICOM_PRIVATE_GROUP = 0x0011
DICOM_PRIVATE_CREATOR = "MEDDIFF PROVENANCE"
DICOM_PRIVATE_ELEMENT = 0x01

_FIELDS: dict[str, tuple[type, ...]] = {
    "format": (str,),
    "format_version": (int,),
    "synthetic": (bool,),
    "model": (str,),
    "model_version": (str,),
    "weights": (str, type(None)),
    "weights_sha256": (str, type(None)),
    "settings": (dict,),
    "seed": (int, type(None)),
    "meddiff_version": (str,),
    "created_utc": (str,),
}
_CHUNK = 1 << 20
_sha_cache: dict[tuple[str, int, int], str] = {}
_sha_lock = threading.Lock()


# ---------------------------------------------------------------- the record


def weights_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a weights file, read once per (real path, mtime, size) in this process."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"weights file {path} does not exist (or is not a file): pass the weights the images were made with."
        )
    real = os.path.realpath(path)
    stat = os.stat(real)
    key = (real, stat.st_mtime_ns, stat.st_size)
    with _sha_lock:
        cached = _sha_cache.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    with open(real, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    value = digest.hexdigest()
    with _sha_lock:
        _sha_cache[key] = value
    return value


def _plain(value: Any) -> Any:
    """JSON's `default`: numpy scalars/arrays and tensors as numbers and lists, paths as strings."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist"):  # numpy arrays and scalars, torch tensors
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON")


def _normalized_settings(settings: Mapping[str, Any]) -> dict:
    if not isinstance(settings, Mapping):
        raise ValueError(f"provenance settings must be a mapping of name -> value, got {type(settings).__name__}.")
    out = {}
    for name, value in settings.items():
        try:
            out[str(name)] = json.loads(json.dumps(value, default=_plain, allow_nan=False))
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"provenance setting '{name}' = {value!r:.80} cannot be stored as JSON ({err}): pass numbers, strings, "
                "lists or dicts (NaN and infinity are refused)."
            ) from err
    return out


def _seed(seed: Any) -> int | None:
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) and not hasattr(seed, "__index__"):
        raise ValueError(f"provenance seed must be an integer or None, got {seed!r}.")
    return int(seed.__index__())


def make_provenance(
    model: str,
    model_version: str,
    *,
    weights: str | os.PathLike | None = None,
    settings: Mapping[str, Any] | None = None,
    seed: int | None = None,
    created: dt.datetime | None = None,
) -> dict:
    """The provenance record of files made by `model` `model_version` with `weights`, `settings` and `seed`.

    `created` (timezone-aware) defaults to now; it is stored in UTC to the second.
    """
    from meddiff import __version__

    for name, value in (("model", model), ("model_version", model_version)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"provenance {name} must be a non-empty string, got {value!r}.")
    when = created or dt.datetime.now(dt.timezone.utc)
    if when.tzinfo is None:
        raise ValueError("provenance `created` must be timezone-aware (e.g. datetime.now(timezone.utc)).")
    stamp = when.astimezone(dt.timezone.utc).replace(microsecond=0, tzinfo=None).isoformat() + "Z"
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "synthetic": True,
        "model": model.strip(),
        "model_version": model_version.strip(),
        "weights": Path(weights).name if weights is not None else None,
        "weights_sha256": weights_sha256(weights) if weights is not None else None,
        "settings": _normalized_settings(settings or {}),
        "seed": _seed(seed),
        "meddiff_version": __version__,
        "created_utc": stamp,
    }


def check_provenance(record: Mapping[str, Any], where: str = "provenance record") -> dict:
    """Return `record` as a dict after checking it is a meddiff provenance record (every field, its type)."""
    if not isinstance(record, Mapping) or record.get("format") != FORMAT:
        raise ValueError(
            f'{where} is not a meddiff provenance record (no "format": "{FORMAT}"): build it with '
            "meddiff.provenance.make_provenance."
        )
    missing = [k for k in _FIELDS if k not in record]
    wrong = [
        k
        for k, types in _FIELDS.items()
        if k in record and (not isinstance(record[k], types) or (bool not in types and isinstance(record[k], bool)))
    ]
    if missing or wrong:
        raise ValueError(
            f"{where} is incomplete (missing {missing or 'nothing'}; wrong type: {wrong or 'none'}): build it with "
            "meddiff.provenance.make_provenance."
        )
    return dict(record)


def provenance_json(record: Mapping[str, Any]) -> str:
    """The canonical JSON text of a record: sorted keys, no spaces, ASCII only, one line."""
    return json.dumps(
        check_provenance(record), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def provenance_summary(record: Mapping[str, Any]) -> str:
    """One human-readable sentence naming the model, its version, the weights and the seed."""
    record = check_provenance(record)
    weights = (
        f"weights {record['weights']} (sha256 {record['weights_sha256']})" if record["weights"] else "no weights file"
    )
    seed = f"seed {record['seed']}" if record["seed"] is not None else "no seed"
    return (
        f"SYNTHETIC image generated by meddiff {record['meddiff_version']}: model {record['model']} version "
        f"{record['model_version']}, {weights}, {seed}, created {record['created_utc']}"
    )


def _parse(text: str | bytes) -> dict | None:
    """The record in `text` (JSON, trailing NUL padding allowed), or None when it is not one."""
    if isinstance(text, bytes):
        text = text.rstrip(b"\0 ").decode("utf-8", errors="replace")
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) and value.get("format") == FORMAT else None


# ---------------------------------------------------------------- NIfTI header extensions


_NIFTI_LAYOUTS = {348: ("f", 108, b"n+1\0"), 540: ("q", 168, b"n+2\0")}  # header size: vox_offset type/place, magic


def _nifti_open(path: Path) -> tuple[BinaryIO, bool]:
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    return (gzip.open(path, "rb") if gzipped else open(path, "rb")), gzipped


def _nifti_header(f: BinaryIO, path: Path) -> tuple[bytearray, str, str, int]:
    """The header bytes, byte order, vox_offset type, and vox_offset of an open single-file NIfTI."""
    start = f.read(4)
    if len(start) < 4:
        raise unreadable(path, "shorter than a NIfTI header", "NIfTI")
    for order in "<>":
        size = struct.unpack(order + "i", start)[0]
        if size in _NIFTI_LAYOUTS:
            break
    else:
        raise unreadable(path, "no NIfTI-1 or NIfTI-2 header size", "NIfTI")
    kind, at, magic = _NIFTI_LAYOUTS[size]
    header = bytearray(start + f.read(size - 4))
    if len(header) < size:
        raise unreadable(path, "truncated header", "NIfTI")
    if size == 348 and bytes(header[344:348]) != magic or size == 540 and bytes(header[4:8]) != magic:
        raise unreadable(path, "not a single-file NIfTI (.nii) header; header/image pairs are not supported", "NIfTI")
    offset = int(struct.unpack_from(order + kind, header, at)[0])
    return header, order, kind, offset


def _nifti_extensions(f: BinaryIO, header_size: int, order: str, offset: int) -> list[tuple[int, bytes]]:
    """The (code, content) header extensions between the header and the voxels (the stream is left at the voxels)."""
    flag = f.read(4)
    extensions, position = [], header_size + 4
    if len(flag) == 4 and flag[0] != 0:
        while position + 8 <= offset:
            head = f.read(8)
            if len(head) < 8:
                break
            size, code = struct.unpack(order + "ii", head)
            if size < 16 or size % 16 or position + size > offset:
                break  # damaged list: stop, as readers do
            extensions.append((code, f.read(size - 8)))
            position += size
    f.read(max(offset - position, 0))  # padding up to the voxels
    return extensions


def _is_record(code: int, content: bytes) -> bool:
    return code == NIFTI_ECODE and _parse(content) is not None


def embed_nifti_provenance(path: str | os.PathLike, record: Mapping[str, Any]) -> Path:
    """Add `record` as a header extension to the NIfTI file at `path` (rewritten atomically; voxels unchanged)."""
    path = Path(path)
    text = provenance_json(record).encode("ascii")
    check_file(path, "NIfTI")
    source, gzipped = _nifti_open(path)
    with source:
        header, order, kind, offset = _nifti_header(source, path)
        found = _nifti_extensions(source, len(header), order, offset)
        kept = [(code, data) for code, data in found if not _is_record(code, data)]
        blocks = [(c, data + b"\0" * (-(len(data) + 8) % 16)) for c, data in [*kept, (NIFTI_ECODE, text)]]
        voxels = len(header) + 4 + sum(8 + len(data) for _, data in blocks)
        struct.pack_into(order + kind, header, _NIFTI_LAYOUTS[len(header)][1], voxels)

        def write(tmp: str) -> None:
            with gzip.open(tmp, "wb", compresslevel=6) if gzipped else open(tmp, "wb") as out:
                out.write(header)
                out.write(b"\x01\0\0\0")
                for code, data in blocks:
                    out.write(struct.pack(order + "ii", 8 + len(data), code))
                    out.write(data)
                shutil.copyfileobj(source, out, _CHUNK)

        return atomic_write(path, write, overwrite=True)


def _nifti_provenance(path: Path) -> dict | None:
    source, _ = _nifti_open(path)
    with source:
        header, order, _, offset = _nifti_header(source, path)
        for code, content in _nifti_extensions(source, len(header), order, offset):
            if code == NIFTI_ECODE and (record := _parse(content)) is not None:
                return record
    return None


# ---------------------------------------------------------------- reading back


def _png_provenance(path: Path) -> dict | None:
    from PIL import Image

    try:
        with Image.open(path) as image:
            text = image.text.get(PNG_KEY)  # reads the text chunks, before and after the image data
    except (OSError, SyntaxError, ValueError) as err:
        raise unreadable(path, err, "PNG") from err
    return _parse(str(text)) if text is not None else None


def _dicom_provenance(path: Path) -> dict | None:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        block = ds.private_block(DICOM_PRIVATE_GROUP, DICOM_PRIVATE_CREATOR)
        value = block[DICOM_PRIVATE_ELEMENT].value if DICOM_PRIVATE_ELEMENT in block else None
    except KeyError:  # no such private block
        return None
    except (OSError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise unreadable(path, err, "DICOM") from err
    return _parse(value) if isinstance(value, (str, bytes)) else None


def _itk_provenance(path: Path) -> dict | None:
    import SimpleITK as sitk

    from meddiff.data.readers import itk_reason

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise unreadable(path, itk_reason(err)) from err
    return _parse(reader.GetMetaData(ITK_KEY)) if reader.HasMetaDataKey(ITK_KEY) else None


def _kind(path: Path) -> str | None:
    with open(path, "rb") as f:
        start = f.read(132)
    if start.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if start[128:132] == b"DICM":
        return "DICOM"
    if start.startswith(b"NRRD"):
        return "ITK"
    if start.startswith(b"\x1f\x8b"):
        with gzip.open(path, "rb") as f:
            start = f.read(4)
    if len(start) >= 4 and any(struct.unpack(o + "i", start[:4])[0] in _NIFTI_LAYOUTS for o in "<>"):
        return "NIfTI"
    if path.name.lower().endswith((".mha", ".mhd")):
        return "ITK"
    return None


def read_provenance(path: str | os.PathLike) -> dict | None:
    """The provenance record inside a PNG, NIfTI, NRRD, MetaImage or DICOM file; None when it carries none."""
    path = check_file(path)
    try:
        kind = _kind(path)
    except (OSError, EOFError) as err:  # a truncated gzip stream
        raise unreadable(path, err, "NIfTI") from err
    readers = {"PNG": _png_provenance, "DICOM": _dicom_provenance, "NIfTI": _nifti_provenance, "ITK": _itk_provenance}
    if kind is None:
        raise UserError(
            f"cannot read provenance from {path}: it is not a PNG, NIfTI, NRRD, MetaImage or DICOM (with preamble) "
            "file. Pass an image meddiff wrote."
        )
    try:
        return readers[kind](path)
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:  # a damaged gzip stream
        raise unreadable(path, err, "NIfTI" if kind == "NIfTI" else None) from err
