"""benchmarks/illumination_probe.py: its candidate statistics measure what they are named for."""

from __future__ import annotations

import numpy as np
import pytest

from tests.benchmark_module import load_benchmark

ip = load_benchmark("illumination_probe")


def test_a_stronger_clipped_field_raises_the_clipped_fraction_and_the_non_uniformity() -> None:
    rng = np.random.default_rng(0)
    texture = np.clip(0.6 + 0.1 * rng.standard_normal((224, 224)), 0, 1)
    ramp = np.linspace(-1.0, 1.0, 224)[None, :]
    ix = {n: i for i, n in enumerate(ip.NAMES)}
    stats = [ip.candidates(np.clip(texture * (1.0 + b * ramp), 0.0, 1.0)) for b in (0.0, 0.3, 0.7)]
    bright = [s[ix["clipped_bright"]] for s in stats]
    assert bright[0] == pytest.approx(float((texture >= 0.98).mean()))
    assert bright[0] < bright[1] < bright[2]
    assert stats[0][ix["nonuniformity"]] < stats[1][ix["nonuniformity"]] < stats[2][ix["nonuniformity"]]
    assert stats[0][ix["log_lowfreq_std"]] < stats[2][ix["log_lowfreq_std"]]
    dark = np.full((64, 64), 0.5)
    dark[:, :8] = 0.0                                      # an eighth of the pixels black
    assert ip.candidates(dark)[ix["clipped_dark"]] == pytest.approx(0.125)
    assert stats[0][ix["mean"]] == pytest.approx(texture.mean())
