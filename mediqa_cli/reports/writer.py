"""Crash-safe score reports: lock, append-only journal, atomic final file, resume state.

Files next to the report ``OUT`` (e.g. ``scores.csv``):

- ``OUT``          the report (CSV of DESIGN §8 columns, or JSONL). Replaced atomically
                   (temporary file in the same folder, fsync, ``os.replace``) only when a run
                   finishes, so a killed run leaves the previous complete report in place.
- ``OUT.partial``  the journal of the current run: one JSON line per finished study, flushed
                   and fsynced per line. After a ``kill -9`` it holds a complete prefix (a torn
                   last line is ignored); ``--resume`` continues from it. Removed at the end.
- ``OUT.state``    resume state of the last complete run: per study a keyed hash of its relative
                   path, its fingerprint (relative path, sizes, mtimes, series UID), the model's
                   sha256 and the record. No path in clear when ``--hide-paths`` is used.
- ``OUT.lock``     ``fcntl.flock`` lock held for the whole run; a second run on the same report
                   gets ``ReportLocked`` (exit 75). The lock vanishes with the process.
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import fcntl
import glob
import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import IO, Any, Iterable

from engines.pipeline import COLUMNS, ScoreRecord

logger = logging.getLogger(__name__)

STATE_VERSION = 1
_RECORD_FIELDS = [f.name for f in dataclasses.fields(ScoreRecord)
                  if f.name not in ("reused", "thumbnails")]


class ReportLocked(Exception):
    """Another process holds the report's lock."""


class ReportLock:
    """Exclusive, non-blocking ``flock`` on ``OUT.lock`` (context manager)."""

    def __init__(self, out: Path) -> None:
        self.path = Path(str(out) + ".lock")
        self.fh: IO[str] | None = None

    def __enter__(self) -> "ReportLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            fh.close()
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise ReportLocked(f"another mediqa run is writing {self.path.name[:-5]}") from None
            raise
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        self.fh = fh
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fh is not None:
            fcntl.flock(self.fh.fileno(), fcntl.LOCK_UN)
            self.fh.close()
            self.fh = None


def study_key(rel_path: str, key: bytes | None = None) -> str:
    """Keyed hash of a study's relative path: identifies it across runs without storing the path."""
    h = hashlib.blake2b(rel_path.encode("utf-8", "surrogateescape"), key=(key or b"")[:64],
                        digest_size=16)
    return h.hexdigest()


def record_to_json(rec: ScoreRecord, *, hide_paths: bool) -> dict[str, Any]:
    d = {k: getattr(rec, k) for k in _RECORD_FIELDS}
    if hide_paths:
        d["path"] = ""
    return d


