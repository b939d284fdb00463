"""How far can *learned* classical features get on a synthetic corpus? (diagnostic for issue 4)

Eight hand-made distortion statistics per salient slice (noise σ, Laplacian variance, fine /
middle band energies and their ratio, gradient energy, 8×8 JPEG blockiness, low-frequency
non-uniformity), averaged over a study's slices, then one ridge regression per modality on their
logs and squares, fitted on the ``train`` split and scored on ``--split`` (held-out source
images). It is an upper reference for "what simple image statistics can tell", to put the deep
model's SRCC and the issue's 0.90 target in context — not a product feature.

    python benchmarks/feature_probe.py CORPUS/manifest.csv [--split test] [--alpha 1.0]
"""

from __future__ import annotations

import argparse
import collections
import logging

import numpy as np
from scipy import ndimage
from skimage.restoration import estimate_sigma

from engines.metrics import srcc
from engines.pipeline import prepare_study
from engines.preprocess import PreprocessConfig, to_unit_range
from training.data.datasets import read_manifest

FEATURES = ("sigma", "lapvar", "fine", "mid", "fine/mid", "grad", "blockiness", "nonuniformity")


def slice_features(g: np.ndarray) -> np.ndarray:
    """The statistics of one grey slice in [0, 1] (logs where the scale is multiplicative)."""
    eps = 1e-8
    g1, g3, g32 = (ndimage.gaussian_filter(g, s) for s in (1.0, 3.0, 32.0))
    fine = float(((g - g1) ** 2).mean())
    mid = float(((g1 - g3) ** 2).mean())
    gy, gx = np.gradient(g)
    dx = np.abs(np.diff(g, axis=1))
    on = dx[:, 7::8].mean() if dx.shape[1] > 8 else 0.0
    block = float(on / (dx.mean() + eps))
    nonuni = float(g32.std() / (g32.mean() + eps))
    return np.array([np.log(float(estimate_sigma(g)) + eps), np.log(float(ndimage.laplace(g).var()) + eps),
                     np.log(fine + eps), np.log(mid + eps), np.log((fine + eps) / (mid + eps)),
                     np.log(float((gx ** 2 + gy ** 2).mean()) + eps), block, nonuni])


def study_features(sample, cfg: PreprocessConfig) -> np.ndarray:
    from engines.io.discover import open_study

    prep = prepare_study(sample.ref, cfg, 7)
    src = open_study(sample.ref)
    slices = [np.asarray(src.get_slice(i), dtype=np.float32) for i in sorted(set(prep.indices))]
    mod = sample.labels.get("modality")
    feats = []
    for s in slices:
        u = to_unit_range(s, mod, prep.ptype_used or sample.labels.get("type"), cfg)
        feats.append(slice_features(u.mean(axis=-1) if u.ndim == 3 else u))
    return np.mean(feats, axis=0)


def design(f: np.ndarray, mu: np.ndarray, sd: np.ndarray) -> np.ndarray:
    z = (f - mu) / sd
    return np.concatenate([np.ones((len(z), 1)), z, z ** 2], axis=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("manifest")
    ap.add_argument("--split", default="test")
    ap.add_argument("--alpha", type=float, default=1.0, help="ridge penalty")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    samples, _ = read_manifest(args.manifest)
    cfg = PreprocessConfig()
    data: dict[str, list] = collections.defaultdict(list)
    for s in samples:
        if s.split in ("train", args.split):
            data[s.split].append((s.labels.get("modality"), study_features(s, cfg), s.target,
                                  s.extra.get("degradation", "")))
    preds, targets, mods, degs = [], [], [], []
    for mod in sorted({m for m, *_ in data["train"]}):
        tr = [(f, t) for m, f, t, _ in data["train"] if m == mod]
        te = [(f, t, d) for m, f, t, d in data[args.split] if m == mod]
        if len(tr) < 5 or not te:
            continue
        ftr = np.stack([f for f, _ in tr])
        mu, sd = ftr.mean(0), ftr.std(0) + 1e-8
        x = design(ftr, mu, sd)
        w = np.linalg.solve(x.T @ x + args.alpha * np.eye(x.shape[1]), x.T @ np.array([t for _, t in tr]))
        p = design(np.stack([f for f, _, _ in te]), mu, sd) @ w
        preds += list(p)
        targets += [t for _, t, _ in te]
        mods += [mod] * len(te)
        degs += [d for _, _, d in te]
        tr_p = x @ w
        print(f"{mod:8s} train n={len(tr):4d} SRCC {srcc(tr_p, np.array([t for _, t in tr])):.3f}   "
              f"{args.split} n={len(te):4d} SRCC {srcc(p, np.array([t for _, t, _ in te])):.3f}")
    preds_a, targets_a = np.array(preds), np.array(targets)
    print(f"overall  {args.split} n={len(preds_a)} SRCC {srcc(preds_a, targets_a):.3f}")
    mixed = np.array(["+" in d for d in degs])
    if mixed.sum() >= 3:
        print(f"mixed degradations n={int(mixed.sum())} SRCC {srcc(preds_a[mixed], targets_a[mixed]):.3f}")


if __name__ == "__main__":
    main()
