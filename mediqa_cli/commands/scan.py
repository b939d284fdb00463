"""``mediqa scan ROOT``: a dry run over an archive — studies, prompts from tags, flags, problems.

Nothing is decoded and no model is loaded (torch is never imported): the walk reads headers
only (``engines.io.discover.discover_studies``), so a scan is cheap enough to audit an archive
before a scoring night.

Output
    A rich table on stdout (one row per study) and a summary (studies by kind, format, status,
    error code, and skipped entries by reason). ``-o scan.csv`` / ``-o scan.json`` also writes
    every row to a file, atomically, with spreadsheet-dangerous cells escaped (CSV).

Columns
    ``study_id`` (keyed hash of the series UID, or of the relative path; see
    ``engines.privacy``), ``path`` (relative to ROOT), ``kind`` (2d / 3d), ``format``,
    ``n_files``, ``n_slices``, ``modality`` / ``region`` / ``type`` (from tags; empty when tags do
    not determine them — the prompt classifier decides at scoring time), ``flags``, ``status``
    (ok / error), ``error_code``, ``error``, ``manufacturer``, ``scanner_model``, ``kvp``,
    ``mas``, ``field_strength`` (tesla), ``transfer_syntax``. No patient identifier, UID or
    free-text description is ever written.

Exit codes
    0 every study was scanned without error; 1 at least one study has an error (each one is a
    row); 2 usage error or a root that cannot be walked.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from engines.errors import error_code
from engines.privacy import install_log_scrubber, scrub, study_id, study_key
from engines.prompts import prompts_from_tags
from mediqa_cli.tables import counts_table, rich_table, write_csv_atomic, write_json_atomic

logger = logging.getLogger(__name__)

COLUMNS: tuple[str, ...] = (
    "study_id", "path", "kind", "format", "n_files", "n_slices", "modality", "region", "type",
    "flags", "status", "error_code", "error", "manufacturer", "scanner_model", "kvp", "mas",
    "field_strength", "transfer_syntax",
)
#: The columns shown in the terminal table (the file gets all of ``COLUMNS``).
TABLE_COLUMNS: tuple[str, ...] = (
    "study_id", "path", "kind", "format", "n_files", "n_slices", "modality", "region", "type",
    "flags", "status", "error_code", "error",
)
_MAX_MESSAGE = 300


class FatalScanError(click.ClickException):
    """A problem with the whole run (the root cannot be walked, the output cannot be written)."""

    exit_code = 2


def _mas(meta: dict[str, Any]) -> float | None:
    """Tube current-time product in mAs: Exposure, else XRayTubeCurrent (mA) × ExposureTime (ms)."""
    exposure = meta.get("Exposure")
    if isinstance(exposure, (int, float)):
        return float(exposure)
    current, time_ms = meta.get("XRayTubeCurrent"), meta.get("ExposureTime")
    if isinstance(current, (int, float)) and isinstance(time_ms, (int, float)):
        return float(current) * float(time_ms) / 1000.0
    return None


def _text(meta: dict[str, Any], key: str) -> str:
    value = meta.get(key)
    return scrub(value) if isinstance(value, str) else ""


def _number(meta: dict[str, Any], key: str) -> float | None:
    value = meta.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _safe_message(exc: BaseException, ref: Any) -> str:
    """An error message fit for output: our own messages (written PHI-free) with the study's
    paths removed and scrubbed; for foreign exceptions only the type name."""
    from engines.errors import MediqaError

    msg = exc.message if isinstance(exc, MediqaError) else type(exc).__name__
    msg = " ".join(str(msg).split())
    candidates = {str(ref.root)} | {str(p) for p in ref.files} | {Path(p).name for p in ref.files}
    for c in sorted((c for c in candidates if len(c) > 2), key=len, reverse=True):
        msg = msg.replace(c, "<path>")
    return scrub(msg)[:_MAX_MESSAGE]


def study_row(ref: Any, key: bytes) -> dict[str, Any]:
    """One output row for a ``StudyRef`` (see the module docstring for the columns)."""
    meta: dict[str, Any] = dict(ref.meta or {})
    row: dict[str, Any] = {
        "study_id": study_id(ref.series_uid or ref.rel_path, key),
        "path": ref.rel_path,
        "kind": ref.kind,
        "format": ref.format,
        "n_files": len(ref.files),
        "n_slices": getattr(ref, "n_slices", None),
        "flags": list(ref.flags or []),
        "status": "ok",
        "error_code": "",
        "error": "",
        "manufacturer": _text(meta, "Manufacturer"),
        "scanner_model": _text(meta, "ManufacturerModelName"),
        "kvp": _number(meta, "KVP"),
        "mas": _mas(meta),
        "field_strength": _number(meta, "MagneticFieldStrength"),
        "transfer_syntax": _text(meta, "TransferSyntaxUID"),
    }
    if ref.error is not None:
        row.update(status="error", error_code=error_code(ref.error),
                   error=_safe_message(ref.error, ref))
        row.update(modality="", region="", type="")
        return row
    try:
        prompts = prompts_from_tags(meta, ref.kind)
    except Exception as exc:  # noqa: BLE001 - a rule must never stop the audit
        logger.warning("prompt rules failed on %s (%s)", ref.rel_path, type(exc).__name__)
        prompts = {}
    for group in ("modality", "region", "type"):
        row[group] = prompts.get(group) or ""
    return row


def summarize(rows: list[dict[str, Any]], skipped: Counter[str]) -> dict[str, Any]:
    """Counts by kind, format, status and error code, plus skipped entries by reason."""
    return {
        "n_studies": len(rows),
        "by_kind": dict(Counter(r["kind"] for r in rows)),
        "by_format": dict(Counter(r["format"] for r in rows)),
        "by_status": dict(Counter(r["status"] for r in rows)),
        "by_error_code": dict(Counter(r["error_code"] for r in rows if r["error_code"])),
        "skipped": dict(skipped),
    }


@click.command("scan")
@click.argument("root", type=click.Path(exists=True, file_okay=False, dir_okay=True,
                                        path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write every row to this file: .csv or .json (atomic write).")
@click.option("--include", multiple=True, metavar="GLOB",
              help="Only files whose path relative to ROOT matches (repeatable; '*' spans '/').")
@click.option("--exclude", multiple=True, metavar="GLOB",
              help="Skip files and folders whose relative path matches (repeatable).")
@click.option("--max-depth", type=click.IntRange(min=0), default=32, show_default=True,
              help="Folder levels below ROOT to descend.")
@click.option("-q", "--quiet", is_flag=True, help="Print the summary only, not the table.")
def scan(root: Path, output: Path | None, include: tuple[str, ...], exclude: tuple[str, ...],
         max_depth: int, quiet: bool) -> None:
    """Dry run: list the studies under ROOT, their prompts from tags, flags and problems.

    Reads headers only and loads no model. Exit code 0 when every study scanned fine, 1 when
    some study has an error (listed with its code), 2 on usage errors.

    \b
    Examples:
      mediqa scan /data/archive
      mediqa scan /data/archive -o scan.csv --exclude '*/SR/*' --max-depth 6
    """
    if output is not None and output.suffix.lower() not in (".csv", ".json"):
        raise click.UsageError(f"--output must end in .csv or .json, got {output.suffix or 'no suffix'!r}")
    install_log_scrubber()
    from engines.io.discover import discover_studies  # header readers only; no torch

    console = Console()
    try:
        key = study_key()
    except OSError as exc:
        raise FatalScanError(f"cannot read or create the study-id key: {exc}") from exc

    skipped: Counter[str] = Counter()

    def on_skip(rel: str, reason: str) -> None:
        skipped[reason.split(";")[0].split("(")[0].strip()] += 1

    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    try:
        for ref in discover_studies(root, max_depth=max_depth, include=include, exclude=exclude,
                                    on_skip=on_skip):
            rows.append(study_row(ref, key))
    except (FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        raise FatalScanError(f"cannot walk {root}: {type(exc).__name__}") from exc
    elapsed = time.perf_counter() - t0

    summary = summarize(rows, skipped)
    if not quiet:
        console.print(rich_table(rows, TABLE_COLUMNS, title=f"{len(rows)} studies"))
    _print_summary(console, summary, elapsed)

    if output is not None:
        try:
            if output.suffix.lower() == ".csv":
                write_csv_atomic(output, rows, COLUMNS)
            else:
                write_json_atomic(output, {"columns": list(COLUMNS), "summary": summary,
                                           "studies": rows})
        except OSError as exc:
            raise FatalScanError(f"cannot write {output}: {exc.strerror or type(exc).__name__}") from exc
        console.print(f"wrote {len(rows)} rows to {output}", markup=False, highlight=False)

    if summary["by_status"].get("error"):
        click.get_current_context().exit(1)


def _print_summary(console: Console, summary: dict[str, Any], elapsed: float) -> None:
    n_err = summary["by_status"].get("error", 0)
    console.print(
        f"{summary['n_studies']} studies ({summary['n_studies'] - n_err} ok, {n_err} with errors) "
        f"in {elapsed:.2f} s", markup=False, highlight=False)
    console.print(counts_table("kind", summary["by_kind"]))
    console.print(counts_table("format", summary["by_format"]))
    if summary["by_error_code"]:
        console.print(counts_table("error code", summary["by_error_code"]))
    if summary["skipped"]:
        console.print(counts_table("skipped entries", summary["skipped"]))
