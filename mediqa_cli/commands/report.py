"""``mediqa report scores.csv [older.csv ...] -o report.html``: the self-contained HTML report.

Several reports (e.g. nightly CSVs) add the per-scanner trend over time; the latest one (by the
date in its file name, else its mtime) drives the other sections. Thumbnails of the worst
studies' salient slices are re-read from ``--root`` (the folder that was scored) when given and
the report has paths; ``mediqa score --report`` embeds them without re-reading.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click

logger = logging.getLogger("mediqa.report")


def thumbnails_from_root(root: Path, rows: list[dict[str, str]], n: int = 12) -> dict[str, list[bytes]]:
    """PNG thumbnails of the salient slices of the ``n`` lowest-scoring rows, read again from ``root``."""
    from engines.io.discover import discover_studies, open_study
    from engines.pipeline import in_plane_spacing, thumbnail_png, window_tags
    from engines.preprocess import PreprocessConfig

    def score(r: dict[str, str]) -> float:
        try:
            return float(r.get("score", ""))
        except ValueError:
            return float("inf")

    root = root.resolve()
    cfg = PreprocessConfig()
    out: dict[str, list[bytes]] = {}
    worst = sorted((r for r in rows if r.get("path") and r.get("status") == "ok"), key=score)[:n]
    for r in worst:
        rel = r["path"].split("#")[0]
        target = (root / rel).resolve()
        if root != target and root not in target.parents:
            continue  # never read outside ROOT
        scan_dir = target if target.is_dir() else target.parent
        try:
            prefix = scan_dir.relative_to(root).as_posix()
            for ref in discover_studies(scan_dir, max_depth=0):
                full = ref.rel_path if prefix == "." else f"{prefix}/{ref.rel_path}"
                if full.replace("/./", "/").removesuffix("/.") != r["path"]:
                    continue
                src = open_study(ref)
                mod = (r.get("modality") or "").lower() or None
                smeta = dict(getattr(src, "meta", {}) or {})
                wt = window_tags(smeta)
                pix = in_plane_spacing(src, smeta, list(getattr(src, "flags", []) or []))
                idx = [int(i) for i in r.get("salient_slices", "").split(";") if i.strip().isdigit()]
                out[r["study_id"]] = [thumbnail_png(src.get_slice(i), mod, r.get("type") or None, cfg, wt,
                                                            pixel_mm=pix)
                                      for i in idx]
                break
        except Exception as exc:  # noqa: BLE001 - a missing thumbnail never fails the report
            logger.warning("no thumbnails for study %s (%s)", r.get("study_id"), type(exc).__name__)
    return out


@click.command("report")
@click.argument("reports", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="HTML file to write.")
@click.option("--root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="The folder that was scored: re-read the worst studies for thumbnails.")
@click.option("--hide-paths", is_flag=True, help="Show no path in the page (study_id only).")
@click.option("--title", default="MedIQA quality report", show_default=True)
def report(reports: tuple[Path, ...], output: Path, root: Path | None, hide_paths: bool, title: str) -> None:
    """Render one or more score reports (CSV or JSONL) into one self-contained HTML file."""
    from mediqa_cli.reports.html import run_date, write_html_report
    from mediqa_cli.reports.writer import read_report

    thumbs: dict[str, Any] = {}
    try:
        if root is not None and not hide_paths:
            latest = max(reports, key=run_date)
            thumbs = thumbnails_from_root(root, read_report(latest))
        write_html_report(reports, output, thumbnails=thumbs, hide_paths=hide_paths, title=title)
    except (OSError, ValueError, KeyError) as exc:
        click.echo(f"Error: cannot build the report: {type(exc).__name__}: {exc}", err=True)
        sys.exit(2)
    click.echo(f"wrote {output}")
