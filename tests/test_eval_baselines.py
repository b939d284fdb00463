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


def test_a_kept_report_must_be_of_the_same_split_and_model_and_hold_every_study() -> None:
    import pytest

    rep = {"model": "runs/x/default.safetensors", "split": "train",
           "predictions": [{"path": "train/a.png", "prediction": 0.2}, {"path": "train/b.png", "prediction": 0.7}]}
    assert eb.report_predictions(rep, ["train/a.png"], "train", "engines/weights/default.safetensors") == {
        "train/a.png": 0.2, "train/b.png": 0.7}
    with pytest.raises(ValueError, match="train split, not test"):
        eb.report_predictions(rep, ["train/a.png"], "test", "default.safetensors")
    with pytest.raises(ValueError, match="default.safetensors, not other.safetensors"):
        eb.report_predictions(rep, ["train/a.png"], "train", "other.safetensors")
    with pytest.raises(ValueError, match="no score for 1 studies .*train/c.png"):
        eb.report_predictions(rep, ["train/a.png", "train/c.png"], "train", "default.safetensors")
