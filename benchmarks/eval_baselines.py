"""Classical no-reference baselines vs a MedIQA model on a synthetic corpus split (issue 4).

For every study of the split (manifest from ``mediqa synth``), the salient slices are read
through the scoring path (``engines.pipeline.prepare_study``) and two classical measures are
computed on each slice in [0, 1] intensity units (before resizing), then averaged over slices:

- noise: ``-skimage.restoration.estimate_sigma`` (more noise → lower quality);
- sharpness: variance of the Laplacian (``scipy.ndimage.laplace``; sharper → higher quality).

SRCC against the manifest's synthetic score is printed overall, per modality and per
degradation, per modality × degradation type (a mixed study counted under every type it
contains: "with") and per modality × single degradation type (studies with that type alone:
"only"), next to the model's SRCC (``training.evaluate.evaluate_model``) and its 95 %
bootstrap interval when ``--model`` is given; ``--compare OTHER.safetensors`` adds a second
model and the paired bootstrap interval of the SRCC difference (model − other) on the same
studies (``engines.metrics.srcc_ci``): an interval holding 0 means the split cannot tell the
two apart. ``--tta`` / ``--compare-tta`` set each model's test-time augmentation (``engines.tta``);
the same model twice with two modes gives the paired effect of TTA; ``--no-features`` scores
with the network alone. ``--report R.json`` takes ``--model``'s scores from a kept ``mediqa evaluate
--json`` report of the same split instead of evaluating again (every study of the split must be in
it). Usage:

    python benchmarks/eval_baselines.py CORPUS/manifest.csv [--split test] [--model M.safetensors]
        [--tta none|flip|d4] [--no-features] [--report R.json] [--compare OTHER.safetensors]
        [--compare-tta MODE] [--json out.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from skimage.restoration import estimate_sigma

from engines.metrics import srcc, srcc_ci
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


def study_statistics(sample: Any, cfg: PreprocessConfig) -> tuple[float, float]:
    """``classical`` on a manifest sample's salient slices (read through the scoring path,
    ``engines.pipeline.prepare_study``, in source units)."""
    prep = prepare_study(sample.ref, cfg, 7)
    src_slices = [np.asarray(r) for r in (prep.raw or [])]
    if not src_slices:   # prepare_study keeps raw slices only for undecided CT; re-read them
        from engines.io.discover import open_study

        src = open_study(sample.ref)
        src_slices = [src.get_slice(i) for i in sorted(set(prep.indices))]
    return classical(src_slices, sample.labels.get("modality"), prep.ptype_used or sample.labels.get("type"), cfg)


def groups_of(rows: list[dict]) -> dict[str, list[dict]]:
    """The table's groups of study rows (``modality``, ``degradation``): overall, per modality,
    per degradation, mixed studies, per modality × type a study contains ("with") and per
    modality × type a study has alone ("only")."""
    groups: dict[str, list[dict]] = collections.defaultdict(list)
    for r in rows:
        groups["overall"].append(r)
        groups[f"modality={r['modality']}"].append(r)
        groups[f"degradation={r['degradation']}"].append(r)
        types = [d for d in r["degradation"].split("+") if d]
        if len(types) > 1:
            groups["mixed degradations"].append(r)
        # the table: each modality by degradation type, a mixed study counted under every
        # type it contains (so a column is "studies with this degradation")
        for d in types:
            groups[f"modality={r['modality']} with {d}"].append(r)
        if len(types) == 1:
            groups[f"modality={r['modality']} only {types[0]}"].append(r)
    return groups


def report_predictions(report: dict, paths: list[str], split: str, model: str) -> dict[str, float]:
    """``model``'s scores of the studies ``paths`` from a kept ``mediqa evaluate --json`` report;
    refused (ValueError) when the report is of another split or model (by file name) or lacks a
    study."""
    if report.get("split") not in (None, split):
        raise ValueError(f"the report is of the {report['split']} split, not {split}")
    if report.get("model") and Path(report["model"]).name != Path(model).name:
        raise ValueError(f"the report is of {Path(report['model']).name}, not {Path(model).name}")
    pred = {r["path"]: r["prediction"] for r in report["predictions"]}
    missing = [p for p in paths if p not in pred]
    if missing:
        raise ValueError(f"no score for {len(missing)} studies of the {split} split (first: {missing[0]}); "
                         "was it made from this manifest?")
    return pred


def _srcc(a: list[float], b: list[float]) -> float | None:
    if len(a) < 3 or np.std(b) == 0 or np.std(a) == 0:
        return None
    return round(float(srcc(np.asarray(a), np.asarray(b))), 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("manifest")
    ap.add_argument("--split", default="test")
    ap.add_argument("--model", default=None)
    ap.add_argument("--compare", default=None, help="a second model: paired SRCC difference intervals")
    ap.add_argument("--tta", default="none", help="--model's test-time augmentation: none | flip | d4")
    ap.add_argument("--compare-tta", default="none", help="--compare's test-time augmentation (the same "
                    "model with two TTA modes gives the paired effect of TTA)")
    ap.add_argument("--no-features", action="store_true", help="score with the network alone (no feature head)")
    ap.add_argument("--report", default=None, help="--model's scores from a kept `mediqa evaluate --json` report")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.report and not args.model:
        ap.error("--report needs --model (the model the report was made with)")
    logging.basicConfig(level=logging.WARNING)
    samples, _ = read_manifest(args.manifest)
    samples = [s for s in samples if (s.split or "") == args.split]
    cfg = PreprocessConfig()
    rows = []
    for s in samples:
        mod = s.labels.get("modality")
        n, sh = study_statistics(s, cfg)
        rows.append({"path": s.path, "score": s.target, "modality": mod,
                     "degradation": s.extra.get("degradation", ""), "noise": n, "sharpness": sh})
    def predictions(model: str | None, tta: str) -> dict[str, float]:
        if not model:
            return {}
        from training.evaluate import evaluate_model
        rep = evaluate_model(model, args.manifest, split=args.split, progress=False, tta=tta,
                             features=not args.no_features)
        return {r["path"]: r["prediction"] for r in rep["predictions"]}

    if args.report:
        try:
            pred = report_predictions(json.loads(Path(args.report).read_text()), [r["path"] for r in rows],
                                      args.split, args.model)
        except ValueError as exc:
            raise SystemExit(f"{args.report}: {exc}") from None
    else:
        pred = predictions(args.model, args.tta)
    other = predictions(args.compare, args.compare_tta) if args.model else {}
    groups = groups_of(rows)
    table = {}
    fmt = lambda v: f"{v:7.3f}" if isinstance(v, float) else f"{'-':>7s}"  # noqa: E731
    print(f"{'group':32s} {'n':>4s} {'-sigma':>7s} {'lapvar':>7s} {'model':>7s} {'95 % CI':>15s}"
          + (f" {'other':>7s} {'model-other 95 % CI':>20s}" if other else ""))
    for g, rs in sorted(groups.items()):
        t = [r["score"] for r in rs]
        res = {"n": len(rs), "noise_srcc": _srcc([r["noise"] for r in rs], t),
               "sharpness_srcc": _srcc([r["sharpness"] for r in rs], t)}
        extra = ""
        if pred:
            have = [r for r in rs if r["path"] in pred and (not other or r["path"] in other)]
            p = [pred[r["path"]] for r in have]
            tt = [r["score"] for r in have]
            res["model_srcc"] = _srcc(p, tt)
            if res["model_srcc"] is not None and len(have) >= 5:
                res["model_ci"] = [round(v, 3) for v in srcc_ci(p, tt)]
                extra = f" [{res['model_ci'][0]:6.3f},{res['model_ci'][1]:6.3f}]"
            else:
                extra = f" {'-':>15s}"
            if other:
                o = [other[r["path"]] for r in have]
                res["other_srcc"] = _srcc(o, tt)
                ok = res["model_srcc"] is not None and res["other_srcc"] is not None and len(have) >= 5
                if ok:
                    res["diff_ci"] = [round(v, 3) for v in srcc_ci(p, tt, compare=o)]
                diff = f"[{res['diff_ci'][0]:6.3f},{res['diff_ci'][1]:6.3f}]" if ok else "-"
                extra += f" {fmt(res['other_srcc'])} {diff:>20s}"
        table[g] = res
        print(f"{g:32s} {res['n']:4d} {fmt(res['noise_srcc'])} {fmt(res['sharpness_srcc'])} {fmt(res.get('model_srcc'))}"
              + extra)
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
