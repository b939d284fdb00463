"""Atomic text files, for every layer (the CLI's reports, the training recipes' corpus stamps and
manifests): ``atomic_write_text`` writes to a temporary file in the destination folder, flushes
and fsyncs it, then ``os.replace``s it over the destination. Readers see the old file or the new
one, never half of one; an interrupted write leaves the previous file intact; and the destination
becomes a new file, so a hard link of the old one (``cp -al``) keeps the old content.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_text(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (temp file in the same folder + ``os.replace``)."""
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "w", encoding=encoding, newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644 & ~_umask())
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return dest


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
