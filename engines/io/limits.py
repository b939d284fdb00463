"""Caps on what a reader may allocate or walk, checked *before* any pixel is decoded.

A lying header (RLE data claiming 60000 × 60000 pixels, a NIfTI header claiming 30000³ voxels)
must be refused from the header alone: decoding first would allocate gigabytes and take tens of
seconds before failing (see ``shared/RELIABILITY.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

from engines.errors import TooLarge


@dataclass(frozen=True)
class ReadLimits:
    """Limits applied by every reader and by ``discover_studies``.

    max_slice_pixels: rows × columns × samples of one decoded slice / frame (a count of values,
                      default 8192² × 1 — a 4096 × 4096 RGB image is 50 M values and passes).
    max_study_pixels: values of a fully decoded study (``read_study``); 1 G values is 4 GiB of
                      float32. The lazy ``open_study`` path only checks ``max_slice_pixels``.
    max_depth:        directory levels below the scan root that are visited.
    max_files:        files examined by one walk; beyond it the walk stops with a warning.
    max_frames:       frames of one multi-frame object / slices of one NIfTI volume.
    """

    max_slice_pixels: int = 8192 * 8192
    max_study_pixels: int = 1 << 30
    max_depth: int = 32
    max_files: int = 1_000_000
    max_frames: int = 20_000

    def check_slice(self, rows: int, columns: int, samples: int = 1, *, what: str = "slice") -> None:
        """Raise ``TooLarge`` when one slice of ``rows × columns × samples`` exceeds the cap."""
        n = int(rows) * int(columns) * max(int(samples), 1)
        if rows <= 0 or columns <= 0:
            return
        if n > self.max_slice_pixels:
            raise TooLarge(f"{what} of {rows}x{columns}x{samples} values exceeds the cap of "
                           f"{self.max_slice_pixels} values per slice")

    def check_frames(self, frames: int) -> None:
        """Raise ``TooLarge`` when one multi-frame object has more frames than the cap."""
        if frames > self.max_frames:
            raise TooLarge(f"{frames} frames exceeds the cap of {self.max_frames}")

    def check_study(self, n_slices: int, rows: int, columns: int, samples: int = 1) -> None:
        """Raise ``TooLarge`` when a whole study exceeds the per-slice, per-study or frame caps."""
        self.check_slice(rows, columns, samples)
        if n_slices > self.max_frames:
            raise TooLarge(f"{n_slices} slices exceeds the cap of {self.max_frames}")
        n = int(n_slices) * int(rows) * int(columns) * max(int(samples), 1)
        if n > self.max_study_pixels:
            raise TooLarge(f"study of {n} values exceeds the cap of {self.max_study_pixels} values")


DEFAULT_LIMITS = ReadLimits()
