"""Pseudonymous study ids, spreadsheet-safe cells, and scrubbing of identifiers from text / logs.

Study ids
    ``study_id(series_uid_or_relpath, key)`` is the first 16 hex digits of
    HMAC-SHA256(key, value). Without the key the id cannot be linked back to the series UID or
    path (and a dictionary of known UIDs cannot be hashed to find it); with the same key, reports
    of different nights join on it.

The key (``study_key()``)
    1. the environment variable ``MEDIQA_STUDY_KEY`` (any non-empty text; its UTF-8 bytes are
       the key; at least 16 characters are recommended and shorter ones log a warning), else
    2. the file ``$XDG_CONFIG_HOME/mediqa/key`` (default ``~/.config/mediqa/key``). On first use
       the file is created with 32 random bytes written as 64 hex digits, mode 0600 in a 0700
       directory; it is created exclusively so two concurrent first runs agree on one key.
       A key file readable by group or others is still used but a warning says so.
    Share the key (or set the variable) on every machine whose reports must join; keep it as
    private as the series UIDs themselves.

Cells
    ``escape_cell`` prefixes ``'`` to text starting with ``= + - @``, tab or carriage return so
    spreadsheets show it instead of evaluating it. Plain numbers ("-1024", "+1.5e3") are left
    alone: they cannot be formulas and must stay numeric.

Scrubbing
    ``scrub(text)`` replaces anything shaped like a DICOM person name (components joined by
    ``^``, e.g. ``DOE^JANE``), the raw value that pydicom's validation warnings echo
    ("Invalid value for VR PN: '...'"), and every identifier registered with
    ``register_identifiers`` (e.g. the PatientName / PatientID of files being read) by
    ``[redacted]``. ``ScrubFilter`` applies it to every log record; ``install_log_scrubber()``
    puts one on the root logger's handlers and routes ``warnings`` into logging so pydicom's
    warnings are scrubbed too.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
import threading
from pathlib import Path
from typing import Any, Iterable

logger = logging.getLogger(__name__)

ENV_KEY = "MEDIQA_STUDY_KEY"
REDACTED = "[redacted]"

#: DICOM keywords that identify a patient (or, through the accession / study number, a visit)
#: and never leave the reader: not in ``meta``, not in reports, not in logs.
PHI_KEYWORDS: frozenset[str] = frozenset({
    "PatientName", "PatientID", "PatientBirthDate", "PatientBirthTime", "PatientBirthName",
    "PatientMotherBirthName", "OtherPatientIDs", "OtherPatientIDsSequence", "OtherPatientNames",
    "IssuerOfPatientID", "PatientAddress", "PatientTelephoneNumbers", "PatientAge", "PatientSex",
    "PatientWeight", "PatientSize", "MedicalRecordLocator", "MilitaryRank", "EthnicGroup",
    "AccessionNumber", "StudyID", "AdmissionID", "ReferringPhysicianName",
    "PerformingPhysicianName", "NameOfPhysiciansReadingStudy", "OperatorsName",
    "RequestingPhysician", "InstitutionName", "InstitutionAddress", "StationName",
    "DeviceSerialNumber", "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate",
    "StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime",
})

#: Keywords whose values ``identifiers_from_dataset`` registers for scrubbing (the ones that are
#: distinctive enough to search for in free text; dates and sex are not).
_SCRUB_KEYWORDS: tuple[str, ...] = (
    "PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthName",
    "PatientMotherBirthName", "AccessionNumber", "MedicalRecordLocator",
)

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")

# A PN value: components separated by '^' (family^given^middle^prefix^suffix), possibly with
# '=' separated ideographic / phonetic groups. Any run of non-space characters holding a caret.
_PN_LIKE = re.compile(r"[^\s'\"\\,;:()\[\]{}<>|]*\^[^\s'\"\\,;:()\[\]{}<>|]*")
# pydicom's validation messages: "Invalid value for VR XX: 'value'" / "... value '...' ...".
_PYDICOM_VALUE = re.compile(r"(Invalid value for VR \w+: )('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")")
_MIN_IDENTIFIER = 3  # shorter registered values would redact ordinary words

_identifiers: set[str] = set()
_identifiers_lock = threading.Lock()
_identifier_re: re.Pattern[str] | None = None


# --- the key -------------------------------------------------------------------------------------

def key_path() -> Path:
    """Where the key file lives: ``$XDG_CONFIG_HOME/mediqa/key`` or ``~/.config/mediqa/key``."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "mediqa" / "key"


