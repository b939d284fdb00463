"""Salient-slice selection on real anatomy (CT_small slices, nibabel's anatomical.nii)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engines.errors import EmptyStudy
from engines.io import Volume, VolumeSource, discover_studies, open_study
from engines.io.nifti import NiftiSource
from engines.slices import select_salient_slices
from tests.conftest import air_slice


class CountingSource:
    """Wraps a real SliceSource and records every index decoded."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.meta, self.flags, self.spacing = inner.meta, inner.flags, inner.spacing
        self.calls: list[int] = []

    def __len__(self) -> int:
        return len(self.inner)

    def get_slice(self, index: int) -> np.ndarray:
        self.calls.append(index)
        return self.inner.get_slice(index)


def _ct_volume(ct_hu: np.ndarray, n: int, first: int, last: int) -> VolumeSource:
    """n slices: air outside [first, last], the real CT_small slice (with a varying shift) inside."""
    vol = np.empty((n, 128, 128), np.float32)
    for i in range(n):
        vol[i] = np.roll(ct_hu, i % 7, axis=1) if first <= i <= last else air_slice(seed=i)
    return VolumeSource(Volume(vol, meta={"Modality": "CT"}))


def test_exact_anatomy_range_and_middle_of_regions(ct_hu: np.ndarray) -> None:
    src = CountingSource(_ct_volume(ct_hu, 200, 37, 161))
    sel = select_salient_slices(src, 7, modality="CT")
    assert sel.anatomy == (37, 161)
    usable = list(range(37, 162))
    regions = np.array_split(np.asarray(usable), 7)
    assert sel.indices == [int(r[len(r) // 2]) for r in regions]
    assert sel.n_total == 200 and sel.n_decoded == len(set(src.calls)) == len(src.calls)
    assert sel.n_decoded <= 0.25 * 200
    for idx, img in zip(sel.indices, sel.slices):
        np.testing.assert_array_equal(img, src.inner.get_slice(idx))


def test_fewer_usable_than_k_repeats_evenly(ct_hu: np.ndarray) -> None:
    src = _ct_volume(ct_hu, 40, 10, 12)  # 3 slices of anatomy
    sel = select_salient_slices(src, 7, modality="CT")
    assert sel.anatomy == (10, 12)
    assert sel.indices == [10, 10, 10, 11, 11, 12, 12]  # usable[floor(i*3/7)]


def test_single_2d_image(ct_hu: np.ndarray) -> None:
    sel = select_salient_slices(VolumeSource(Volume(ct_hu[None])), 7, modality="CT")
    assert sel.indices == [0] * 7 and sel.n_decoded == 1


def test_blank_volume_raises_empty_study() -> None:
    src = VolumeSource(Volume(np.full((50, 32, 32), -1000.0, np.float32)))
    with pytest.raises(EmptyStudy):
        select_salient_slices(src, 7, modality="CT")


def test_no_anatomy_falls_back_to_whole_range() -> None:
    vol = np.stack([air_slice((64, 64), seed=i) for i in range(30)])  # varying air, no body
    sel = select_salient_slices(VolumeSource(Volume(vol)), 7, modality="CT")
    assert "no_anatomy" in sel.flags and sel.anatomy == (0, 29)
    assert sel.indices == [int(r[len(r) // 2]) for r in np.array_split(np.arange(30), 7)]


def test_otsu_rule_on_real_mr_nifti(nifti_anat_path: Path) -> None:
    src = CountingSource(NiftiSource(nifti_anat_path))
    n = len(src)
    sel = select_salient_slices(src, 7, modality="MR")
    assert len(sel.indices) == 7 and sel.indices == sorted(sel.indices)
    assert 0 <= sel.anatomy[0] <= sel.anatomy[1] < n
    assert all(sel.anatomy[0] <= i <= sel.anatomy[1] for i in sel.indices)


def test_300_slice_dicom_series_decodes_under_a_quarter(tmp_path_factory, write_ct_series, ct_hu) -> None:
    """300 real-header DICOM files (CT_small anatomy in 60..239, air at both ends)."""
    d = tmp_path_factory.mktemp("long")
    n = 300
    write_ct_series(d, [1.25 * i for i in range(n)],
                    hu=lambda i: None if 60 <= i < 240 else air_slice(seed=i))
    (ref,) = list(discover_studies(d))
    assert ref.n_slices == n
    src = CountingSource(open_study(ref))
    sel = select_salient_slices(src, 7, modality=ref.meta.get("Modality"))
    assert sel.anatomy == (60, 239)
    assert sel.n_decoded == len(src.calls) <= 0.25 * n
    assert len(set(sel.indices)) == 7


def test_scan_stride_parameter(ct_hu: np.ndarray) -> None:
    src = CountingSource(_ct_volume(ct_hu, 100, 20, 79))
    sel = select_salient_slices(src, 7, modality="CT", scan_stride=10)
    assert sel.anatomy == (20, 79)
    assert set(range(0, 100, 10)) <= set(src.calls)
