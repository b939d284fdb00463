"""The ``Volume`` every reader returns, and the lazy ``SliceSource`` protocol.

A ``Volume`` is fully decoded. A ``SliceSource`` decodes one slice at a time so that salient-slice
selection can look at a strided subset of a long series without decoding all of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass
class Volume:
    """A decoded study.

    array:   float32 (Z, H, W) grey or (Z, H, W, 3) RGB, in physical units (HU for CT after
             RescaleSlope/Intercept; stored values otherwise; MONOCHROME1 already inverted).
             A 2D image is a one-slice volume (Z == 1).
    spacing: (z, y, x) in mm; 1.0 where unknown (flagged ``spacing_unknown``).
    meta:    whitelisted, non-identifying tags (see ``engines.io.meta.META_WHITELIST``).
    flags:   geometry / content warnings, e.g. ``missing_slice``, ``duplicate_position``,
             ``uneven_spacing``, ``gantry_tilt``, ``single_slice``.
    """

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    meta: dict[str, Any] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)

    @property
    def is_rgb(self) -> bool:
        return self.array.ndim == 4 and self.array.shape[-1] == 3

    @property
    def n_slices(self) -> int:
        return int(self.array.shape[0])


@runtime_checkable
class SliceSource(Protocol):
    """Lazy access to the slices of a study, in geometric order.

    ``get_slice(i)`` returns float32 (H, W) or (H, W, 3) in physical units, decoding only slice i.
    """

    meta: dict[str, Any]
    flags: list[str]
    spacing: tuple[float, float, float]

    def __len__(self) -> int: ...

    def get_slice(self, index: int) -> np.ndarray: ...


class VolumeSource:
    """Adapts an already decoded ``Volume`` to the ``SliceSource`` protocol."""

    def __init__(self, volume: Volume) -> None:
        self.volume = volume
        self.meta = volume.meta
        self.flags = volume.flags
        self.spacing = volume.spacing

    def __len__(self) -> int:
        return self.volume.n_slices

    def get_slice(self, index: int) -> np.ndarray:
        return self.volume.array[index]
