"""DICOM: header-only scan, series grouping, geometric sorting and on-demand decoding.

Header scan
    ``scan_header(path)`` reads one file's header (no pixel data) into a ``DicomHeader``: a
    classic single-frame image up to group 0028, parsed from its first ``HEADER_CHUNK`` bytes in
    memory (from the file when the header does not fit), anything else up to the pixel data.
    Files without the 128-byte preamble are read with ``force=True`` only after ``sniff_dicom``
    has seen a plausible first data element, and the result must carry at least one of
    SOPClassUID / Modality / Rows — ``force`` is never blind. Within one folder scan, files of a
    series share the validated series-level part (``header_from_dataset``'s cache, keyed by the
    stored bytes of the elements it comes from).

Grouping (``group_headers``)
    Files are grouped by SeriesInstanceUID and split by rounded ImageOrientationPatient,
    Rows × Columns, samples per pixel, EchoNumbers and image class (``localizer`` when ImageType
    holds LOCALIZER, ``derived`` when its first value is DERIVED, ``original`` otherwise; the first
    two are flagged). Multi-frame objects are studies of their own. Projection images (CR, DX,
    MG, …) without positions, and files without a SeriesInstanceUID, are one study per file.

Sorting (``sort_geometry``)
    Slices are ordered by ImagePositionPatient projected on the slice normal
    (row cosines × column cosines); spacing along z is the median step of those projections,
    never SliceThickness. When positions are missing or unusable the order falls back to
    InstanceNumber (flag ``sorted_by_instance``, spacing unknown), and to the scan order as a last
    resort (flag ``order_unknown``). Flags: ``duplicate_position``, ``missing_slice``,
    ``uneven_spacing``, ``gantry_tilt``, ``spacing_unknown``. Nothing is resampled or dropped.

Kind
    A study with one slice is ``2d`` (a radiograph, or an isolated slice of a cross-sectional
    modality, which is also flagged ``single_slice``); two or more slices or frames are ``3d``.

Decoding (``decode_frame``)
    float32 (H, W) or (H, W, 3). Checks, in this order and before any pixel is decoded: Rows /
    Columns / frames / samples are valid integers (``BadTag``) and within ``ReadLimits``
    (``TooLarge``); pixel data present (``NoPixelData``); a decoder for the transfer syntax is
    installed (``DecoderMissing``); native pixel data is as long as the header says
    (``Truncated``). Then: palette colour → RGB, YBR → RGB (pydicom), MONOCHROME1 inverted over the
    stored range, RescaleSlope / Intercept applied (per frame for enhanced multi-frame; malformed
    values → ``BadTag``), or a Modality LUT when present.

pydicom warnings can echo raw tag values, so they are silenced around every read and the
``pydicom`` logger is scrubbed of quoted values.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from engines.errors import (
    BadGeometry,
    BadTag,
    DecoderMissing,
    MediqaError,
    NoPixelData,
    NotDicom,
    Truncated,
    UnreadableInput,
)
from engines.io.limits import DEFAULT_LIMITS, ReadLimits
from engines.io.meta import as_float, as_float_list, extract_meta

logger = logging.getLogger(__name__)

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
#: Modalities whose single images are projections (2D by nature).
PROJECTION_MODALITIES = frozenset({"CR", "DX", "MG", "XA", "RF", "IO", "PX", "OP", "XC", "ES", "GM", "SM", "OPT", "US"})
#: Modalities whose single slices are flagged ``single_slice`` (a volume cut to one slice).
CROSS_SECTIONAL_MODALITIES = frozenset({"CT", "MR", "PT", "NM"})
_ORIENT_DECIMALS = 2
_TILT_DEGREES = 0.5


class _ScrubQuoted(logging.Filter):
    """Replace quoted values in pydicom log records (they may be patient data)."""

    _quoted = re.compile(r"'[^']*'|\"[^\"]*\"")

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:
            msg = str(record.msg)
        record.msg = self._quoted.sub("'…'", msg)
        record.args = ()
        return True


_pydicom_logger = logging.getLogger("pydicom")
if not any(isinstance(f, _ScrubQuoted) for f in _pydicom_logger.filters):
    _pydicom_logger.addFilter(_ScrubQuoted())


# --------------------------------------------------------------------------------------------
# Reading headers
# --------------------------------------------------------------------------------------------

def sniff_dicom(path: Path) -> str:
    """``"dicom"`` (DICM prefix at byte 128), ``"raw"`` (no preamble but the first bytes are a
    plausible group 0002/0008 data element, either endianness) or ``"no"``."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return "no"
    return _sniff_head(head)


