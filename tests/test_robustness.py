"""Issue 6 robustness suite: ``mediqa score`` as a real process on 100 good studies plus one of
each bad input, killed with SIGKILL and resumed, run twice, run concurrently, with canary
patient identifiers in the DICOM tags and in a file name, and with a reader that hangs.
"""

from __future__ import annotations

import csv
import os
import random
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from tests.test_pipeline import (CANARY_ACCESSION, CANARY_BIRTH, CANARY_ID, CANARY_NAME, TEST_KEY,
                                 make_artifact, write_png, write_series)

REPO = Path(__file__).resolve().parents[1]
CANARIES = (CANARY_NAME, CANARY_NAME.split("^")[0], CANARY_ID, CANARY_BIRTH, CANARY_ACCESSION)
# bad input file → accepted error codes (the I/O layer decides the exact one)
BAD = {
    "bad/zero.dcm": {"not_dicom", "truncated", "unreadable"},
    "bad/text.dcm": {"not_dicom"},
    "bad/truncated.dcm": {"truncated"},
    "bad/huge_rle.dcm": {"too_large"},
    "bad/bomb.png": {"too_large"},
    "bad/sr.dcm": {"no_pixel_data"},
}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_bad_inputs(root: Path) -> None:
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

    bad = root / "bad"
    bad.mkdir(parents=True)
    (bad / "zero.dcm").write_bytes(b"")
    (bad / "text.dcm").write_text("PatientName: nobody\nthis is a text file, not DICOM\n" * 10)
    full = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    (bad / "truncated.dcm").write_bytes(full[: len(full) * 2 // 3])
    # RLE header claiming 60000 x 60000 pixels with a few bytes of data.
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.Rows = ds.Columns = 60000
    ds.SeriesInstanceUID = generate_uid()
    ds.PixelData = encapsulate([b"\x00" * 6000])
    ds["PixelData"].VR = "OB"
    ds.save_as(bad / "huge_rle.dcm", enforce_file_format=True)
    # PNG claiming 30000 x 30000 pixels (a decompression bomb by header).
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    (bad / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
                                   + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 30001 * 4))
                                   + _png_chunk(b"IEND", b""))
    # A structured report: valid DICOM, no pixels.
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sr = Dataset()
    sr.file_meta = meta
    sr.SOPClassUID = meta.MediaStorageSOPClassUID
    sr.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    sr.Modality = "SR"
    sr.SeriesInstanceUID = generate_uid()
    sr.PatientName = CANARY_NAME
    sr.PatientID = CANARY_ID
    sr.save_as(bad / "sr.dcm", enforce_file_format=True)
    # A DICOMDIR (media index): recognised and skipped, not a study.
    (bad / "DICOMDIR").write_bytes(Path(get_testdata_file("DICOMDIR")).read_bytes())


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("robust")
    root = base / "archive"
    for i in range(60):
        write_png(root / "png" / f"p{i:03d}.png", seed=i, rgb=(i % 5 == 0))
    for i in range(25):
        write_series(root / "ct" / f"s{i:02d}", source="CT_small.dcm", n=3, seed=i)
    for i in range(15):
        write_series(root / "mr" / f"s{i:02d}", source="MR_small.dcm", n=3, seed=100 + i)
    write_bad_inputs(root)
    model = make_artifact(base / "model.safetensors")
    e = dict(os.environ, MEDIQA_STUDY_KEY=TEST_KEY.decode(), PYTHONPATH=str(REPO),
             XDG_CONFIG_HOME=str(base / "cfg"))
    e.pop("MEDIQA_PLUGINS", None)
    return {"base": base, "root": root, "model": model, "env": e}


def _cmd(env: dict, out: Path, *extra: str, root: Path | None = None) -> list[str]:
    return [sys.executable, "-m", "mediqa_cli", "score", str(root or env["root"]), "-o", str(out),
            "--model", str(env["model"]), "--backend", "torch", "--workers", "2", "--batch-size", "8",
            *extra]


def _run(env: dict, cmd: list[str], extra_env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=dict(env["env"], **(extra_env or {})), capture_output=True,
                          text=True, timeout=timeout)


