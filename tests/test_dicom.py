"""DICOM decoding on real files of every transfer syntax shipped by pydicom / pydicom-data."""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest

from engines.errors import BadTag, DecoderMissing, MediqaError, NoPixelData, Truncated, UnreadableInput
from engines.io import discover_studies, open_study, read_study
from engines.io.dicom import decode_file, read_dataset, scan_header, sort_geometry
from engines.io.meta import extract_meta


def _raw(path: Path, frame: int | None = None) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
        return pydicom.pixels.pixel_array(ds, index=frame)


def test_ct_small_in_hounsfield_units(ct_small_path: Path) -> None:
    img = decode_file(ct_small_path)
    raw = _raw(ct_small_path)
    assert img.dtype == np.float32 and img.shape == (128, 128)
    np.testing.assert_array_equal(img, raw.astype(np.float32) - 1024.0)  # slope 1, intercept -1024
    assert img.min() < -500 < img.max()  # air and tissue both present


@pytest.mark.parametrize("name", [
    "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm", "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_padded.dcm",
])
def test_mr_small_every_lossless_syntax_equals_uncompressed(testdata_file, mr_small_path: Path, name: str) -> None:
    ref = decode_file(mr_small_path)
    got = decode_file(testdata_file(name))
    assert got.shape == (64, 64)
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("lossless,uncompressed", [
    ("693_J2KR.dcm", "693_UNCR.dcm"),          # JPEG 2000 lossless, CT 512²
    ("RG1_J2KR.dcm", "RG1_UNCR.dcm"),          # JPEG 2000 lossless, CR 1955×1841
    ("emri_small_jpeg_ls_lossless.dcm", "emri_small.dcm"),
    ("emri_small_RLE.dcm", "emri_small.dcm"),
])
def test_pydicom_data_lossless_pairs(testdata_file, lossless: str, uncompressed: str) -> None:
    a = decode_file(testdata_file(lossless), 0 if "emri" in lossless else None)
    b = decode_file(testdata_file(uncompressed), 0 if "emri" in lossless else None)
    np.testing.assert_array_equal(a, b)


def test_jpeg2000_lossy_close_to_uncompressed(testdata_file) -> None:
    a = decode_file(testdata_file("693_J2KI.dcm"))
    b = decode_file(testdata_file("693_UNCI.dcm"))
    assert a.shape == b.shape == (512, 512)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99


@pytest.mark.parametrize("name", ["image_dfl.dcm", "JPGExtended.dcm", "JPEGLSNearLossless_16.dcm", "bad_sequence.dcm",
                                  "JPEG-LL.dcm"])
def test_other_syntaxes_decode(testdata_file, name: str) -> None:
    img = decode_file(testdata_file(name))
    assert img.ndim == 2 and img.dtype == np.float32 and np.isfinite(img).all() and img.max() > img.min()