def _sniff_head(head: bytes) -> str:
    """``sniff_dicom`` on the first 132 bytes of a file."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if len(head) < 8:
        return "no"
    group_le = int.from_bytes(head[0:2], "little")
    group_be = int.from_bytes(head[0:2], "big")
    if group_le in (0x0002, 0x0008) or group_be in (0x0002, 0x0008):
        elem = int.from_bytes(head[2:4], "little" if group_le in (0x0002, 0x0008) else "big")
        if elem < 0x0200:  # the first elements of these groups are low-numbered
            return "raw"
    return "no"


def _past_image_module(tag: Any, vr: Any, length: int) -> bool:
    """Header-scan stop: every element the scan uses (``DicomHeader``, the meta whitelist) lies in
    groups 0002-0028; what follows in a single-frame file is private data (e.g. Siemens CSA in
    0029, GE in 0043), overlays and pixel data."""
    return int(tag) > 0x0028FFFF


#: Bytes read at once for a header scan; headers up to group 0028 are a few KiB in practice.
HEADER_CHUNK = 64 * 1024
#: Files up to this size are read whole and parsed in memory when decoded (pydicom holds the
#: pixel data in memory anyway; larger files are parsed from the file, no second copy).
WHOLE_READ_BYTES = 32 * 1024 * 1024


class _Stop:
    """``_past_image_module`` that remembers whether it stopped the parse (the header up to group
    0028 was complete in the bytes given) — telling a parse that ended at the stop from one that
    ran out of bytes."""

    __slots__ = ("hit",)

    def __init__(self) -> None:
        self.hit = False

    def __call__(self, tag: Any, vr: Any, length: int) -> bool:
        self.hit = _past_image_module(tag, vr, length)
        return self.hit


def _parse_partial_in_memory(chunk: bytes, size: int, force: bool) -> Any | None:
    """``read_partial`` up to group 0028 from the first bytes of a file held in memory (a
    quarter less CPU than pydicom's hundreds of small reads on the file; the header scan reads
    every file of an archive). None when those bytes do not settle it — the file is longer
    than ``chunk`` and the parse did not reach the stop or failed — and the caller parses the
    file itself, so errors and results are always those of the whole file."""
    from pydicom.filereader import read_partial

    stop = _Stop()
    try:
        ds = read_partial(io.BytesIO(chunk), stop, force=force)
    except Exception:  # noqa: BLE001 - decided on the whole file below
        if len(chunk) < size:
            return None
        raise
    if stop.hit or len(chunk) >= size:
        return ds
    return None


def read_dataset(path: Path, *, header_only: bool) -> Any:
    """pydicom ``Dataset`` of ``path``; raises ``NotDicom`` for anything that is not DICOM.

    The file is opened once: size, sniff and parse use the same handle (the header scan reads
    every file of an archive, and a second ``open`` per file was a measurable share of it).
    ``header_only``: elements up to group 0028 (``_past_image_module``) for a classic single-frame
    image (no NumberOfFrames, a top-level PixelSpacing / ImagerPixelSpacing), else the whole
    header before the pixel data (``tests/test_dicom.py`` checks both give the same
    ``DicomHeader`` on every pydicom / pydicom-data test file)."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.filereader import read_partial

    path = Path(path)
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise UnreadableInput(f"cannot open file ({type(exc).__name__})") from None
    with fh:
        try:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(HEADER_CHUNK if header_only else 132)
            fh.seek(0)
        except OSError as exc:
            raise UnreadableInput(f"cannot read file ({type(exc).__name__})") from None
        if size == 0:
            raise NotDicom("empty file (0 bytes)")
        kind = _sniff_head(head)
        if kind == "no":
            raise NotDicom("no DICOM preamble and no recognisable data elements")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                if header_only:
                    ds = _parse_partial_in_memory(head, size, kind == "raw")
                    if ds is None:
                        ds = read_partial(fh, _past_image_module, force=(kind == "raw"))
                    if "NumberOfFrames" in ds or not ("PixelSpacing" in ds or "ImagerPixelSpacing" in ds):
                        # Multi-frame and enhanced objects (SEG too, even with one frame) keep
                        # geometry and spacing in the functional groups (5200,xxxx); objects
                        # without a top-level spacing may as well: read the whole header.
                        fh.seek(0)
                        ds = pydicom.dcmread(fh, stop_before_pixels=True, force=(kind == "raw"))
                elif size <= WHOLE_READ_BYTES:
                    # One read, parsed in memory: a fifth less CPU than pydicom's small reads.
                    ds = pydicom.dcmread(io.BytesIO(fh.read()), stop_before_pixels=False, force=(kind == "raw"))
                else:
                    ds = pydicom.dcmread(fh, stop_before_pixels=False, force=(kind == "raw"))
            except InvalidDicomError:
                raise NotDicom("not a DICOM file") from None
            except MediqaError:
                raise
            except Exception as exc:  # noqa: BLE001 - parse errors of every kind (see RELIABILITY.md)
                raise UnreadableInput(f"DICOM header could not be parsed ({type(exc).__name__})") from None
    if kind == "raw" and not any(k in ds for k in ("SOPClassUID", "Modality", "Rows")):
        raise NotDicom("no DICOM preamble and no image attributes")
    return ds


