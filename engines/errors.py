"""Error hierarchy with stable codes.

Every error that can concern a single study carries a ``code`` that the scan / score reports
write into the ``error_code`` column. Codes are part of the public interface: never rename one.
Messages must not contain patient identifiers or raw tag values (see ``engines.privacy``).
"""

from __future__ import annotations


class MediqaError(Exception):
    """Base class. ``code`` is stable and machine-readable."""

    code: str = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code


class UnreadableInput(MediqaError):
    """The file exists but cannot be parsed as a supported image (``unreadable``)."""

    code = "unreadable"


class NotDicom(UnreadableInput):
    code = "not_dicom"


class Truncated(UnreadableInput):
    code = "truncated"


class NoPixelData(UnreadableInput):
    code = "no_pixel_data"


class BadGeometry(UnreadableInput):
    code = "bad_geometry"


class BadTag(UnreadableInput):
    """A tag we rely on (rescale, spacing, rows/columns) is malformed."""

    code = "bad_tag"


class TooLarge(UnreadableInput):
    """The header claims more pixels than the configured cap; refused before allocating."""

    code = "too_large"


class DecoderMissing(MediqaError):
    """The transfer syntax needs a pixel-data plugin that is not installed."""

    code = "decoder_missing"


class UnsupportedInput(MediqaError):
    code = "unsupported"


class EmptyStudy(MediqaError):
    """No usable slice (e.g. every slice is blank)."""

    code = "empty"


class StudyTimeout(MediqaError):
    code = "timeout"


class UnsupportedArtifact(MediqaError):
    """A model file of another preset / format / version than the caller expects."""

    code = "unsupported_artifact"


class BackendUnavailable(MediqaError):
    """An optional runtime is not installed; the message names the pip install line."""

    code = "backend_unavailable"


class ConfigError(MediqaError):
    code = "config"


class DatasetError(MediqaError):
    code = "dataset"


def error_code(exc: BaseException) -> str:
    """Stable code for any exception caught at a per-study boundary."""
    if isinstance(exc, MediqaError):
        return exc.code
    if isinstance(exc, MemoryError):
        return "too_large"
    return "internal"
