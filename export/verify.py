"""Parity between any two backends on the same real, preprocessed inputs.

Every export runs this (reference: the torch fp32 model; candidate: the exported artifact) and
raises ``ParityError`` past tolerance, with the numbers in the message. Reported per output:
max absolute difference, max relative difference (|a-b| / max(|a|, 1e-6)); for the score also
the Spearman rank correlation (SRCC) between the two backends' scores over the inputs.

Tolerances by candidate precision (scores are in the model's [0, 1] label scale):

========  ===============  ===========================  ========================
precision score max |Δ|    other outputs max |Δ|         score SRCC
========  ===============  ===========================  ========================
fp32      1e-4             1e-4 · max(1, max|ref|)       reported only
fp16      1e-2             2e-2 · max(1, max|ref|)       ≥ 0.99 *
bf16      3e-2             6e-2 · max(1, max|ref|)       ≥ 0.98 *
int8      (none)           (none)                        ≥ 0.99
========  ===============  ===========================  ========================

\\* The rank condition applies only when the reference scores spread over more than 10 × the
score tolerance: below that, ranks are decided by differences the tolerance allows anyway.
For int8 the rank correlation is the acceptance criterion (see ``export.quantize``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engines import names
from engines.errors import MediqaError

log = logging.getLogger(__name__)


class ParityError(MediqaError):
    """An exported artifact disagrees with its reference past tolerance."""

    code = "parity"

    def __init__(self, message: str, report: "ParityReport | None" = None) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class Tolerance:
    score_atol: float | None
    other_atol: float | None     # scaled by max(1, max|ref|) of each output
    min_srcc: float | None
    srcc_always: bool = False    # apply the SRCC condition whatever the score spread


TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(1e-4, 1e-4, None),
    "fp16": Tolerance(1e-2, 2e-2, 0.99),
    "bf16": Tolerance(3e-2, 6e-2, 0.98),
    "int8": Tolerance(None, None, 0.99, srcc_always=True),
}


@dataclass
class OutputDiff:
    name: str
    max_abs: float
    max_rel: float
    ref_max_abs: float


@dataclass
class ParityReport:
    reference: str
    candidate: str
    graph: str
    precision: str
    n: int
    diffs: dict[str, OutputDiff]
    score_srcc: float
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def score_max_abs(self) -> float:
        return self.diffs[names.SCORE].max_abs if names.SCORE in self.diffs else float("nan")

    def summary(self) -> str:
        parts = [f"{self.graph} {self.candidate} vs {self.reference} ({self.precision}, n={self.n}):"]
        for d in self.diffs.values():
            parts.append(f"{d.name} max|Δ|={d.max_abs:.2e} rel={d.max_rel:.2e}")
        if not np.isnan(self.score_srcc):
            parts.append(f"score SRCC={self.score_srcc:.4f}")
        parts.append("OK" if self.passed else "FAILED: " + "; ".join(self.failures))
        return " ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"reference": self.reference, "candidate": self.candidate, "graph": self.graph,
                "precision": self.precision, "n": self.n, "score_srcc": self.score_srcc,
                "passed": self.passed, "failures": list(self.failures),
                "diffs": {k: vars(v) for k, v in self.diffs.items()}}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two (N,) arrays; NaN when N < 3 or either side is constant."""
    from scipy.stats import spearmanr

    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def compare_outputs(ref: dict[str, np.ndarray], cand: dict[str, np.ndarray], *, precision: str = "fp32",
                    graph: str = "2d", reference: str = "reference", candidate: str = "candidate",
                    tolerance: Tolerance | None = None) -> ParityReport:
    """Compare two output dicts (same keys, same shapes) against the precision's tolerance."""
    tol = tolerance or TOLERANCES[precision]
    missing = sorted(set(ref) ^ set(cand))
    failures = [f"outputs differ in names: {missing}"] if missing else []
    diffs: dict[str, OutputDiff] = {}
    n = 0
    for key in ref:
        if key not in cand:
            continue
        r = np.asarray(ref[key], dtype=np.float64)
        c = np.asarray(cand[key], dtype=np.float64)
        n = int(r.shape[0]) if r.ndim else 1
        if r.shape != c.shape:
            failures.append(f"{key}: shape {c.shape} vs reference {r.shape}")
            continue
        if not np.all(np.isfinite(c)):
            failures.append(f"{key}: non-finite values in {candidate}")
            continue
        delta = np.abs(r - c)
        diffs[key] = OutputDiff(key, float(delta.max(initial=0.0)),
                                float((delta / np.maximum(np.abs(r), 1e-6)).max(initial=0.0)),
                                float(np.abs(r).max(initial=0.0)))
        d = diffs[key]
        if key == names.SCORE:
            if tol.score_atol is not None and d.max_abs > tol.score_atol:
                failures.append(f"score max|Δ| {d.max_abs:.3e} > {tol.score_atol:.0e}")
        elif tol.other_atol is not None:
            lim = tol.other_atol * max(1.0, d.ref_max_abs)
            if d.max_abs > lim:
                failures.append(f"{key} max|Δ| {d.max_abs:.3e} > {lim:.1e}")
    srcc = float("nan")
    if names.SCORE in ref and names.SCORE in cand and names.SCORE in diffs:
        srcc = spearman(ref[names.SCORE], cand[names.SCORE])
        if tol.min_srcc is not None:
            spread = float(np.ptp(np.asarray(ref[names.SCORE]))) if n else 0.0
            applies = tol.srcc_always or tol.score_atol is None or spread > 10 * tol.score_atol
            if applies and not (srcc >= tol.min_srcc):  # NaN fails too
                failures.append(f"score SRCC {srcc:.4f} < {tol.min_srcc}")
    return ParityReport(reference, candidate, graph, precision, n, diffs, srcc, failures)