def test_monochrome1_is_inverted(testdata_file) -> None:
    path = testdata_file("RG3_UNCI.dcm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    raw = _raw(path).astype(np.float32)
    img = decode_file(path)
    top = 2 ** int(ds.BitsStored) - 1
    slope = float(ds.get("RescaleSlope", 1) or 1)
    icpt = float(ds.get("RescaleIntercept", 0) or 0)
    np.testing.assert_allclose(img, (top - raw) * slope + icpt)


@pytest.mark.parametrize("name", ["SC_rgb_rle.dcm", "SC_rgb_jpeg_dcmtk.dcm", "SC_ybr_full_422_uncompressed.dcm",
                                  "examples_palette.dcm", "SC_rgb_small_odd_big_endian.dcm", "ExplVR_BigEnd.dcm"])
def test_colour_files_decode_to_rgb(testdata_file, name: str) -> None:
    img = decode_file(testdata_file(name))
    assert img.ndim == 3 and img.shape[-1] == 3 and img.dtype == np.float32
    assert not np.array_equal(img[..., 0], img[..., 1])  # real colour, not grey repeated


def test_ybr_full_422_converted_to_rgb(testdata_file) -> None:
    # The same red/green/blue test pattern stored as RGB and as subsampled YBR.
    rgb = decode_file(testdata_file("SC_rgb.dcm"))
    ybr = decode_file(testdata_file("SC_ybr_full_422_uncompressed.dcm"))
    assert rgb.shape == ybr.shape
    assert np.abs(rgb - ybr).mean() < 8.0  # within chroma-subsampling / rounding error on 0..255


def test_enhanced_ct_per_frame_geometry_and_rescale(testdata_file, tmp_path: Path) -> None:
    shutil.copy(testdata_file("eCT_Supplemental.dcm"), tmp_path / "ect.dcm")
    (ref,) = list(discover_studies(tmp_path))
    assert ref.error is None and ref.kind == "3d" and ref.n_slices == 2
    assert "multi_frame" in ref.flags and "derived" in ref.flags
    ds = pydicom.dcmread(tmp_path / "ect.dcm", stop_before_pixels=True)
    z = [float(f.PlanePositionSequence[0].ImagePositionPatient[2]) for f in ds.PerFrameFunctionalGroupsSequence]
    assert ref.spacing is not None and ref.spacing[0] == pytest.approx(abs(z[1] - z[0]))  # axial: normal ∥ z
    vol = read_study(ref)
    assert vol.array.shape == (2, 512, 512)
    raw0 = _raw(tmp_path / "ect.dcm", ref._slices[0][1]).astype(np.float32)
    np.testing.assert_array_equal(vol.array[0], raw0 - 1024.0)  # shared-group RescaleIntercept −1024
    assert vol.meta["Modality"] == "CT"


def test_enhanced_mr_multi_frame(testdata_file, tmp_path: Path) -> None:
    shutil.copy(testdata_file("emri_small.dcm"), tmp_path / "emri.dcm")
    (ref,) = list(discover_studies(tmp_path))
    assert ref.kind == "3d" and ref.n_slices == 10
    src = open_study(ref)
    assert len(src) == 10
    np.testing.assert_array_equal(src.get_slice(3), _raw(tmp_path / "emri.dcm", ref._slices[3][1]).astype(np.float32))
    assert ref.meta["MagneticFieldStrength"] == pytest.approx(3.0)


def test_truncated_pixel_data_fails(testdata_file) -> None:
    with pytest.raises(Truncated):
        decode_file(testdata_file("MR_truncated.dcm"))


@pytest.mark.parametrize("name", ["JPEG-lossy.dcm", "JPEG2000-embedded-sequence-delimiter.dcm"])
def test_deliberately_broken_files_fail_with_a_code(testdata_file, name: str) -> None:
    with pytest.raises(UnreadableInput) as info:
        decode_file(testdata_file(name))
    assert info.value.code == "unreadable"
    assert "JPEG" in info.value.message  # names the transfer syntax


def test_sr_without_pixels(testdata_file) -> None:
    with pytest.raises(NoPixelData):
        scan_header(testdata_file("test-SR.dcm"))


def _write_ct_copy(ct_small_path: Path, out: Path, edit) -> Path:
    ds = pydicom.dcmread(ct_small_path)
    edit(ds)
    ds.save_as(out, enforce_file_format=True)
    return out


def test_decoder_missing_names_the_transfer_syntax(ct_small_path: Path, tmp_path: Path) -> None:
    from pydicom.encaps import encapsulate
    from pydicom.uid import MPEG2MPML

    def edit(ds):
        ds.file_meta.TransferSyntaxUID = MPEG2MPML
        ds.PixelData = encapsulate([b"\x00" * 64])
        ds["PixelData"].VR = "OB"

    path = _write_ct_copy(ct_small_path, tmp_path / "mpeg.dcm", edit)
    scan_header(path)  # the header is fine
    with pytest.raises(DecoderMissing) as info:
        decode_file(path)
    assert "MPEG2" in info.value.message and info.value.code == "decoder_missing"


@pytest.mark.parametrize("bad", ["1,5", "abc", "0"])
def test_malformed_rescale_is_bad_tag(ct_small_path: Path, tmp_path: Path, bad: str) -> None:
    from pydicom.dataelem import RawDataElement

    def edit(ds):
        # Written raw, as a broken modality would, bypassing pydicom's value validation.
        ds[0x00281053] = RawDataElement(pydicom.tag.Tag(0x00281053), "DS", len(bad.encode()) + len(bad) % 2,
                                        (bad + " " * (len(bad) % 2)).encode(), 0, False, True)

    path = _write_ct_copy(ct_small_path, tmp_path / "badslope.dcm", edit)
    with pytest.raises(BadTag):
        decode_file(path)


def test_header_scan_reads_no_pixels_and_meta_has_no_identifiers(ct_small_path: Path) -> None:
    hdr = scan_header(ct_small_path)
    assert (hdr.rows, hdr.columns, hdr.frames) == (128, 128, 1)
    assert hdr.position is not None and hdr.orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    ds = read_dataset(ct_small_path, header_only=True)
    assert "PixelData" not in ds
    meta = extract_meta(ds)
    assert meta["Modality"] == "CT" and meta["KVP"] > 0 and meta["RescaleIntercept"] == -1024.0
    text = repr(meta)
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber"):
        assert kw not in meta
        value = str(ds.get(kw, "") or "")
        if value:
            assert value not in text


def test_field_strength_in_gauss_becomes_tesla(ct_small_path: Path) -> None:
    ds = pydicom.dcmread(ct_small_path, stop_before_pixels=True)
    ds.MagneticFieldStrength = 15000
    assert extract_meta(ds)["MagneticFieldStrength"] == pytest.approx(1.5)
    ds.MagneticFieldStrength = 3
    assert extract_meta(ds)["MagneticFieldStrength"] == pytest.approx(3.0)


def test_sort_geometry_projects_on_normal_and_flags() -> None:
    # Coronal slices (normal along y): positions differ in y only; InstanceNumbers reversed.
    orient = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
    pos = [(0.0, y, 0.0) for y in (4.0, 0.0, 2.0, 8.0)]
    geo = sort_geometry(pos, orient, [1, 2, 3, 4])
    ys = [pos[i][1] for i in geo.order]
    assert ys == sorted(ys) or ys == sorted(ys, reverse=True)
    assert geo.z_spacing == pytest.approx(2.0)
    assert "missing_slice" in geo.flags  # 4 → 8 skips one slice
    geo = sort_geometry([None, None, None], orient, [3, 1, 2])
    assert geo.order == [1, 2, 0] and "sorted_by_instance" in geo.flags


def _readme_coverage() -> tuple[int, int]:
    readme = Path(__file__).resolve().parents[1] / "README.md"
    text = readme.read_text(encoding="utf-8")
    section = text.split("<!-- BEGIN io -->")[1].split("<!-- END io -->")[0]
    m = re.search(r"cover (\d+) of (\d+) compressed test files", section)
    assert m, "README io section must state the decoder coverage"
    return int(m.group(1)), int(m.group(2))


def test_decoder_coverage_table_in_readme_is_right(pydicom_test_dir: Path, testdata_file) -> None:
    """Measure which compressed pydicom / pydicom-data files the installed plugins decode."""
    dirs = [pydicom_test_dir, testdata_file("eCT_Supplemental.dcm").parent]
    ok, failed = 0, []
    for d in dirs:
        for path in sorted(d.glob("*.dcm")):
            try:
                ds = read_dataset(path, header_only=True)
            except MediqaError:
                continue
            ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
            if ts is None or not pydicom.uid.UID(str(ts)).is_compressed or "Rows" not in ds:
                continue
            frames = int(ds.get("NumberOfFrames") or 1)
            try:
                decode_file(path, 0 if frames > 1 else None)
                ok += 1
            except MediqaError:
                failed.append(path.name)
    assert sorted(failed) == ["JPEG-lossy.dcm", "JPEG2000-embedded-sequence-delimiter.dcm",
                              "emri_small_jpeg_2k_lossless_too_short.dcm"]
    assert (ok, ok + len(failed)) == _readme_coverage()


def test_fast_header_read_equals_the_full_header(pydicom_test_dir: Path, testdata_file) -> None:
    """The header scan stops after group 0028 for classic single-frame images; on every DICOM
    test file in pydicom and pydicom-data it must give the same DicomHeader, or the same error,
    as parsing the whole header before the pixel data (what it did before)."""
    from engines.io.dicom import _sniff_head, header_from_dataset

    def outcome(read) -> object:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return header_from_dataset(path, read(path))
        except MediqaError as exc:
            return ("error", exc.code)
        except Exception as exc:  # noqa: BLE001 - compared, not raised
            return ("exception", type(exc).__name__)

    def whole_header(p: Path):
        kind = _sniff_head(p.read_bytes()[:132])
        if kind == "no":
            raise MediqaError("not DICOM", code="not_dicom")
        return pydicom.dcmread(p, stop_before_pixels=True, force=kind == "raw")

    dirs = {pydicom_test_dir, testdata_file("693_UNCR.dcm").parent}   # pydicom, pydicom-data
    files = sorted({p for d in dirs for p in d.rglob("*.dcm") if p.is_file()})
    assert len(files) > 70
    cut_short = 0
    for path in files:
        fast = outcome(lambda p: read_dataset(p, header_only=True))
        ref = outcome(whole_header)
        if fast == ("error", "not_dicom") or ref == ("error", "unreadable"):
            continue
        assert fast == ref, path.name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                fast_ds, ref_ds = read_dataset(path, header_only=True), whole_header(path)
            except Exception:  # noqa: BLE001 - failures were compared above
                continue
        cut_short += len(fast_ds) < len(ref_ds)
    assert cut_short >= 5   # the early stop is taken (11 files here: private groups, overlays)


def _header_fields(h) -> tuple:
    return (h.series_uid, h.sop_uid, h.modality, h.rows, h.columns, h.samples, h.frames, h.orientation,
            h.position, h.instance, h.echo, h.image_class, h.pixel_spacing, h.meta)


def test_header_longer_than_the_in_memory_chunk_is_read_from_the_file(ct_small_path: Path, tmp_path: Path) -> None:
    """The scan parses the first ``HEADER_CHUNK`` bytes in memory; a header whose elements up to
    group 0028 do not fit (a large private element in group 0009) must give the same header as
    the whole file, and a file cut inside that header the same error as pydicom on the file."""
    from engines.io.dicom import HEADER_CHUNK

    def big_private(ds) -> None:
        block = ds.private_block(0x0009, "MEDIQA TEST", create=True)
        block.add_new(0x01, "OB", b"\x00" * (HEADER_CHUNK + 4096))
        ds.Exposure = 123   # after the private block, inside the part the scan uses

    path = _write_ct_copy(ct_small_path, tmp_path / "big.dcm", big_private)
    hdr = scan_header(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = pydicom.dcmread(path, stop_before_pixels=True)
    assert hdr.meta["Exposure"] == 123.0 and hdr.rows == int(ref.Rows)
    assert hdr.position == tuple(float(v) for v in ref.ImagePositionPatient)
    # The same file with a one-chunk parse of 1 KiB forced: identical header.
    import engines.io.dicom as dicom_mod

    small_chunk = dicom_mod.HEADER_CHUNK
    try:
        dicom_mod.HEADER_CHUNK = 1024
        assert _header_fields(scan_header(path)) == _header_fields(hdr)
    finally:
        dicom_mod.HEADER_CHUNK = small_chunk
    # Every chunk length through CT_small's header (element boundaries included, where the
    # in-memory parse ends without an error): the header of the whole file.
    whole = _header_fields(scan_header(ct_small_path))
    try:
        for n in range(132, 4000, 4):
            dicom_mod.HEADER_CHUNK = n
            assert _header_fields(scan_header(ct_small_path)) == whole, n
    finally:
        dicom_mod.HEADER_CHUNK = small_chunk
    # Cut inside the private element (beyond the chunk): an error with a code, never a header.
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(path.read_bytes()[: HEADER_CHUNK + 1024])
    with pytest.raises(MediqaError):
        scan_header(cut)


def test_series_cache_gives_the_headers_of_a_scan_without_it(write_ct_series, tmp_path: Path) -> None:
    """Files of one series share the validated series part (``meta_cache``); every header must
    equal the one scanned alone, per-file fields included, and a truncated file in a cached
    series is still caught (its length is checked per file)."""
    def vary(i: int, ds) -> None:
        ds.Exposure = 100 + i            # meta is shared per series: the first file's value
        if i == 3:
            ds.Rows = 64                 # a different image size: a different key
            ds.PixelData = ds.PixelData[: 64 * 128 * 2]

    paths = write_ct_series(tmp_path / "s", [float(z) for z in range(6)], extra=vary)
    cache: dict = {}
    cached = [scan_header(p, meta_cache=cache) for p in paths]
    alone = [scan_header(p) for p in paths]
    assert len(cache) == 2
    for c, a in zip(cached, alone):
        assert _header_fields(c)[:-1] == _header_fields(a)[:-1]     # all but meta
    assert [h.rows for h in cached] == [128, 128, 128, 64, 128, 128]
    assert [h.position[2] for h in cached] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert [h.instance for h in cached] == [1, 2, 3, 4, 5, 6]
    assert len({h.sop_uid for h in cached}) == 6
    truncated = tmp_path / "s" / "slice_005.dcm"
    truncated.write_bytes(truncated.read_bytes()[:20000])    # pixel data alone need 32 KiB
    with pytest.raises(Truncated):
        scan_header(truncated, meta_cache=cache)
    with pytest.raises(Truncated):
        scan_header(truncated)
