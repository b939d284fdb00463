"""Agreement between predicted and reference quality scores: SRCC, PLCC, KROCC, RMSE.

numpy / scipy only. Inputs are 1-D sequences of equal length ``n >= 2`` of finite numbers
(anything else raises ``ValueError``). A correlation is undefined when either side is constant:
the function then returns ``nan`` and issues a ``RuntimeWarning`` instead of failing, so a
validation pass on a degenerate batch does not stop a training run.

PLCC and RMSE can be computed after the 4-parameter logistic mapping that IQA papers
conventionally fit from predictions to reference scores before measuring linear agreement:

    f(x) = (b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2

It removes a monotonic non-linearity between the model's scale and the reference scale
(SRCC and KROCC are rank-based and unaffected). The fit uses ``scipy.optimize.curve_fit``
starting from b1 = max(target), b2 = min(target), b3 = mean(pred), b4 = std(pred). When the
fit fails (no convergence, a non-finite result, or fewer than 5 points for 4 parameters) the
identity mapping is used instead — i.e. plain PLCC / RMSE — and a ``RuntimeWarning`` says so.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Sequence

import numpy as np
from scipy import optimize, stats

log = logging.getLogger(__name__)

ArrayLike = Sequence[float] | np.ndarray


def _pair(pred: ArrayLike, target: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validate and return float64 1-D copies of ``pred`` and ``target``."""
    p = np.asarray(pred, dtype=np.float64).reshape(-1) if np.ndim(pred) <= 1 else None
    t = np.asarray(target, dtype=np.float64).reshape(-1) if np.ndim(target) <= 1 else None
    if p is None or t is None:
        raise ValueError("pred and target must be 1-D sequences of scores")
    if p.shape != t.shape:
        raise ValueError(f"pred and target differ in length: {p.size} vs {t.size}")
    if p.size < 2:
        raise ValueError(f"at least 2 scores are needed, got {p.size}")
    if not (np.isfinite(p).all() and np.isfinite(t).all()):
        raise ValueError("pred and target must be finite (found nan or inf)")
    return p, t


def _constant(p: np.ndarray, t: np.ndarray, name: str) -> bool:
    """True (and a warning) when a correlation is undefined because one side is constant."""
    if np.ptp(p) == 0 or np.ptp(t) == 0:
        side = "pred" if np.ptp(p) == 0 else "target"
        warnings.warn(f"{name} is undefined: {side} is constant; returning nan",
                      RuntimeWarning, stacklevel=3)
        return True
    return False


def srcc(pred: ArrayLike, target: ArrayLike) -> float:
    """Spearman rank-order correlation in [-1, 1] (ties get average ranks)."""
    p, t = _pair(pred, target)
    if _constant(p, t, "SRCC"):
        return float("nan")
    return float(stats.spearmanr(p, t).statistic)


def krocc(pred: ArrayLike, target: ArrayLike) -> float:
    """Kendall rank-order correlation (tau-b, which accounts for ties) in [-1, 1]."""
    p, t = _pair(pred, target)
    if _constant(p, t, "KROCC"):
        return float("nan")
    return float(stats.kendalltau(p, t).statistic)


