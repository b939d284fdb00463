"""NIfTI-1/2 volumes (``.nii``, ``.nii.gz``) via nibabel, read lazily slice by slice.

Orientation: the voxel axes are mapped to the closest canonical RAS+ axes
(``nibabel.orientations.io_orientation``); slices run along the superior (z) axis, from inferior
to superior. Each slice is returned in the radiological layout DICOM axial images use: rows run
anterior → posterior, columns run patient right → left. Nothing is resampled (an oblique volume
is mapped to its closest axes only). Spacing (z, y, x) in mm comes from the header zooms after the
same axis mapping.

4D volumes: the first volume is used (flag ``4d_first_volume``). Headers are checked against
``ReadLimits`` before any voxel is read (nibabel accepts a header claiming 30000³ voxels and only
fails when the data is fetched).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from engines.errors import MediqaError, TooLarge, UnreadableInput, UnsupportedInput
from engines.io.limits import DEFAULT_LIMITS, ReadLimits

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES: tuple[str, ...] = (".nii", ".nii.gz")


def is_nifti_name(path: Path) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in NIFTI_SUFFIXES)


class NiftiSource:
    """Lazy ``SliceSource`` over a NIfTI file: ``get_slice(i)`` reads one slice from disk.

    Slices are float32 (H, W) = (n_y, n_x) in the file's units (scl_slope/scl_inter applied).
    """

    def __init__(self, path: Path, *, limits: ReadLimits = DEFAULT_LIMITS) -> None:
        import nibabel as nib
        from nibabel.orientations import io_orientation

        self.path = Path(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                img = nib.load(str(self.path))
            except MediqaError:
                raise
            except Exception as exc:  # noqa: BLE001 - nibabel raises many types on bad headers
                raise UnreadableInput(f"NIfTI header could not be read ({type(exc).__name__})") from None
        shape = tuple(int(s) for s in img.shape)
        self.flags: list[str] = []
        if len(shape) < 2 or len(shape) > 5 or any(s <= 0 for s in shape):
            raise UnsupportedInput(f"NIfTI with shape {shape} is not an image volume")
        if len(shape) == 2:
            shape = shape + (1,)
        extra = shape[3:]
        if any(s > 1 for s in extra):
            if len(extra) > 1 and extra[1] > 1:
                raise UnsupportedInput(f"NIfTI with shape {shape} (5D) is not supported")
            self.flags.append("4d_first_volume")
        dtype = img.get_data_dtype()
        if dtype.fields is not None or dtype.kind == "c":
            raise UnsupportedInput(f"NIfTI data type {dtype} (RGB / complex) is not supported")
        affine = img.affine if img.affine is not None else np.eye(4)
        ornt = io_orientation(affine)
        if np.isnan(ornt).any():
            ornt = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
            self.flags.append("orientation_unknown")
        # For each RAS output axis: the voxel axis feeding it and whether it is flipped.
        self._src_axis = [0, 0, 0]
        self._flip = [False, False, False]
        for vox_axis, (out_axis, direction) in enumerate(ornt[:3]):
            self._src_axis[int(out_axis)] = vox_axis
            self._flip[int(out_axis)] = direction < 0
        limits.check_slice(shape[self._src_axis[1]], shape[self._src_axis[0]], what="NIfTI slice")
        n_vox = shape[0] * shape[1] * shape[2]
        if shape[self._src_axis[2]] > limits.max_frames:
            raise TooLarge(f"NIfTI with {shape[self._src_axis[2]]} slices exceeds the cap of {limits.max_frames}")
        if n_vox > limits.max_study_pixels:
            raise TooLarge(f"NIfTI volume of {n_vox} voxels exceeds the cap of {limits.max_study_pixels}")
        zooms = [float(z) if np.isfinite(z) and z > 0 else 1.0 for z in img.header.get_zooms()[:3]]
        while len(zooms) < 3:
            zooms.append(1.0)
        self.spacing = (zooms[self._src_axis[2]], zooms[self._src_axis[1]], zooms[self._src_axis[0]])
        self._shape = shape
        self._ndim_data = len(img.shape)
        self._img = img
        self.meta: dict[str, Any] = {"Rows": float(shape[self._src_axis[1]]),
                                     "Columns": float(shape[self._src_axis[0]])}

    def __len__(self) -> int:
        return self._shape[self._src_axis[2]]

    def get_slice(self, index: int) -> np.ndarray:
        """float32 (n_y, n_x): rows anterior → posterior, columns right → left."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(index)
        index %= n
        z_axis = self._src_axis[2]
        vox = n - 1 - index if self._flip[2] else index
        slicer: list[Any] = [slice(None)] * self._ndim_data
        if self._ndim_data == 2:
            slicer = [slice(None), slice(None)]
        else:
            slicer[z_axis] = vox
            for extra in range(3, self._ndim_data):
                slicer[extra] = 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                plane = np.asarray(self._img.dataobj[tuple(slicer)], dtype=np.float32)
            except MediqaError:
                raise
            except Exception as exc:  # noqa: BLE001 - truncated gzip, short files, ...
                raise UnreadableInput(f"NIfTI data could not be read ({type(exc).__name__})") from None
        # Remaining voxel axes in increasing order; put RAS x first, y second.
        remaining = [a for a in range(3) if a != z_axis] if self._ndim_data > 2 else [0, 1]
        x_axis, y_axis = self._src_axis[0], self._src_axis[1]
        if remaining.index(x_axis) != 0:
            plane = plane.T
        if self._flip[0]:
            plane = plane[::-1]
        if self._flip[1]:
            plane = plane[:, ::-1]
        # plane[x, y] in RAS; radiological display: rows = y descending, cols = x descending.
        out = np.ascontiguousarray(plane[::-1, ::-1].T, dtype=np.float32)
        if not np.isfinite(out).all():
            out = np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)
            if "nonfinite_values" not in self.flags:
                self.flags.append("nonfinite_values")
        return out


def open_nifti(path: Path, *, limits: ReadLimits = DEFAULT_LIMITS) -> NiftiSource:
    """Open a NIfTI file lazily; raises ``UnreadableInput`` / ``TooLarge`` / ``UnsupportedInput``."""
    return NiftiSource(path, limits=limits)
