"""``mediqa scan`` / ``mediqa info`` through CliRunner on real pydicom files and broken ones.

The 3D series is built from the real CT_small slice (GE, 128²): its header and pixels are
copied into 5 files with new positions along z, a new series UID, shuffled file names and
shuffled InstanceNumbers — there is no real multi-slice CT series in any package.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from click.testing import CliRunner
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from mediqa_cli.main import cli
from mediqa_cli.tables import atomic_write_text, csv_text, write_csv_atomic

CANARY_NAME = "CANARYZEBRA^QUOKKA"
CANARY_ID = "PIDCANARY7731"
CANARY_PARTS = ("CANARYZEBRA", "QUOKKA", CANARY_ID)
KEY = "test-study-key-0123456789"


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    root = tmp_path / "archive"
    ct_src = Path(get_testdata_file("CT_small.dcm"))
    mr_src = Path(get_testdata_file("MR_small.dcm"))

    (root / "single").mkdir(parents=True)
    ct = pydicom.dcmread(ct_src)
    ct.PatientName, ct.PatientID = CANARY_NAME, CANARY_ID
    ct.save_as(root / "single" / "ct.dcm")

    mr = pydicom.dcmread(mr_src)
    mr.PatientName, mr.PatientID = CANARY_NAME, CANARY_ID
    mr.Manufacturer = "=HYPERLINK(\"http://x\")"  # must come out escaped in the CSV
    mr.save_as(root / "single" / "mr.dcm")

    series = root / "series"
    series.mkdir()
    uid = generate_uid()
    rng = random.Random(7)
    names = [f"{rng.getrandbits(40):010x}.dcm" for _ in range(5)]
    instance_numbers = rng.sample(range(1, 6), 5)
    for i in range(5):
        ds = pydicom.dcmread(ct_src)
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        x, y, _ = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, -10.0 + 2.5 * i]
        ds.SliceLocation = -10.0 + 2.5 * i
        ds.InstanceNumber = instance_numbers[i]
        ds.PatientName, ds.PatientID = CANARY_NAME, CANARY_ID
        ds.save_as(series / names[i])

    broken = root / "broken"
    broken.mkdir()
    (broken / "empty.dcm").write_bytes(b"")
    (broken / "notes.dcm").write_text("this is a text file, not DICOM\n")
    raw = ct_src.read_bytes()
    (broken / "truncated.dcm").write_bytes(raw[: len(raw) - 9000])
    return root


@pytest.fixture(autouse=True)
def _restore_warnings_routing():
    yield
    logging.captureWarnings(False)  # ``mediqa scan`` routes warnings into (scrubbed) logging


@pytest.fixture
def runner(monkeypatch) -> CliRunner:
    monkeypatch.setenv("MEDIQA_STUDY_KEY", KEY)
    monkeypatch.setenv("COLUMNS", "250")
    return CliRunner()


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_scan_lists_every_study_once_with_errors_and_no_phi(archive, runner, tmp_path):
    out = tmp_path / "scan.csv"
    log_stream = io.StringIO()
    handler = logging.StreamHandler(log_stream)
    root_logger = logging.getLogger()
    old_level = root_logger.level
    root_logger.addHandler(handler)
    root_logger.setLevel(logging.DEBUG)  # whatever the readers log, even at DEBUG, is checked too
    try:
        result = runner.invoke(cli, ["scan", str(archive), "-o", str(out)])
    finally:
        root_logger.removeHandler(handler)
        root_logger.setLevel(old_level)
    assert result.exit_code == 1, result.output
    rows = _rows(out)
    by_path = {r["path"]: r for r in rows}
    assert len(by_path) == len(rows) == 6  # each study exactly once
    assert set(by_path) == {"single/ct.dcm", "single/mr.dcm", "series", "broken/empty.dcm",
                            "broken/notes.dcm", "broken/truncated.dcm"}

    s = by_path["series"]
    assert (s["kind"], s["format"], s["n_files"], s["n_slices"]) == ("3d", "dicom", "5", "5")
    assert (s["modality"], s["type"], s["status"], s["error_code"]) == ("ct", "soft", "ok", "")
    assert (by_path["single/mr.dcm"]["modality"], by_path["single/mr.dcm"]["type"]) == ("mr", "t2")
    assert by_path["single/ct.dcm"]["kind"] == "2d"
    assert by_path["single/ct.dcm"]["mas"] != ""  # CT_small carries Exposure

    codes = {p: r["error_code"] for p, r in by_path.items() if r["status"] == "error"}
    assert codes == {"broken/empty.dcm": "not_dicom", "broken/notes.dcm": "not_dicom",
                     "broken/truncated.dcm": "truncated"}
    assert all(by_path[p]["error"] for p in codes)

    # pseudonymous ids: 16 hex digits, unique, no UID or canary anywhere
    ids = [r["study_id"] for r in rows]
    assert len(set(ids)) == 6 and all(len(i) == 16 and int(i, 16) >= 0 for i in ids)
    csv_text_out = out.read_text(encoding="utf-8")
    for text in (result.stdout, result.stderr, csv_text_out, log_stream.getvalue()):
        for canary in CANARY_PARTS:
            assert canary.lower() not in text.lower()
        assert "1.3.6.1.4.1" not in text and "1.2.826.0.1" not in text  # no SOP/series UIDs
    # the formula in a free-text tag is escaped
    assert by_path["single/mr.dcm"]["manufacturer"].startswith("'=")

    # the terminal table and summary name every study and error code
    for p in by_path:
        assert p in result.stdout
    assert "truncated" in result.stdout and "6 studies (3 ok, 3 with errors)" in result.stdout


def test_scan_ids_are_stable_per_key_and_change_with_it(archive, runner, tmp_path, monkeypatch):
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    runner.invoke(cli, ["scan", str(archive), "-q", "-o", str(a)])
    runner.invoke(cli, ["scan", str(archive), "-q", "-o", str(b)])
    monkeypatch.setenv("MEDIQA_STUDY_KEY", "another-key-9876543210")
    runner.invoke(cli, ["scan", str(archive), "-q", "-o", str(c)])
    ids = [{s["path"]: s["study_id"] for s in json.loads(p.read_text())["studies"]}
           for p in (a, b, c)]
    assert ids[0] == ids[1]
    assert all(ids[0][k] != ids[2][k] for k in ids[0])


def test_scan_json_output_and_summary(archive, runner, tmp_path):
    out = tmp_path / "nested" / "scan.json"
    result = runner.invoke(cli, ["scan", str(archive), "--quiet", "-o", str(out)])
    assert result.exit_code == 1
    data = json.loads(out.read_text())
    summary = data["summary"]
    assert summary["n_studies"] == len(data["studies"]) == 6
    assert summary["by_status"] == {"ok": 3, "error": 3}
    assert summary["by_error_code"] == {"not_dicom": 2, "truncated": 1}
    assert summary["by_kind"] == {"2d": 5, "3d": 1}
    assert data["columns"][0] == "study_id"
    assert "┃ study_id" not in result.stdout  # --quiet: summary only
    assert [p.name for p in out.parent.iterdir()] == ["scan.json"]  # no temp file left behind


def test_scan_clean_folder_exits_0_and_filters(archive, runner, tmp_path):
    out = tmp_path / "ok.csv"
    result = runner.invoke(cli, ["scan", str(archive), "--exclude", "broken", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert {r["path"] for r in _rows(out)} == {"single/ct.dcm", "single/mr.dcm", "series"}

    result = runner.invoke(cli, ["scan", str(archive), "--include", "single/*", "-o", str(out)])
    assert result.exit_code == 0
    assert {r["path"] for r in _rows(out)} == {"single/ct.dcm", "single/mr.dcm"}

    shutil.copy(get_testdata_file("CT_small.dcm"), archive / "top.dcm")
    result = runner.invoke(cli, ["scan", str(archive), "--max-depth", "0", "-o", str(out)])
    assert result.exit_code == 0
    assert [r["path"] for r in _rows(out)] == ["top.dcm"]


def test_scan_usage_errors_exit_2(archive, runner, tmp_path):
    r = runner.invoke(cli, ["scan", str(archive), "-o", str(tmp_path / "scan.xlsx")])
    assert r.exit_code == 2 and ".csv or .json" in r.output
    r = runner.invoke(cli, ["scan", str(tmp_path / "missing")])
    assert r.exit_code == 2
    r = runner.invoke(cli, ["scan", str(archive), "--max-depth", "-1"])
    assert r.exit_code == 2
    (tmp_path / "a_file").write_text("x")
    r = runner.invoke(cli, ["scan", str(tmp_path / "a_file")])
    assert r.exit_code == 2


def test_scan_overwrites_output_atomically(archive, runner, tmp_path):
    out = tmp_path / "scan.csv"
    out.write_text("previous content\n")
    runner.invoke(cli, ["scan", str(archive), "-q", "-o", str(out)])
    assert out.read_text().startswith("study_id,path,")
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["scan.csv"]


def test_help_and_scan_do_not_import_torch(archive, tmp_path):
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from mediqa_cli.main import cli\n"
        "r = CliRunner().invoke(cli, ['--help'])\n"
        "assert r.exit_code == 0, r.output\n"
        "r = CliRunner().invoke(cli, ['scan', sys.argv[1], '-q', '-o', sys.argv[2]])\n"
        "assert r.exit_code == 1, r.output\n"
        "r = CliRunner().invoke(cli, ['info', '--json'])\n"
        "assert r.exit_code == 0, r.output\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO_TORCH')\n"
    )
    env = {**os.environ, "MEDIQA_STUDY_KEY": KEY}
    proc = subprocess.run([sys.executable, "-c", code, str(archive), str(tmp_path / "s.csv")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("NO_TORCH")
    assert len(_rows(tmp_path / "s.csv")) == 6


def test_info_reports_versions_and_decoders(runner):
    result = runner.invoke(cli, ["info", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["versions"]["pydicom"] == pydicom.__version__
    dec = {d["uid"]: d for d in data["dicom_decoders"]}
    assert dec[pydicom.uid.ExplicitVRLittleEndian]["decodable"] is True
    from pydicom.pixels import get_decoder
    j2k = get_decoder(pydicom.uid.JPEG2000)
    assert dec[pydicom.uid.JPEG2000]["decodable"] == j2k.is_available
    assert dec[pydicom.uid.JPEG2000]["plugins"] == list(j2k.available_plugins)
    assert "onnxruntime_providers" in data["runtimes"]
    table = runner.invoke(cli, ["info"])
    assert table.exit_code == 0 and "RLE Lossless" in table.stdout


def test_info_model_card_of_bundled_and_given_model(runner, tmp_path):
    """``info --model default`` shows the bundled model's card as recorded by its recipe;
    ``--model PATH`` any artifact's; a file without a card is a clear error."""
    import hashlib

    from engines.artifact import bundled_model_path, load_card

    result = runner.invoke(cli, ["info", "--json", "--model", "default"])
    assert result.exit_code == 0, result.output
    m = json.loads(result.stdout)["model"]
    path = bundled_model_path()
    card = load_card(path)
    assert m["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and m["size_bytes"] == path.stat().st_size
    assert m["recipe_sha256"] == card.training["recipe_sha256"] and m["recipe"].endswith(".yaml")
    assert m["test"]["srcc"] == card.metrics["test"]["overall"]["srcc"] and m["test"]["n"] > 0
    assert m["val"]["srcc"] == card.metrics["val"]["srcc"]
    if "base" in card.training:   # a continuation recipe's output names its base
        assert m["base"]["sha256"] == card.training["base"]["sha256"] and len(m["base"]["sha256"]) == 64
    if "soup" in card.training:   # a soup recipe's output names its members
        assert [x["sha256"] for x in m["soup"]] == [x["sha256"] for x in card.training["soup"]]
        assert len(m["soup"]) >= 2 and all(len(x["sha256"]) == 64 and x["recipe"] for x in m["soup"])
    assert set(m["test_srcc_by_prompt_modality"]) <= {"ct", "mr", "xr", "fundus", "us", "other"}
    assert m["card"] == json.loads(json.dumps(card.to_dict()))
    # the feature head's blend weight per modality (README: X-ray only, 0.5)
    assert m["feature_blend"] == {mod: h["blend"] for mod, h in card.feature_head["heads"].items()}
    assert m["feature_blend"]["xr"] == 0.5 and m["feature_blend"]["ct"] == 0.0
    assert m["preset"] == card.preset == "mediqa-vitt16-tex"   # README: the bundled soup has the texture branch
    assert m["feature_statistics"] == {k: card.feature_head[k] for k in ("version", "features")}
    table = runner.invoke(cli, ["info", "--model", str(path)])
    assert table.exit_code == 0 and "model card" in table.stdout and "recipe_sha256" in table.stdout
    assert "[{" not in table.stdout and "{'" not in table.stdout   # lists / mappings as text, not Python repr
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not a safetensors file")
    result = runner.invoke(cli, ["info", "--model", str(bad)])
    assert result.exit_code != 0 and "cannot read the model card" in result.output


def test_tables_csv_escaping_and_atomic_write(tmp_path):
    rows = [{"a": "=1+2", "b": -1024, "c": ["x", "y"], "d": float("nan")},
            {"a": "+C", "b": "-5", "c": None, "d": 0.123456789}]
    text = csv_text(rows, ["a", "b", "c", "d"])
    parsed = list(csv.reader(io.StringIO(text)))
    assert parsed == [["a", "b", "c", "d"], ["'=1+2", "-1024", "x;y", ""],
                      ["'+C", "-5", "", "0.123457"]]
    p = write_csv_atomic(tmp_path / "t.csv", rows, ["a"])
    assert p.read_text() == "a\n'=1+2\n'+C\n"
    with pytest.raises(TypeError):
        atomic_write_text(tmp_path / "t.csv", 42)  # type: ignore[arg-type]
    assert p.read_text() == "a\n'=1+2\n'+C\n"  # a failed write leaves the old file intact
    assert sorted(x.name for x in tmp_path.iterdir()) == ["t.csv"]