def _batched(fn: Any, batch_size: int, *arrays: np.ndarray) -> dict[str, np.ndarray]:
    parts = [fn(*[a[i: i + batch_size] for a in arrays]) for i in range(0, len(arrays[0]), batch_size)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def compare_backends(reference: Any, candidate: Any, images: np.ndarray, prompts: np.ndarray, *,
                     volumes: np.ndarray | None = None, volume_prompts: np.ndarray | None = None,
                     precision: str = "fp32", batch_size: int = 8, raise_on_fail: bool = True,
                     tolerance: Tolerance | None = None) -> list[ParityReport]:
    """Run both backends on the same inputs: the 2D graph always, the classifier and the 3D graph
    when both backends have them. Returns one report per graph; raises ParityError on the first
    failing graph when ``raise_on_fail`` (all reports are computed and logged first)."""
    ra, ca = reference.describe(), candidate.describe()
    reports = [compare_outputs(_batched(reference.score, batch_size, images, prompts),
                               _batched(candidate.score, batch_size, images, prompts),
                               precision=precision, graph="2d", reference=ra, candidate=ca,
                               tolerance=tolerance)]
    if reference.has_classifier and candidate.has_classifier:
        reports.append(compare_outputs(_batched(reference.classify, batch_size, images),
                                       _batched(candidate.classify, batch_size, images),
                                       precision=precision, graph="classifier", reference=ra,
                                       candidate=ca, tolerance=tolerance))
    if volumes is not None and reference.has_volume_graph and candidate.has_volume_graph:
        vp = volume_prompts if volume_prompts is not None else prompts[: len(volumes)]
        vb = max(1, batch_size // max(1, volumes.shape[1]))
        reports.append(compare_outputs(_batched(reference.score_volume, vb, volumes, vp),
                                       _batched(candidate.score_volume, vb, volumes, vp),
                                       precision=precision, graph="3d", reference=ra, candidate=ca,
                                       tolerance=tolerance))
    for r in reports:
        (log.info if r.passed else log.error)("parity %s", r.summary())
    bad = [r for r in reports if not r.passed]
    if bad and raise_on_fail:
        raise ParityError("parity check failed: " + " | ".join(r.summary() for r in bad), bad[0])
    return reports
