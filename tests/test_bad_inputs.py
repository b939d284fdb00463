"""Bad inputs: each yields one code-bearing error for that study, quickly, and the walk continues."""

from __future__ import annotations

import logging
import random
import shutil
import struct
import time
import zlib
from pathlib import Path

import pydicom
import pytest

from engines.errors import MediqaError, NotDicom, TooLarge, Truncated
from engines.io import discover_studies, open_study, read_study
from engines.io.dicom import decode_file, scan_header
from engines.io.image2d import read_image2d


def _rle_header_60000(ct_small_path: Path, out: Path) -> Path:
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless

    ds = pydicom.dcmread(ct_small_path)
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.Rows = ds.Columns = 60000
    header = struct.pack("<16L", 1, 64, *([0] * 14))
    ds.PixelData = encapsulate([header + b"\x00" * 6000])
    ds["PixelData"].VR = "OB"
    ds.save_as(out, enforce_file_format=True)
    return out


def test_rle_header_claiming_60000_squared_is_refused_fast(ct_small_path: Path, tmp_path: Path) -> None:
    path = _rle_header_60000(ct_small_path, tmp_path / "huge.dcm")
    t0 = time.perf_counter()
    with pytest.raises(TooLarge):
        scan_header(path)
    with pytest.raises(TooLarge):
        decode_file(path)
    (ref,) = list(discover_studies(tmp_path))
    assert ref.error is not None and ref.error.code == "too_large"
    assert time.perf_counter() - t0 < 1.0


def _png_bomb(path: Path, side: int = 30000) -> Path:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit grey
    # A small, valid zlib stream of zero rows: the header alone must trigger the refusal.
    idat = zlib.compress(b"\x00" * (side + 1) * 4, 9)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def test_png_bomb_is_too_large(tmp_path: Path) -> None:
    path = _png_bomb(tmp_path / "bomb.png")
    t0 = time.perf_counter()
    with pytest.raises(TooLarge):
        read_image2d(path)
    (ref,) = list(discover_studies(tmp_path))
    assert ref.error is not None and ref.error.code == "too_large"
    assert time.perf_counter() - t0 < 1.0


def test_zero_byte_and_text_dcm_are_not_dicom(tmp_path: Path) -> None:
    (tmp_path / "empty.dcm").write_bytes(b"")
    (tmp_path / "notes.dcm").write_text("Patient notes\nnot an image\n" * 20)
    for p in (tmp_path / "empty.dcm", tmp_path / "notes.dcm"):
        with pytest.raises(NotDicom):
            scan_header(p)
    refs = list(discover_studies(tmp_path))
    assert [(r.rel_path, r.error.code) for r in refs] == [("empty.dcm", "not_dicom"), ("notes.dcm", "not_dicom")]


def test_truncated_file_fails_never_partial(ct_small_path: Path, tmp_path: Path) -> None:
    data = ct_small_path.read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) - 5000])
    (ref,) = list(discover_studies(tmp_path))
    err = ref.error
    if err is None:  # not caught at scan time → must fail at decode time
        with pytest.raises(Truncated):
            read_study(ref)
    else:
        assert err.code == "truncated"
    with pytest.raises(Truncated):
        decode_file(tmp_path / "cut.dcm")


def test_real_truncated_file(testdata_file, tmp_path: Path) -> None:
    shutil.copy(testdata_file("MR_truncated.dcm"), tmp_path / "t.dcm")
    (ref,) = list(discover_studies(tmp_path))
    with pytest.raises(Truncated):
        open_study(ref).get_slice(0)


def test_sr_and_dicomdir(testdata_file, pydicom_test_dir: Path, tmp_path: Path) -> None:
    shutil.copy(testdata_file("test-SR.dcm"), tmp_path / "report.dcm")
    shutil.copy(pydicom_test_dir / "dicomdirtests" / "DICOMDIR", tmp_path / "DICOMDIR")
    shutil.copy(pydicom_test_dir / "dicomdirtests" / "DICOMDIR", tmp_path / "index.dcm")  # renamed DICOMDIR
    skipped: list[tuple[str, str]] = []
    refs = list(discover_studies(tmp_path, on_skip=lambda r, w: skipped.append((r, w))))
    assert [(r.rel_path, r.error.code) for r in refs] == [("report.dcm", "no_pixel_data")]
    assert {r for r, _ in skipped} == {"DICOMDIR", "index.dcm"}


def test_mixed_folder_walk_continues_and_no_phi_in_logs(ct_small_path: Path, tmp_path: Path, write_ct_series,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    ds = pydicom.dcmread(ct_small_path, stop_before_pixels=True)
    phi = [str(ds.PatientName), str(ds.PatientID)]
    write_ct_series(tmp_path / "good", [0, 5, 10])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "empty.dcm").write_bytes(b"")
    _rle_header_60000(ct_small_path, tmp_path / "bad" / "huge.dcm")
    _png_bomb(tmp_path / "bad" / "bomb.png")
    (tmp_path / "bad" / "cut.dcm").write_bytes(ct_small_path.read_bytes()[:3000])
    with caplog.at_level(logging.DEBUG):
        refs = list(discover_studies(tmp_path))
        for r in refs:
            try:
                read_study(r)
            except MediqaError as exc:
                logging.getLogger("test").info("study %s failed: %s", r.rel_path, exc.message)
    codes = {r.rel_path: (r.error.code if r.error else None) for r in refs}
    assert codes["good"] is None
    assert codes["bad/empty.dcm"] == "not_dicom" and codes["bad/huge.dcm"] == "too_large"
    assert codes["bad/bomb.png"] == "too_large" and codes["bad/cut.dcm"] in ("truncated", "unreadable")
    text = caplog.text + " ".join(r.error.message for r in refs if r.error)
    for value in phi:
        if value:
            assert value not in text


def test_mutated_files_only_raise_mediqa_errors(ct_small_path: Path, tmp_path: Path) -> None:
    """A small mutation fuzz: every failure is a MediqaError with a code, never a raw exception."""
    data = bytearray(ct_small_path.read_bytes())
    rng = random.Random(1234)
    outcomes: dict[str, int] = {}
    for k in range(60):
        mutant = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            pos = rng.randrange(128, 1400)  # the header region, where parsing breaks
            mutant[pos] = rng.randrange(256)
        path = tmp_path / f"m{k}.dcm"
        path.write_bytes(bytes(mutant))
        try:
            scan_header(path)
            decode_file(path)
            outcomes["ok"] = outcomes.get("ok", 0) + 1
        except MediqaError as exc:
            outcomes[exc.code] = outcomes.get(exc.code, 0) + 1
    assert sum(outcomes.values()) == 60