def study_key(path: str | os.PathLike[str] | None = None) -> bytes:
    """The keyed-hash secret: ``$MEDIQA_STUDY_KEY``, else the key file (created on first use).

    ``path`` overrides the key file location (tests, site-wide keys). Raises ``OSError`` when
    the file can neither be read nor created.
    """
    env = os.environ.get(ENV_KEY)
    if env:
        if len(env) < 16:
            logger.warning("%s is shorter than 16 characters; study ids are easier to guess",
                           ENV_KEY)
        return env.encode("utf-8")
    p = Path(path) if path is not None else key_path()
    try:
        return _read_key(p)
    except FileNotFoundError:
        pass
    p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    token = secrets.token_hex(32).encode("ascii")
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it first: use theirs
        return _read_key(p)
    try:
        os.write(fd, token + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    logger.info("created a new study-id key file at %s (mode 0600)", p)
    return token


def _read_key(p: Path) -> bytes:
    data = p.read_bytes().strip()
    if not data:
        raise OSError(f"the study-id key file {p} is empty; delete it to create a new key")
    mode = stat.S_IMODE(p.stat().st_mode)
    if mode & 0o077:
        logger.warning("the study-id key file %s is readable by others (mode %o); chmod 600 it",
                       p, mode)
    return data


def study_id(series_uid_or_relpath: str, key: bytes | None = None) -> str:
    """Pseudonymous id: first 16 hex digits of HMAC-SHA256(key, value). ``key`` defaults to
    ``study_key()``."""
    if key is None:
        key = study_key()
    if isinstance(key, str):
        key = key.encode("utf-8")
    return hmac.new(key, str(series_uid_or_relpath).encode("utf-8"), hashlib.sha256).hexdigest()[:16]


# --- cells ---------------------------------------------------------------------------------------

def escape_cell(value: Any) -> Any:
    """Text that a spreadsheet would evaluate gets a leading ``'``; anything else is returned as is."""
    if isinstance(value, str) and value.startswith(_FORMULA_START) and not _PLAIN_NUMBER.match(value):
        return "'" + value
    return value


# --- scrubbing -----------------------------------------------------------------------------------

def register_identifiers(values: Iterable[Any]) -> None:
    """Add identifying values (names, IDs) that ``scrub`` must remove from now on (process-wide).

    A PN value is registered whole and by component (``DOE^JANE`` → also ``DOE``, ``JANE``);
    values shorter than 3 characters are ignored."""
    global _identifier_re
    new: set[str] = set()
    for v in values:
        if v is None:
            continue
        text = str(v).strip()
        parts = [text] + [c.strip() for c in re.split(r"[\^=]", text)] if "^" in text else [text]
        new.update(p for p in parts if len(p) >= _MIN_IDENTIFIER)
    if not new:
        return
    with _identifiers_lock:
        if new <= _identifiers:
            return
        _identifiers.update(new)
        ordered = sorted(_identifiers, key=len, reverse=True)  # longest first
        _identifier_re = re.compile("|".join(re.escape(v) for v in ordered), re.IGNORECASE)


def clear_identifiers() -> None:
    """Forget every registered identifier (tests; a long-lived process between batches)."""
    global _identifier_re
    with _identifiers_lock:
        _identifiers.clear()
        _identifier_re = None


def identifiers_from_dataset(ds: Any) -> list[str]:
    """The distinctive identifying values of a pydicom ``Dataset`` (PatientName, PatientID,
    OtherPatientIDs, AccessionNumber, …) as strings, for ``register_identifiers``."""
    out: list[str] = []
    for kw in _SCRUB_KEYWORDS:
        try:
            value = ds.get(kw)
        except Exception:  # noqa: BLE001 - a malformed element must not stop scrubbing
            continue
        if value is None or value == "":
            continue
        items = value if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" \
            else [value]
        for v in items:
            if hasattr(v, "get"):  # a sequence item (OtherPatientIDsSequence): skip
                continue
            text = v.decode("latin-1") if isinstance(v, bytes) else str(v)
            if text.strip():
                out.append(text.strip())
    return out


def scrub(text: Any) -> str:
    """``text`` with PN-shaped values, values echoed by pydicom warnings and registered
    identifiers replaced by ``[redacted]``."""
    s = str(text)
    s = _PYDICOM_VALUE.sub(lambda m: m.group(1) + REDACTED, s)
    s = _PN_LIKE.sub(REDACTED, s)
    pattern = _identifier_re
    if pattern is not None:
        s = pattern.sub(REDACTED, s)
    return s


class ScrubFilter(logging.Filter):
    """A logging filter that scrubs the formatted message (and the exception text) of every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string: keep the template only
            message = str(record.msg)
        record.msg = scrub(message)
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            # format the traceback now, scrubbed; handlers then reuse exc_text
            record.exc_text = scrub(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


def install_log_scrubber(logger_: logging.Logger | None = None) -> ScrubFilter:
    """Attach one ``ScrubFilter`` to every handler of ``logger_`` (default: the root logger) and
    route ``warnings`` through logging so library warnings are scrubbed as well. Idempotent."""
    target = logger_ or logging.getLogger()
    logging.captureWarnings(True)
    existing = next((f for h in target.handlers for f in h.filters if isinstance(f, ScrubFilter)),
                    None)
    flt = existing or ScrubFilter()
    handlers = list(target.handlers)
    if target is logging.getLogger() and not handlers and logging.lastResort is not None:
        handlers = [logging.lastResort]  # records with nowhere else to go end up here
    for h in handlers:
        if not any(isinstance(f, ScrubFilter) for f in h.filters):
            h.addFilter(flt)
    return flt
