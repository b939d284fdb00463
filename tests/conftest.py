"""Shared fixtures: paths of real test images shipped in PyPI packages, and a writer of synthetic
DICOM CT series built from the real ``CT_small.dcm`` header.

Real files (skipped with a reason if the package that ships them is missing):
    ``testdata_file(name)``   any file from pydicom / pydicom-data (``get_testdata_file``)
    ``pydicom_test_dir``      pydicom's ``data/test_files`` folder
    ``ct_small_path``, ``mr_small_path``
    ``nifti_4d_path``         nibabel's ``example4d.nii.gz`` (real EPI, 128×96×24×2)
    ``nifti_anat_path``       nibabel's ``anatomical.nii`` (33×41×25)
    ``retina_path``           scikit-image's ``retina.jpg`` (real colour fundus, 1411×1411)

Series writer — there is no long real CT volume in any package, so 3D series are made from the
real CT_small slice (real header, real anatomy) with new positions:

    paths = write_ct_series(tmp_path / "s", [0.0, 5.0, 10.0])

See ``_write_ct_series`` for every option (shuffled names, instance numbers independent of
position, orientation, ImageType, per-slice HU content, modality).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pytest

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def pytest_configure(config: pytest.Config) -> None:
    """Keep the header cache of ``mediqa score`` (default: the user's cache folder) inside a
    temporary folder for the whole session, subprocesses included."""
    import tempfile

    os.environ.setdefault("MEDIQA_CACHE_DIR", tempfile.mkdtemp(prefix="mediqa-test-cache-"))


def _testdata(name: str) -> Path:
    from pydicom.data import get_testdata_file

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = get_testdata_file(name)
    if p is None:
        pytest.skip(f"{name} is not available offline (install pydicom-data)")
    return Path(p)


@pytest.fixture(scope="session")
def testdata_file() -> Callable[[str], Path]:
    """``testdata_file("CT_small.dcm") -> Path`` from pydicom or pydicom-data."""
    return _testdata


@pytest.fixture(scope="session")
def pydicom_test_dir() -> Path:
    return _testdata("CT_small.dcm").parent


@pytest.fixture(scope="session")
def ct_small_path() -> Path:
    """Real GE CT slice, 128×128, int16, RescaleIntercept −1024, Explicit VR Little Endian."""
    return _testdata("CT_small.dcm")


@pytest.fixture(scope="session")
def mr_small_path() -> Path:
    """Real MR slice, 64×64."""
    return _testdata("MR_small.dcm")


@pytest.fixture(scope="session")
def nifti_4d_path() -> Path:
    from nibabel.testing import data_path

    return Path(data_path) / "example4d.nii.gz"


@pytest.fixture(scope="session")
def nifti_anat_path() -> Path:
    from nibabel.testing import data_path

    return Path(data_path) / "anatomical.nii"


@pytest.fixture(scope="session")
def retina_path() -> Path:
    import skimage

    p = Path(skimage.__file__).parent / "data" / "retina.jpg"
    if not p.exists():
        pytest.skip("scikit-image's retina.jpg is not installed")
    return p


def ct_small_hu(ct_path: Path) -> np.ndarray:
    """The real CT_small slice in HU, float32 (128, 128)."""
    import pydicom

    ds = pydicom.dcmread(ct_path)
    return ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _write_ct_series(
    directory: Path,
    positions: Sequence[float | Sequence[float]],
    *,
    instance_numbers: Sequence[int | None] | None = None,
    filenames: Sequence[str] | None = None,
    series_uid: str | None = None,
    orientation: Sequence[float] | Sequence[Sequence[float]] = AXIAL,
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    hu: Callable[[int], np.ndarray | None] | None = None,
    modality: str = "CT",
    extra: Callable[[int, object], None] | None = None,
) -> list[Path]:
    """Write one DICOM file per entry of ``positions`` from the real CT_small header.

    positions:        z in mm (x, y taken from CT_small) or full (x, y, z) ImagePositionPatient.
    instance_numbers: InstanceNumber per file (default 1..n in the given order; None drops the tag).
    filenames:        file names (default ``slice_###.dcm`` in the given order); pass shuffled
                      names to prove nothing is sorted by name.
    series_uid:       shared SeriesInstanceUID (default: a new one per call).
    orientation:      6 direction cosines for every file, or one 6-tuple per file.
    image_type:       ImageType values (e.g. ("ORIGINAL", "PRIMARY", "LOCALIZER")).
    hu:               ``hu(i) -> float (128,128) HU array`` or None to keep the real anatomy.
    extra:            ``extra(i, dataset)`` to edit anything else before saving.
    Returns the written paths in the order of ``positions``. Pixel data are int16 stored values
    (HU + 1024), Explicit VR Little Endian.
    """
    import pydicom
    from pydicom.uid import generate_uid

    from pydicom.data import get_testdata_file

    src = Path(get_testdata_file("CT_small.dcm"))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    n = len(positions)
    orients = [list(orientation)] * n if not isinstance(orientation[0], (list, tuple)) else [list(o) for o in orientation]  # type: ignore[index]
    paths: list[Path] = []
    template = pydicom.dcmread(src)
    base_hu = template.pixel_array.astype(np.float32) * float(template.RescaleSlope) + float(template.RescaleIntercept)
    x0, y0 = float(template.ImagePositionPatient[0]), float(template.ImagePositionPatient[1])
    for i, pos in enumerate(positions):
        ds = template.copy()
        ds.file_meta = template.file_meta.copy()
        sop = generate_uid()
        ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.SeriesInstanceUID = series_uid
        ds.Modality = modality
        ds.ImageType = list(image_type)
        ds.ImageOrientationPatient = [float(v) for v in orients[i]]
        if isinstance(pos, (int, float)):
            ds.ImagePositionPatient = [x0, y0, float(pos)]
        else:
            ds.ImagePositionPatient = [float(v) for v in pos]
        num = (i + 1) if instance_numbers is None else instance_numbers[i]
        if num is None:
            if "InstanceNumber" in ds:
                del ds.InstanceNumber
        else:
            ds.InstanceNumber = int(num)
        img = hu(i) if hu is not None else None
        img = base_hu if img is None else np.asarray(img, dtype=np.float32)
        stored = np.clip(np.rint(img - float(template.RescaleIntercept)), -32768, 32767).astype(np.int16)
        ds.Rows, ds.Columns = stored.shape
        ds.PixelData = stored.tobytes()
        if extra is not None:
            extra(i, ds)
        name = filenames[i] if filenames is not None else f"slice_{i:03d}.dcm"
        path = directory / name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def write_ct_series() -> Callable[..., list[Path]]:
    """The series writer ``_write_ct_series`` (see its docstring)."""
    return _write_ct_series


@pytest.fixture(scope="session")
def ct_hu(ct_small_path: Path) -> np.ndarray:
    """CT_small in HU, float32 (128, 128) — the real anatomy used by ``write_ct_series``."""
    return ct_small_hu(ct_small_path)


def air_slice(shape: tuple[int, int] = (128, 128), seed: int = 0) -> np.ndarray:
    """An anatomy-free CT slice: air at −1000 HU with mild noise (σ = 10 HU)."""
    rng = np.random.default_rng(seed)
    return (-1000.0 + rng.normal(0.0, 10.0, shape)).astype(np.float32)


@pytest.fixture(scope="session")
def make_air_slice() -> Callable[..., np.ndarray]:
    return air_slice


@pytest.fixture
def symlinks_supported(tmp_path: Path) -> bool:
    try:
        os.symlink(tmp_path, tmp_path / "_probe_link")
        os.unlink(tmp_path / "_probe_link")
        return True
    except (OSError, NotImplementedError):
        pytest.skip("symbolic links are not supported here")
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``slow`` tests run only when asked for (``-m slow``); elsewhere they are skipped visibly."""
    if "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
