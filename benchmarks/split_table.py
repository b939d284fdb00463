"""The README's per-modality × per-degradation table from one kept ``mediqa evaluate --json``
report, without evaluating again.

Groups come from the corpus manifest (``mediqa synth``), not from the report's prompts: the
manifest's ``modality`` (what the study is, whatever the tags or the classifier say), each
degradation type (a mixed study counted under every type it contains), the mixed studies, and with
``--by-source`` each source of the modality (``source_id``). Each row gives n, SRCC and its 95 %
bootstrap interval (``engines.metrics.srcc_ci``). Used for the fresh-draw re-estimate (a corpus
of another ``--seed`` rendered with ``mediqa synth --splits val,test``). Several REPORT MANIFEST
pairs (e.g. one model on the test splits of two seeds) are pooled into one table; their studies
are kept apart by the pair's position. Usage:

    python benchmarks/split_table.py REPORT.json CORPUS/manifest.csv [REPORT2.json CORPUS2/manifest.csv ...]
        [--by-source] [--json out.json]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any, Mapping

from engines.metrics import srcc, srcc_ci

#: Row order of the README table: each modality's degradation types as the generator names them.
TYPES: dict[str, tuple[str, ...]] = {"ct": ("dose", "blur", "sparse"),
                                     "mr": ("noise", "motion", "ringing", "bias"),
                                     "xr": ("jpeg", "blur", "noise", "illumination"),
                                     "fundus": ("blur", "noise", "jpeg", "illumination")}


def table(report: Mapping[str, Any], manifest: Mapping[str, Mapping[str, str]], *,
          by_source: bool = False) -> list[dict[str, Any]]:
    """Rows ``{"group", "n", "srcc", "lo", "hi"}``: all, mixed, then per modality its own row, one
    per degradation type and (``by_source``) one per source. A study of the report that the
    manifest does not hold raises (not the same corpus)."""
    preds = report.get("predictions") or []
    missing = [p["path"] for p in preds if p["path"] not in manifest]
    if not preds or missing:
        raise ValueError(f"{len(missing)} of {len(preds)} report studies are not in the manifest "
                         f"(e.g. {missing[:2]}): not this corpus' report")
    studies = [(float(p["prediction"]), float(manifest[p["path"]]["score"]), manifest[p["path"]]) for p in preds]
    out: list[dict[str, Any]] = []

    def add(group: str, sel: list[tuple[float, float, Mapping[str, str]]]) -> None:
        if not sel:
            return
        pr, tg = [s[0] for s in sel], [s[1] for s in sel]
        lo, hi = srcc_ci(pr, tg)
        out.append({"group": group, "n": len(sel), "srcc": srcc(pr, tg), "lo": lo, "hi": hi})

    add("all", studies)
    add("mixed", [s for s in studies if "+" in s[2]["degradation"]])
    for mod in [*TYPES, *sorted({s[2]["modality"] for s in studies} - set(TYPES))]:
        sel = [s for s in studies if s[2]["modality"] == mod]
        add(mod, sel)
        for t in TYPES.get(mod, ()):
            add(f"{mod} with {t}", [s for s in sel if t in s[2]["degradation"].split("+")])
        if by_source:
            for src in sorted({s[2]["source_id"] for s in sel}):
                add(f"{mod} source {src}", [s for s in sel if s[2]["source_id"] == src])
    return out


def read_manifest_rows(path: str | Path) -> dict[str, dict[str, str]]:
    with Path(path).open(newline="", encoding="utf-8") as fh:
        return {r["path"]: r for r in csv.DictReader(fh)}


def pooled(pairs: list[tuple[Mapping[str, Any], Mapping[str, Mapping[str, str]]]]
           ) -> tuple[dict[str, Any], dict[str, Mapping[str, str]]]:
    """One (report, manifest) from several: each study path prefixed by its pair's position
    (``0/``, ``1/``, …), so equal relative paths of two corpora stay two studies."""
    if len(pairs) == 1:
        return dict(pairs[0][0]), dict(pairs[0][1])
    report: dict[str, Any] = {"predictions": []}
    manifest: dict[str, Mapping[str, str]] = {}
    for i, (rep, man) in enumerate(pairs):
        report["predictions"] += [{**p, "path": f"{i}/{p['path']}"} for p in rep.get("predictions") or []]
        manifest.update({f"{i}/{k}": v for k, v in man.items()})
    return report, manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("pairs", nargs="+", metavar="REPORT MANIFEST", help="one or more report / manifest pairs")
    ap.add_argument("--by-source", action="store_true", help="a row per source of each modality")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if len(args.pairs) % 2:
        ap.error("give REPORT MANIFEST pairs")
    pairs = [(json.loads(Path(r).read_text()), read_manifest_rows(m)) for r, m in zip(args.pairs[::2], args.pairs[1::2])]
    rows = table(*pooled(pairs), by_source=args.by_source)
    print("| group | n | SRCC [95 %] |\n|---|---|---|")
    for r in rows:
        print(f"| {r['group']} | {r['n']} | {r['srcc']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}] |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
