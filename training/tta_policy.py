"""Choose a model's per-modality test-time augmentation (``--tta auto``) on held-out data.

Flips and quarter turns do not change an image's quality, yet averaging a model over them helps
some modalities and hurts others (measured on the bundled model: d4 lifts X-ray and fundus SRCC,
lowers CT). So the choice is made per modality, on a validation split, and recorded in the model
card (``ModelCard.tta_policy``), where ``engines.tta`` reads it at scoring time.

Rule (``select_policy``): every candidate mode is evaluated on the same studies as the plain
score; studies are grouped by the modality of their *prompt* (what the model is told at run
time, so the grouping is the one ``auto`` applies). Within a modality, a mode is eligible when
the lower end of the paired bootstrap interval of its SRCC gain over the plain score
(``engines.metrics.srcc_ci``, 95 %) is above ``min_gain`` (0 by default): the split must show
that it helps, not just hint at it. Among eligible modes the highest SRCC wins, the cheaper mode
on a tie; a modality with fewer than ``min_studies`` studies, or no eligible mode, keeps
``none`` (below ``MIN_MEASURABLE`` studies nothing is measured, and the table says so). Modalities the split does not hold get the fallback ``none``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from engines.errors import DatasetError
from engines.metrics import srcc, srcc_ci
from engines.tta import TTA_MODES, TTAPolicy

log = logging.getLogger(__name__)

CANDIDATES: tuple[str, ...] = ("flip", "d4")
MIN_MEASURABLE = 3   # studies a modality needs before any SRCC of it is computed


def _by_path(report: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["path"]: p for p in report["predictions"]}


def select_policy(reports: Mapping[str, Mapping[str, Any]], *, min_gain: float = 0.0,
                  min_studies: int = 20, confidence: float = 0.95, n_resamples: int = 2000,
                  seed: int = 0) -> TTAPolicy:
    """The per-modality policy from ``evaluate_model`` reports of one model on one split.

    ``reports``: mode → report; must hold ``none`` (the baseline) and at least one other mode.
    Studies missing from any report are left out of every comparison. The returned policy's
    ``selection`` records, per modality, n, every mode's SRCC and paired gain interval, and the
    rule's parameters.
    """
    if "none" not in reports or len(reports) < 2:
        raise ValueError("select_policy needs the plain ('none') report and at least one TTA mode")
    unknown = sorted(set(reports) - set(TTA_MODES))
    if unknown:
        raise ValueError(f"unknown TTA modes {unknown}; expected some of {list(TTA_MODES)}")
    preds = {mode: _by_path(rep) for mode, rep in reports.items()}
    common = set.intersection(*(set(p) for p in preds.values()))
    groups: dict[str, list[str]] = defaultdict(list)
    for path in sorted(common):
        groups[preds["none"][path].get("modality") or "other"].append(path)
    cost = {m: len(TTA_MODES[m]) for m in reports}
    modes: dict[str, str] = {}
    table: dict[str, Any] = {}
    for modality, paths in sorted(groups.items()):
        if len(paths) < MIN_MEASURABLE:   # no rank correlation to measure: none, and say why
            table[modality] = {"n": len(paths), "srcc": {}, "gain_ci": {}, "chosen": "none",
                               "note": f"fewer than {MIN_MEASURABLE} studies"}
            log.info("TTA policy: %s (n=%d) -> none (too few studies to measure)", modality, len(paths))
            continue
        target = np.array([preds["none"][p]["target"] for p in paths], dtype=np.float64)
        base = np.array([preds["none"][p]["prediction"] for p in paths], dtype=np.float64)
        row: dict[str, Any] = {"n": len(paths), "srcc": {}, "gain_ci": {}}
        row["srcc"]["none"] = _r(srcc(base, target))
        eligible: list[tuple[float, int, str]] = []
        for mode in sorted(m for m in reports if m != "none"):
            pred = np.array([preds[mode][p]["prediction"] for p in paths], dtype=np.float64)
            rho = srcc(pred, target)
            lo, hi = srcc_ci(pred, target, compare=base, confidence=confidence,
                             n_resamples=n_resamples, seed=seed)
            row["srcc"][mode] = _r(rho)
            row["gain_ci"][mode] = [_r(lo), _r(hi)]
            if len(paths) >= min_studies and math.isfinite(lo) and lo > min_gain:
                eligible.append((rho, -cost[mode], mode))
        chosen = max(eligible)[2] if eligible else "none"
        row["chosen"] = chosen
        table[modality] = row
        if chosen != "none":
            modes[modality] = chosen
        log.info("TTA policy: %s (n=%d) -> %s; SRCC %s", modality, len(paths), chosen, row["srcc"])
    selection = {"rule": "paired bootstrap gain over none: lower bound > min_gain; best SRCC wins",
                 "min_gain": min_gain, "min_studies": min_studies, "confidence": confidence,
                 "n_resamples": n_resamples, "seed": seed, "modalities": table}
    return TTAPolicy(modes=modes, fallback="none", selection=selection)


def _r(x: float) -> float | None:
    return round(float(x), 4) if math.isfinite(float(x)) else None


def choose_tta_policy(model_path: str | Path, data: str | Path, *, split: str = "val",
                      modes: Sequence[str] = CANDIDATES, device: str = "cpu", batch_size: int = 8,
                      workers: int = 0, progress: bool = True, reports_dir: str | Path | None = None,
                      evaluate: Callable[..., dict[str, Any]] | None = None,
                      known: Mapping[str, Mapping[str, Any]] | None = None, **rule: Any) -> TTAPolicy:
    """Evaluate ``model_path`` on ``split`` of ``data`` plain and with each of ``modes``, then
    ``select_policy``. The modes are measured in one pass (``training.evaluate.evaluate_modes``:
    the studies are read once and each image transform runs once, so none + flip + d4 cost one
    d4 evaluation). ``reports_dir``: keep each mode's report there (``tta-<mode>.json``, with the
    model's sha256, the data and the split) and reuse one that matches all three, so an
    interrupted choice resumes where it stopped. ``evaluate``: replaces ``evaluate_modes`` (same
    signature; tests). ``known``: mode → report that the caller has just measured with the same
    tensors on the same data and split (a recipe's record of that split, taken in one pass with the
    modes it will need); they are used, and kept, as if measured here. ``rule``: passed to
    ``select_policy``."""
    from engines.pipeline import file_sha256  # noqa: PLC0415
    from training.evaluate import evaluate_modes  # noqa: PLC0415
    from training.tasks import jsonable  # noqa: PLC0415

    if split == "train":
        raise DatasetError("choose the TTA policy on held-out data (val or test), not on the training split")
    if split == "all":
        log.warning("choosing the TTA policy on every study of %s: right only if the model never trained on it", data)
    evaluate = evaluate or evaluate_modes
    sha = file_sha256(model_path)
    wanted = tuple(dict.fromkeys(("none", *modes)))
    reports = ({m: r for m, r in kept_reports(reports_dir, sha, data, split).items() if m in wanted}
               if reports_dir else {})
    given = {m: jsonable(dict(r)) for m, r in (known or {}).items() if m in wanted and m not in reports}
    reports.update(given)
    missing = tuple(m for m in wanted if m not in reports)
    if missing:
        log.info("evaluating %s on the %s split with TTA %s (one pass)", Path(model_path).name, split,
                 ", ".join(missing))
        fresh = evaluate(model_path, data, modes=missing, split=split, device=device, batch_size=batch_size,
                         workers=workers, progress=progress)
        reports.update({mode: jsonable(fresh[mode]) for mode in missing})
    if reports_dir:
        for mode in (*given, *missing):
            cached = Path(reports_dir) / f"tta-{mode}.json"
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_text(json.dumps({**_report_key(sha, data, split), "report": reports[mode]}))
    policy = select_policy(reports, **rule)
    selection = {**policy.selection, "data": str(data), "split": split, "model_sha256": sha}
    return TTAPolicy(modes=dict(policy.modes), fallback=policy.fallback, selection=selection)


def _report_key(model_sha256: str, data: str | Path, split: str) -> dict[str, str]:
    """What a kept report must match to be reused: the model's sha256, the data and the split."""
    return {"model_sha256": model_sha256, "data": str(Path(data).resolve()), "split": split}


