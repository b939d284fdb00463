"""One self-contained HTML report from one or more score reports (no network, no scripts).

Sections: run summary; score distribution per modality (histograms) and per scanner (box
plots); the worst studies with thumbnails of their salient slices (base64 PNG) and each slice's
score and fusion weight; error counts by code; and, when several reports (e.g. nightly CSVs) are
given, the median score per scanner over time. Charts are inline SVG, styles inline CSS; every
text value from a report is HTML-escaped.

Run dates: a ``YYYY-MM-DD`` (or ``YYYYMMDD``) in the report's file name, else its mtime.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import logging
import os
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

logger = logging.getLogger(__name__)

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")
N_WORST = 12

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;background:#fff}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:6px 0} td,th{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f3f5f8} .num{text-align:right;font-variant-numeric:tabular-nums}
.muted{color:#777} .badge{display:inline-block;padding:1px 8px;border-radius:9px;background:#eef;margin-right:6px}
.err{background:#fde8e8} .ok{background:#e8f6ea} .thumbs{display:flex;gap:6px;flex-wrap:wrap}
.thumb{text-align:center;font-size:11px} .thumb img{display:block;width:96px;height:96px;image-rendering:auto;border:1px solid #ccc}
.charts{display:flex;flex-wrap:wrap;gap:18px} .chart{border:1px solid #eee;padding:6px}
svg text{font:11px system-ui,sans-serif;fill:#333}
"""


def _e(v: Any) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def _f(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if np.isfinite(x) else None


def run_date(path: Path) -> dt.datetime:
    """The date of a report: from its file name when it holds one, else its modification time."""
    m = re.search(r"(20\d\d)-?([01]\d)-?([0-3]\d)", path.name)
    if m:
        try:
            return dt.datetime(int(m.group(1)), int(m.group(2)), int(m.group(3)))
        except ValueError:
            pass
    return dt.datetime.fromtimestamp(path.stat().st_mtime)


def scanner_of(row: dict[str, str]) -> str:
    name = " ".join(x for x in (row.get("manufacturer", ""), row.get("scanner_model", "")) if x)
    return name or "unknown scanner"


# ------------------------------------------------------------------------------- SVG charts

def svg_histogram(values: Sequence[float], lo: float, hi: float, *, bins: int = 20, width: int = 300,
                  height: int = 140, color: str = PALETTE[0], title: str = "") -> str:
    """Histogram of ``values`` over [lo, hi] as an inline SVG."""
    counts, edges = np.histogram(np.clip(values, lo, hi), bins=bins, range=(lo, hi))
    top = max(int(counts.max()), 1) if counts.size else 1
    pl, pb, pt = 30, 18, 16
    w, h = width - pl - 6, height - pb - pt
    bw = w / bins
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
             f'<text x="{pl}" y="11">{_e(title)} (n={len(values)})</text>']
    for i, c in enumerate(counts):
        bh = h * c / top
        parts.append(f'<rect x="{pl + i * bw + 0.5:.1f}" y="{pt + h - bh:.1f}" width="{max(bw - 1, 1):.1f}" '
                     f'height="{bh:.1f}" fill="{color}"><title>{edges[i]:.3g}–{edges[i + 1]:.3g}: {c}</title></rect>')
    parts += [f'<line x1="{pl}" y1="{pt + h}" x2="{pl + w}" y2="{pt + h}" stroke="#555"/>',
              f'<text x="{pl}" y="{height - 4}">{lo:.3g}</text>',
              f'<text x="{pl + w}" y="{height - 4}" text-anchor="end">{hi:.3g}</text>',
              f'<text x="{pl - 4}" y="{pt + 8}" text-anchor="end">{top}</text>', "</svg>"]
    return "".join(parts)


