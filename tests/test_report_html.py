"""The HTML report: self-contained (no network reference), escapes report text, and renders in
headless Chromium to a non-empty, non-uniform screenshot (skipped, with the reason shown, when
no Chromium is installed: ``apt-get install chromium``)."""

from __future__ import annotations

import csv
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from engines.pipeline import COLUMNS


def _write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(COLUMNS))
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in COLUMNS})
    return path


def _rows(seed: int) -> list[dict[str, str]]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(30):
        mod = ("ct", "mr", "xr")[i % 3]
        scan = ("GE", "Siemens")[i % 2]
        rows.append({"study_id": f"{seed:02d}{i:014d}", "path": f"s/{i}", "kind": "3d" if mod != "xr" else "2d",
                     "status": "ok", "score": f"{rng.uniform(1, 5):.4f}", "modality": mod,
                     "region": "chest", "type": "soft", "prompt_source": "tags",
                     "salient_slices": "1;2;3", "slice_scores": "2.0;3.0;4.0",
                     "slice_weights": "0.2;0.3;0.5", "manufacturer": scan, "scanner_model": "X1"})
    rows.append({"study_id": "e1", "path": "bad/<script>alert(1)</script>.dcm", "status": "error",
                 "error_code": "truncated", "error": "file holds <b>26137</b> bytes"})
    return rows


def test_html_is_self_contained_and_escaped(tmp_path: Path) -> None:
    from mediqa_cli.reports.html import write_html_report

    a = _write_csv(tmp_path / "scores-2025-01-01.csv", _rows(1))
    b = _write_csv(tmp_path / "scores-2025-01-02.csv", _rows(2))
    out = write_html_report([b, a], tmp_path / "r.html")
    html = out.read_text()
    assert "<script>" not in html and "&lt;script&gt;" in html and "&lt;b&gt;26137" in html
    assert "src=\"http" not in html and "href=\"http" not in html and "@import" not in html
    assert "Median score per scanner over time" in html and "2025-01-01" in html
    assert "truncated" in html and html.count("<svg") >= 5


def test_html_renders_in_headless_chromium(tmp_path: Path) -> None:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        pytest.skip("chromium not installed (apt-get install -y chromium); render check skipped")
    from PIL import Image

    from mediqa_cli.reports.html import write_html_report

    a = _write_csv(tmp_path / "scores-2025-01-01.csv", _rows(1))
    out = write_html_report([a], tmp_path / "r.html")
    shot = tmp_path / "shot.png"
    subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-dev-shm-usage", "--hide-scrollbars", f"--screenshot={shot}",
                    "--window-size=1000,1400", out.as_uri()],
                   check=False, capture_output=True, timeout=60)
    assert shot.exists() and shot.stat().st_size > 1000
    img = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert img.std() > 5  # text and charts, not a blank page
    assert (img < 128).mean() > 0.002  # some dark pixels (text)