def _int_tag(ds: Any, keyword: str, default: int | None = None, *, required: bool = False) -> int | None:
    """A non-negative integer tag, validated (``BadTag`` when malformed)."""
    try:
        value = ds.get(keyword)
    except Exception:
        raise BadTag(f"{keyword} is malformed") from None
    if value is None or value == "":
        if required:
            raise BadTag(f"{keyword} is missing")
        return default
    f = as_float(value)
    if f is None or f < 0 or f != int(f):
        raise BadTag(f"{keyword} is not a non-negative integer")
    return int(f)


def _image_class(image_type: list[str] | None) -> str:
    if not image_type:
        return "original"
    if "LOCALIZER" in image_type or "SCOUT" in image_type:
        return "localizer"
    if image_type[0] == "DERIVED":
        return "derived"
    return "original"


@dataclass
class DicomHeader:
    """What the grouping and sorting need from one file (no pixel data, no identifiers)."""

    path: Path
    series_uid: str | None
    sop_uid: str | None
    modality: str | None
    rows: int
    columns: int
    samples: int
    frames: int                                   # 1 for single-frame objects
    orientation: tuple[float, ...] | None         # 6 direction cosines
    position: tuple[float, float, float] | None   # ImagePositionPatient, mm
    instance: int | None
    echo: int | None
    image_class: str                              # "original" | "localizer" | "derived"
    pixel_spacing: tuple[float, float] | None     # (row, col) mm
    meta: dict[str, Any] = field(default_factory=dict)
    frame_positions: list[tuple[float, float, float] | None] | None = None
    frame_orientations: list[tuple[float, ...] | None] | None = None
    frame_numbers: list[int | None] | None = None

    @property
    def orientation_key(self) -> tuple[float, ...] | None:
        if self.orientation is None:
            return None
        return tuple(round(v, _ORIENT_DECIMALS) + 0.0 for v in self.orientation)


def _per_frame_geometry(ds: Any, n_frames: int) -> tuple[list, list, list]:
    """Per-frame positions, orientations and in-stack numbers of an enhanced multi-frame object."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared = ds.get("SharedFunctionalGroupsSequence") or []
    shared_item = shared[0] if len(shared) else None
    shared_orient = None
    if shared_item is not None and shared_item.get("PlaneOrientationSequence"):
        shared_orient = as_float_list(shared_item.PlaneOrientationSequence[0].get("ImageOrientationPatient"), 6)
    top_orient = as_float_list(ds.get("ImageOrientationPatient"), 6)
    positions: list = []
    orients: list = []
    numbers: list = []
    for i in range(n_frames):
        item = per_frame[i] if i < len(per_frame) else None
        pos = orient = num = None
        if item is not None:
            if item.get("PlanePositionSequence"):
                pos = as_float_list(item.PlanePositionSequence[0].get("ImagePositionPatient"), 3)
            if item.get("PlaneOrientationSequence"):
                orient = as_float_list(item.PlaneOrientationSequence[0].get("ImageOrientationPatient"), 6)
            if item.get("FrameContentSequence"):
                num = as_float(item.FrameContentSequence[0].get("InStackPositionNumber"))
        orient = orient or shared_orient or top_orient
        positions.append(tuple(pos) if pos else None)
        orients.append(tuple(orient) if orient else None)
        numbers.append(int(num) if num is not None else None)
    return positions, orients, numbers


#: Elements whose stored bytes key ``header_from_dataset``'s per-series cache: files of one
#: series that agree on all of them share the validated image size, pixel-data length, image
#: class and ``meta`` of the first one parsed.
_SERIES_KEY_TAGS = (
    0x0020000E,  # SeriesInstanceUID
    0x00080060,  # Modality
    0x00080008,  # ImageType
    0x00180086,  # EchoNumbers
    0x00280002,  # SamplesPerPixel
    0x00280004,  # PhotometricInterpretation
    0x00280008,  # NumberOfFrames
    0x00280010,  # Rows
    0x00280011,  # Columns
    0x00280030,  # PixelSpacing
    0x00181164,  # ImagerPixelSpacing
    0x00280100,  # BitsAllocated
)


@dataclass(frozen=True)
class _SeriesPart:
    """What ``header_from_dataset`` derives from the elements of ``_SERIES_KEY_TAGS`` (and, for
    ``meta``, the whitelist of ``engines.io.meta``), validated once per series and folder."""

    series_uid: str | None
    rows: int
    cols: int
    samples: int
    frames: int
    native_bytes: int | None        # pixel-data bytes an uncompressed file needs; None: not checked
    echo: int | None
    image_class: str
    pixel_spacing: tuple[float, float] | None
    meta: dict[str, Any]


def _raw_value(ds: Any, tag: int) -> Any:
    """The stored bytes of an element (pydicom converts a value only when it is accessed; the
    bytes are enough to compare files), or its converted value's repr once converted."""
    elem = ds.get_item(tag)
    if elem is None:
        return None
    value = elem.value
    return value if isinstance(value, (bytes, str, int, float)) else repr(value)


