"""Why is within-modality SRCC on held-out sources low? Two diagnostics for issue 4.

1. **Cross-type offsets** (``--eval``: the JSON of ``mediqa evaluate --split test --json``). Per
   modality: SRCC, and for each degradation type of that modality the mean residual of a linear
   fit target ~ prediction (the whole modality; a mixed study's combination, e.g. dose+blur, is a
   type of its own). Then the SRCC an *oracle* would get that shifts
   each degradation type by its own offset (least squares: one slope for the modality, one
   intercept per type): what ranking within each type gives once the scale between types is right. The gap between the two is the part of the error that is
   cross-type calibration; the rest is ranking within types.
2. **CT noise per mAs by source** (``--ct-noise``): on every dose-only CT study of the corpus,
   ``skimage.restoration.estimate_sigma`` in HU (soft-tissue window), fitted as a + b/√mAs per
   source. The synthetic score of a dose study depends on mAs alone, while the noise the image
   shows at a given mAs differs between sources (patient size, pixel size).

    python benchmarks/calibration_probe.py CORPUS/manifest.csv [--eval EVAL.json] [--ct-noise]

Diagnostic only; nothing here is used by training or scoring.
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import logging
import warnings

import numpy as np

from engines.metrics import srcc

log = logging.getLogger("calibration_probe")


def type_offsets(preds: list[tuple[str, float, float]]) -> dict[str, object]:
    """``preds``: (degradation, target, prediction) of one modality. SRCC as is, per-type mean
    residuals of the linear fit target ~ prediction, and the SRCC with those offsets removed."""
    deg = np.array([p[0] for p in preds])
    t = np.array([p[1] for p in preds], dtype=np.float64)
    q = np.array([p[2] for p in preds], dtype=np.float64)
    slope, icpt = np.polyfit(q, t, 1)
    res = t - (slope * q + icpt)
    # the oracle: one common slope, one intercept per type (least squares), each type shifted by
    # its intercept; exact when predictions are a monotone-linear map of the targets plus offsets
    types = sorted(set(deg))
    design = np.column_stack([q] + [(deg == d).astype(np.float64) for d in types])
    coef = np.linalg.lstsq(design, t, rcond=None)[0]
    adj = q.copy()
    per: dict[str, dict[str, float]] = {}
    for k, d in enumerate(types):
        m = deg == d
        if coef[0] > 0:
            adj[m] += coef[1 + k] / coef[0]
        per[d] = {"n": int(m.sum()), "srcc": srcc(q[m], t[m]) if m.sum() > 2 else float("nan"),
                  "target_mean": float(t[m].mean()), "pred_mean": float(q[m].mean()),
                  "residual": float(res[m].mean())}
    return {"n": len(preds), "srcc": srcc(q, t), "srcc_type_offsets_removed": srcc(adj, t), "types": per}


def ct_noise_per_source(manifest: str) -> dict[str, dict[str, float]]:
    """Studies are read through the scoring path's reader (``engines.io``: series order, rescale
    to HU); the central slice of each dose-only CT study is measured."""
    from skimage.restoration import estimate_sigma

    from engines.io.discover import open_study
    from training.data.datasets import read_manifest

    with open(manifest, newline="") as fh:
        mas = {r["path"]: float(json.loads(r["params"])["mas"]) for r in csv.DictReader(fh)
               if r["modality"] == "ct" and r["degradation"] == "dose"}
    samples, _ = read_manifest(manifest)
    by: dict[str, list[tuple[float, float, float]]] = collections.defaultdict(list)
    for s in samples:
        if s.path not in mas:
            continue
        src = open_study(s.ref)
        hu = np.asarray(src.get_slice(len(src) // 2), dtype=np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sigma = float(estimate_sigma(np.clip((hu + 160.0) / 400.0, 0.0, 1.0))) * 400.0
        by[s.extra["source_id"]].append((mas[s.path], sigma, float(src.spacing[1])))
    out = {}
    for src_id, v in sorted(by.items()):
        a = np.array(v)
        b, c = np.polyfit(a[:, 0] ** -0.5, a[:, 1], 1)
        out[src_id] = {"n": len(a), "pixel_mm": float(a[0, 2]), "hu_per_inv_sqrt_mas": float(b),
                       "offset_hu": float(c), "sigma_at_100_mas": float(b / 10.0 + c)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("manifest")
    ap.add_argument("--eval", default=None, help="JSON of mediqa evaluate --json on this corpus")
    ap.add_argument("--ct-noise", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result: dict[str, object] = {}
    if args.eval:
        with open(args.manifest, newline="") as fh:
            man = {r["path"]: r for r in csv.DictReader(fh)}
        rep = json.load(open(args.eval))
        by_mod: dict[str, list[tuple[str, float, float]]] = collections.defaultdict(list)
        for p in rep["predictions"]:
            r = man[p["path"]]
            by_mod[r["modality"]].append((r["degradation"], float(p["target"]), float(p["prediction"])))
        result["offsets"] = {m: type_offsets(v) for m, v in sorted(by_mod.items())}
        for m, o in result["offsets"].items():
            log.info("%-7s n=%4d SRCC %.3f | per-type offsets removed (oracle) %.3f", m, o["n"], o["srcc"],
                     o["srcc_type_offsets_removed"])
            for d, t in o["types"].items():
                log.info("    %-20s n=%3d SRCC %6.3f  target %.3f  prediction %.3f  residual %+.3f",
                         d, t["n"], t["srcc"], t["target_mean"], t["pred_mean"], t["residual"])
    if args.ct_noise:
        result["ct_noise"] = ct_noise_per_source(args.manifest)
        for s, v in result["ct_noise"].items():
            log.info("%-14s n=%3d pixel %.2f mm  sigma ≈ %.0f/√mAs %+.1f HU  (at 100 mAs %.1f HU)", s, v["n"],
                     v["pixel_mm"], v["hu_per_inv_sqrt_mas"], v["offset_hu"], v["sigma_at_100_mas"])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