def auto_predictions(policy: TTAPolicy, reports: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[float, str | None]]:
    """What ``--tta auto`` scores under ``policy`` from the chooser's per-mode ``reports``: study
    path → (the prediction of the mode its prompt modality gets, that modality). Every mode the
    policy uses must be among the reports."""
    rows = {mode: {r["path"]: r for r in rep["predictions"]} for mode, rep in reports.items()}
    out: dict[str, tuple[float, str | None]] = {}
    for path, r in rows["none"].items():
        mode = policy.modes.get(r.get("modality") or "", policy.fallback)
        if mode not in rows:
            raise ValueError(f"the policy gives {r.get('modality')} TTA {mode}, which the reports lack")
        out[path] = (float(rows[mode][path]["prediction"]), r.get("modality"))
    return out


def kept_reports(reports_dir: str | Path, model_sha256: str, data: str | Path,
                 split: str) -> dict[str, dict[str, Any]]:
    """The per-mode reports ``choose_tta_policy`` kept in ``reports_dir`` for this model, data and split."""
    key = _report_key(model_sha256, data, split)
    out = {}
    for f in sorted(Path(reports_dir).glob("tta-*.json")):
        saved = json.loads(f.read_text())
        if all(saved.get(k) == v for k, v in key.items()):
            log.info("reusing %s", f)
            out[f.stem[len("tta-"):]] = saved["report"]
    return out


