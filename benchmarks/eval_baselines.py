"""Classical no-reference baselines vs a MedIQA model on a synthetic corpus split (issue 4).

For every study of the split (manifest from ``mediqa synth``), the salient slices are read
through the scoring path (``engines.pipeline.prepare_study``) and two classical measures are
computed on each slice in [0, 1] intensity units (before resizing), then averaged over slices:

- noise: ``-skimage.restoration.estimate_sigma`` (more noise → lower quality);
- sharpness: variance of the Laplacian (``scipy.ndimage.laplace``; sharper → higher quality).

SRCC against the manifest's synthetic score is printed overall, per modality and per
degradation, next to the model's SRCC (``training.evaluate.evaluate_model``) when ``--model``
is given. Usage:

    python benchmarks/eval_baselines.py CORPUS/manifest.csv [--split test] [--model M.safetensors]
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.restoration import estimate_sigma

from engines.metrics import srcc
from engines.pipeline import prepare_study
from engines.preprocess import PreprocessConfig, to_unit_range
from training.data.datasets import read_manifest


def classical(raw_slices: list[np.ndarray], modality: str | None, ptype: str | None,
              cfg: PreprocessConfig) -> tuple[float, float]:
    """(negated noise sigma, Laplacian variance), averaged over the slices."""
    noise, sharp = [], []
    for s in raw_slices:
        u = to_unit_range(np.asarray(s, dtype=np.float32), modality, ptype, cfg)
        g = u.mean(axis=-1) if u.ndim == 3 else u
        noise.append(-float(estimate_sigma(g)))
        sharp.append(float(ndimage.laplace(g).var()))
    return float(np.mean(noise)), float(np.mean(sharp))


def _srcc(a: list[float], b: list[float]) -> float | None:
    if len(a) < 3 or np.std(b) == 0 or np.std(a) == 0:
        return None
    return round(float(srcc(np.asarray(a), np.asarray(b))), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("manifest")
    ap.add_argument("--split", default="test")
    ap.add_argument("--model", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    samples, _ = read_manifest(args.manifest)
    samples = [s for s in samples if (s.split or "") == args.split]
    cfg = PreprocessConfig()
    rows = []
    for s in samples:
        prep = prepare_study(s.ref, cfg, 7)
        src_slices = [np.asarray(r) for r in (prep.raw or [])]
        if not src_slices:   # prepare_study keeps raw slices only for undecided CT; re-read them
            from engines.io.discover import open_study
            src = open_study(s.ref)
            src_slices = [src.get_slice(i) for i in sorted(set(prep.indices))]
        mod = s.labels.get("modality")
        n, sh = classical(src_slices, mod, prep.ptype_used or s.labels.get("type"), cfg)
        rows.append({"path": s.path, "score": s.target, "modality": mod,
                     "degradation": s.extra.get("degradation", ""), "noise": n, "sharpness": sh})
    pred: dict[str, float] = {}
    if args.model:
        from training.evaluate import evaluate_model
        rep = evaluate_model(args.model, args.manifest, split=args.split, progress=False)
        pred = {r["path"]: r["prediction"] for r in rep["predictions"]}
    groups: dict[str, list[dict]] = collections.defaultdict(list)
    for r in rows:
        groups["overall"].append(r)
        groups[f"modality={r['modality']}"].append(r)
        groups[f"degradation={r['degradation']}"].append(r)
        if "+" in r["degradation"]:
            groups["mixed degradations"].append(r)
    table = {}
    print(f"{'group':32s} {'n':>4s} {'-sigma':>7s} {'lapvar':>7s} {'model':>7s}")
    for g, rs in sorted(groups.items()):
        t = [r["score"] for r in rs]
        res = {"n": len(rs), "noise_srcc": _srcc([r["noise"] for r in rs], t),
               "sharpness_srcc": _srcc([r["sharpness"] for r in rs], t)}
        if pred:
            have = [r for r in rs if r["path"] in pred]
            res["model_srcc"] = _srcc([pred[r["path"]] for r in have], [r["score"] for r in have])
        table[g] = res
        fmt = lambda v: f"{v:7.3f}" if isinstance(v, float) else f"{'-':>7s}"  # noqa: E731
        print(f"{g:32s} {res['n']:4d} {fmt(res['noise_srcc'])} {fmt(res['sharpness_srcc'])} {fmt(res.get('model_srcc'))}")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