def svg_boxplots(groups: dict[str, list[float]], lo: float, hi: float, *, width: int = 640) -> str:
    """Horizontal box plots (min, quartiles, max) per group."""
    names = sorted(groups)
    lab, row = 190, 26
    height = row * len(names) + 30
    w = width - lab - 20

    def x(v: float) -> float:
        return lab + (v - lo) / ((hi - lo) or 1.0) * w

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">']
    for i, name in enumerate(names):
        a = np.asarray(groups[name], dtype=float)
        q0, q1, q2, q3, q4 = np.percentile(a, [0, 25, 50, 75, 100])
        y = 10 + i * row
        c = PALETTE[i % len(PALETTE)]
        parts += [f'<text x="{lab - 6}" y="{y + 14}" text-anchor="end">{_e(name[:30])} (n={a.size})</text>',
                  f'<line x1="{x(q0):.1f}" y1="{y + 10}" x2="{x(q4):.1f}" y2="{y + 10}" stroke="{c}"/>',
                  f'<rect x="{x(q1):.1f}" y="{y + 3}" width="{max(x(q3) - x(q1), 1):.1f}" height="14" '
                  f'fill="{c}" fill-opacity="0.35" stroke="{c}"/>',
                  f'<line x1="{x(q2):.1f}" y1="{y + 2}" x2="{x(q2):.1f}" y2="{y + 18}" stroke="{c}" stroke-width="2"/>']
    yb = height - 14
    parts += [f'<line x1="{lab}" y1="{yb}" x2="{lab + w}" y2="{yb}" stroke="#555"/>',
              f'<text x="{lab}" y="{height - 2}">{lo:.3g}</text>',
              f'<text x="{lab + w}" y="{height - 2}" text-anchor="end">{hi:.3g}</text>', "</svg>"]
    return "".join(parts)


def svg_bars(counts: dict[str, int], *, width: int = 480, color: str = PALETTE[1]) -> str:
    names = sorted(counts, key=lambda k: (-counts[k], k))
    lab, row = 150, 20
    height = row * len(names) + 8
    top = max(counts.values()) if counts else 1
    w = width - lab - 40
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">']
    for i, n in enumerate(names):
        y = 4 + i * row
        bw = w * counts[n] / top
        parts += [f'<text x="{lab - 6}" y="{y + 12}" text-anchor="end">{_e(n)}</text>',
                  f'<rect x="{lab}" y="{y + 2}" width="{max(bw, 1):.1f}" height="13" fill="{color}"/>',
                  f'<text x="{lab + bw + 4:.1f}" y="{y + 12}">{counts[n]}</text>']
    parts.append("</svg>")
    return "".join(parts)


def svg_trend(series: dict[str, list[tuple[int, float]]], labels: list[str], lo: float, hi: float,
              *, width: int = 680, height: int = 260) -> str:
    """Median score per scanner (lines) over the runs (x = run index, labelled by date)."""
    pl, pr, pt, pb = 40, 170, 12, 34
    w, h = width - pl - pr, height - pt - pb
    n = max(len(labels) - 1, 1)

    def xy(i: int, v: float) -> tuple[float, float]:
        return pl + w * i / n, pt + h - h * (v - lo) / ((hi - lo) or 1.0)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
             f'<rect x="{pl}" y="{pt}" width="{w}" height="{h}" fill="none" stroke="#ccc"/>',
             f'<text x="{pl - 4}" y="{pt + 8}" text-anchor="end">{hi:.3g}</text>',
             f'<text x="{pl - 4}" y="{pt + h}" text-anchor="end">{lo:.3g}</text>']
    for i, lab in enumerate(labels):
        x, _ = xy(i, lo)
        parts.append(f'<text x="{x:.1f}" y="{height - 16}" text-anchor="middle">{_e(lab)}</text>')
    for j, (name, pts) in enumerate(sorted(series.items())):
        c = PALETTE[j % len(PALETTE)]
        coords = [xy(i, v) for i, v in pts]
        parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="'
                     + " ".join(f"{a:.1f},{b:.1f}" for a, b in coords) + '"/>')
        parts += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{c}"/>' for a, b in coords]
        parts.append(f'<text x="{pl + w + 8}" y="{pt + 12 + 14 * j}" fill="{c}">{_e(name[:26])}</text>')
    parts.append("</svg>")
    return "".join(parts)


