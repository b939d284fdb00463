"""Which fixed statistics of the network's MR input read smoothing but not noise? No model involved.

The texture branch's noise term (README, "The model") reads the flattest cells' log energy: it
rises with noise and falls with blur, so a network that learns to penalise noise with it scores
blurred MR as cleaner (tex2n), and one that also learns a smoothing penalty shrinks its noise
weight again (tex2n-apod; `docs/model-history.md`). A statistic that falls with smoothing and
does not move with noise would let the two be weighed apart. This probe measures candidates on
the real MR base images of ``benchmarks/unseen_degradations.py`` (the validation / test sources,
up to ``--slices`` salient slices each), clean and at that benchmark's three strengths of noise,
field (3 / 1.5 / 1 T), blur, pixelation, ringing and ghosting, each preprocessed exactly as the
bundled model's card says (``engines.preprocess.preprocess_slice``; the grey channel). Per base
image and kind, the Spearman correlation of the statistic with the strength (clean = 0); the
table gives its mean over the images, and ``--json`` keeps every row with the statistic's moves.

Statistics (``input_statistics``), each of the high-pass residual ``g − mean3×3(g)`` of the
input ``g`` averaged over s × s pixels (``high_pass``) and its mean square in cells
(``cell_energy``; cells of max(2, 8 / s) pixels of the averaged image):
``floor_s{s}`` = log of the 10th percentile of the cells' energy (a noise level: the flattest
cells), ``edge_s{s}`` = log of the 98th percentile (the busiest cells: edges and noise),
``net_s{s}`` = log(98th − 10th percentile) (the busiest cells' energy above the noise floor:
noise adds to both percentiles and cancels, smoothing lowers the edges). ``net_s4`` is the noise
term's sharpness statistic (``TextureBranch.sharpness_statistic``, torch) computed in numpy; the
two agree to 0.25 on a real MR slice (``tests/test_sharpness_probe.py``).

Measured 2026-12-07 (15 real MR slices; mean SRCC with strength, noise / field / blur / pixelate /
ringing / ghosting): ``floor_s1`` +1.00 / +1.00 / −0.53 / −0.53 / −0.11 / +0.33; ``net_s4``
**−0.09 / −0.20 / −1.00** / +0.19 / −0.91 / −0.97, with mean moves of at most 0.03 for every
noise step against −0.57 / −1.51 / −3.02 for the three blur steps — at 4 × 4-pixel means the
noise is averaged down and its floor subtracted, so what is left is edge energy. Usage:

    python benchmarks/sharpness_probe.py [--slices 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

KINDS: tuple[str, ...] = ("noise", "field", "blur", "pixelate", "ringing", "ghosting")
SCALES: tuple[int, ...] = (1, 2, 4)


def high_pass(grey: np.ndarray, scale: int) -> np.ndarray:
    """``grey`` averaged over ``scale`` × ``scale`` pixels (one sample per block), minus its own
    3 × 3 mean."""
    from scipy import ndimage

    g = np.asarray(grey, dtype=np.float64)
    if scale > 1:
        h, w = (g.shape[0] // scale) * scale, (g.shape[1] // scale) * scale
        g = g[:h, :w].reshape(h // scale, scale, w // scale, scale).mean(axis=(1, 3))
    return g - ndimage.uniform_filter(g, 3, mode="nearest")


def cell_energy(resid: np.ndarray, cell: int) -> np.ndarray:
    """Mean square of ``resid`` in each ``cell`` × ``cell`` block (the edge remainder dropped), flat."""
    h, w = (resid.shape[0] // cell) * cell, (resid.shape[1] // cell) * cell
    return (resid[:h, :w] ** 2).reshape(h // cell, cell, w // cell, cell).mean(axis=(1, 3)).ravel()


def input_statistics(grey: np.ndarray, eps: float = 1e-8) -> dict[str, float]:
    """``floor_s{s}``, ``edge_s{s}`` and ``net_s{s}`` for s in ``SCALES`` (module docstring)."""
    out: dict[str, float] = {}
    for s in SCALES:
        e = cell_energy(high_pass(grey, s), max(2, 8 // s))
        p10, p98 = np.percentile(e, [10, 98])
        out[f"floor_s{s}"] = float(np.log(p10 + eps))
        out[f"edge_s{s}"] = float(np.log(p98 + eps))
        out[f"net_s{s}"] = float(np.log(max(p98 - p10, eps)))
    return out


def srcc_with_strength(values: list[float]) -> float:
    """Spearman correlation of clean + three strengths' values with 0, 1, 2, 3 (0 when constant)."""
    from scipy import stats

    if np.ptp(values) == 0:
        return 0.0
    return float(stats.spearmanr(np.arange(len(values)), values)[0])


def probe(slices: int = 7, kinds: Iterable[str] = KINDS) -> list[dict[str, Any]]:
    """One row per (base image, kind, statistic): ``srcc`` with strength and ``moves`` (each
    strength's value minus the clean one)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from unseen_degradations import base_images, degrade, strengths  # noqa: PLC0415

    from engines.artifact import bundled_model_path, load_card  # noqa: PLC0415
    from engines.preprocess import PreprocessConfig, preprocess_slice  # noqa: PLC0415

    cfg = PreprocessConfig.from_dict(load_card(bundled_model_path()).preprocess)
    rows: list[dict[str, Any]] = []
    for i, (unit, modality, arr, pixel_mm) in enumerate(base_images(["mr"], slices)):
        lo, hi = float(arr.min()), float(arr.max())
        u = (arr - lo) / max(hi - lo, 1e-6)

        def grey(img: np.ndarray) -> np.ndarray:
            return np.asarray(preprocess_slice(img, modality, None, cfg, compact_grey=True, pixel_mm=pixel_mm)[0])

        clean = input_statistics(grey(arr))
        for kind in kinds:
            seq = [clean]
            for step, level in enumerate(strengths(kind, u.shape), start=1):   # the benchmark's seeds
                img = lo + degrade(u, kind, level, np.random.default_rng([i, step, len(kind)])) * (hi - lo)
                seq.append(input_statistics(grey(img)))
            for name in clean:
                vals = [d[name] for d in seq]
                rows.append({"unit": unit, "kind": kind, "stat": name, "srcc": srcc_with_strength(vals),
                             "moves": [v - vals[0] for v in vals[1:]]})
    return rows


def summarise(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """{statistic: {kind: mean SRCC over the base images}}."""
    acc: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        acc.setdefault(r["stat"], {}).setdefault(r["kind"], []).append(float(r["srcc"]))
    return {s: {k: float(np.mean(v)) for k, v in by_kind.items()} for s, by_kind in acc.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slices", type=int, default=7, help="salient slices per MR volume (as unseen_degradations)")
    ap.add_argument("--json", default=None, help="also write the table and every row here")
    args = ap.parse_args()
    rows = probe(args.slices)
    table = summarise(rows)
    print(f"mean SRCC of each statistic with strength over {len({r['unit'] for r in rows})} real MR base images")
    print(f"{'statistic':12s}" + "".join(f"{k:>10s}" for k in KINDS))
    for name, by_kind in table.items():
        print(f"{name:12s}" + "".join(f"{by_kind.get(k, float('nan')):+10.2f}" for k in KINDS))
    if args.json:
        Path(args.json).write_text(json.dumps({"table": table, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
