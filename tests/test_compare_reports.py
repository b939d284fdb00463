"""benchmarks/compare_reports.py: paired comparison of two kept evaluation reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.benchmark_module import load_benchmark

_ROOT = Path(__file__).resolve().parents[1]
cr = load_benchmark("compare_reports")


def _report(preds: np.ndarray, targets: np.ndarray, mods: list[str], degs: list[str]) -> dict:
    return {"predictions": [{"path": f"test/{m}/{i:05d}.png", "target": float(t), "prediction": float(p),
                             "modality": m, "degradation": d}
                            for i, (p, t, m, d) in enumerate(zip(preds, targets, mods, degs))]}


def _pair(rng: np.random.Generator, n: int = 120) -> tuple[dict, dict, np.ndarray]:
    t = rng.uniform(0, 1, n)
    mods = ["ct"] * (n // 2) + ["xr"] * (n - n // 2)
    degs = ["noise", "blur", "noise+blur"] * (n // 3)
    good = t + rng.normal(0, 0.05, n)                       # ranks well everywhere
    bad = t.copy()
    bad[n // 2:] = rng.uniform(0, 1, n - n // 2)            # ranks nothing within X-ray
    return _report(good, t, mods, degs), _report(bad, t, mods, degs), t


def test_paired_interval_tells_apart_only_the_group_where_the_models_differ() -> None:
    good, bad, _ = _pair(np.random.default_rng(0))
    res = cr.compare(good, bad)
    assert set(res) == {"all", "modality=ct", "modality=xr"}
    assert res["all"]["n"] == 120 and res["modality=xr"]["n"] == 60
    assert res["modality=xr"]["interval"][0] > 0.3            # the candidate is clearly better there
    assert res["all"]["interval"][0] > 0
    lo, hi = res["modality=ct"]["interval"]                   # identical up to noise within CT
    assert lo <= 0 <= hi or abs(res["modality=ct"]["diff"]) < 0.02
    # the same report against itself: no difference anywhere
    same = cr.compare(good, good)
    assert all(r["diff"] == 0 and r["interval"] == [0.0, 0.0] for r in same.values())
    # swapping the roles flips the sign
    assert cr.compare(bad, good)["modality=xr"]["interval"][1] < -0.3


def test_degradation_groups_count_mixed_studies_under_every_type() -> None:
    good, bad, _ = _pair(np.random.default_rng(1))
    res = cr.compare(good, bad, by="degradation")
    assert res["degradation=noise"]["n"] == 80 and res["degradation=blur"]["n"] == 80


def test_refuses_reports_of_different_studies_or_targets() -> None:
    good, bad, _ = _pair(np.random.default_rng(2))
    short = {"predictions": bad["predictions"][:-1]}
    with pytest.raises(ValueError, match="different studies"):
        cr.compare(good, short)
    relabelled = json.loads(json.dumps(bad))
    relabelled["predictions"][0]["target"] += 0.5
    with pytest.raises(ValueError, match="targets differ"):
        cr.compare(good, relabelled)
    with pytest.raises(ValueError, match="no predictions"):
        cr.compare({"predictions": []}, bad)


def test_command_line_prints_and_writes_json(tmp_path: Path) -> None:
    good, bad, _ = _pair(np.random.default_rng(3))
    a, b, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "cmp.json"
    a.write_text(json.dumps(good))
    b.write_text(json.dumps(bad))
    proc = subprocess.run([sys.executable, str(_ROOT / "benchmarks" / "compare_reports.py"), str(a), str(b),
                           "--json", str(out)], capture_output=True, text=True, cwd=_ROOT,
                          env={"PYTHONPATH": str(_ROOT), "PATH": "/usr/bin:/bin"}, check=True)
    assert "modality=xr" in proc.stdout and "above 0" in proc.stdout
    assert json.loads(out.read_text())["modality=xr"]["interval"][0] > 0.3