def _series_key(ds: Any) -> tuple | None:
    """Cache key of a single-frame image (None: no file meta / SeriesInstanceUID — not cached)."""
    file_meta = getattr(ds, "file_meta", None)
    ts = _raw_value(file_meta, 0x00020010) if file_meta is not None else None
    if ts is None:
        return None
    values = tuple(_raw_value(ds, tag) for tag in _SERIES_KEY_TAGS)
    uid = values[0]
    if not (uid.strip(b"\x00 ") if isinstance(uid, bytes) else str(uid or "").strip()):
        return None   # no SeriesInstanceUID: one study per file, nothing shared
    return (ts, _raw_value(file_meta, 0x00020002), *values)


def _series_part(path: Path, ds: Any, limits: ReadLimits) -> _SeriesPart:
    """Validate and extract the series-level part of one header (raises as
    ``header_from_dataset``; the pixel-data length is checked against the file by the caller)."""
    file_meta = getattr(ds, "file_meta", None)
    media_class = str(file_meta.get("MediaStorageSOPClassUID", "")) if file_meta is not None else ""
    if media_class == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
        raise NoPixelData("DICOMDIR (a media index, not an image)")
    if "Rows" not in ds or "Columns" not in ds:
        sop_class = str(ds.get("SOPClassUID", "") or "")
        sop_name = getattr(ds.get("SOPClassUID"), "name", "") if sop_class else ""
        if "Image Storage" in str(sop_name) and "Rows" not in ds:
            # An image object whose header ends before its image attributes: cut short.
            raise Truncated("image object ends before its image attributes (Rows/Columns)")
        raise NoPixelData("no image attributes (Rows/Columns); e.g. a structured report")
    rows, cols, samples, frames = _image_size(ds, limits)
    limits.check_frames(frames)
    ts = _transfer_syntax(ds)
    native = None if ts.is_compressed or ts.is_deflated else _native_expected_bytes(ds, rows, cols, samples, frames)
    meta = extract_meta(ds)
    echo = as_float(ds.get("EchoNumbers"))
    spacing = meta.get("PixelSpacing") or meta.get("ImagerPixelSpacing")
    return _SeriesPart(
        series_uid=str(ds.get("SeriesInstanceUID") or "") or None,
        rows=rows, cols=cols, samples=samples, frames=frames, native_bytes=native,
        echo=int(echo) if echo is not None else None,
        image_class=_image_class(meta.get("ImageType")),
        pixel_spacing=(spacing[0], spacing[1]) if spacing else None,
        meta=meta,
    )


