"""benchmarks/fit_by_source.py: per-source fit and label-bin plateaus from a kept report."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.benchmark_module import load_benchmark

_ROOT = Path(__file__).resolve().parents[1]
fb = load_benchmark("fit_by_source")


def _data(rng: np.random.Generator) -> tuple[dict, list[dict]]:
    """Source A ranked perfectly, source B backwards; B's noise studies plateau at 0.6; a CT study
    that --modality mr must drop."""
    manifest, preds = [], []
    for i in range(40):
        src = "A" if i < 20 else "B"
        deg = ["noise", "motion", "noise+motion", "noise"][i % 4]
        t = float(rng.uniform(0, 1))
        p = t if src == "A" else 1.0 - t
        if src == "B" and deg == "noise":
            p = 0.6
        path = f"train/mr/{i:05d}.dcm"
        manifest.append({"path": path, "score": f"{t:.6f}", "modality": "mr", "source_id": src, "degradation": deg})
        preds.append({"path": path, "prediction": p})
    manifest.append({"path": "train/ct/0.dcm", "score": "0.5", "modality": "ct", "source_id": "C", "degradation": "dose"})
    preds.append({"path": "train/ct/0.dcm", "prediction": 0.1})
    return {"predictions": preds}, manifest


def test_tables_see_the_source_that_ranks_backwards_and_the_plateau() -> None:
    report, manifest = _data(np.random.default_rng(0))
    rows = fb.join_rows(report, manifest, "MR")
    assert len(rows) == 40 and {r["modality"] for r in rows} == {"mr"}
    table = fb.source_table(rows)
    assert table["A"]["all"]["srcc"] == pytest.approx(1.0)
    assert table["B"]["motion"]["srcc"] == pytest.approx(-1.0)
    assert table["B"]["noise"]["srcc"] is None                # constant predictions: no SRCC
    assert table["A"]["mixed"]["n"] == 5 and table["ALL"]["all"]["n"] == 40
    assert fb.kind_of("noise+motion") == "mixed" and fb.kind_of("bias") == "bias" and fb.kind_of("") == "-"
    bins = fb.label_bins([r for r in rows if r["source"] == "B"], [0, 0.5, 1.01])
    assert [b["mean"] for b in bins["noise"]] == pytest.approx([0.6, 0.6])    # the plateau
    assert bins["motion"][0]["mean"] > bins["motion"][-1]["mean"]          # backwards
    assert sum(b["n"] for b in bins["all"]) == 20


def test_refuses_a_report_with_a_study_the_manifest_lacks(tmp_path: Path) -> None:
    report, manifest = _data(np.random.default_rng(1))
    with pytest.raises(ValueError, match="not in the manifest"):
        fb.join_rows(report, manifest[1:])
    with pytest.raises(ValueError, match="no predictions"):
        fb.join_rows({"predictions": []}, manifest)
    rp, mp = tmp_path / "r.json", tmp_path / "m.csv"
    rp.write_text(json.dumps(report))
    with mp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(manifest[0]))
        w.writeheader()
        w.writerows(manifest)
    out = subprocess.run([sys.executable, str(_ROOT / "benchmarks/fit_by_source.py"), str(rp), str(mp),
                          "--modality", "mr", "--json", str(tmp_path / "o.json")],
                         capture_output=True, text=True, cwd=_ROOT, check=True).stdout
    assert "SRCC per source" in out and "mean ± sd score per label bin" in out
    saved = json.loads((tmp_path / "o.json").read_text())
    assert saved["model"]["A"]["all"]["srcc"] == pytest.approx(1.0) and saved["neg_sigma"] == {}


def test_noise_statistic_on_sources_and_on_network_inputs_ranks_mr_field_strength(tmp_path: Path) -> None:
    """``add_noise_stat``: on a rendered corpus of MR studies at drawn field strengths, -sigma read
    from the source slices and from the network's input tensors both fall with the field's noise
    (a statistic that read nothing, or read the wrong image, would not rank them)."""
    import dataclasses

    from engines.metrics import srcc
    from training.synth.corpus import MR_FIELDS, SizeConfig, plan_corpus, render_corpus

    plan = [dataclasses.replace(s, degradation="noise", primary=("field",),   # noise alone, five fields
                                params={"tesla": MR_FIELDS[i % len(MR_FIELDS)], "motion_period": 5.0})
            for i, s in enumerate(plan_corpus(1, SizeConfig({"mr": 10}, {}, image_size=64)))]
    manifest = render_corpus(tmp_path, plan)
    with manifest.open(newline="") as f:
        mrows = list(csv.DictReader(f))
    report = {"predictions": [{"path": r["path"], "prediction": 0.5} for r in mrows]}
    for on in ("source", "input"):
        rows = fb.join_rows(report, mrows, "mr")
        fb.add_noise_stat(rows, str(manifest), on)
        rho = float(srcc(np.array([r["score"] for r in rows]), np.array([r["neg_sigma"] for r in rows])))
        assert rho > 0.8, (on, rho)
    with pytest.raises(ValueError, match="on must be"):
        fb.add_noise_stat(rows, str(manifest), "raw")
