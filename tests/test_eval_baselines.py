"""benchmarks/eval_baselines.py: the table's groups of studies."""

from __future__ import annotations

from tests.benchmark_module import load_benchmark

eb = load_benchmark("eval_baselines")


def test_mixed_studies_count_under_with_but_not_under_only() -> None:
    rows = [{"modality": "mr", "degradation": "noise"}, {"modality": "mr", "degradation": "noise+bias"},
            {"modality": "mr", "degradation": "bias"}, {"modality": "ct", "degradation": "noise"},
            {"modality": "ct", "degradation": ""}]
    g = eb.groups_of(rows)
    assert len(g["overall"]) == 5 and len(g["modality=mr"]) == 3
    assert g["modality=mr with noise"] == rows[:2] and g["modality=mr with bias"] == rows[1:3]
    assert g["modality=mr only noise"] == [rows[0]] and g["modality=mr only bias"] == [rows[2]]
    assert g["mixed degradations"] == [rows[1]]
    assert g["modality=ct only noise"] == [rows[3]] and "modality=ct only " not in g
    assert g["degradation=noise"] == [rows[0], rows[3]]