def header_from_dataset(path: Path, ds: Any, *, limits: ReadLimits = DEFAULT_LIMITS,
                        meta_cache: dict[tuple, _SeriesPart] | None = None) -> DicomHeader:
    """Validate the geometry tags of a header-only dataset and build a ``DicomHeader``.

    ``meta_cache`` (one per folder scan): single-frame files whose file meta and
    ``_SERIES_KEY_TAGS`` elements have the same stored bytes (one series, same size, ImageType,
    echo, spacing, transfer syntax) share the image size, pixel-data length, image class and
    ``meta`` validated for the first of them, without converting those values again (pydicom's
    value conversion was a third of the header-scan time); the per-file fields (positions,
    orientation, instance and SOP instance UID) and the file's length are always read per file.

    Raises ``NoPixelData`` (no Rows/Columns: SR, presentation states, DICOMDIR), ``BadTag``,
    ``TooLarge`` (from the header alone) and ``Truncated`` (native pixel data shorter than the
    header says, judged from the file size).
    """
    key = _series_key(ds) if meta_cache is not None else None
    part = meta_cache.get(key) if key is not None else None  # type: ignore[union-attr]
    if part is None:
        part = _series_part(path, ds, limits)
        if key is not None and part.frames == 1:
            meta_cache[key] = part  # type: ignore[index]
    if part.native_bytes is not None:
        _check_file_length(path, part.native_bytes)
    orient = as_float_list(ds.get("ImageOrientationPatient"), 6)
    pos = as_float_list(ds.get("ImagePositionPatient"), 3)
    inst = as_float(ds.get("InstanceNumber"))
    hdr = DicomHeader(
        path=Path(path),
        series_uid=part.series_uid,
        sop_uid=str(ds.get("SOPInstanceUID") or "") or None,
        modality=part.meta.get("Modality"),
        rows=part.rows, columns=part.cols, samples=part.samples, frames=part.frames,
        orientation=tuple(orient) if orient else None,
        position=tuple(pos) if pos else None,  # type: ignore[arg-type]
        instance=int(inst) if inst is not None and inst == int(inst) else None,
        echo=part.echo,
        image_class=part.image_class,
        pixel_spacing=part.pixel_spacing,
        meta=part.meta,
    )
    if part.frames > 1:
        positions, orients, numbers = _per_frame_geometry(ds, part.frames)
        hdr.frame_positions, hdr.frame_orientations, hdr.frame_numbers = positions, orients, numbers
        if hdr.orientation is None and orients and orients[0] is not None:
            hdr.orientation = orients[0]
    return hdr


def _image_size(ds: Any, limits: ReadLimits) -> tuple[int, int, int, int]:
    """(rows, cols, samples, frames) validated against ``limits`` before any pixel is decoded."""
    rows = _int_tag(ds, "Rows", required=True) or 0
    cols = _int_tag(ds, "Columns", required=True) or 0
    samples = _int_tag(ds, "SamplesPerPixel", 1) or 1
    frames = _int_tag(ds, "NumberOfFrames", 1) or 1
    if rows == 0 or cols == 0:
        raise NoPixelData("Rows or Columns is zero")
    limits.check_slice(rows, cols, samples)
    return rows, cols, samples, frames


def scan_header(path: Path, *, limits: ReadLimits = DEFAULT_LIMITS,
                meta_cache: dict[tuple, Any] | None = None) -> DicomHeader:
    """Header-only read of one file → ``DicomHeader``. Raises a ``MediqaError`` subclass.
    ``meta_cache``: see ``header_from_dataset``."""
    ds = read_dataset(path, header_only=True)
    try:
        with warnings.catch_warnings():
            # pydicom converts values lazily on access and its warnings echo them.
            warnings.simplefilter("ignore")
            return header_from_dataset(path, ds, limits=limits, meta_cache=meta_cache)
    except MediqaError:
        raise
    except Exception as exc:  # noqa: BLE001 - malformed elements fail on access in many ways
        raise UnreadableInput(f"DICOM header is malformed ({type(exc).__name__})") from None


def _native_expected_bytes(ds: Any, rows: int, cols: int, samples: int, frames: int) -> int | None:
    bits = _int_tag(ds, "BitsAllocated", None)
    if not bits:
        return None
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "YBR_FULL_422" and samples == 3:
        samples = 2  # chroma subsampled horizontally: 4 values per 2 pixels
    return math.ceil(rows * cols * samples * frames * bits / 8)


def _transfer_syntax(ds: Any) -> Any:
    from pydicom.uid import UID, ImplicitVRLittleEndian

    file_meta = getattr(ds, "file_meta", None)
    ts = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if not ts:
        # Raw (preamble-less) files: pydicom records how it parsed them.
        if getattr(ds, "is_little_endian", True) is False:
            return UID("1.2.840.10008.1.2.2")
        return ImplicitVRLittleEndian if getattr(ds, "is_implicit_VR", True) else UID("1.2.840.10008.1.2.1")
    return UID(str(ts))


def _check_file_length(path: Path, expected: int) -> None:
    """Scan-time truncation check for uncompressed files: the file must be at least as long as
    the pixel data the header describes (the header itself is not counted, so this is lenient)."""
    try:
        size = os.path.getsize(path)
    except OSError:
        return
    if size < expected:
        raise Truncated(f"file holds {size} bytes but its pixel data alone needs {expected}")


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------

@dataclass
class Geometry:
    """Result of sorting: ``order`` indexes the input list; ``z_spacing`` in mm or None."""

    order: list[int]
    z_spacing: float | None
    flags: list[str]


