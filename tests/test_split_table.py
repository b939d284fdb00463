"""benchmarks/split_table.py: the per-modality × per-degradation table from a kept report."""

from __future__ import annotations

import numpy as np
import pytest

from engines.metrics import srcc
from tests.benchmark_module import load_benchmark

st = load_benchmark("split_table")


def test_groups_come_from_the_manifest_and_mixed_studies_count_under_each_type() -> None:
    rng = np.random.default_rng(0)
    n = 90
    degs = ["noise", "blur", "noise+blur"] * (n // 3)
    srcs = ["a", "b"] * (n // 2)
    target = rng.uniform(0, 1, n)
    pred = target + rng.normal(0, 0.2, n)
    manifest = {f"test/{i}.png": {"score": f"{t:.6f}", "modality": "xr", "degradation": d, "source_id": s}
                for i, (t, d, s) in enumerate(zip(target, degs, srcs))}
    # the report's own prompt modality is wrong for every study: the table must not use it
    report = {"predictions": [{"path": f"test/{i}.png", "prediction": float(p), "target": -1.0, "modality": "ct"}
                              for i, p in enumerate(pred)]}
    rows = {r["group"]: r for r in st.table(report, manifest, by_source=True)}
    t6 = np.round(target, 6)
    assert rows["all"]["n"] == n and rows["all"]["srcc"] == pytest.approx(srcc(pred, t6))
    assert "ct" not in rows and rows["xr"]["n"] == n
    blur = [i for i, d in enumerate(degs) if "blur" in d]
    assert rows["xr with blur"]["n"] == len(blur) == 2 * n // 3
    assert rows["xr with blur"]["srcc"] == pytest.approx(srcc(pred[blur], t6[blur]))
    assert rows["mixed"]["n"] == n // 3
    assert rows["xr source a"]["n"] == rows["xr source b"]["n"] == n // 2
    assert rows["all"]["lo"] < rows["all"]["srcc"] < rows["all"]["hi"]
    assert "xr with jpeg" not in rows                       # no study of that type: no row
    with pytest.raises(ValueError, match="not in the manifest"):
        st.table({"predictions": [{"path": "val/other.png", "prediction": 0.1}]}, manifest)


def test_pooled_pairs_keep_equal_paths_of_two_corpora_apart() -> None:
    rng = np.random.default_rng(1)
    pairs, preds, targets = [], [], []
    for _ in range(2):                                   # the same relative paths in both corpora
        t, p = rng.uniform(0, 1, 30), rng.uniform(0, 1, 30)
        man = {f"test/{i}.png": {"score": f"{x:.6f}", "modality": "ct", "degradation": "dose", "source_id": "s"}
               for i, x in enumerate(t)}
        pairs.append(({"predictions": [{"path": f"test/{i}.png", "prediction": float(x)} for i, x in enumerate(p)]},
                      man))
        preds += list(p)
        targets += list(np.round(t, 6))
    rows = {r["group"]: r for r in st.table(*st.pooled(pairs))}
    assert rows["all"]["n"] == 60 and rows["ct with dose"]["n"] == 60
    assert rows["all"]["srcc"] == pytest.approx(srcc(np.array(preds), np.array(targets)))
    one = {r["group"]: r for r in st.table(*st.pooled(pairs[:1]))}
    assert one["all"]["n"] == 30
