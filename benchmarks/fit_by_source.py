"""How a model fits a synthetic split per base-image source, and where its scores plateau.

Reads a kept ``mediqa evaluate --json`` report and the corpus manifest it was made from (the
manifest's ``source_id`` and ``degradation`` columns; the report's predictions are matched by study
path; every report study must be in the manifest). Prints, for the chosen modality:

1. per source × single degradation type (studies with that type alone; ``mixed`` = two or more
   types; ``all``): the model's SRCC against the synthetic score and n; with ``--stats`` also the
   SRCC of the negated noise estimate (``-sigma``, ``benchmarks/eval_baselines.study_statistics``: skimage's
   ``estimate_sigma`` on the salient slices in [0, 1] units) — reading the images, ~0.2 s a study;
   ``--stats input`` measures it on the network's input tensors instead (``prepare_inputs``: what
   survives the preprocessing);
2. per single degradation type × label bin: the model's mean ± sd score. A model that ranks a
   type sees a rising mean across the bins; a flat run of means over a range of labels is a
   plateau (the model hedges there), whatever the SRCC says.

Made for the training-split diagnosis in the README ("What limits it": the network underfits its
own training studies). Usage:

    python benchmarks/fit_by_source.py REPORT.json CORPUS/manifest.csv [--modality mr] [--stats [input]]
        [--bins 0,0.3,0.5,0.6,0.7,0.8,0.9,1.01] [--json out.json]
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from engines.metrics import srcc

MIN_N = 5   # groups smaller than this get no SRCC


def join_rows(report: Mapping[str, Any], manifest_rows: Sequence[Mapping[str, str]],
              modality: str | None = None) -> list[dict[str, Any]]:
    """One row per report study (``path``, ``score``, ``pred``, ``source``, ``degradation``,
    ``modality``), restricted to ``modality`` when given. ValueError when the report holds no
    predictions or names a study the manifest lacks."""
    by_path = {r["path"]: r for r in manifest_rows}
    preds = report.get("predictions") or []
    if not preds:
        raise ValueError("the report holds no predictions (write it with `mediqa evaluate --json`)")
    out = []
    for p in preds:
        m = by_path.get(str(p["path"]))
        if m is None:
            raise ValueError(f"study {p['path']!r} of the report is not in the manifest")
        if modality and m.get("modality", "").lower() != modality.lower():
            continue
        out.append({"path": m["path"], "score": float(m["score"]), "pred": float(p["prediction"]),
                    "source": m.get("source_id", ""), "degradation": m.get("degradation", ""),
                    "modality": m.get("modality", "")})
    return out


def kind_of(degradation: str) -> str:
    """``mixed`` for two or more named types, else the one type (``"-"`` for none)."""
    parts = [d for d in degradation.split("+") if d]
    return "mixed" if len(parts) > 1 else (parts[0] if parts else "-")


def _rho(a: Sequence[float], b: Sequence[float]) -> float | None:
    if len(a) < MIN_N or len(set(a)) < 2 or len(set(b)) < 2:
        return None
    v = float(srcc(np.asarray(a), np.asarray(b)))
    return None if math.isnan(v) else v


def source_table(rows: Sequence[Mapping[str, Any]], value: str = "pred") -> dict[str, dict[str, dict[str, Any]]]:
    """{source (and ``ALL``): {kind (and ``all``): {"n", "srcc"}}} of ``rows[value]`` against the
    score; ``srcc`` is None for fewer than ``MIN_N`` studies or a constant column."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = collections.defaultdict(list)
    for r in rows:
        for src in (r["source"], "ALL"):
            groups[(src, "all")].append(r)
            groups[(src, kind_of(r["degradation"]))].append(r)
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for (src, kind), rs in sorted(groups.items()):
        table.setdefault(src, {})[kind] = {"n": len(rs), "srcc": _rho([r["score"] for r in rs],
                                                                      [r[value] for r in rs])}
    return table


def label_bins(rows: Sequence[Mapping[str, Any]], edges: Sequence[float]) -> dict[str, list[dict[str, Any]]]:
    """{kind (and ``all``): [{"lo", "hi", "n", "mean", "sd"} per non-empty bin lo ≤ score < hi]}:
    the model's mean score per label bin."""
    out: dict[str, list[dict[str, Any]]] = {}
    kinds = sorted({kind_of(r["degradation"]) for r in rows}) + ["all"]
    for k in kinds:
        rs = [r for r in rows if k == "all" or kind_of(r["degradation"]) == k]
        t = np.array([r["score"] for r in rs])
        p = np.array([r["pred"] for r in rs])
        bins = []
        for lo, hi in zip(edges[:-1], edges[1:]):
            m = (t >= lo) & (t < hi)
            if m.any():
                bins.append({"lo": float(lo), "hi": float(hi), "n": int(m.sum()),
                             "mean": float(p[m].mean()), "sd": float(p[m].std())})
        out[k] = bins
    return out