def srcc_ci(pred: ArrayLike, target: ArrayLike, *, compare: ArrayLike | None = None,
            confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Bootstrap confidence interval (percentile method, studies resampled with replacement,
    ``scipy.stats.bootstrap``) of ``srcc(pred, target)`` — or, with ``compare`` (another model's
    predictions for the same studies), of the paired difference ``srcc(pred) - srcc(compare)``:
    both models are judged on the same resampled studies, so what the split happens to hold
    cancels out. An interval that holds 0 says the two models are not told apart by these
    studies. Deterministic for a given ``seed``; (nan, nan) when SRCC is undefined."""
    p, t = _pair(pred, target)
    data: tuple[np.ndarray, ...] = (p, t)
    if compare is not None:
        c, _ = _pair(compare, target)
        data = (p, c, t)
    if np.ptp(t) == 0 or np.ptp(p) == 0 or (compare is not None and np.ptp(data[1]) == 0):
        return float("nan"), float("nan")

    def rho(a: np.ndarray, b: np.ndarray) -> float:
        r = stats.spearmanr(a, b).statistic
        return float(r) if np.isfinite(r) else 0.0   # a constant resample ranks nothing

    def statistic(*cols: np.ndarray) -> float:
        if len(cols) == 2:
            return rho(cols[0], cols[1])
        return rho(cols[0], cols[2]) - rho(cols[1], cols[2])

    res = stats.bootstrap(data, statistic, paired=True, vectorized=False, confidence_level=confidence,
                          n_resamples=n_resamples, method="percentile", rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def logistic4(x: np.ndarray, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    """The 4-parameter logistic: ``(b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2``."""
    z = np.clip(-(x - b3) / (abs(b4) + 1e-12), -500.0, 500.0)  # no overflow warnings
    return (b1 - b2) / (1.0 + np.exp(z)) + b2


def fit_logistic(pred: ArrayLike, target: ArrayLike) -> np.ndarray | None:
    """Fit ``logistic4`` from ``pred`` to ``target``; the 4 parameters, or None when it fails."""
    p, t = _pair(pred, target)
    if p.size < 5 or np.ptp(p) == 0:
        return None
    p0 = [float(t.max()), float(t.min()), float(p.mean()), float(p.std()) or 1.0]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", optimize.OptimizeWarning)
            params, _ = optimize.curve_fit(logistic4, p, t, p0=p0, maxfev=20000)
    except (RuntimeError, ValueError, optimize.OptimizeWarning) as exc:
        log.debug("logistic fit failed: %s", exc)
        return None
    if not np.all(np.isfinite(params)) or not np.all(np.isfinite(logistic4(p, *params))):
        return None
    return params


def _mapped(p: np.ndarray, t: np.ndarray, logistic: bool, name: str) -> np.ndarray:
    """``p`` after the logistic mapping when asked (identity when the fit fails, with a warning)."""
    if not logistic:
        return p
    params = fit_logistic(p, t)
    if params is None:
        warnings.warn(f"{name}: the 4-parameter logistic fit failed; using raw predictions",
                      RuntimeWarning, stacklevel=3)
        return p
    return logistic4(p, *params)


def plcc(pred: ArrayLike, target: ArrayLike, *, logistic: bool = False) -> float:
    """Pearson linear correlation in [-1, 1]; with ``logistic=True`` after the 4-parameter fit."""
    p, t = _pair(pred, target)
    if _constant(p, t, "PLCC"):
        return float("nan")
    q = _mapped(p, t, logistic, "PLCC")
    if np.ptp(q) == 0:  # a fit can flatten everything
        warnings.warn("PLCC is undefined: mapped predictions are constant; returning nan",
                      RuntimeWarning, stacklevel=2)
        return float("nan")
    return float(stats.pearsonr(q, t).statistic)


def rmse(pred: ArrayLike, target: ArrayLike, *, logistic: bool = False) -> float:
    """Root-mean-square error in target units; with ``logistic=True`` after the 4-parameter fit.

    Defined for constant inputs too (no warning)."""
    p, t = _pair(pred, target)
    q = _mapped(p, t, logistic, "RMSE") if np.ptp(p) > 0 else p
    return float(np.sqrt(np.mean((q - t) ** 2)))


def evaluate_all(pred: ArrayLike, target: ArrayLike, *, logistic: bool = False) -> dict[str, Any]:
    """All metrics at once: ``{"n", "srcc", "plcc", "krocc", "rmse"}`` (floats; nan where
    undefined). With ``logistic=True`` also ``"plcc_logistic"`` and ``"rmse_logistic"``."""
    p, t = _pair(pred, target)
    out: dict[str, Any] = {
        "n": int(p.size),
        "srcc": srcc(p, t),
        "plcc": plcc(p, t),
        "krocc": krocc(p, t),
        "rmse": rmse(p, t),
    }
    if logistic:
        out["plcc_logistic"] = plcc(p, t, logistic=True)
        out["rmse_logistic"] = rmse(p, t, logistic=True)
    return out