def record_from_json(d: dict[str, Any]) -> ScoreRecord:
    return ScoreRecord(**{k: v for k, v in d.items() if k in _RECORD_FIELDS})


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_jsonl_entries(path: Path) -> Iterable[dict[str, Any]]:
    """Complete, parseable lines only (a torn last line from a kill is skipped)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    out = []
    for line in data.split(b"\n")[:-1]:  # the part after the last newline is incomplete
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(obj, dict) and "k" in obj and "row" in obj:
            out.append(obj)
    return out


class ReportWriter:
    """Writes one report run. Use ``write`` per record in order, then ``commit`` (or ``abort``).

    ``resume=True`` loads ``OUT.state`` then ``OUT.partial`` (later entries win) so that
    ``previous(ref_key, fingerprint)`` can return the record to carry over.
    """

    def __init__(self, out: str | os.PathLike[str], *, fmt: str = "csv", hide_paths: bool = False,
                 resume: bool = False, model_hash: str = "", key: bytes | None = None) -> None:
        if fmt not in ("csv", "jsonl"):
            raise ValueError(f"format must be csv or jsonl, got {fmt!r}")
        self.out = Path(out)
        self.fmt, self.hide_paths, self.model_hash, self.key = fmt, hide_paths, model_hash, key
        self.journal_path = Path(str(self.out) + ".partial")
        self.state_path = Path(str(self.out) + ".state")
        self.prev: dict[str, dict[str, Any]] = {}
        self.n_written = 0
        self.out.parent.mkdir(parents=True, exist_ok=True)
        for stale in glob.glob(glob.escape(str(self.out)) + ".tmp-*"):
            try:
                os.unlink(stale)
            except OSError:
                pass
        if resume:
            for src in (self.state_path, self.journal_path):
                for e in read_jsonl_entries(src):
                    self.prev[e["k"]] = e
            logger.info("resume: %d studies known from the previous run(s)", len(self.prev))
        self._open()

    def _open(self) -> None:
        pid = os.getpid()
        self.tmp_report = Path(f"{self.out}.tmp-{pid}")
        self.tmp_state = Path(f"{self.state_path}.tmp-{pid}")
        # The journal keeps a resumed run's earlier lines: a second kill still resumes from all.
        mode = "ab" if self.prev else "wb"
        self.journal = open(self.journal_path, mode)
        self.report: IO[str] = open(self.tmp_report, "w", newline="", encoding="utf-8")
        self.state: IO[str] = open(self.tmp_state, "w", encoding="utf-8")
        if self.fmt == "csv":
            self.csv = csv.DictWriter(self.report, fieldnames=list(COLUMNS), extrasaction="raise")
            self.csv.writeheader()

    def previous(self, rel_path: str, fingerprint: str) -> ScoreRecord | None:
        """The earlier record of this study if its fingerprint and the model are unchanged.

        Timeouts are retried (they are often caused by load, not by the file).
        """
        e = self.prev.get(study_key(rel_path, self.key))
        if not e or e.get("fp") != fingerprint or e.get("mh") != self.model_hash:
            return None
        rec = record_from_json(e["row"])
        if rec.status == "error" and rec.error_code == "timeout":
            return None
        return rec

    def write(self, rec: ScoreRecord) -> None:
        """Journal (fsynced) and stage one record; ``rec.path`` is the study's relative path."""
        entry = {"k": study_key(rec.path, self.key), "fp": rec.fingerprint, "mh": self.model_hash,
                 "row": record_to_json(rec, hide_paths=self.hide_paths)}
        line = json.dumps(entry, ensure_ascii=True, separators=(",", ":")) + "\n"
        if not rec.reused:
            # One write per line, then flush + fsync: a kill leaves whole lines plus at most one torn one.
            self.journal.write(line.encode("ascii"))
            self.journal.flush()
            os.fsync(self.journal.fileno())
        self.state.write(line)
        if self.fmt == "csv":
            self.csv.writerow(rec.to_row(hide_paths=self.hide_paths))
        else:
            self.report.write(json.dumps(jsonl_row(rec, hide_paths=self.hide_paths),
                                         ensure_ascii=False) + "\n")
        self.n_written += 1

    def commit(self) -> None:
        """Make the new report (and its resume state) visible atomically; drop the journal."""
        for fh in (self.report, self.state):
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
        os.replace(self.tmp_state, self.state_path)
        os.replace(self.tmp_report, self.out)
        _fsync_dir(self.out.parent)
        self.journal.close()
        try:
            os.unlink(self.journal_path)
        except FileNotFoundError:
            pass

    def abort(self) -> None:
        """Leave the previous report and the journal in place; remove temporary files."""
        for fh in (self.report, self.state, self.journal):
            try:
                fh.close()
            except Exception:  # noqa: BLE001
                pass
        for p in (self.tmp_report, self.tmp_state):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


def jsonl_row(rec: ScoreRecord, *, hide_paths: bool) -> dict[str, Any]:
    """JSONL form of a record: numbers and lists typed, text cells escaped as in the CSV."""
    from engines.privacy import escape_cell

    row: dict[str, Any] = {}
    for c in COLUMNS:
        v = getattr(rec, c)
        if c == "path" and hide_paths:
            v = ""
        if isinstance(v, str):
            v = escape_cell(v)
        elif isinstance(v, list):
            v = [escape_cell(x) if isinstance(x, str) else x for x in v]
        row[c] = v
    return row


def read_report(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Rows of a CSV or JSONL report as text dicts (JSONL lists are ``;``-joined)."""
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() in (".jsonl", ".json") or text.lstrip().startswith("{"):
        rows = []
        for line in text.splitlines():
            if not line.strip():
                continue
            d = json.loads(line)
            rows.append({k: ";".join(map(str, v)) if isinstance(v, list) else
                         ("" if v is None else str(v)) for k, v in d.items()})
        return rows
    return list(csv.DictReader(io.StringIO(text)))
