"""NIfTI (nibabel's real test volumes) and 2D images (scikit-image's retina, Pillow-written files)."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from engines.errors import TooLarge
from engines.io import discover_studies, read_study
from engines.io.image2d import read_image2d
from engines.io.nifti import NiftiSource


def test_example4d_first_volume(nifti_4d_path: Path, tmp_path: Path) -> None:
    shutil.copy(nifti_4d_path, tmp_path / "epi.nii.gz")
    (ref,) = list(discover_studies(tmp_path))
    assert ref.format == "nifti" and ref.kind == "3d" and ref.n_slices == 24
    assert "4d_first_volume" in ref.flags
    assert ref.spacing == pytest.approx((2.2, 2.0, 2.0), abs=1e-4)
    vol = read_study(ref)
    assert vol.array.shape == (24, 96, 128) and vol.array.dtype == np.float32
    canon = np.asarray(nib.as_closest_canonical(nib.load(nifti_4d_path)).dataobj[..., 0], dtype=np.float32)
    # Slice z of the RAS volume, rows anterior → posterior, columns right → left.
    np.testing.assert_allclose(vol.array[5], canon[::-1, ::-1, 5].T)


def test_reorientation_gives_the_same_slices(nifti_anat_path: Path, tmp_path: Path) -> None:
    """The same anatomy stored with flipped / permuted voxel axes reads back identically."""
    img = nib.load(nifti_anat_path)
    data = np.asarray(img.dataobj, dtype=np.float32)
    ras = NiftiSource(nifti_anat_path)
    # Flip x and swap y/z in voxel space, compensating in the affine.
    flipped = data[::-1].transpose(0, 2, 1)
    perm = np.zeros((4, 4))
    perm[0, 0] = -1
    perm[0, 3] = data.shape[0] - 1
    perm[1, 2] = 1
    perm[2, 1] = 1
    perm[3, 3] = 1
    new_affine = img.affine @ perm
    path = tmp_path / "reoriented.nii.gz"
    nib.save(nib.Nifti1Image(flipped, new_affine), path)
    other = NiftiSource(path)
    assert len(other) == len(ras) == 25 and other.spacing == pytest.approx(ras.spacing)
    for z in (0, 12, 24):
        np.testing.assert_array_equal(other.get_slice(z), ras.get_slice(z))


def test_nifti_header_claiming_huge_volume_is_refused(tmp_path: Path) -> None:
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((30000, 30000, 30000))
    hdr.set_data_dtype(np.int16)
    path = tmp_path / "huge.nii"
    with open(path, "wb") as fh:
        fh.write(hdr.binaryblock)
        fh.write(b"\x00" * 4 + b"\x00" * 1024)
    with pytest.raises(TooLarge):
        NiftiSource(path)
    (ref,) = list(discover_studies(tmp_path))
    assert ref.error is not None and ref.error.code == "too_large"


def test_retina_rgb(retina_path: Path) -> None:
    vol = read_image2d(retina_path)
    assert vol.array.shape == (1, 1411, 1411, 3) and vol.is_rgb
    assert vol.array.max() <= 255 and vol.array[0, 700, 700].std() > 0


@pytest.mark.parametrize("mode,dtype,maxval", [("L", np.uint8, 255), ("I;16", np.uint16, 65535)])
def test_grey_png_and_tiff(tmp_path: Path, retina_path: Path, mode: str, dtype, maxval: int) -> None:
    grey = np.asarray(Image.open(retina_path).convert("L"), dtype=np.float64)[::4, ::4]
    arr = (grey / 255.0 * maxval).astype(dtype)
    for suffix in (".png", ".tif"):
        path = tmp_path / f"g{suffix}"
        Image.fromarray(arr).save(path)
        vol = read_image2d(path)
        assert vol.array.shape == (1,) + arr.shape and not vol.is_rgb
        np.testing.assert_array_equal(vol.array[0], arr.astype(np.float32))


def test_rgba_palette_and_grey_rgb(tmp_path: Path, retina_path: Path) -> None:
    rgb = Image.open(retina_path).convert("RGB").resize((200, 200))
    rgb.convert("RGBA").save(tmp_path / "a.png")
    rgb.convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "p.png")
    rgb.convert("L").convert("RGB").save(tmp_path / "g.png")
    a = read_image2d(tmp_path / "a.png")
    np.testing.assert_array_equal(a.array[0], np.asarray(rgb, np.float32))
    assert read_image2d(tmp_path / "p.png").array.shape == (1, 200, 200, 3)
    g = read_image2d(tmp_path / "g.png")
    assert g.array.shape == (1, 200, 200) and "grey_as_rgb" in g.flags
    refs = {r.rel_path: r for r in discover_studies(tmp_path)}
    assert set(refs) == {"a.png", "g.png", "p.png"} and all(r.kind == "2d" and r.format == "image" for r in refs.values())
