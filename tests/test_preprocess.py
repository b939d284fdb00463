"""The shared preprocessing's exact percentiles: the fast selection must give np.percentile's
results bit for bit, since models were trained with np.percentile (train/serve parity)."""

from __future__ import annotations

import numpy as np
import pytest

from engines.preprocess import _SELECT_MIN, exact_percentiles, robust_minmax


def _reference_minmax(img: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """robust_minmax as it was written before the selection (np.percentile on every pixel)."""
    x = img.astype(np.float32, copy=False)
    finite = x[np.isfinite(x)]
    if finite.size == 0:
        return np.zeros_like(x, dtype=np.float32)
    lo, hi = np.percentile(finite, percentiles)
    if not hi > lo:
        lo, hi = float(finite.min()), float(finite.max())
    if not hi > lo:
        return np.zeros_like(x, dtype=np.float32)
    out = (np.nan_to_num(x, nan=lo) - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def _arrays(rng: np.random.Generator) -> list[np.ndarray]:
    n = 70_001
    background = np.where(rng.random(n) < 0.7, 0.0, rng.normal(100, 30, n))
    return [
        rng.random(n).astype(np.float32),
        rng.integers(0, 40, n).astype(np.float32),                  # heavy ties
        background.astype(np.float32),                              # MR-like zero background
        np.sort(rng.random(n)).astype(np.float32),                  # sorted
        np.sort(rng.random(n)).astype(np.float32)[::-1].copy(),     # reverse sorted
        rng.standard_cauchy(n),                                     # float64, heavy tails
        np.full(n, 3.0, np.float32),                                # constant
        rng.random((300, 257)).astype(np.float32),                  # 2D
        rng.random(_SELECT_MIN + 1).astype(np.float32) * 1e6,       # just above the cut-over
    ]


@pytest.mark.parametrize("qs", [(0.5, 99.5), (1.0, 99.0), (0.0, 100.0), (5.0, 95.0), (50.0, 50.1)])
def test_exact_percentiles_equal_numpy_bit_for_bit(qs: tuple[float, float]) -> None:
    rng = np.random.default_rng(7)
    for a in _arrays(rng):
        expected = [float(v) for v in np.percentile(a, qs)]
        assert exact_percentiles(a, qs) == expected, (a.dtype, a.shape, qs)


def test_exact_percentiles_on_random_sizes() -> None:
    rng = np.random.default_rng(11)
    for _ in range(60):
        n = int(rng.integers(1, 200_000))
        a = (rng.random(n) * rng.choice([1.0, 1e4])).astype(np.float32)
        if rng.random() < 0.5:
            a = np.round(a)                  # integer-valued, as rescaled DICOM pixels are
        qs = (float(rng.uniform(0, 10)), float(rng.uniform(90, 100)))
        assert exact_percentiles(a, qs) == [float(v) for v in np.percentile(a, qs)], (n, qs)


def test_interpolation_rounds_as_numpy_does() -> None:
    """Two neighbours and a fraction where numpy's interpolation (from the nearer end, the
    difference taken in float32) and the naive ``a + (b - a) * g`` in float64 differ."""
    n, q = 4178, 54.362499146542284
    prev = int(np.floor((n - 1) * q / 100.0))
    a, b = np.float32(3.6159506), np.float32(98.32404)
    rng = np.random.default_rng(5)
    values = np.concatenate([rng.uniform(-50, 3, prev), [a, b], rng.uniform(99, 200, n - prev - 2)])
    values = rng.permutation(values.astype(np.float32))
    assert exact_percentiles(values, (q, 99.0)) == [float(v) for v in np.percentile(values, (q, 99.0))]


def test_a_misleading_sample_falls_back_to_a_full_sort(monkeypatch: pytest.MonkeyPatch) -> None:
    import engines.preprocess as pre

    n = 1_000_003
    a = np.tile(np.asarray([5.0, 6.0, 7.0, 8.0], np.float32), n // 4 + 1)[:n]
    a[:: max(1, n // pre._SAMPLE)] = -1.0   # the strided sample sees only these, too few to hold the 0.5 %
    results: list[object] = []
    real = pre._order_stats

    def spy(*args: object, **kw: object) -> object:
        results.append(real(*args, **kw))  # type: ignore[arg-type]
        return results[-1]

    monkeypatch.setattr(pre, "_order_stats", spy)
    assert exact_percentiles(a, (0.5, 99.5)) == [float(v) for v in np.percentile(a, (0.5, 99.5))]
    assert results and results[0] is None     # the bound was too low: counted, not trusted


def test_robust_minmax_is_unchanged_by_the_selection() -> None:
    rng = np.random.default_rng(3)
    imgs = [a.reshape(-1, 1) if a.ndim == 1 else a for a in _arrays(rng)]
    with_nan = rng.normal(500, 100, (256, 256)).astype(np.float32)
    with_nan[10:20, 30:40] = np.nan
    with_nan[0, 0] = np.inf
    rgb = rng.integers(0, 255, (128, 96, 3)).astype(np.uint8)
    for img in imgs + [with_nan, rgb, np.zeros((64, 64), np.float32)]:
        got = robust_minmax(img, (0.5, 99.5))
        want = _reference_minmax(img, (0.5, 99.5))
        assert got.dtype == np.float32 and got.shape == img.shape
        assert np.array_equal(got, want), img.shape