def slice_normal(orientation: Iterable[float]) -> np.ndarray | None:
    """Unit normal (3,) float64 of a slice from its 6 direction cosines, or None if degenerate."""
    o = np.asarray(list(orientation), dtype=np.float64)
    n = np.cross(o[:3], o[3:])
    norm = float(np.linalg.norm(n))
    if not math.isfinite(norm) or norm < 1e-6:
        return None
    return n / norm


def sort_geometry(positions: list[tuple[float, float, float] | None], orientation: tuple[float, ...] | None,
                  instances: list[int | None]) -> Geometry:
    """Order slices along the slice normal; see the module docstring for flags and fallbacks."""
    n = len(positions)
    if n <= 1:
        return Geometry(list(range(n)), None, [])
    normal = slice_normal(orientation) if orientation is not None else None
    if normal is not None and all(p is not None for p in positions):
        pts = np.asarray(positions, dtype=np.float64)
        proj = pts @ normal
        inst_key = np.asarray([i if i is not None else 0 for i in instances], dtype=np.float64)
        order = [int(i) for i in np.lexsort((inst_key, proj))]
        sp = proj[order]
        steps = np.diff(sp)
        flags: list[str] = []
        positive = steps[steps > 1e-3]
        if len(positive) < len(steps):
            flags.append("duplicate_position")
        if len(positive) == 0:
            return Geometry(order, None, flags + ["spacing_unknown"])
        spacing = float(np.median(positive))
        ratio = positive / spacing
        nearest = np.rint(ratio)
        missing = (nearest >= 2) & (np.abs(ratio - nearest) < 0.1)
        if missing.any():
            flags.append("missing_slice")
        tol = max(0.01, 0.05 * spacing)
        if (np.abs(positive[~missing] - spacing) > tol).any():
            flags.append("uneven_spacing")
        span = pts[order[-1]] - pts[order[0]]
        length = float(np.linalg.norm(span))
        if length > 1e-3:
            cos = abs(float(span @ normal)) / length
            if math.degrees(math.acos(min(1.0, cos))) > _TILT_DEGREES:
                flags.append("gantry_tilt")
        return Geometry(order, spacing, flags)
    if all(i is not None for i in instances) and len(set(instances)) == n:
        order = sorted(range(n), key=lambda k: instances[k])  # type: ignore[arg-type, return-value]
        return Geometry(order, None, ["sorted_by_instance", "spacing_unknown"])
    return Geometry(list(range(n)), None, ["order_unknown", "spacing_unknown"])


# --------------------------------------------------------------------------------------------
# Grouping
# --------------------------------------------------------------------------------------------

@dataclass
class SeriesGroup:
    """One study made of DICOM files: ``slices`` are (file, frame or None) in geometric order."""

    headers: list[DicomHeader]            # in geometric order (one header for a multi-frame object)
    slices: list[tuple[Path, int | None]]
    spacing: tuple[float, float, float]
    flags: list[str]
    meta: dict[str, Any]
    series_uid: str | None

    @property
    def kind(self) -> str:
        return "3d" if len(self.slices) >= 2 else "2d"


def _in_plane_spacing(hdr: DicomHeader, flags: list[str]) -> tuple[float, float]:
    if hdr.pixel_spacing is None:
        if "spacing_unknown" not in flags:
            flags.append("spacing_unknown")
        return (1.0, 1.0)
    return hdr.pixel_spacing


def series_from_multiframe(hdr: DicomHeader) -> SeriesGroup:
    """One multi-frame object → one study with its frames sorted geometrically."""
    positions = hdr.frame_positions or [None] * hdr.frames
    orients = hdr.frame_orientations or [hdr.orientation] * hdr.frames
    numbers = hdr.frame_numbers or [None] * hdr.frames
    keys = {tuple(round(v, _ORIENT_DECIMALS) + 0.0 for v in o) for o in orients if o is not None}
    flags: list[str] = []
    if len(keys) > 1:
        geo = Geometry(list(range(hdr.frames)), None, ["mixed_orientation", "order_unknown", "spacing_unknown"])
    else:
        geo = sort_geometry(positions, orients[0] if orients else None, numbers)
        if "order_unknown" in geo.flags:
            # Frames of one object without positions: stored frame order is the acquisition order.
            geo = Geometry(geo.order, None, ["frame_order", "spacing_unknown"])
    flags.extend(geo.flags)
    flags.append("multi_frame")
    dy, dx = _in_plane_spacing(hdr, flags)
    return SeriesGroup([hdr], [(hdr.path, f) for f in geo.order], (geo.z_spacing or 1.0, dy, dx),
                       flags, dict(hdr.meta), hdr.series_uid)


def _class_flags(hdr: DicomHeader) -> list[str]:
    return [hdr.image_class] if hdr.image_class in ("localizer", "derived") else []


