"""Metrics against scipy.stats, the logistic fit, and the edge cases."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import stats

from engines.metrics import evaluate_all, fit_logistic, krocc, logistic4, plcc, rmse, srcc


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.mark.parametrize("n", [2, 3, 17, 500])
def test_random_data_matches_scipy(rng, n):
    t = rng.uniform(0, 4, n)
    p = t + rng.normal(0, 0.8, n)
    assert srcc(p, t) == pytest.approx(stats.spearmanr(p, t).statistic, abs=1e-12)
    assert plcc(p, t) == pytest.approx(stats.pearsonr(p, t).statistic, abs=1e-12)
    assert krocc(p, t) == pytest.approx(stats.kendalltau(p, t).statistic, abs=1e-12)
    assert rmse(p, t) == pytest.approx(np.sqrt(np.mean((p - t) ** 2)), abs=1e-12)


def test_real_like_scores_with_ties_match_scipy(rng):
    # LDCTIQA-style: reference scores on a 0..4 grid in steps of 0.2 (many ties) that saturate
    # at both ends of a latent quality, predictions roughly linear in it (rounded: ties too).
    latent = rng.uniform(-3, 3, 300)
    t = np.round(4 / (1 + np.exp(-2 * latent)) / 0.2) * 0.2
    p = np.round(0.5 + 0.15 * latent + rng.normal(0, 0.03, latent.size), 2)
    assert srcc(p, t) == pytest.approx(stats.spearmanr(p, t).statistic, abs=1e-12)
    assert krocc(p, t) == pytest.approx(stats.kendalltau(p, t).statistic, abs=1e-12)
    assert plcc(p, t) == pytest.approx(stats.pearsonr(p, t).statistic, abs=1e-12)
    # the logistic mapping follows the saturation: linear agreement improves, ranks do not change
    assert plcc(p, t, logistic=True) > plcc(p, t) + 0.01
    assert rmse(p, t, logistic=True) < rmse(p, t)
    assert srcc(logistic4(p, *fit_logistic(p, t)), t) == pytest.approx(srcc(p, t), abs=1e-9)


def test_logistic_fit_recovers_known_parameters(rng):
    x = np.linspace(-3, 3, 200)
    truth = (4.0, 0.5, 0.3, 0.7)
    y = logistic4(x, *truth) + rng.normal(0, 0.01, x.size)
    params = fit_logistic(x, y)
    assert params is not None
    b1, b2, b3, b4 = params
    assert (b1, b2, b3, abs(b4)) == pytest.approx(truth, abs=0.05)
    assert plcc(x, y, logistic=True) > 0.999


def test_perfect_and_reversed_order():
    t = np.arange(10.0)
    assert srcc(t, t) == pytest.approx(1.0)
    assert krocc(t, -t) == pytest.approx(-1.0)
    assert plcc(2 * t + 3, t) == pytest.approx(1.0)
    assert rmse(t, t) == 0.0


def test_constant_input_gives_nan_with_a_warning():
    t = [1.0, 2.0, 3.0, 4.0]
    c = [0.5, 0.5, 0.5, 0.5]
    for fn in (srcc, plcc, krocc):
        with pytest.warns(RuntimeWarning, match="constant"):
            assert np.isnan(fn(c, t))
        with pytest.warns(RuntimeWarning, match="constant"):
            assert np.isnan(fn(t, c))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rmse(c, t) == pytest.approx(np.sqrt(np.mean((np.array(c) - t) ** 2)))


def test_failed_fit_falls_back_to_plain_plcc_with_a_warning():
    p, t = [0.1, 0.4, 0.2], [1.0, 3.0, 2.5]  # 3 points cannot fix 4 parameters
    assert fit_logistic(p, t) is None
    with pytest.warns(RuntimeWarning, match="logistic fit failed"):
        assert plcc(p, t, logistic=True) == pytest.approx(stats.pearsonr(p, t).statistic)


@pytest.mark.parametrize("p,t,match", [
    ([1.0], [1.0], "at least 2"),
    ([], [], "at least 2"),
    ([1.0, 2.0], [1.0, 2.0, 3.0], "differ in length"),
    ([1.0, float("nan")], [1.0, 2.0], "finite"),
    ([[1.0, 2.0], [3.0, 4.0]], [1.0, 2.0], "1-D"),
])
def test_invalid_input_raises(p, t, match):
    for fn in (srcc, plcc, krocc, rmse, evaluate_all):
        with pytest.raises(ValueError, match=match):
            fn(p, t)


def test_evaluate_all_keys_and_values(rng):
    t = rng.uniform(0, 1, 50)
    p = t + rng.normal(0, 0.1, 50)
    out = evaluate_all(p, t)
    assert set(out) == {"n", "srcc", "plcc", "krocc", "rmse"}
    assert out["n"] == 50 and out["srcc"] == pytest.approx(srcc(p, t))
    out = evaluate_all(p, t, logistic=True)
    assert {"plcc_logistic", "rmse_logistic"} <= set(out)
    assert out["rmse_logistic"] <= out["rmse"] + 1e-9


def test_srcc_ci_holds_the_estimate_and_narrows_with_more_studies():
    from engines.metrics import srcc_ci

    rng = np.random.default_rng(1)
    widths = []
    for n in (60, 600):
        t = rng.random(n)
        p = t + rng.normal(0, 0.3, n)
        lo, hi = srcc_ci(p, t)
        assert lo < srcc(p, t) < hi and -1 <= lo and hi <= 1
        widths.append(hi - lo)
        assert srcc_ci(p, t) == (lo, hi)                      # deterministic for a seed
    assert widths[1] < widths[0] / 2                          # ~1/sqrt(n)


def test_paired_srcc_difference_ci_separates_models_only_when_they_differ():
    from engines.metrics import srcc_ci

    rng = np.random.default_rng(2)
    n = 400
    t = rng.random(n)
    good = t + rng.normal(0, 0.1, n)
    bad = t + rng.normal(0, 0.6, n)
    lo, hi = srcc_ci(good, t, compare=bad)
    assert lo > 0 and lo < srcc(good, t) - srcc(bad, t) < hi
    assert srcc_ci(good, t, compare=good) == (0.0, 0.0)
    twin = t + rng.normal(0, 0.1, n)                          # as good, other noise
    lo, hi = srcc_ci(good, t, compare=twin)
    assert lo < 0 < hi
    # paired: a shared error (both models wrong on the same studies) cancels out
    shared = rng.normal(0, 0.5, n)
    a, b = t + shared, t + shared + rng.normal(0, 0.05, n)
    paired = srcc_ci(a, t, compare=b)
    unpaired_width = (srcc_ci(a, t)[1] - srcc_ci(a, t)[0]) + (srcc_ci(b, t)[1] - srcc_ci(b, t)[0])
    assert paired[1] - paired[0] < unpaired_width / 4
    lo, hi = srcc_ci(np.ones(5), np.arange(5.0))
    assert np.isnan(lo) and np.isnan(hi)
