"""engines.io.header_cache: unchanged DICOM files are not parsed again; changed ones are; a
broken cache never stops a scan; scoring with the cache gives the same records."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engines.io import discover_studies
from engines.io.header_cache import HeaderCache


def _refs_view(refs):
    return [(r.rel_path, r.kind, [f.name for f in r.files], r.series_uid, sorted(r.flags), r.meta,
             r.n_slices, r.spacing) for r in refs]


def test_second_scan_is_served_from_the_cache_without_parsing(tmp_path: Path, write_ct_series,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import engines.io.discover as discover

    write_ct_series(tmp_path / "data" / "a", [0.0, 2.0, 1.0, 3.0])
    write_ct_series(tmp_path / "data" / "b", [0.0, 1.5])
    db = tmp_path / "cache" / "headers.sqlite"
    with HeaderCache(db) as cache:
        first = list(discover_studies(tmp_path / "data", header_cache=cache))
        assert (cache.hits, cache.misses) == (0, 6)
    assert oct(db.stat().st_mode & 0o777) == "0o600"

    def no_parse(*a, **k):
        raise AssertionError("a cached header was parsed again")

    monkeypatch.setattr(discover, "scan_header", no_parse)
    with HeaderCache(db) as cache:
        second = list(discover_studies(tmp_path / "data", header_cache=cache))
        assert (cache.hits, cache.misses) == (6, 0)
    assert _refs_view(second) == _refs_view(first)
    assert [h for r in second for h in (r._slices or [])] == [h for r in first for h in (r._slices or [])]


def test_changed_file_is_parsed_again(tmp_path: Path, write_ct_series) -> None:
    paths = write_ct_series(tmp_path / "data" / "a", [0.0, 1.0, 2.0])
    db = tmp_path / "h.sqlite"
    with HeaderCache(db) as cache:
        list(discover_studies(tmp_path / "data", header_cache=cache))
    import pydicom

    uid = pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID
    # Rewrite one slice at another position: same name and series, new content and mtime.
    write_ct_series(tmp_path / "data" / "a", [9.0], filenames=[paths[0].name], series_uid=uid)
    st = paths[0].stat()
    os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with HeaderCache(db) as cache:
        (ref,) = list(discover_studies(tmp_path / "data", header_cache=cache))
        assert (cache.hits, cache.misses) == (2, 1)
    assert ref.files[-1].name == paths[0].name   # parsed again: now the highest position, last


def test_corrupt_cache_is_ignored_with_a_warning(tmp_path: Path, write_ct_series,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    write_ct_series(tmp_path / "data" / "a", [0.0, 1.0])
    db = tmp_path / "h.sqlite"
    db.write_bytes(b"this is not a sqlite database" * 100)
    with caplog.at_level("WARNING"):
        cache = HeaderCache(db)
        refs = list(discover_studies(tmp_path / "data", header_cache=cache))
        cache.close()
    assert not cache.enabled and len(refs) == 1 and refs[0].n_slices == 2
    assert "header cache" in caplog.text and "unusable" in caplog.text


def test_scanner_process_uses_the_cache_and_reports_hits(tmp_path: Path, write_ct_series,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    from engines.pipeline import ScoreConfig
    from tests.test_pipeline import drain_scanner

    write_ct_series(tmp_path / "data" / "a", [0.0, 1.0, 2.0])
    cfg = ScoreConfig(header_cache=str(tmp_path / "h.sqlite"))
    for expected in ("0 files served from it, 3 parsed", "3 files served from it, 0 parsed"):
        caplog.clear()
        with caplog.at_level("INFO", logger="engines.pipeline"):
            refs = drain_scanner(tmp_path / "data", cfg)
        assert [r.n_slices for r in refs] == [3]
        assert expected in caplog.text


def test_lowered_limits_are_checked_on_cached_headers(tmp_path: Path, write_ct_series) -> None:
    """A header cached under generous limits is not served once the limits are lowered below it:
    the file is scanned again and fails with the scan's own error."""
    from engines.errors import TooLarge
    from engines.io.limits import ReadLimits

    write_ct_series(tmp_path / "data" / "a", [0.0, 1.0])
    db = tmp_path / "headers.sqlite"
    with HeaderCache(db) as cache:
        assert all(r.error is None for r in discover_studies(tmp_path / "data", header_cache=cache))
    with pytest.raises(TooLarge, match="2 frames exceeds the cap of 1"):
        ReadLimits(max_frames=1).check_frames(2)
    for tight in (ReadLimits(max_slice_pixels=100), ReadLimits(max_frames=0)):
        with HeaderCache(db) as cache:
            refs = list(discover_studies(tmp_path / "data", header_cache=cache, limits=tight))
            assert cache.hits == 0
        assert refs and all(r.error is not None and r.error.code == "too_large" for r in refs)