def _rows(p: Path) -> list[dict[str, str]]:
    with open(p, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _stable(rows: list[dict[str, str]]) -> list[tuple]:
    return [tuple(v for k, v in r.items() if k != "elapsed_ms") for r in rows]


def _assert_no_canary(texts: list[str], extra: tuple[str, ...] = ()) -> None:
    for t in texts:
        for c in CANARIES + extra:
            assert c.lower() not in t.lower(), f"canary {c!r} leaked"


@pytest.fixture(scope="module")
def reference(env: dict) -> dict:
    out = env["base"] / "ref" / "scores.csv"
    out.parent.mkdir()
    res = _run(env, _cmd(env, out, "--report", str(out.parent / "report.html")))
    return {"out": out, "res": res}


def test_good_ok_bad_one_error_row_each_exit_1(env: dict, reference: dict) -> None:
    res, out = reference["res"], reference["out"]
    assert res.returncode == 1, res.stderr[-2000:]
    assert "Traceback" not in res.stderr + res.stdout
    rows = _rows(out)
    by_path = {r["path"]: r for r in rows}
    good = [r for r in rows if not r["path"].startswith("bad/")]
    assert len(good) == 100 and all(r["status"] == "ok" for r in good), \
        [(r["path"], r["error_code"]) for r in good if r["status"] != "ok"]
    for name, codes in BAD.items():
        assert by_path[name]["status"] == "error" and by_path[name]["error_code"] in codes, by_path[name]
    assert len(rows) == 100 + len(BAD)  # DICOMDIR is an index, not a study: no row
    assert sum(r["path"] == "bad/DICOMDIR" for r in rows) == 0
    texts = [out.read_text(), Path(str(out) + ".state").read_text(), res.stdout, res.stderr,
             (out.parent / "report.html").read_text()]
    _assert_no_canary(texts)


def test_second_run_rescores_nothing(env: dict, reference: dict) -> None:
    out = env["base"] / "second" / "scores.csv"
    out.parent.mkdir()
    for f in ("", ".state"):
        Path(str(out) + f).write_bytes(Path(str(reference["out"]) + f).read_bytes())
    res = _run(env, _cmd(env, out, "--resume"))
    assert res.returncode == 1
    assert f"re-scored 0, carried over {100 + len(BAD)}" in res.stdout
    assert _stable(_rows(out)) == _stable(_rows(reference["out"]))


def test_kill_9_then_resume_equals_uninterrupted_and_lock(env: dict, reference: dict) -> None:
    out = env["base"] / "killed" / "scores.csv"
    out.parent.mkdir()
    journal = Path(str(out) + ".partial")
    stop_after = random.Random(os.getpid()).randint(3, 60)
    proc = subprocess.Popen(_cmd(env, out), cwd=REPO, env=env["env"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 90:
        if journal.exists() and journal.read_bytes().count(b"\n") >= stop_after:
            break
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # no complete report yet; the journal holds a complete prefix
    n_done = journal.read_bytes().count(b"\n")
    assert n_done >= 1
    # Resume; while it runs, a second run on the same report must exit 75.
    resumed = subprocess.Popen(_cmd(env, out, "--resume"), cwd=REPO, env=env["env"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = Path(str(out) + ".lock")
    t0 = time.monotonic()
    while time.monotonic() - t0 < 30 and not (lock.exists() and lock.read_text().strip() == str(resumed.pid)):
        time.sleep(0.05)
    second = _run(env, _cmd(env, out))
    stdout, stderr = resumed.communicate(timeout=120)
    assert second.returncode == 75, second.stderr[-1000:]
    assert resumed.returncode == 1, stderr[-2000:]
    assert f"carried over {n_done}" in stdout or "carried over" in stdout
    assert _stable(_rows(out)) == _stable(_rows(reference["out"]))
    assert not journal.exists()


def test_hide_paths_canary_file_name_and_hanging_reader(env: dict) -> None:
    root = env["base"] / "small"
    write_png(root / "ZZCANARYFILE_smith.png", seed=1)
    write_png(root / "x.hang.png", seed=2)
    write_series(root / "ZZCANARYDIR", n=3, seed=3)
    fifo = env["base"] / "hang.fifo"
    os.mkfifo(fifo)
    out = env["base"] / "small_out" / "scores.csv"
    t0 = time.monotonic()
    res = _run(env, _cmd(env, out, "--hide-paths", "--timeout", "3", "--report",
                         str(out.parent / "r.html"), root=root),
               extra_env={"MEDIQA_PLUGINS": "tests.test_pipeline:register_hanging_reader",
                          "MEDIQA_TEST_FIFO": str(fifo)})
    assert time.monotonic() - t0 < 90
    assert res.returncode == 1 and "Traceback" not in res.stderr
    rows = _rows(out)
    assert sorted(r["status"] for r in rows) == ["error", "ok", "ok"]
    err = next(r for r in rows if r["status"] == "error")
    assert err["error_code"] == "timeout"
    assert all(r["path"] == "" for r in rows)
    texts = [out.read_text(), Path(str(out) + ".state").read_text(), res.stdout, res.stderr,
             (out.parent / "r.html").read_text()]
    _assert_no_canary(texts, extra=("ZZCANARYFILE", "smith", "ZZCANARYDIR", "hang.png"))
