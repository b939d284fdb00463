"""Readers: safe discovery, DICOM series, NIfTI and 2D images → ``Volume`` / ``SliceSource``."""

from engines.io.volume import SliceSource, Volume, VolumeSource

__all__ = ["SliceSource", "Volume", "VolumeSource"]