# ------------------------------------------------------------------------------- the page

def _split(v: str, typ: Any) -> list:
    out = []
    for x in (v or "").split(";"):
        try:
            out.append(typ(x))
        except (TypeError, ValueError):
            continue
    return out


def render_html(runs: list[tuple[Path, list[dict[str, str]]]], *,
                thumbnails: dict[str, list[bytes]] | None = None, hide_paths: bool = False,
                title: str = "MedIQA quality report") -> str:
    """The report page for ``runs`` ([(report path, rows)], oldest first; the last is "latest")."""
    thumbnails = thumbnails or {}
    latest_path, rows = runs[-1]
    status = Counter(r.get("status", "") for r in rows)
    scores = [(s, r) for r in rows if (s := _f(r.get("score"))) is not None and r.get("status") == "ok"]
    vals = [s for s, _ in scores]
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    models = Counter(r.get("model", "") for r in rows)
    backends = Counter(r.get("backend", "") for r in rows)
    out = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}</title>",
           f"<style>{_CSS}</style></head><body>", f"<h1>{_e(title)}</h1>",
           f'<p class="muted">generated {dt.datetime.now().strftime("%Y-%m-%d %H:%M")} from '
           f'{len(runs)} report(s); latest: {_e(latest_path.name)} ({run_date(latest_path):%Y-%m-%d})</p>',
           "<p>" + "".join(f'<span class="badge {"err" if k == "error" else "ok" if k == "ok" else ""}">'
                           f"{_e(k)}: {v}</span>" for k, v in sorted(status.items())) + "</p>",
           "<p class=\"muted\">model: " + ", ".join(_e(m) for m in models if m)
           + " · backend: " + ", ".join(_e(b) for b in backends if b) + "</p>"]

    # Distribution per modality
    out.append("<h2>Score distribution per modality</h2>")
    by_mod: dict[str, list[float]] = defaultdict(list)
    for s, r in scores:
        by_mod[r.get("modality") or "?"].append(s)
    if by_mod:
        out.append('<div class="charts">')
        for i, (m, v) in enumerate(sorted(by_mod.items())):
            out.append(f'<div class="chart">{svg_histogram(v, lo, hi, color=PALETTE[i % len(PALETTE)], title=m)}</div>')
        out.append("</div>")
        out.append("<table><tr><th>modality</th><th>n</th><th>min</th><th>median</th><th>max</th></tr>")
        for m, v in sorted(by_mod.items()):
            a = np.asarray(v)
            out.append(f"<tr><td>{_e(m)}</td><td class=num>{a.size}</td><td class=num>{a.min():.3f}</td>"
                       f"<td class=num>{np.median(a):.3f}</td><td class=num>{a.max():.3f}</td></tr>")
        out.append("</table>")
    else:
        out.append('<p class="muted">no scored study</p>')

    # Per scanner
    out.append("<h2>Score distribution per scanner</h2>")
    by_scanner: dict[str, list[float]] = defaultdict(list)
    for s, r in scores:
        by_scanner[scanner_of(r)].append(s)
    out.append(svg_boxplots(by_scanner, lo, hi) if by_scanner else '<p class="muted">no scored study</p>')

    # Worst studies
    worst = sorted(scores, key=lambda sr: sr[0])[:N_WORST]
    out.append(f"<h2>Worst {len(worst)} studies</h2>")
    if worst:
        show_path = not hide_paths and any(r.get("path") for _, r in worst)
        out.append("<table><tr><th>score</th><th>study_id</th><th>kind</th><th>prompt</th>"
                   + ("<th>path</th>" if show_path else "") + "<th>flags</th><th>salient slices</th></tr>")
        for s, r in worst:
            idx = _split(r.get("salient_slices", ""), int)
            ss = _split(r.get("slice_scores", ""), float)
            ww = _split(r.get("slice_weights", ""), float)
            pngs = thumbnails.get(r.get("study_id", ""), [])
            cells = []
            for j, i in enumerate(idx):
                img = (f'<img alt="slice {i}" src="data:image/png;base64,{base64.b64encode(pngs[j]).decode()}">'
                       if j < len(pngs) else "")
                cap = f"#{i}"
                if j < len(ss):
                    cap += f" s={ss[j]:.3f}"
                if j < len(ww):
                    cap += f" w={ww[j]:.2f}"
                cells.append(f'<div class="thumb">{img}{_e(cap)}</div>')
            prompt = " / ".join(_e(r.get(g, "")) for g in ("modality", "region", "type"))
            out.append(f"<tr><td class=num><b>{s:.3f}</b></td><td><code>{_e(r.get('study_id'))}</code></td>"
                       f"<td>{_e(r.get('kind'))}</td><td>{prompt}<br><span class=muted>{_e(r.get('prompt_source'))}"
                       f"</span></td>" + (f"<td>{_e(r.get('path'))}</td>" if show_path else "")
                       + f"<td>{_e(r.get('flags', '').replace(';', ' '))}</td>"
                       f'<td><div class="thumbs">{"".join(cells)}</div></td></tr>')
        out.append("</table>")

    # Errors
    errors = [r for r in rows if r.get("status") == "error"]
    out.append(f"<h2>Errors ({len(errors)})</h2>")
    if errors:
        codes = Counter(r.get("error_code") or "?" for r in errors)
        out.append(svg_bars(dict(codes)))
        out.append("<table><tr><th>error_code</th><th>study_id</th>" + ("" if hide_paths else "<th>path</th>")
                   + "<th>message</th></tr>")
        for r in errors[:100]:
            out.append(f"<tr><td>{_e(r.get('error_code'))}</td><td><code>{_e(r.get('study_id'))}</code></td>"
                       + ("" if hide_paths else f"<td>{_e(r.get('path'))}</td>")
                       + f"<td>{_e(r.get('error'))}</td></tr>")
        out.append("</table>")
        if len(errors) > 100:
            out.append(f'<p class="muted">… and {len(errors) - 100} more</p>')
    else:
        out.append('<p class="muted">none</p>')

    # Trend over runs
    if len(runs) > 1:
        out.append("<h2>Median score per scanner over time</h2>")
        labels = [f"{run_date(p):%Y-%m-%d}" for p, _ in runs]
        series: dict[str, list[tuple[int, float]]] = defaultdict(list)
        all_vals: list[float] = []
        for i, (_, rr) in enumerate(runs):
            groups: dict[str, list[float]] = defaultdict(list)
            for r in rr:
                s = _f(r.get("score"))
                if s is not None and r.get("status") == "ok":
                    groups[scanner_of(r)].append(s)
            for name, v in groups.items():
                med = float(np.median(v))
                series[name].append((i, med))
                all_vals.append(med)
        if all_vals:
            tlo, thi = min(all_vals), max(all_vals)
            if thi - tlo < 1e-9:
                tlo, thi = tlo - 0.5, thi + 0.5
            out.append(svg_trend(series, labels, tlo, thi))
    out.append("</body></html>")
    return "\n".join(out)


def write_html_report(reports: Iterable[str | os.PathLike[str]], out: str | os.PathLike[str], *,
                      thumbnails: dict[str, list[bytes]] | None = None, hide_paths: bool = False,
                      title: str = "MedIQA quality report") -> Path:
    """Read the reports (CSV / JSONL), order them by date, write the page atomically."""
    from mediqa_cli.reports.writer import read_report

    runs = [(Path(p), read_report(p)) for p in reports]
    runs.sort(key=lambda pr: run_date(pr[0]))
    if not runs:
        raise ValueError("no report given")
    text = render_html(runs, thumbnails=thumbnails, hide_paths=hide_paths, title=title)
    o = Path(out)
    o.parent.mkdir(parents=True, exist_ok=True)
    tmp = o.with_name(o.name + f".tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, o)
    return o
