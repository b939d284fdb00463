"""Paired comparison of two kept ``mediqa evaluate --json`` reports, without evaluating again.

Two reports of the same split (a candidate and a bar, two TTA modes, two
copies of the same studies) are matched by study path. For all matched studies and for each manifest group
(``--by``: ``modality`` by default — the bar report's prompt modality, from the tags or else its
classifier — or ``degradation``, whose mixed studies count under every
type they contain), it prints both SRCCs, their difference and the paired 95 % bootstrap interval
of the difference on the same resampled studies (``engines.metrics.srcc_ci``). An interval wholly
below or above 0 tells the two apart; one that holds 0 does not.

Refuses reports whose studies differ or whose targets disagree (they would not be the same
split). Usage:

    python benchmarks/compare_reports.py CANDIDATE.json BAR.json [--by modality|degradation]
        [--confidence 0.95] [--json out.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from engines.metrics import srcc, srcc_ci


def _rows(report: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    rows = {str(p["path"]): p for p in report.get("predictions") or []}
    if not rows:
        raise ValueError("the report holds no predictions (write it with `mediqa evaluate --json`)")
    return rows


def _group_keys(row: Mapping[str, Any], by: str) -> list[str]:
    if by == "degradation":
        return [d for d in str(row.get("degradation") or "").split("+") if d]
    value = row.get(by)
    return [str(value)] if value not in (None, "") else []


def compare(candidate: Mapping[str, Any], bar: Mapping[str, Any], *, by: str = "modality",
            confidence: float = 0.95, seed: int = 0) -> dict[str, dict[str, Any]]:
    """``{"all": {...}, "<by>=<value>": {...}}``, each with n, srcc (candidate), bar_srcc, diff and
    the paired interval [lo, hi] of the difference (NaN where SRCC is undefined)."""
    a, b = _rows(candidate), _rows(bar)
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise ValueError(f"the reports cover different studies ({len(only_a)} only in the candidate, e.g. "
                         f"{only_a[:2]}; {len(only_b)} only in the bar, e.g. {only_b[:2]})")
    keys = sorted(a)
    ta = np.array([float(a[k]["target"]) for k in keys])
    tb = np.array([float(b[k]["target"]) for k in keys])
    if not np.allclose(ta, tb, atol=1e-6):
        raise ValueError("the reports' targets differ for the same studies: not the same split or labels")
    # groups come from the bar's rows: its prompt modality (tags, else its classifier), so both
    # models are grouped the same way even where the candidate's classifier names another
    groups: dict[str, list[int]] = collections.defaultdict(list)
    for i, k in enumerate(keys):
        groups["all"].append(i)
        for g in _group_keys(b[k], by):
            groups[f"{by}={g}"].append(i)
    pa = np.array([float(a[k]["prediction"]) for k in keys])
    pb = np.array([float(b[k]["prediction"]) for k in keys])
    out: dict[str, dict[str, Any]] = {}
    for name in ["all", *sorted(g for g in groups if g != "all")]:
        idx = np.asarray(groups[name])
        if len(idx) < 3:
            s = sb = lo = hi = math.nan
        else:
            s, sb = srcc(pa[idx], ta[idx]), srcc(pb[idx], ta[idx])
            lo, hi = srcc_ci(pa[idx], ta[idx], compare=pb[idx], confidence=confidence, seed=seed)
        out[name] = {"n": int(len(idx)), "srcc": float(s), "bar_srcc": float(sb), "diff": float(s - sb),
                     "interval": [float(lo), float(hi)]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("candidate")
    ap.add_argument("bar")
    ap.add_argument("--by", choices=("modality", "degradation"), default="modality")
    ap.add_argument("--confidence", type=float, default=0.95)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    res = compare(json.loads(Path(args.candidate).read_text()), json.loads(Path(args.bar).read_text()),
                  by=args.by, confidence=args.confidence)
    print(f"{'group':28s} {'n':>5s} {'candidate':>9s} {'bar':>7s} {'diff':>7s}  paired {args.confidence:.0%}")
    for name, r in res.items():
        lo, hi = r["interval"]
        verdict = "above 0" if lo > 0 else "below 0" if hi < 0 else "holds 0" if np.isfinite(lo) else "-"
        print(f"{name:28s} {r['n']:5d} {r['srcc']:9.4f} {r['bar_srcc']:7.4f} {r['diff']:+7.4f}  "
              f"[{lo:+.3f}, {hi:+.3f}] {verdict}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
