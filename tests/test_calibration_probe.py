"""benchmarks/calibration_probe.py: the per-type offset oracle separates cross-type calibration
from ranking within types."""

from __future__ import annotations

import numpy as np

from tests.benchmark_module import load_benchmark

probe = load_benchmark("calibration_probe")


def test_oracle_removes_offsets_between_types_and_nothing_else() -> None:
    rng = np.random.default_rng(0)
    t = rng.uniform(0.2, 0.9, 60)
    kinds = np.array(["noise", "blur", "jpeg"] * 20)
    shift = {"noise": 0.0, "blur": 0.4, "jpeg": -0.3}
    # perfect ranking inside each type, wrong scale between types
    preds = [(k, float(x), float(x + shift[k])) for k, x in zip(kinds, t)]
    out = probe.type_offsets(preds)
    assert out["srcc"] < 0.8
    assert out["srcc_type_offsets_removed"] == 1.0
    assert all(v["srcc"] == 1.0 for v in out["types"].values())
    assert out["types"]["blur"]["residual"] < 0 < out["types"]["jpeg"]["residual"]
    # shuffled predictions inside one type: the oracle cannot repair that
    noisy = [(k, tt, p if k != "blur" else float(rng.uniform())) for k, tt, p in preds]
    assert probe.type_offsets(noisy)["srcc_type_offsets_removed"] < 0.95
