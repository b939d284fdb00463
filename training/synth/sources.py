"""Real base images that ship inside PyPI packages, and their split into train / val / test.

Every base image is located through its package (``pydicom.data.get_testdata_file``,
``importlib.resources``), never through a machine path, and decoded with the package's own reader
(pydicom applies nothing: we apply RescaleSlope/Intercept ourselves so CT is in HU, and invert
MONOCHROME1).

Split units. The held-out splits must not share base images with training. A *unit* is what is
assigned to a split:
* CT and MR: one unit per physical source (one patient / one acquisition). CT has five sources:
  train gets three (the 693 head slice, an abdomen slice ``explicit_VR-UN`` and a skull-base
  slice ``J2K_pixelrep_mismatch``, whose pixel-representation quirk pydicom corrects), val the
  CT_small chest, test the Siemens neck CT ``bad_sequence``. (``eCT_Supplemental`` is not used: a
  processed, skull-stripped map with air holes, not an acquired image.) MR train has five sources (shoulder, abdomen, three heads of which two ship in
  dipy: a DWI b0 volume and a T1 coronal slice); val and test keep their own subjects.
  ``EXTRA_MR`` (used only with the generator option ``train_extra_mr``) holds two more MR
  training sources, two further subjects, from heudiconv's test data: a Siemens 3 T BOLD EPI
  volume and a multiband DWI b0 volume, both stored as Siemens mosaics (one 2D image of tiled
  slices) and cut back into slices here. heudiconv is installed without its dependencies (only
  its data files are read; the package is never imported). ``MORE_MR`` (generator option
  ``train_more_mr``) holds one more: dipy's coarse-matrix T2-weighted brain ``aniso_vox``.
* X-ray and fundus: only two real photographs / radiographs of each kind ship in packages, so
  those images are cut into non-overlapping tiles and the tiles are the units; the val and test
  tiles are image regions never seen in training. This is weaker than a held-out patient and is
  said so in the README. With ``train_windows`` (``training.synth.corpus.plan_corpus``) a
  training study shows a random window of the rectangle of its source's training tiles
  (``split_region``) rather than one tile. (skimage's ``microaneurysms.png`` is not used: a 102² grey crop, it looks
  blurred even when pristine.)

The table ``SOURCES`` is the single place that fixes labels (prompt vocabulary of
``engines.prompts.DEFAULT_VOCAB``) and splits; it does not depend on the seed.

Loaded arrays (``BaseImage.array``):
* CT: float32 (Z, H, W) HU (Z = 1 for single slices), clipped to [-1024, 3071].
* MR: float32 (Z, H, W) ≥ 0, scanner units.
* X-ray: float32 (1, H, W) in [0, 1], MONOCHROME2 (bone bright), robust min-max.
* fundus: float32 (1, H, W, 3) in [0, 1].
``pixel_mm`` is the in-plane pixel size (y, x) of the returned array, ``slice_mm`` the slice
spacing (nominal for single slices).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Collection

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")


@dataclass(frozen=True)
class Unit:
    """A split unit: a whole source, or one tile (``tile`` = (row, col) of ``grid``) of it."""

    unit_id: str
    source: str
    split: str
    tile: tuple[int, int] | None = None


@dataclass(frozen=True)
class SourceSpec:
    """One real base image / volume and its labels."""

    name: str                      # stable id, e.g. "ct-693"
    modality: str                  # ct | mr | xr | fundus
    region: str
    type: str
    loader: str                    # key into _LOADERS
    arg: str                       # file name for the loader
    origin: str                    # package the data ships in
    splits: tuple[str, ...] = ("train",)   # one per tile (row-major) or a single entry
    grid: tuple[int, int] = (1, 1)
    crop_x: tuple[float, float] = (0.0, 1.0)   # column range kept before tiling (fractions)
    header: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def units(self) -> list[Unit]:
        rows, cols = self.grid
        if rows * cols == 1:
            return [Unit(self.name, self.name, self.splits[0])]
        if len(self.splits) != rows * cols:
            raise ValueError(f"{self.name}: {rows * cols} tiles but {len(self.splits)} splits")
        return [Unit(f"{self.name}#r{r}c{c}", self.name, self.splits[r * cols + c], (r, c))
                for r in range(rows) for c in range(cols)]


@dataclass
class BaseImage:
    """A decoded base image (or one tile of it); see the module docstring for units."""

    unit: Unit
    spec: SourceSpec
    array: np.ndarray
    pixel_mm: tuple[float, float]
    slice_mm: float


SOURCES: tuple[SourceSpec, ...] = (
    # --- CT (HU) ---
    SourceSpec("ct-693", "ct", "head", "soft", "dicom", "693_UNCR.dcm", "pydicom-data", ("train",),
               header={"BodyPartExamined": "HEAD", "Manufacturer": "SYNTH (base: 693 head CT)"}),
    SourceSpec("ct-abdomen", "ct", "abdomen", "soft", "dicom", "explicit_VR-UN.dcm", "pydicom-data",
               ("train",), header={"BodyPartExamined": "ABDOMEN",
                                   "Manufacturer": "SYNTH (base: abdomen CT)"}),
    SourceSpec("ct-head2", "ct", "head", "soft", "dicom", "J2K_pixelrep_mismatch.dcm", "pydicom",
               ("train",), header={"BodyPartExamined": "HEAD",
                                   "Manufacturer": "SYNTH (base: skull-base CT)"}),
    SourceSpec("ct-small", "ct", "chest", "lung", "dicom", "CT_small.dcm", "pydicom", ("val",),
               header={"BodyPartExamined": "CHEST", "Manufacturer": "SYNTH (base: GE CT_small)"}),
    SourceSpec("ct-neck", "ct", "other", "soft", "dicom", "bad_sequence.dcm", "pydicom-data",
               ("test",), header={"BodyPartExamined": "NECK",
                                  "Manufacturer": "SYNTH (base: Siemens neck CT)"}),
    # --- MR (magnitudes) ---
    SourceSpec("mr-shoulder", "mr", "extremity", "t1", "dicom", "MR2_UNCR.dcm", "pydicom-data",
               ("train",), header={"BodyPartExamined": "SHOULDER", "RepetitionTime": 350.0,
                                   "EchoTime": 27.0, "SeriesDescription": "T1 SE"}),
    SourceSpec("mr-abdomen", "mr", "abdomen", "t1", "dicom", "MR-SIEMENS-DICOM-WithOverlays.dcm",
               "pydicom", ("train",), header={"BodyPartExamined": "ABDOMEN", "RepetitionTime": 5.53,
                                              "EchoTime": 2.81, "SeriesDescription": "T1 VIBE FS"}),
    SourceSpec("mr-anatomical", "mr", "head", "t1", "nifti", "anatomical.nii", "nibabel", ("train",),
               header={"BodyPartExamined": "HEAD", "RepetitionTime": 500.0, "EchoTime": 15.0,
                       "SeriesDescription": "T1 3D"}),
    SourceSpec("mr-dwi", "mr", "head", "dwi", "dipy_nifti", "S0_10slices.nii.gz", "dipy", ("train",),
               header={"BodyPartExamined": "HEAD", "RepetitionTime": 8000.0, "EchoTime": 80.0,
                       "SeriesDescription": "DWI b0"}),
    SourceSpec("mr-t1cor", "mr", "head", "t1", "dipy_npy", "t1_coronal_slice.npy", "dipy", ("train",),
               header={"BodyPartExamined": "HEAD", "RepetitionTime": 2000.0, "EchoTime": 3.0,
                       "SeriesDescription": "T1 MPRAGE COR"}),
    SourceSpec("mr-emri", "mr", "head", "t1", "dicom", "emri_small.dcm", "pydicom-data", ("val",),
               header={"BodyPartExamined": "HEAD", "RepetitionTime": 9.0, "EchoTime": 4.6,
                       "SeriesDescription": "T1 TFE"}),
    SourceSpec("mr-epi", "mr", "head", "other", "nifti4d", "example4d.nii.gz", "nibabel", ("test",),
               header={"BodyPartExamined": "HEAD", "RepetitionTime": 2000.0, "EchoTime": 30.0,
                       "SeriesDescription": "EPI BOLD"}),
    SourceSpec("mr-small", "mr", "other", "t2", "dicom", "MR_small.dcm", "pydicom", ("test",),
               header={"RepetitionTime": 4000.0, "EchoTime": 240.0, "SeriesDescription": "T2 SE"}),
    # --- X-ray (CR) ---
    SourceSpec("xr-chest", "xr", "chest", "grey", "dicom", "RG1_UNCR.dcm", "pydicom-data",
               ("train", "train", "val", "test"), grid=(2, 2),
               header={"BodyPartExamined": "CHEST"}),
    SourceSpec("xr-leg", "xr", "extremity", "grey", "dicom", "RG3_UNCR.dcm", "pydicom-data",
               ("train", "train", "val", "test"), grid=(4, 1), crop_x=(0.25, 0.75),
               header={"BodyPartExamined": "EXTREMITY"}),
    # --- fundus (RGB) ---
    SourceSpec("fundus-retina", "fundus", "eye", "color", "skimage", "retina.jpg", "scikit-image",
               ("train", "train", "val", "test"), grid=(2, 2)),
)


# More MR training sources (generator option ``train_extra_mr``), two subjects that ship in
# heudiconv's test data; training only, so validation and test are the same with or without them.
EXTRA_MR: tuple[SourceSpec, ...] = (
    SourceSpec("mr-bold", "mr", "head", "other", "mosaic", "axasc35.dcm", "heudiconv", ("train",),
               header={"BodyPartExamined": "HEAD", "RepetitionTime": 3000.0, "EchoTime": 30.0,
                       "SeriesDescription": "EPI BOLD"}),
    SourceSpec("mr-dwi-mb", "mr", "head", "dwi", "mosaic", "b0dwiForFmap/b0dwi_for_fmap+00001.dcm",
               "heudiconv", ("train",),
               header={"BodyPartExamined": "HEAD", "RepetitionTime": 4150.0, "EchoTime": 85.2,
                       "SeriesDescription": "DWI b0 MB3"}),
)


# One more MR training source (generator option ``train_more_mr``), a further subject that ships
# in dipy's data files: ``aniso_vox.nii.gz``, a whole-brain T2-weighted (DWI b0) volume acquired on
# a coarse 58 × 58 matrix (4 × 4 mm pixels, 24 slices of 5 mm), the kind of matrix the coarse test
# sources have. (``ascm_out_test.nii.gz`` is the same volume denoised, and ``test_piesno.nii.gz`` is
# a noisy acquisition, so neither is a clean base.) Training only.
MORE_MR: tuple[SourceSpec, ...] = (
    SourceSpec("mr-aniso", "mr", "head", "dwi", "dipy_nifti", "aniso_vox.nii.gz", "dipy", ("train",),
               header={"BodyPartExamined": "HEAD", "RepetitionTime": 8000.0, "EchoTime": 90.0,
                       "SeriesDescription": "DWI b0"}),
)


#: The optional source groups, by the generator option (``training.synth.corpus``) that adds
#: them, in table order. Functions below take the names of the options that are on.
OPTIONAL_SOURCES: dict[str, tuple[SourceSpec, ...]] = {"train_extra_mr": EXTRA_MR, "train_more_mr": MORE_MR}


def _source_table(optional: Collection[str] = ()) -> tuple[SourceSpec, ...]:
    """``SOURCES`` plus the ``OPTIONAL_SOURCES`` groups named in ``optional``, in table order."""
    unknown = set(optional) - set(OPTIONAL_SOURCES)
    if unknown:
        raise ValueError(f"no optional source group {sorted(unknown)}; known: {list(OPTIONAL_SOURCES)}")
    return SOURCES + tuple(s for name, group in OPTIONAL_SOURCES.items() if name in optional for s in group)


def sources_fingerprint(optional: Collection[str] = ()) -> str:
    """12 hex digits that change whenever the table of sources, their labels or splits change
    (with ``optional`` groups, their rows too; without them the value is what it always was).

    Recorded next to a generated corpus so that a recipe never reuses a corpus made from another
    table (see ``training.recipe.ensure_corpus``)."""
    rows = [[s.name, s.modality, s.region, s.type, s.loader, s.arg, list(s.splits), list(s.grid),
             list(s.crop_x)] for s in _source_table(optional)]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:12]


def source_by_name(name: str) -> SourceSpec:
    for s in _source_table(OPTIONAL_SOURCES):
        if s.name == name:
            return s
    raise KeyError(f"unknown synthetic source {name!r}")


def all_units(modality: str | None = None, optional: Collection[str] = ()) -> list[Unit]:
    """Units of every source (optionally one modality), in table order, with the ``optional``
    source groups appended."""
    return [u for s in _source_table(optional) if modality in (None, s.modality) for u in s.units()]


def _dicom_path(name: str) -> str:
    from pydicom.data import get_testdata_file

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = get_testdata_file(name)
    if path is None:
        raise FileNotFoundError(f"{name} not found: install pydicom-data (pip install pydicom-data)")
    return str(path)


def _load_dicom(name: str) -> tuple[np.ndarray, tuple[float, float], float]:
    return _read_dicom(_dicom_path(name))[1:]


def _read_dicom(path: str) -> tuple[Any, np.ndarray, tuple[float, float], float]:
    """(dataset, float32 (Z, H, W) in HU for CT / stored values otherwise with MONOCHROME1
    inverted, pixel mm, slice mm) of one DICOM file."""
    import pydicom

    ds = pydicom.dcmread(path)
    arr = ds.pixel_array.astype(np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    if ds.get("Modality") == "CT":
        arr = arr * slope + intercept
        arr = np.clip(arr, -1024.0, 3071.0)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        arr = arr.max() - arr
    ps = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    fallback = 0.15 if ds.get("Modality") in ("CR", "DX") else 1.0
    pixel = (float(ps[0]), float(ps[1])) if ps and float(ps[0]) > 0 else (fallback, fallback)
    thick = float(ds.get("SliceThickness") or 3.0)
    if "PerFrameFunctionalGroupsSequence" in ds:  # enhanced MR: spacing lives in the groups
        shared = ds.get("SharedFunctionalGroupsSequence")
        try:
            pm = shared[0].PixelMeasuresSequence[0]
            pixel = (float(pm.PixelSpacing[0]), float(pm.PixelSpacing[1]))
            thick = float(pm.SliceThickness)
        except (AttributeError, IndexError, TypeError):
            log.debug("no shared pixel measures in %s", path)
    return ds, arr, pixel, thick


def _read_nifti(ref: Any, max_slice_mm: float | None = None) -> tuple[np.ndarray, tuple[float, float], float]:
    """A NIfTI file shipped in a package (x, y, z[, t]) → (z, y, x) with y down the rows, ≥ 0;
    the first volume of a 4D file. ``max_slice_mm`` caps a nonsensical nominal z-zoom."""
    import nibabel as nib

    with resources.as_file(ref) as p:
        img = nib.load(str(p))
        data = np.asarray(img.dataobj, dtype=np.float32)
        zooms = img.header.get_zooms()
    if data.ndim == 4:
        data = data[..., 0]
    vol = np.ascontiguousarray(np.transpose(data, (2, 1, 0))[:, ::-1, :])
    slice_mm = float(zooms[2]) if max_slice_mm is None else float(min(zooms[2], max_slice_mm))
    return np.clip(vol, 0.0, None), (float(zooms[1]), float(zooms[0])), slice_mm


def _load_nifti(name: str) -> tuple[np.ndarray, tuple[float, float], float]:
    return _read_nifti(resources.files("nibabel") / "tests" / "data" / name)


def _dipy_file(name: str) -> Any:
    try:
        ref = resources.files("dipy") / "data" / "files" / name
    except ModuleNotFoundError as exc:
        raise FileNotFoundError(f"{name} ships in dipy: pip install dipy") from exc
    return ref


def _load_dipy_nifti(name: str) -> tuple[np.ndarray, tuple[float, float], float]:
    # S0_10slices stores 10 thin-slab slices with a nominal 53 mm z-zoom: keep a sane spacing.
    return _read_nifti(_dipy_file(name), max_slice_mm=5.0)


def _load_dipy_npy(name: str) -> tuple[np.ndarray, tuple[float, float], float]:
    """A single 2D slice saved as .npy (dipy's T1 coronal slice, values in [0, 1], 1 mm nominal)."""
    with resources.as_file(_dipy_file(name)) as p:
        arr = np.load(str(p), allow_pickle=False).astype(np.float32)
    return np.clip(arr, 0.0, None)[None], (1.0, 1.0), 1.0


def _heudiconv_file(name: str) -> Any:
    """A file of heudiconv's test data, located without importing heudiconv (it is installed
    with ``--no-deps``; its own imports would need nipype)."""
    spec = importlib.util.find_spec("heudiconv")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{name} ships in heudiconv: pip install --no-deps heudiconv")
    path = Path(list(spec.submodule_search_locations)[0]) / "tests" / "data" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed heudiconv")
    return path


def _load_mosaic(name: str) -> tuple[np.ndarray, tuple[float, float], float]:
    """A Siemens mosaic (one 2D image holding a volume's slices as a square grid of tiles,
    row-major; the slice count in the private tag (0019,100A) NumberOfImagesInMosaic) → (Z, H, W)."""
    ds, arr, pixel, thick = _read_dicom(str(_heudiconv_file(name)))
    img = arr[0]
    elem = ds.get((0x0019, 0x100A))
    if elem is None:
        raise ValueError(f"{name}: no NumberOfImagesInMosaic (0019,100A): not a Siemens mosaic")
    value = elem.value
    if isinstance(value, (bytes, bytearray)):   # implicit VR: raw little-endian US
        value = int.from_bytes(bytes(value[:2]), "little")
    n = int(value)
    grid = int(np.ceil(np.sqrt(n)))
    th, tw = img.shape[0] // grid, img.shape[1] // grid
    if n < 1 or th < 8 or tw < 8:
        raise ValueError(f"{name}: {n} slices do not tile a {img.shape} mosaic")
    vol = np.stack([img[(k // grid) * th:(k // grid + 1) * th, (k % grid) * tw:(k % grid + 1) * tw]
                    for k in range(n)])
    thick = float(ds.get("SpacingBetweenSlices") or thick)   # a mosaic's slices may have gaps
    return np.clip(vol, 0.0, None), pixel, thick


def _load_skimage(name: str) -> tuple[np.ndarray, tuple[float, float], float]:
    ref = resources.files("skimage") / "data" / name
    with resources.as_file(ref) as p:
        img = np.asarray(Image.open(str(p)).convert("RGB"), dtype=np.float32) / 255.0
    return img[None], (0.01, 0.01), 1.0


_LOADERS: dict[str, Callable[[str], tuple[np.ndarray, tuple[float, float], float]]] = {
    "dicom": _load_dicom,
    "nifti": _load_nifti,
    "nifti4d": _load_nifti,     # 4D: the first volume (the key stays: it names the source's file kind)
    "skimage": _load_skimage,
    "dipy_nifti": _load_dipy_nifti,
    "dipy_npy": _load_dipy_npy,
    "mosaic": _load_mosaic,
}


@lru_cache(maxsize=32)
def _load_source(name: str) -> tuple[np.ndarray, tuple[float, float], float]:
    spec = source_by_name(name)
    arr, pixel, thick = _LOADERS[spec.loader](spec.arg)
    if spec.modality == "xr":
        lo, hi = np.percentile(arr, (0.5, 99.5))
        arr = np.clip((arr - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    log.debug("loaded %s %s pixel=%s", name, arr.shape, pixel)
    return arr.astype(np.float32), pixel, thick


def _tiles(spec: SourceSpec, arr: np.ndarray, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    """The tiles ``rows[0] <= r < rows[1]``, ``cols[0] <= c < cols[1]`` of the source's grid as
    one copied array (``crop_x`` applied first)."""
    if spec.crop_x != (0.0, 1.0):
        w = arr.shape[2]
        arr = arr[:, :, int(spec.crop_x[0] * w): int(spec.crop_x[1] * w)]
    n_rows, n_cols = spec.grid
    h, w = arr.shape[1:3]
    return np.array(arr[:, rows[0] * h // n_rows: rows[1] * h // n_rows,
                        cols[0] * w // n_cols: cols[1] * w // n_cols], copy=True)


def load_unit(unit: Unit) -> BaseImage:
    """Decode the unit's source (cached per process) and cut its tile. Arrays as in the module doc."""
    spec = source_by_name(unit.source)
    arr, pixel, thick = _load_source(unit.source)
    r, c = unit.tile if unit.tile is not None else (0, 0)
    return BaseImage(unit=unit, spec=spec, array=_tiles(spec, arr, (r, r + 1), (c, c + 1)), pixel_mm=pixel,
                     slice_mm=thick)


def split_region(unit: Unit) -> np.ndarray:
    """The part of the unit's source covered by every tile of the unit's split, as one array.

    For a tiled source whose tiles of this split form a rectangle (the training tiles of each
    X-ray and fundus source: the top row / the top two rows), that rectangle; otherwise (an
    untiled source, or same-split tiles that are not a rectangle) the unit's own tile. A window
    taken anywhere inside it never shows pixels of another split's tile.
    """
    spec = source_by_name(unit.source)
    if unit.tile is None:
        return load_unit(unit).array
    mine = [(u.tile[0], u.tile[1]) for u in spec.units() if u.split == unit.split and u.tile is not None]
    r0, r1 = min(r for r, _ in mine), max(r for r, _ in mine) + 1
    c0, c1 = min(c for _, c in mine), max(c for _, c in mine) + 1
    if len(mine) != (r1 - r0) * (c1 - c0):
        r0, c0 = unit.tile
        r1, c1 = r0 + 1, c0 + 1
    return _tiles(spec, _load_source(unit.source)[0], (r0, r1), (c0, c1))


def check_sources(optional: Collection[str] = (), names: Collection[str] | None = None) -> dict[str, str]:
    """Which sources can be loaded here (``optional`` source groups included): name → "ok" or the
    error message (``names``: only those). A loaded source stays in this process' cache, so
    forked render workers inherit it."""
    out: dict[str, str] = {}
    for s in _source_table(optional):
        if names is not None and s.name not in names:
            continue
        try:
            _load_source(s.name)
            out[s.name] = "ok"
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            out[s.name] = f"{type(exc).__name__}: {exc}"
    return out