def add_noise_stat(rows: list[dict[str, Any]], manifest: str, on: str = "source") -> None:
    """Each row gains ``neg_sigma``: ``on="source"``, ``eval_baselines.study_statistics``' noise
    measure (the salient slices in source units mapped to [0, 1]); ``on="input"``, the same
    estimate (skimage's ``estimate_sigma``, negated, averaged over slices) on the network's own
    input tensors (``training.data.cache.prepare_inputs``, the training and scoring path; each
    (3, S, S) image averaged over its channels) — whether what the statistic reads survives the
    preprocessing the network sees. Both use the default ``PreprocessConfig``: right for MR, X-ray
    and fundus; a model trained with another CT setting (the bundled one's ``ct_pixel_mm`` 1.0)
    sees CT inputs that differ from these."""
    import sys  # noqa: PLC0415

    from engines.preprocess import PreprocessConfig  # noqa: PLC0415
    from training.data.datasets import read_manifest  # noqa: PLC0415

    if on not in ("source", "input"):
        raise ValueError(f"on must be 'source' or 'input', got {on!r}")
    samples = {s.path: s for s in read_manifest(manifest)[0]}
    cfg = PreprocessConfig()
    if on == "input":
        from skimage.restoration import estimate_sigma  # noqa: PLC0415

        from training.data.cache import prepare_inputs  # noqa: PLC0415

        for r in rows:
            x = prepare_inputs(samples[r["path"]].ref, cfg, 7).images
            x = x[None] if x.ndim == 3 else x
            r["neg_sigma"] = -float(np.mean([estimate_sigma(im.mean(axis=0)) for im in x]))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from eval_baselines import study_statistics  # noqa: PLC0415

    for r in rows:
        r["neg_sigma"], _ = study_statistics(samples[r["path"]], cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("report")
    ap.add_argument("manifest")
    ap.add_argument("--modality", default=None, help="only this modality's studies (e.g. mr)")
    ap.add_argument("--stats", nargs="?", const="source", choices=("source", "input"), default=None,
                    help="also the -sigma statistic's SRCC (reads the images): on the source slices "
                         "(default) or on the network's input tensors (--stats input)")
    ap.add_argument("--bins", default="0,0.3,0.5,0.6,0.7,0.8,0.9,1.01")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with open(args.manifest, newline="") as f:
        manifest_rows = list(csv.DictReader(f))
    try:
        rows = join_rows(json.loads(Path(args.report).read_text()), manifest_rows, args.modality)
    except ValueError as exc:
        raise SystemExit(f"{args.report}: {exc}") from None
    if not rows:
        raise SystemExit("no study of the report matches --modality")
    if args.stats:
        add_noise_stat(rows, args.manifest, args.stats)
    net = source_table(rows)
    sig = source_table(rows, "neg_sigma") if args.stats else {}
    kinds = sorted({k for t in net.values() for k in t if k != "all"})
    cols = ["all"] + kinds
    fmt = lambda c: "-" if c is None or c.get("srcc") is None else f"{c['srcc']:.3f}"  # noqa: E731
    print(f"SRCC per source x single degradation ({'model / -sigma' if sig else 'model'}; n)")
    print(f"{'source':16s}" + "".join(f"{c:>22s}" for c in cols))
    for src in sorted(net, key=lambda s: (s == "ALL", s)):
        cells = []
        for c in cols:
            cell = net[src].get(c)
            if cell is None:
                cells.append(f"{'':>22s}")
                continue
            txt = fmt(cell) + (f" / {fmt(sig[src].get(c))}" if sig else "") + f" ({cell['n']})"
            cells.append(f"{txt:>22s}")
        print(f"{src:16s}" + "".join(cells))
    edges = [float(x) for x in args.bins.split(",")]
    bins = label_bins(rows, edges)
    print("\nmean ± sd score per label bin")
    for k, bs in bins.items():
        print(f"{k:8s} " + " | ".join(f"[{b['lo']:.1f},{b['hi']:.1f}) n={b['n']} {b['mean']:.2f}±{b['sd']:.2f}"
                                    for b in bs))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": net, "neg_sigma": sig, "bins": bins}, indent=1))


if __name__ == "__main__":
    main()
