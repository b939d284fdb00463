"""Shared output helpers for CLI commands: atomic CSV / JSON files and rich tables.

- ``atomic_write_text`` (``engines.files``, re-exported here) writes to a temporary file in the
  destination folder, flushes and fsyncs it, then ``os.replace``s it over the destination: readers
  see the old file or the new one, never half of one, and an interrupted run leaves the previous
  output intact.
- ``write_csv_atomic`` formats every cell as text (lists ``;``-joined, floats with up to 6
  significant digits, None empty) and escapes cells a spreadsheet would evaluate
  (``engines.privacy.escape_cell``: leading ``= + - @``, tab, CR).
- ``write_json_atomic`` writes UTF-8 JSON (nan / inf become null, which JSON lacks).
- ``rich_table`` builds a ``rich.table.Table`` from row dicts; cell text is printed literally
  (no rich markup is interpreted from data).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from rich.table import Table
from rich.text import Text

from engines.files import atomic_write_text  # noqa: F401 - re-exported: the CLI's writers
from engines.privacy import escape_cell


def format_cell(value: Any) -> str:
    """One value as CSV / table text: None → '', bool → 'true'/'false', float → %.6g
    (nan → ''), list / tuple → ';'-joined, everything else ``str``."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ";".join(format_cell(v) for v in value)
    return str(value)


def csv_text(rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """CSV text with a header row; missing keys are empty cells, extra keys are ignored."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(list(columns))
    for row in rows:
        writer.writerow([escape_cell(format_cell(row.get(c))) for c in columns])
    return buf.getvalue()


def write_csv_atomic(path: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]],
                     columns: Sequence[str]) -> Path:
    """Write ``rows`` as CSV (escaped cells) to ``path`` atomically."""
    return atomic_write_text(path, csv_text(rows, columns))


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item"):  # numpy scalars
        return _json_safe(value.item())
    return str(value)


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented UTF-8 JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(_json_safe(obj), indent=2, ensure_ascii=False) + "\n")


def rich_table(rows: Iterable[Mapping[str, Any]], columns: Sequence[str], *,
               title: str | None = None, styles: Mapping[str, str] | None = None) -> Table:
    """A rich table of ``rows`` (dicts) in the order of ``columns``; values are shown literally."""
    table = Table(title=title, show_lines=False, header_style="bold")
    for c in columns:
        table.add_column(c, style=(styles or {}).get(c), overflow="fold")
    for row in rows:
        table.add_row(*(Text(format_cell(row.get(c))) for c in columns))
    return table


def counts_table(title: str, counts: Mapping[str, int]) -> Table:
    """Two-column table of ``name → count``, largest first."""
    table = Table(title=title, header_style="bold")
    table.add_column("value")
    table.add_column("count", justify="right")
    for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        table.add_row(Text(name or "-"), str(n))
    return table