def group_headers(headers: list[DicomHeader]) -> list[SeriesGroup]:
    """Group header-scanned files into studies (see the module docstring)."""
    groups: dict[tuple, list[DicomHeader]] = OrderedDict()
    singles: list[SeriesGroup] = []
    for hdr in headers:
        if hdr.frames > 1:
            grp = series_from_multiframe(hdr)
            grp.flags.extend(_class_flags(hdr))
            singles.append(grp)
            continue
        standalone = hdr.series_uid is None or (
            (hdr.modality or "").upper() in PROJECTION_MODALITIES and hdr.position is None)
        if standalone:
            key: tuple = ("file", str(hdr.path))
        else:
            key = (hdr.series_uid, hdr.orientation_key, hdr.rows, hdr.columns, hdr.samples, hdr.echo,
                   hdr.image_class)
        groups.setdefault(key, []).append(hdr)
    out: list[SeriesGroup] = []
    for key, members in groups.items():
        flags: list[str] = []
        seen_sop: set[str] = set()
        unique: list[DicomHeader] = []
        for h in members:
            if h.sop_uid and h.sop_uid in seen_sop:
                if "duplicate_instance" not in flags:
                    flags.append("duplicate_instance")
                continue
            if h.sop_uid:
                seen_sop.add(h.sop_uid)
            unique.append(h)
        geo = sort_geometry([h.position for h in unique], unique[0].orientation, [h.instance for h in unique])
        flags.extend(geo.flags)
        ordered = [unique[i] for i in geo.order]
        first = ordered[0]
        flags.extend(_class_flags(first))
        if key[0] == "file" and first.series_uid is None:
            flags.append("no_series_uid")
        if len(ordered) == 1 and (first.modality or "").upper() in CROSS_SECTIONAL_MODALITIES:
            flags.append("single_slice")
        dy, dx = _in_plane_spacing(first, flags)
        z = geo.z_spacing if geo.z_spacing is not None else 1.0
        out.append(SeriesGroup(ordered, [(h.path, None) for h in ordered], (z, dy, dx), flags,
                               dict(first.meta), first.series_uid))
    return out + singles


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------

def _decoder_check(ts: Any) -> None:
    """Raise ``DecoderMissing`` when no installed plugin can decode transfer syntax ``ts``."""
    if not ts.is_compressed:
        return
    from pydicom.pixels import get_decoder

    name = getattr(ts, "name", str(ts)) or str(ts)
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise DecoderMissing(f"no pixel data decoder exists for transfer syntax {name} ({ts})") from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "a decoding plugin"
        raise DecoderMissing(f"transfer syntax {name} ({ts}) needs {missing}")


def _rescale_for_frame(ds: Any, frame: int | None) -> tuple[float, float] | None:
    """(slope, intercept) for ``frame`` — per-frame group, shared group, then top level.
    None when no rescale is given anywhere. ``BadTag`` when present but not numbers."""
    items: list[Any] = []
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and frame is not None and frame < len(per_frame):
        items.append(per_frame[frame])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        items.append(shared[0])
    for item in items:
        seq = item.get("PixelValueTransformationSequence")
        if seq:
            return _validated_rescale(seq[0])
    if "RescaleSlope" in ds or "RescaleIntercept" in ds:
        return _validated_rescale(ds)
    return None


def _validated_rescale(ds: Any) -> tuple[float, float]:
    raw_slope, raw_icpt = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    slope = 1.0 if raw_slope in (None, "") else as_float(raw_slope)
    icpt = 0.0 if raw_icpt in (None, "") else as_float(raw_icpt)
    if slope is None or slope == 0.0:
        raise BadTag("RescaleSlope is not a non-zero number")
    if icpt is None:
        raise BadTag("RescaleIntercept is not a number")
    return slope, icpt


def _map_decode_error(exc: BaseException, ts: Any) -> MediqaError:
    text = str(exc)
    name = getattr(ts, "name", str(ts))
    if isinstance(exc, MemoryError):
        from engines.errors import TooLarge

        return TooLarge("not enough memory to decode the pixel data")
    if "less than expected" in text or "truncat" in text.lower():
        return Truncated(f"pixel data is shorter than the header says ({name})")
    if "missing dependencies" in text or "no pixel data decoders" in text.lower():
        return DecoderMissing(f"transfer syntax {name} needs a decoding plugin that is not installed")
    if "no 'Pixel Data'" in text or "no pixel data" in text.lower():
        return NoPixelData("no pixel data element")
    return UnreadableInput(f"pixel data could not be decoded ({name}; {type(exc).__name__})")


