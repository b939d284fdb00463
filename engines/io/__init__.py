"""Readers: safe discovery, DICOM series, NIfTI and 2D images → ``Volume`` / ``SliceSource``."""

from engines.io.discover import StudyRef, discover_studies, iter_files, open_study, read_study
from engines.io.limits import DEFAULT_LIMITS, ReadLimits
from engines.io.meta import META_WHITELIST, extract_meta
from engines.io.volume import SliceSource, Volume, VolumeSource

__all__ = [
    "DEFAULT_LIMITS", "META_WHITELIST", "ReadLimits", "SliceSource", "StudyRef", "Volume", "VolumeSource",
    "discover_studies", "extract_meta", "iter_files", "open_study", "read_study",
]