def override_policy(policy: TTAPolicy, changes: Mapping[str, str], *, reason: str,
                    evidence: str | Path | None = None, when: str | None = None) -> TTAPolicy:
    """``policy`` with the modes of some modalities set by hand (``changes``: modality → mode),
    for evidence the validation split cannot give (e.g. real images with degradations the corpus
    lacks). The measured ``selection`` is kept as it was; ``selection["overrides"]`` gains one
    entry per modality: its previous and new mode, the ``reason``, and the ``evidence`` file's
    name and sha256 when one is given. A modality set to the fallback leaves ``modes``."""
    if not reason.strip():
        raise ValueError("an override needs a reason")
    if not changes:
        raise ValueError("no modality to override")
    ev: dict[str, str] | None = None
    if evidence is not None:
        path = Path(evidence)
        ev = {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    stamp = when or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    modes = dict(policy.modes)
    overrides = list(policy.selection.get("overrides", []))
    for modality, mode in sorted(changes.items()):
        if mode not in TTA_MODES:
            raise ValueError(f"{modality}={mode}: unknown TTA mode; expected one of {list(TTA_MODES)}")
        entry: dict[str, Any] = {"modality": modality, "from": policy.mode_for(modality), "to": mode,
                                 "reason": reason.strip(), "at": stamp}
        if ev is not None:
            entry["evidence"] = ev
        overrides.append(entry)
        if mode == policy.fallback:
            modes.pop(modality, None)
        else:
            modes[modality] = mode
    return TTAPolicy(modes=modes, fallback=policy.fallback, selection={**policy.selection, "overrides": overrides})


def effective_choice(policy: TTAPolicy, modality: str) -> str:
    """The mode ``modality`` gets after the policy's overrides: the last override of it, else the
    measured choice recorded in ``selection`` (``none`` when the selection does not list it)."""
    for entry in reversed(policy.selection.get("overrides", [])):
        if entry["modality"] == modality:
            return str(entry["to"])
    return str(policy.selection.get("modalities", {}).get(modality, {}).get("chosen", policy.fallback))


def write_policy(model_path: str | Path, policy: TTAPolicy, output: str | Path | None = None) -> Path:
    """Copy of the ``.safetensors`` artifact at ``model_path`` whose card holds ``policy``
    (``output`` None: replaced in place, atomically). Tensors are copied as stored (fp16 stays
    fp16, bit for bit); only the card changes."""
    from engines.artifact import rewrite_card  # noqa: PLC0415

    return rewrite_card(model_path, output, tta_policy=policy.to_dict())