def decode_frame(ds: Any, frame: int | None = None, *, limits: ReadLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Decode one frame (or the only image) of a full dataset.

    Returns float32 (H, W) in physical units (RescaleSlope/Intercept applied, MONOCHROME1
    inverted) or float32 (H, W, 3) RGB. ``frame`` is a 0-based frame index for multi-frame data.
    """
    from pydicom.pixels import apply_color_lut, apply_modality_lut, pixel_array

    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise NoPixelData("image attributes but no pixel data element (the file may be truncated)")
    rows, cols, samples, frames = _image_size(ds, limits)
    if frame is not None and not 0 <= frame < frames:
        raise BadGeometry(f"frame {frame} out of range 0..{frames - 1}")
    ts = _transfer_syntax(ds)
    _decoder_check(ts)
    if "PixelData" in ds and not ts.is_compressed:
        expected = _native_expected_bytes(ds, rows, cols, samples, frames)
        got = len(ds.PixelData)
        if expected is not None and got < expected:
            raise Truncated(f"pixel data holds {got} bytes, the header needs {expected}")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            arr = pixel_array(ds, index=frame if frames > 1 else None)
            if photometric == "PALETTE COLOR":
                arr = apply_color_lut(arr, ds)
        except MediqaError:
            raise
        except Exception as exc:  # noqa: BLE001 - decoders raise every type (RELIABILITY.md)
            raise _map_decode_error(exc, ts) from None
    if arr.ndim == 3 and frames > 1 and arr.shape[0] == frames:
        arr = arr[frame or 0]
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
    if arr.ndim == 3 and arr.shape[-1] == 3:
        return np.ascontiguousarray(arr, dtype=np.float32)
    if arr.ndim != 2:
        raise BadGeometry(f"decoded pixel array has unexpected shape {arr.shape}")
    out = arr.astype(np.float32)
    if photometric == "MONOCHROME1":
        bits = _int_tag(ds, "BitsStored", None) or int(arr.dtype.itemsize * 8)
        signed = (_int_tag(ds, "PixelRepresentation", 0) or 0) == 1
        lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
        out = np.float32(lo + hi) - out
    rescale = _rescale_for_frame(ds, frame)
    if rescale is not None:
        slope, icpt = rescale
        if slope != 1.0:
            out *= np.float32(slope)
        if icpt != 0.0:
            out += np.float32(icpt)
    elif "ModalityLUTSequence" in ds and photometric != "MONOCHROME1":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                out = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
            except Exception as exc:  # noqa: BLE001
                raise BadTag(f"Modality LUT could not be applied ({type(exc).__name__})") from None
    if not np.isfinite(out).all():
        raise UnreadableInput("decoded pixel values are not finite")
    return out


def decode_file(path: Path, frame: int | None = None, *, limits: ReadLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Read ``path`` and decode one frame; see ``decode_frame``."""
    ds = read_dataset(path, header_only=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return decode_frame(ds, frame, limits=limits)
    except MediqaError:
        raise
    except Exception as exc:  # noqa: BLE001 - the per-file boundary
        raise _map_decode_error(exc, _transfer_syntax(ds)) from None


class DicomSeriesSource:
    """Lazy ``SliceSource`` over a DICOM study: slice i is decoded only when asked for.

    ``slices`` are (file, frame index or None) in geometric order. The dataset of the last file
    read is kept, so the frames of a multi-frame object are decoded without re-reading it.
    """

    def __init__(self, slices: list[tuple[Path, int | None]], *, spacing: tuple[float, float, float],
                 meta: dict[str, Any], flags: list[str], limits: ReadLimits = DEFAULT_LIMITS) -> None:
        self.slices = list(slices)
        self.spacing = spacing
        self.meta = meta
        self.flags = flags
        self.limits = limits
        self._cached: tuple[Path, Any] | None = None

    def __len__(self) -> int:
        return len(self.slices)

    def _dataset(self, path: Path) -> Any:
        if self._cached is not None and self._cached[0] == path:
            return self._cached[1]
        ds = read_dataset(path, header_only=False)
        self._cached = (path, ds)
        return ds

    def get_slice(self, index: int) -> np.ndarray:
        """float32 (H, W) or (H, W, 3) in physical units; raises a ``MediqaError`` subclass."""
        if not -len(self.slices) <= index < len(self.slices):
            raise IndexError(index)
        path, frame = self.slices[index]
        ds = self._dataset(path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return decode_frame(ds, frame, limits=self.limits)
        except MediqaError:
            raise
        except Exception as exc:  # noqa: BLE001 - the per-slice boundary
            raise _map_decode_error(exc, _transfer_syntax(ds)) from None
