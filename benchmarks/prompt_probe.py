"""How much do a model's prompts reach its score? Two measurements on one split of a manifest.

1. The column norms of each Swin stage's prompt projection (``prompt_proj``, a linear map of the
   concatenated one-hot prompt): a label no training study ever had keeps its initial column, so
   trained and never-used labels of similar norm mean the prompts barely moved.
2. The split's SRCC per manifest modality and source (plain: no TTA, no feature head) three ways:
   ``as-is``; ``unseen-to-mean``, where a region / type value never seen with the study's
   modality in the manifest's training split is replaced by the mean of the values that were
   (the map is linear, so this is the mean of their contributions); ``all-to-mean``, every CT /
   MR study's region and type replaced so. The mean offset (score − label) per group is printed
   too. Only the CT and MR studies are scored (the prompts of the held-out sources differ there).

The replacement wraps ``engines.prompts.encode_prompt`` for the duration of this script: the
evaluation path encodes each study's prompt through it. Usage:

    python benchmarks/prompt_probe.py MODEL MANIFEST [--split test] [--workers 2]

Measured 2026-12-06 on the bundled model (test split of its corpus): column norms 0.12-0.26
for every label; CT 0.766 / 0.766 / 0.766, MR 0.706 / 0.704 / 0.710.
"""

from __future__ import annotations

import argparse
import collections
import csv
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

import engines.prompts as prompts_module
from engines.metrics import srcc

MODES = ("as-is", "unseen-to-mean", "all-to-mean")


def column_norms(model: str) -> dict[str, dict[str, float]]:
    """Stage → label → norm of its prompt-projection column."""
    from engines.artifact import load_tensors  # noqa: PLC0415

    vocab = prompts_module.DEFAULT_VOCAB
    labels = [f"{g}:{v}" for g in prompts_module.GROUPS for v in vocab.labels(g)]
    mods, _ = load_tensors(model)
    out = {}
    for key in sorted(k for k in mods["iqa"] if k.endswith("prompt_proj.weight")):
        w = mods["iqa"][key].float()
        out[key.rsplit(".", 2)[0]] = {lab: float(w[:, i].norm()) for i, lab in enumerate(labels)}
    return out


def seen_values(rows: list[dict[str, str]]) -> dict[tuple[str, str], set[str]]:
    """(modality, group) → the labels the manifest's training split has for it."""
    seen: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
    for r in rows:
        if r["split"] == "train":
            for g in ("region", "type"):
                seen[(r["modality"], g)].add(r[g])
    return seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("manifest", type=Path)
    ap.add_argument("--split", default="test")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    from training.evaluate import evaluate_model  # noqa: PLC0415

    for stage, norms in column_norms(args.model).items():
        print(stage, " ".join(f"{k}={v:.2f}" for k, v in norms.items()))
    rows = list(csv.DictReader(args.manifest.open()))
    by_path = {r["path"]: r for r in rows}
    seen = seen_values(rows)
    picked = [r for r in rows if r["split"] == args.split and r["modality"] in ("ct", "mr")]
    if not picked:
        raise SystemExit(f"no CT / MR study in the {args.split} split of {args.manifest}")
    original = prompts_module.encode_prompt
    state = {"mode": MODES[0]}

    def encode(prompt: Any, vocab: Any = prompts_module.DEFAULT_VOCAB) -> np.ndarray:
        vec = original(prompt, vocab)
        if state["mode"] == "as-is" or prompt.modality not in ("ct", "mr"):
            return vec
        offsets = vocab.offsets()
        for g in ("region", "type"):
            ok = seen.get((prompt.modality, g), set())
            if ok and (state["mode"] == "all-to-mean" or getattr(prompt, g) not in ok):
                vec[vocab.columns(g)] = 0.0
                for v in ok:
                    vec[offsets[g] + vocab.index(g, v)] = 1.0 / len(ok)
        return vec

    # a manifest of the picked studies next to the original, so their relative paths resolve
    with tempfile.NamedTemporaryFile("w", suffix=".csv", dir=args.manifest.parent, newline="",
                                     delete=False) as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(picked)
        subset = Path(f.name)
    prompts_module.encode_prompt = encode
    try:
        for mode in MODES:
            state["mode"] = mode
            rep = evaluate_model(args.model, subset, split=args.split, tta="none", features=False,
                                 workers=args.workers, progress=False)
            groups: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
            for p in rep["predictions"]:
                r = by_path[p["path"]]
                for key in (r["modality"], f"{r['modality']}/{r['source_id']}"):
                    groups[key].append((p["target"], p["prediction"]))
            cells = []
            for key, pairs in sorted(groups.items()):
                t, y = np.array(pairs).T
                cells.append(f"{key} n={len(t)} srcc={srcc(y, t):.3f} offset={float(np.mean(y - t)):+.3f}")
            print(f"{mode:15s}", " | ".join(cells))
    finally:
        prompts_module.encode_prompt = original
        subset.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
