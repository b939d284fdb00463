"""``mediqa score`` / ``mediqa report`` through Click's CliRunner on tiny real corpora."""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.test_pipeline import (TEST_KEY, _study_key, artifact, make_artifact, small_corpus,  # noqa: F401
                                 write_png, write_series)


def _run(args: list[str]) -> tuple[int, str, str]:
    from mediqa_cli.main import cli

    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    return res.exit_code, res.stdout, res.stderr


def _rows(p: Path) -> list[dict[str, str]]:
    with open(p, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_score_writes_design_columns_and_exit_0(artifact: Path, small_corpus: Path, tmp_path: Path) -> None:
    from engines.pipeline import COLUMNS

    out = tmp_path / "scores.csv"
    code, stdout, stderr = _run(["score", str(small_corpus), "-o", str(out), "--model", str(artifact),
                                 "--backend", "torch", "--workers", "1", "--batch-size", "4",
                                 "--report", str(tmp_path / "r.html")])
    assert code == 0, stderr
    with open(out, newline="") as fh:
        header = next(csv.reader(fh))
    assert tuple(header) == COLUMNS
    rows = _rows(out)
    assert len(rows) == 4 and {r["status"] for r in rows} == {"ok"}
    assert {r["backend"] for r in rows} == {"torch"}
    assert "worst" in stdout and "score by modality" in stdout
    assert not Path(str(out) + ".partial").exists() and Path(str(out) + ".state").exists()
    html = (tmp_path / "r.html").read_text()
    assert "data:image/png;base64," in html and "<svg" in html


def test_jsonl_hide_paths_min_score(artifact: Path, small_corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "scores.jsonl"
    code, stdout, _ = _run(["score", str(small_corpus), "-o", str(out), "--model", str(artifact),
                            "--backend", "torch", "--workers", "1", "--format", "jsonl", "--hide-paths",
                            "--min-score", "100"])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 4 and all(r["path"] == "" for r in rows)
    assert all("low_score" in r["flags"] for r in rows)
    assert isinstance(rows[0]["score"], float) and isinstance(rows[0]["salient_slices"], list)
    assert "ct_a" not in stdout and "img_c" not in stdout
    assert "below --min-score 100: 4" in stdout


def test_resume_rescores_only_changed_studies(artifact: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_series(root / "s1", n=4, seed=1)
    for i in range(3):
        write_png(root / f"p{i}.png", seed=i)
    out = tmp_path / "scores.csv"
    args = ["score", str(root), "-o", str(out), "--model", str(artifact), "--backend", "torch",
            "--workers", "1"]
    assert _run(args)[0] == 0
    first = _rows(out)
    code, stdout, _ = _run(args + ["--resume"])
    assert code == 0 and "re-scored 0, carried over 4" in stdout
    assert [r["score"] for r in _rows(out)] == [r["score"] for r in first]
    # Touch one file with new content: only that study is scored again.
    write_png(root / "p1.png", seed=42)
    os.utime(root / "p1.png", (time.time() + 5, time.time() + 5))
    code, stdout, _ = _run(args + ["--resume"])
    assert code == 0 and "re-scored 1, carried over 3" in stdout
    # Another model: everything is scored again.
    other = make_artifact(tmp_path / "other.safetensors", seed=1)
    code, stdout, _ = _run(args[:-4] + ["--model", str(other), "--backend", "torch", "--workers", "1", "--resume"])
    assert code == 0 and "re-scored 4, carried over 0" in stdout


def test_missing_model_is_a_clear_fatal_error(small_corpus: Path, tmp_path: Path) -> None:
    code, _, stderr = _run(["score", str(small_corpus), "-o", str(tmp_path / "x.csv"),
                            "--model", str(tmp_path / "nope.safetensors")])
    assert code == 2 and "model file not found" in stderr
    code, _, stderr = _run(["score", str(tmp_path / "missing"), "-o", str(tmp_path / "x.csv")])
    assert code == 2  # usage error from Click


def test_locked_report_exits_75(artifact: Path, small_corpus: Path, tmp_path: Path) -> None:
    from mediqa_cli.reports.writer import ReportLock

    out = tmp_path / "scores.csv"
    with ReportLock(out):
        code, _, stderr = _run(["score", str(small_corpus), "-o", str(out), "--model", str(artifact),
                                "--backend", "torch"])
    assert code == 75 and "another mediqa run" in stderr
    assert not out.exists()


def test_report_command_several_runs_with_thumbnails(artifact: Path, small_corpus: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "scores-2024-01-01.csv", tmp_path / "scores-2024-01-02.csv"
    for o in (a, b):
        assert _run(["score", str(small_corpus), "-o", str(o), "--model", str(artifact), "--backend", "torch",
                     "--workers", "1", "-q"])[0] == 0
    html_path = tmp_path / "r.html"
    code, _, stderr = _run(["report", str(b), str(a), "-o", str(html_path), "--root", str(small_corpus)])
    assert code == 0, stderr
    html = html_path.read_text()
    assert "Median score per scanner over time" in html and "2024-01-01" in html
    assert html.count("data:image/png;base64,") >= 16  # 2 PNGs + 7 CT + 7 MR salient slices
    assert "http://" not in html.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_header_cache_gives_the_same_report_and_keeps_no_phi(artifact: Path, small_corpus: Path,
                                                             tmp_path: Path) -> None:
    """Two runs with --header-cache: the second is served from the cache (the SQLite file holds
    one row per DICOM file) and writes the same rows; the cache holds no patient identifiers."""
    import sqlite3

    from tests.test_pipeline import CANARY_ACCESSION, CANARY_BIRTH, CANARY_ID, CANARY_NAME

    db = tmp_path / "cache" / "h.sqlite"
    rows = []
    for i in range(2):
        out = tmp_path / f"s{i}.csv"
        code, _, stderr = _run(["score", str(small_corpus), "-o", str(out), "--model", str(artifact),
                                "--backend", "torch", "--workers", "1", "--header-cache", str(db)])
        assert code == 0, stderr
        rows.append([{k: v for k, v in r.items() if k != "elapsed_ms"} for r in _rows(out)])
    assert rows[0] == rows[1] and len(rows[0]) == 4
    n_dicom = sum(1 for p in small_corpus.rglob("*.dcm"))
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT COUNT(*) FROM headers").fetchone()[0] == n_dicom
    blob = b"".join(p.read_bytes() for p in db.parent.iterdir())   # incl. a WAL file, if any
    for canary in (CANARY_NAME, CANARY_ID, CANARY_BIRTH, CANARY_ACCESSION):
        assert canary.encode() not in blob
    code, _, _ = _run(["score", str(small_corpus), "-o", str(tmp_path / "off.csv"), "--model",
                       str(artifact), "--backend", "torch", "--workers", "1", "--header-cache", "off"])
    assert code == 0
