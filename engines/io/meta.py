"""The whitelist of non-identifying DICOM header fields and their validated extraction.

``extract_meta(ds)`` returns ``dict[str, Any]`` keyed by DICOM keyword:

- numeric tags → ``float`` (multi-valued ones such as ``WindowCenter`` → their first value;
  ``PixelSpacing`` / ``ImagerPixelSpacing`` → ``[row_mm, col_mm]``); malformed or non-finite
  numbers are dropped (only the keyword is logged, never the value);
- ``ImageType`` → ``list[str]`` (upper case), other strings → ``str`` (trimmed, control
  characters removed, at most 64 characters);
- ``MagneticFieldStrength`` in tesla: values above 100 are taken to be gauss and divided by 10 000.

Enhanced multi-frame objects keep most of these inside the shared / per-frame functional groups;
they are looked up there when absent at the top level (``EffectiveEchoTime`` → ``EchoTime``,
``ExposureInmAs`` → ``Exposure``, ``XRayTubeCurrentInmA`` → ``XRayTubeCurrent``,
``ExposureTimeInms`` → ``ExposureTime``).

Never extracted: patient name / ID / birth date / age / sex, accession number, institution,
station, operator or physician names, dates and times, and every UID except the transfer
syntax (the SeriesInstanceUID travels separately in ``StudyRef.series_uid``).
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

from engines.prompts import field_strength_tesla

logger = logging.getLogger(__name__)

#: Tags whose value is a number (first value kept when multi-valued).
NUMERIC_TAGS: tuple[str, ...] = (
    "KVP", "Exposure", "XRayTubeCurrent", "ExposureTime", "ExposureInuAs", "CTDIvol",
    "MagneticFieldStrength", "WindowCenter", "WindowWidth", "RepetitionTime", "EchoTime",
    "InversionTime", "FlipAngle", "EchoNumbers", "EchoTrainLength", "SliceThickness",
    "SpacingBetweenSlices", "ReconstructionDiameter", "SpiralPitchFactor",
    "SingleCollimationWidth", "TotalCollimationWidth", "RescaleSlope", "RescaleIntercept",
    "Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation", "SamplesPerPixel",
    "NumberOfFrames", "BodyPartThickness", "CompressionForce", "ImagingFrequency",
    "DiffusionBValue", "LossyImageCompressionRatio",
)
#: Tags whose value is a pair of numbers (row, column) in mm.
PAIR_TAGS: tuple[str, ...] = ("PixelSpacing", "ImagerPixelSpacing")
#: Tags kept as short text.
STRING_TAGS: tuple[str, ...] = (
    "Modality", "BodyPartExamined", "ConvolutionKernel", "SeriesDescription", "ProtocolName",
    "StudyDescription",
    "Manufacturer", "ManufacturerModelName", "SoftwareVersions", "PhotometricInterpretation",
    "RescaleType", "ScanningSequence", "SequenceVariant", "MRAcquisitionType", "ScanOptions",
    "ViewPosition", "PatientPosition", "ImageLaterality", "Laterality", "FilterType",
    "SequenceName", "LossyImageCompression",
)
#: Tags kept as a list of upper-case strings.
LIST_TAGS: tuple[str, ...] = ("ImageType",)

#: The full whitelist (DICOM keywords) plus ``TransferSyntaxUID`` from the file meta group.
META_WHITELIST: tuple[str, ...] = NUMERIC_TAGS + PAIR_TAGS + STRING_TAGS + LIST_TAGS + ("TransferSyntaxUID",)

# Enhanced multi-frame names → the classic keyword they stand for.
_FG_ALIASES: dict[str, str] = {
    "EffectiveEchoTime": "EchoTime",
    "ExposureInmAs": "Exposure",
    "XRayTubeCurrentInmA": "XRayTubeCurrent",
    "ExposureTimeInms": "ExposureTime",
}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MAX_STR = 64


def as_float(value: Any) -> float | None:
    """First value of a DICOM number as a finite float, or None when missing or malformed."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        if len(value) == 0:
            return None
        value = value[0]
    try:
        out = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return out if math.isfinite(out) else None


def as_float_list(value: Any, n: int) -> list[float] | None:
    """Exactly ``n`` finite floats, or None."""
    if value is None or isinstance(value, (str, bytes, bytearray)):
        if isinstance(value, str) and "\\" in value:
            value = value.split("\\")
        else:
            return None
    try:
        items = list(value)
    except TypeError:
        return None
    if len(items) != n:
        return None
    out: list[float] = []
    for v in items:
        f = as_float(v)
        if f is None:
            return None
        out.append(f)
    return out


def clean_text(value: Any) -> str | None:
    """A short printable string, or None when empty."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("ascii", "replace")
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(v) for v in value)
    text = _CONTROL.sub(" ", str(value)).strip()
    return text[:_MAX_STR] if text else None


def _functional_group_items(ds: Any) -> list[Any]:
    """Items of the shared and first per-frame functional groups (enhanced multi-frame)."""
    items: list[Any] = []
    for seq_kw in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        seq = ds.get(seq_kw)
        if not seq:
            continue
        try:
            group = seq[0]
        except (IndexError, TypeError):
            continue
        for elem in group:
            if elem.VR == "SQ" and elem.value:
                items.extend(list(elem.value))
    return items


def _lookup(ds: Any, keyword: str, fg_items: list[Any]) -> Any:
    value = ds.get(keyword)
    if value is not None and value != "":
        return value
    for item in fg_items:
        v = item.get(keyword)
        if v is not None and v != "":
            return v
        for alias, target in _FG_ALIASES.items():
            if target == keyword:
                v = item.get(alias)
                if v is not None and v != "":
                    return v
    return None


def extract_meta(ds: Any) -> dict[str, Any]:
    """Whitelisted, validated, non-identifying fields of a pydicom ``Dataset`` (header only is enough)."""
    fg_items = _functional_group_items(ds)
    meta: dict[str, Any] = {}
    bad: list[str] = []
    for kw in NUMERIC_TAGS:
        try:
            raw = _lookup(ds, kw, fg_items)
        except Exception:  # a malformed element can fail on access
            bad.append(kw)
            continue
        if raw is None:
            continue
        f = as_float(raw)
        if f is None:
            bad.append(kw)
            continue
        if kw == "MagneticFieldStrength":
            f = field_strength_tesla(f)  # gauss -> tesla; non-positive -> None
            if f is None:
                bad.append(kw)
                continue
        meta[kw] = f
    for kw in PAIR_TAGS:
        try:
            raw = _lookup(ds, kw, fg_items)
        except Exception:
            bad.append(kw)
            continue
        if raw is None:
            continue
        pair = as_float_list(raw, 2)
        if pair is None or min(pair) <= 0:
            bad.append(kw)
            continue
        meta[kw] = pair
    for kw in STRING_TAGS:
        try:
            text = clean_text(_lookup(ds, kw, fg_items))
        except Exception:
            bad.append(kw)
            continue
        if text is not None:
            meta[kw] = text
    for kw in LIST_TAGS:
        try:
            raw = ds.get(kw)
        except Exception:
            bad.append(kw)
            continue
        if raw is None:
            continue
        values = [v for v in (clean_text(x) for x in (raw if not isinstance(raw, str) else raw.split("\\"))) if v]
        if values:
            meta[kw] = [v.upper() for v in values]
    file_meta = getattr(ds, "file_meta", None)
    ts = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if ts:
        meta["TransferSyntaxUID"] = str(ts)
    if bad:
        logger.debug("dropped malformed header fields: %s", ", ".join(sorted(set(bad))))
    return meta
