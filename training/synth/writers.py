"""Writers for the synthetic corpus: DICOM series / single images, NIfTI volumes, PNG / JPEG.

DICOM output is a real, minimal but complete CT / MR / CR image object:
* SOP classes: CT Image Storage, MR Image Storage, Computed Radiography Image Storage; Explicit
  VR Little Endian; 16-bit unsigned stored values (CT with RescaleIntercept −1024, slope 1, so
  stored = HU + 1024 clipped to [0, 4095]).
* Geometry: axial ImageOrientationPatient ``[1,0,0,0,1,0]``, ImagePositionPatient z stepping by
  the slice spacing, PixelSpacing, SliceThickness, SpacingBetweenSlices.
* Every UID comes from ``pydicom.uid.generate_uid(entropy_srcs=[...])`` over the corpus seed
  and the study key, so the same seed gives byte-identical files. Dates and times are fixed.
* No identifiers: PatientName / PatientID are synthetic (``SYNTH^00042`` / ``SYNTH00042``);
  no birth date, no accession number, no institution.

NIfTI: ``.nii.gz`` with an LPS → RAS affine built from the spacing; int16 data; the scan
parameters go into the ``descrip`` field (NIfTI has no place for them otherwise).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
_SOP_CLASS = {"CT": CT_IMAGE_STORAGE, "MR": MR_IMAGE_STORAGE, "CR": CR_IMAGE_STORAGE}
SYNTH_DATE = "20240101"
SYNTH_TIME = "120000"


def make_uid(*parts: object) -> str:
    """Deterministic DICOM UID from ``parts`` (pydicom's prefix + a hash of the parts)."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[str(p) for p in parts]))


def hu_to_stored(hu: np.ndarray) -> np.ndarray:
    """HU → uint16 stored values for RescaleIntercept −1024, slope 1 (clipped to 0..4095)."""
    return np.clip(np.round(np.asarray(hu, dtype=np.float64) + 1024.0), 0, 4095).astype(np.uint16)


def to_uint16(x: np.ndarray, max_value: int = 4095) -> np.ndarray:
    """Non-negative magnitudes → uint16 by rounding (values must already be scaled), clipped."""
    return np.clip(np.round(np.asarray(x, dtype=np.float64)), 0, max_value).astype(np.uint16)


def _base_dataset(modality: str, key: str, seed: int, index: int, tags: Mapping[str, Any]) -> Any:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = _SOP_CLASS[modality]
    ds.SOPClassUID = _SOP_CLASS[modality]
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.Modality = modality
    ds.PatientName = f"SYNTH^{index:05d}"
    ds.PatientID = f"SYNTH{index:05d}"
    ds.StudyInstanceUID = make_uid("mediqa-synth", seed, key, "study")
    ds.SeriesInstanceUID = make_uid("mediqa-synth", seed, key, "series")
    ds.FrameOfReferenceUID = make_uid("mediqa-synth", seed, key, "frame")
    ds.StudyID = f"{index:05d}"
    ds.SeriesNumber = 1
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = SYNTH_DATE
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = SYNTH_TIME
    ds.Manufacturer = "MEDIQA SYNTH"
    ds.ManufacturerModelName = "mediqa-synth"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"] if modality != "CR" else ["ORIGINAL", "PRIMARY"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    for k, v in tags.items():
        if v is not None:
            setattr(ds, k, v)
    return ds


def _write(ds: Any, path: Path) -> None:
    from pydicom import dcmwrite

    path.parent.mkdir(parents=True, exist_ok=True)
    dcmwrite(str(path), ds, enforce_file_format=True)


def write_dicom_series(folder: Path, stored: np.ndarray, *, modality: str,
                       spacing: tuple[float, float, float], tags: Mapping[str, Any], key: str,
                       seed: int, index: int) -> list[Path]:
    """Write (Z, H, W) uint16 ``stored`` as one axial series, one file per slice.

    ``spacing`` = (z, y, x) mm. ``tags`` are added to every slice (Modality-specific acquisition
    tags, rescale, windows, descriptions). Files are named ``IM0001.dcm`` …; positions run
    from z = 0 upwards. Returns the written paths.
    """
    if stored.ndim != 3 or stored.dtype != np.uint16:
        raise ValueError(f"stored must be (Z, H, W) uint16, got {stored.shape} {stored.dtype}")
    dz, dy, dx = spacing
    z, h, w = stored.shape
    paths = []
    for i in range(z):
        ds = _base_dataset(modality, key, seed, index, tags)
        ds.SOPInstanceUID = make_uid("mediqa-synth", seed, key, "instance", i)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [f"{-dx * w / 2:.3f}", f"{-dy * h / 2:.3f}", f"{i * dz:.3f}"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = f"{i * dz:.3f}"
        ds.PixelSpacing = [f"{dy:.6g}", f"{dx:.6g}"]
        ds.SliceThickness = f"{dz:.6g}"
        ds.SpacingBetweenSlices = f"{dz:.6g}"
        ds.Rows, ds.Columns = h, w
        ds.PixelData = np.ascontiguousarray(stored[i]).tobytes()
        path = folder / f"IM{i + 1:04d}.dcm"
        _write(ds, path)
        paths.append(path)
    return paths


def write_dicom_image(path: Path, stored: np.ndarray, *, modality: str,
                      pixel_mm: tuple[float, float], tags: Mapping[str, Any], key: str, seed: int,
                      index: int) -> Path:
    """Write one (H, W) uint16 image as a single-frame DICOM (CT / MR / CR)."""
    if stored.ndim != 2 or stored.dtype != np.uint16:
        raise ValueError(f"stored must be (H, W) uint16, got {stored.shape} {stored.dtype}")
    ds = _base_dataset(modality, key, seed, index, tags)
    ds.SOPInstanceUID = make_uid("mediqa-synth", seed, key, "instance", 0)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.InstanceNumber = 1
    h, w = stored.shape
    ds.Rows, ds.Columns = h, w
    if modality == "CR":
        ds.ImagerPixelSpacing = [f"{pixel_mm[0]:.6g}", f"{pixel_mm[1]:.6g}"]
    else:
        ds.PixelSpacing = [f"{pixel_mm[0]:.6g}", f"{pixel_mm[1]:.6g}"]
        ds.ImagePositionPatient = [f"{-pixel_mm[1] * w / 2:.3f}", f"{-pixel_mm[0] * h / 2:.3f}", "0"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    _write(ds, path)
    return path


def write_nifti(path: Path, volume: np.ndarray, spacing: tuple[float, float, float],
                descrip: str = "") -> Path:
    """Write (Z, H, W) as ``.nii.gz`` int16 (values rounded and clipped to the int16 range).

    Array axes become NIfTI (x = columns, y = rows, z = slices); the affine maps voxel indices to
    RAS mm for an axial LPS acquisition (x and y negated).
    """
    import nibabel as nib

    dz, dy, dx = spacing
    data = np.clip(np.round(np.asarray(volume, dtype=np.float64)), -32768, 32767).astype(np.int16)
    data = np.ascontiguousarray(np.transpose(data, (2, 1, 0)))
    affine = np.diag([-dx, -dy, dz, 1.0])
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = descrip.encode("ascii", "replace")[:79]
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Gzip with a fixed mtime and no file name so the same data gives the same bytes.
    import gzip

    with open(path, "wb") as fh, gzip.GzipFile(fileobj=fh, mode="wb", mtime=0, filename="") as gz:
        gz.write(img.to_bytes())
    return path


def to_uint8(img: np.ndarray) -> np.ndarray:
    """[0, 1] float → uint8 by rounding."""
    return np.clip(np.round(np.asarray(img, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


def write_png(path: Path, img: np.ndarray) -> Path:
    """[0, 1] (H, W) or (H, W, 3) → 8-bit PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(img)).save(path, format="PNG", optimize=False)
    return path


def write_jpeg(path: Path, img: np.ndarray, quality: int = 95) -> Path:
    """[0, 1] (H, W) or (H, W, 3) → baseline JPEG at ``quality``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    u8 = to_uint8(img)
    Image.fromarray(u8).save(path, format="JPEG", quality=int(quality),
                             subsampling=2 if u8.ndim == 3 else 0)
    return path
