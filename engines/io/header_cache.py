"""A persistent cache of DICOM header scans, for nightly re-runs over the same archive.

``discover_studies`` parses every DICOM header of an archive (≈ 1 ms per file with pydicom), on
every run — also with ``--resume``, which needs each series' fingerprint. On a 100,000-study
archive of 200-slice series that is hours of parsing each night for files that did not change.
``HeaderCache`` keeps each successfully scanned ``DicomHeader`` in SQLite, keyed by the file's
absolute path and validated by its size, modification time (ns) and inode: any change and the
file is parsed again. Failed scans are never cached (a broken file is retried every run).

Format: table ``headers(path, size, mtime_ns, ino, meta_id, value)`` with ``value`` the JSON of
the geometry fields; the whitelisted ``meta`` dicts (shared by the files of a series) live once
in ``metas(id, value)``. ``SCHEMA`` is part of every row: a release that changes what a header
holds bumps it and old rows are ignored. The file holds SeriesInstanceUIDs / SOPInstanceUIDs in
clear (needed to group series), so it is created mode 0600 in the user's cache folder by
default, like the study-id key. Problems with the cache (locked, corrupt, read-only) are logged
once and the run continues without it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
from pathlib import Path
from typing import Any

from engines.io.dicom import DicomHeader
from engines.io.limits import DEFAULT_LIMITS, ReadLimits

logger = logging.getLogger(__name__)

SCHEMA = 1
_COMMIT_EVERY = 500


def default_cache_path() -> Path:
    """``$MEDIQA_CACHE_DIR`` or ``$XDG_CACHE_HOME/mediqa`` or ``~/.cache/mediqa``, + headers.sqlite."""
    base = os.environ.get("MEDIQA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "mediqa")
    return Path(base) / "headers.sqlite"


def _tuple(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def header_to_json(hdr: DicomHeader) -> str:
    d = {k: v for k, v in vars(hdr).items() if k not in ("path", "meta")}
    return json.dumps(d, separators=(",", ":"))


def header_from_json(path: Path, value: str, meta: dict[str, Any]) -> DicomHeader:
    d = json.loads(value)
    for k in ("orientation", "position", "pixel_spacing"):
        d[k] = _tuple(d.get(k))
    for k in ("frame_positions", "frame_orientations"):
        if d.get(k) is not None:
            d[k] = [_tuple(v) for v in d[k]]
    return DicomHeader(path=path, meta=meta, **d)


class HeaderCache:
    """SQLite-backed ``DicomHeader`` cache; use as a context manager or call ``close()``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.hits = self.misses = 0
        self._pending = 0
        self._metas: dict[str, dict[str, Any]] = {}
        self._db: sqlite3.Connection | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            new = not self.path.exists()
            self._db = sqlite3.connect(str(self.path), timeout=30.0)
            if new:
                os.chmod(self.path, 0o600)
            self._db.executescript(
                "PRAGMA journal_mode=WAL;"
                "CREATE TABLE IF NOT EXISTS metas (id TEXT PRIMARY KEY, value TEXT NOT NULL);"
                "CREATE TABLE IF NOT EXISTS headers (path TEXT PRIMARY KEY, schema INTEGER NOT NULL,"
                " size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, ino INTEGER NOT NULL,"
                " meta_id TEXT NOT NULL, value TEXT NOT NULL);")
        except (sqlite3.Error, OSError) as exc:
            self._disable(exc)

    def _disable(self, exc: BaseException) -> None:
        logger.warning("header cache %s unusable (%s); scanning without it", self.path, type(exc).__name__)
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
        self._db = None

    @property
    def enabled(self) -> bool:
        return self._db is not None

    def get(self, path: Path, st: os.stat_result, limits: ReadLimits = DEFAULT_LIMITS) -> DicomHeader | None:
        """The cached header of ``path`` if the file is unchanged, else None."""
        if self._db is None:
            return None
        try:
            row = self._db.execute(
                "SELECT size, mtime_ns, ino, meta_id, value FROM headers WHERE path = ? AND schema = ?",
                (str(path), SCHEMA)).fetchone()
            if row is None or (row[0], row[1], row[2]) != (st.st_size, st.st_mtime_ns, st.st_ino):
                self.misses += 1
                return None
            meta = self._metas.get(row[3])
            if meta is None:
                m = self._db.execute("SELECT value FROM metas WHERE id = ?", (row[3],)).fetchone()
                if m is None:
                    self.misses += 1
                    return None
                meta = self._metas[row[3]] = json.loads(m[0])
            hdr = header_from_json(path, row[4], dict(meta))
        except (sqlite3.Error, ValueError, TypeError, KeyError) as exc:
            self._disable(exc)
            return None
        # Limits may have been lowered since the header was cached: the same checks as the scan.
        try:
            limits.check_slice(hdr.rows, hdr.columns, hdr.samples)
            limits.check_frames(hdr.frames)
        except Exception:  # noqa: BLE001 - let the real scan raise the proper error
            return None
        self.hits += 1
        return hdr

    def put(self, path: Path, st: os.stat_result, hdr: DicomHeader) -> None:
        if self._db is None:
            return
        try:
            mv = json.dumps(hdr.meta, sort_keys=True, separators=(",", ":"))
            mid = hashlib.sha256(mv.encode()).hexdigest()[:32]
            if mid not in self._metas:
                self._db.execute("INSERT OR IGNORE INTO metas (id, value) VALUES (?, ?)", (mid, mv))
                self._metas[mid] = dict(hdr.meta)
            self._db.execute(
                "INSERT OR REPLACE INTO headers (path, schema, size, mtime_ns, ino, meta_id, value)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (str(path), SCHEMA, st.st_size, st.st_mtime_ns, st.st_ino, mid, header_to_json(hdr)))
            self._pending += 1
            if self._pending >= _COMMIT_EVERY:
                self._db.commit()
                self._pending = 0
        except (sqlite3.Error, TypeError, ValueError) as exc:
            self._disable(exc)

    def close(self) -> None:
        if self._db is None:
            return
        try:
            self._db.commit()
            self._db.close()
        except sqlite3.Error as exc:
            logger.warning("header cache %s: final commit failed (%s)", self.path, type(exc).__name__)
        self._db = None

    def __enter__(self) -> "HeaderCache":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
