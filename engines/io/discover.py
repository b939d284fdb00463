"""Safe directory walk → studies; opening a study lazily or decoding it whole.

The walk (``iter_files``)
    - never follows a symbolic link whose target lies outside the scan root; links inside the
      root are followed, and every directory and file is visited once (de-duplicated by
      ``(st_dev, st_ino)``), so link loops end;
    - skips hidden entries (name starting with ``.``) and known junk (``Thumbs.db``,
      ``desktop.ini``, ``__MACOSX``, editor backups ``*~``);
    - descends at most ``max_depth`` directory levels below the root and examines at most
      ``ReadLimits.max_files`` files;
    - ``include`` / ``exclude`` are ``fnmatch`` globs on the POSIX path relative to the root
      (``*`` also matches ``/``); a file is kept when it matches some ``include`` (or there are
      none) and no ``exclude``; a directory matching an ``exclude`` is not entered.

File kinds: ``.nii`` / ``.nii.gz`` → NIfTI; ``.png .jpg .jpeg .tif .tiff .bmp`` → 2D image; a
known non-image suffix (``.txt``, ``.json``, …) is skipped; anything else is sniffed for DICOM
(preamble or a plausible first data element). A file named ``*.dcm`` / ``*.dicom`` / ``*.ima``
that is not DICOM becomes an error study (``not_dicom``); other non-DICOM files are skipped.
DICOMDIR index files are recognised and skipped. Every skip is reported through ``on_skip``
(path relative to the root, reason) and logged at DEBUG level.

Every unreadable file becomes one ``StudyRef`` with ``error`` set; the walk continues.
Studies are yielded sorted by ``rel_path`` once the whole tree has been scanned (DICOM series
may span folders, so grouping needs every header first).
"""

from __future__ import annotations

import fnmatch
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from engines.errors import BadGeometry, MediqaError, NoPixelData, NotDicom, UnreadableInput
from engines.io.dicom import DicomHeader, DicomSeriesSource, group_headers, scan_header, sniff_dicom
from engines.io.image2d import image_header, is_image_name, read_image2d
from engines.io.limits import DEFAULT_LIMITS, ReadLimits
from engines.io.nifti import NiftiSource, is_nifti_name
from engines.io.volume import SliceSource, Volume, VolumeSource

logger = logging.getLogger(__name__)

JUNK_NAMES = frozenset({"thumbs.db", "desktop.ini", "__macosx", "ehthumbs.db", "icon\r"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".ima", ".dic"})
NON_IMAGE_SUFFIXES = frozenset({
    ".txt", ".json", ".csv", ".tsv", ".xml", ".md", ".rst", ".html", ".htm", ".pdf", ".py", ".pyc",
    ".yaml", ".yml", ".ini", ".cfg", ".log", ".zip", ".tar", ".7z", ".rar", ".bz2", ".xz",
    ".exe", ".dll", ".so", ".sh", ".bat", ".icc", ".dump", ".doc", ".docx", ".xls", ".xlsx",
    ".mat", ".npy", ".npz", ".h5", ".hdf5", ".safetensors", ".onnx", ".engine", ".pt", ".pth",
})

SkipCallback = Callable[[str, str], None]


@dataclass
class StudyRef:
    """One row of the report, found by ``discover_studies`` (nothing decoded yet).

    kind:       "2d" | "3d".
    format:     "dicom" | "nifti" | "image".
    root:       the scan root (absolute).
    files:      absolute paths; a DICOM series in geometric order; one file otherwise.
    rel_path:   POSIX path relative to ``root``; a multi-file series is its folder, with
                ``#<n>`` appended when a folder holds several studies (n from 1).
    series_uid: SeriesInstanceUID (DICOM) or None; never written to reports unhashed.
    meta:       whitelisted, non-identifying header fields (``engines.io.meta``).
    flags:      geometry / content flags (see ``engines.io.dicom``).
    error:      set when the study failed at scan time (one study per bad file).
    n_slices:   slices (frames) the study holds; 0 for a failed study.
    spacing:    (z, y, x) mm as computed at scan time, or None when unknown / not scanned.
    """

    kind: str
    format: str
    root: Path
    files: list[Path]
    rel_path: str
    series_uid: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)
    error: MediqaError | None = None
    n_slices: int = 1
    spacing: tuple[float, float, float] | None = None
    _slices: list[tuple[Path, int | None]] | None = field(default=None, repr=False, compare=False)


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name


def _matches(rel: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatch(rel, p) for p in patterns)


def iter_files(root: Path, *, max_depth: int = 32, include: Sequence[str] = (), exclude: Sequence[str] = (),
               max_files: int = DEFAULT_LIMITS.max_files, on_skip: SkipCallback | None = None) -> Iterator[Path]:
    """Yield the regular files under ``root`` (absolute paths under ``root``), safely, in sorted order."""
    root = Path(root).resolve(strict=True)

    def skip(path: Path, reason: str) -> None:
        rel = _rel(path, root)
        logger.debug("skipped %s: %s", rel, reason)
        if on_skip is not None:
            on_skip(rel, reason)

    seen: set[tuple[int, int]] = set()
    st_root = root.stat()
    seen.add((st_root.st_dev, st_root.st_ino))
    n_files = 0
    stack: list[tuple[Path, int]] = [(root, 0)]
    while stack:
        folder, depth = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            skip(folder, f"directory not readable ({type(exc).__name__})")
            continue
        subdirs: list[tuple[Path, int]] = []
        for entry in entries:
            path = Path(entry.path)
            name = entry.name
            if name.startswith("."):
                skip(path, "hidden")
                continue
            if name.lower() in JUNK_NAMES or name.endswith("~"):
                skip(path, "junk file")
                continue
            try:
                if entry.is_symlink():
                    target = Path(os.path.realpath(path))
                    if target != root and root not in target.parents:
                        skip(path, "symbolic link pointing outside the scan root")
                        continue
                st = os.stat(path)  # follows links inside the root
            except OSError as exc:
                skip(path, f"not accessible ({type(exc).__name__})")
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen:
                skip(path, "already visited (link or loop)")
                continue
            rel = _rel(path, root)
            if stat.S_ISDIR(st.st_mode):
                if exclude and (_matches(rel, exclude) or _matches(rel + "/", exclude)):
                    skip(path, "excluded")
                    continue
                if depth + 1 > max_depth:
                    skip(path, f"deeper than max_depth={max_depth}")
                    continue
                seen.add(key)
                subdirs.append((path, depth + 1))
                continue
            if not stat.S_ISREG(st.st_mode):
                skip(path, "not a regular file")
                continue
            if include and not _matches(rel, include):
                continue
            if exclude and _matches(rel, exclude):
                skip(path, "excluded")
                continue
            seen.add(key)
            n_files += 1
            if n_files > max_files:
                logger.warning("stopped after %d files (ReadLimits.max_files)", max_files)
                skip(path, f"file limit {max_files} reached; walk stopped")
                return
            yield path
        stack.extend(reversed(subdirs))


def _error_ref(root: Path, path: Path, fmt: str, exc: MediqaError) -> StudyRef:
    return StudyRef(kind="2d", format=fmt, root=root, files=[path], rel_path=_rel(path, root), error=exc,
                    n_slices=0)


def discover_studies(root: Path | str, *, max_depth: int = 32, include: Sequence[str] = (),
                     exclude: Sequence[str] = (), limits: ReadLimits = DEFAULT_LIMITS,
                     on_skip: SkipCallback | None = None,
                     header_cache: Any | None = None) -> Iterator[StudyRef]:
    """Find every study under ``root`` (header reads only; no pixel is decoded), streamed.

    The walk goes folder by folder (depth first, names sorted, a folder's own files before its
    subfolders); a folder's studies are yielded, sorted by ``rel_path``, as soon as its files have
    been scanned, so scoring starts after the first folder and memory holds one folder's headers
    rather than the whole archive's. DICOM files are therefore grouped into series *within a
    folder*: a series whose files are spread over several folders becomes one study per folder,
    and every part after the first is flagged ``series_split_across_folders`` (the first part
    has already been yielded when the second is found); a folder that holds exactly the
    instances of a series already found (a copy) is skipped with an ``on_skip`` reason.
    ``header_cache`` (an ``engines.io.header_cache.HeaderCache``) serves unchanged files' headers
    without parsing them and stores new ones.
    Failed files are yielded with ``error`` set. ``on_skip(rel_path, reason)`` is called for each
    skipped entry (hidden, junk, DICOMDIR, links out of the root, non-image files). Raises
    ``FileNotFoundError`` / ``NotADirectoryError`` for a bad root only.
    """
    root_path = Path(root).resolve(strict=True)
    if not root_path.is_dir():
        raise NotADirectoryError(str(root))
    depth = min(max_depth, limits.max_depth)
    # series UID -> hashes of the SOP instance sets already yielded under it (a few bytes per
    # series, so a 100,000-study archive costs megabytes, not its headers).
    seen_series: dict[str, set[int]] = {}
    refs: list[StudyRef] = []
    headers: list[DicomHeader] = []
    meta_cache: dict[tuple, Any] = {}
    folder: Path | None = None

    def flush() -> list[StudyRef]:
        sop_of = {h.path: h.sop_uid or str(h.path) for h in headers}
        out = list(refs)
        found: list[tuple[str, int]] = []
        for ref in _dicom_refs(root_path, headers):
            if ref.series_uid:
                sops = hash(tuple(sorted(sop_of.get(f, str(f)) for f in ref.files)))
                parts = seen_series.get(ref.series_uid, set())   # from earlier folders only
                if sops in parts:
                    # The same instances again in another folder: a copy, scanned once.
                    if on_skip is not None:
                        on_skip(ref.rel_path, "copy of a series already found in another folder")
                    continue
                if parts:
                    ref.flags.append("series_split_across_folders")
                found.append((ref.series_uid, sops))
            out.append(ref)
        for uid, sops in found:
            seen_series.setdefault(uid, set()).add(sops)
        out.sort(key=lambda r: (r.rel_path, r.files[0].as_posix() if r.files else ""))
        refs.clear()
        headers.clear()
        meta_cache.clear()
        return out

    for path in iter_files(root_path, max_depth=depth, include=include, exclude=exclude,
                           max_files=limits.max_files, on_skip=on_skip):
        if path.parent != folder:
            yield from flush()
            folder = path.parent
        ref = _scan_file(root_path, path, limits, on_skip, headers, meta_cache, header_cache)
        if ref is not None:
            refs.append(ref)
    yield from flush()


def _scan_file(root: Path, path: Path, limits: ReadLimits, on_skip: SkipCallback | None,
               headers: list[DicomHeader], meta_cache: dict[tuple, Any],
               header_cache: Any | None = None) -> StudyRef | None:
    """One file of the walk: a finished ``StudyRef`` (image, NIfTI, error), or None when the file
    was skipped or its DICOM header was appended to ``headers`` for series grouping."""
    rel = _rel(path, root)
    if is_nifti_name(path):
        return _nifti_ref(root, path, limits)
    if is_image_name(path):
        return _image_ref(root, path, limits)
    if path.suffix.lower() in NON_IMAGE_SUFFIXES:
        if on_skip is not None:
            on_skip(rel, "not an image file")
        return None
    named_dicom = path.suffix.lower() in DICOM_SUFFIXES
    if path.name.lower().startswith("dicomdir"):
        if on_skip is not None:
            on_skip(rel, "DICOMDIR (media index) skipped; the images it lists are scanned directly")
        logger.debug("skipped DICOMDIR %s", rel)
        return None
    st = None
    if header_cache is not None:
        try:
            st = path.stat()
            cached = header_cache.get(path, st, limits)
        except OSError:
            cached = None
        if cached is not None:
            headers.append(cached)
            return None
    if not named_dicom and sniff_dicom(path) == "no":
        if on_skip is not None:
            on_skip(rel, "not a recognised image file")
        return None
    try:
        hdr = scan_header(path, limits=limits, meta_cache=meta_cache)
        headers.append(hdr)
        if header_cache is not None and st is not None:
            header_cache.put(path, st, hdr)
    except NoPixelData as exc:
        if "DICOMDIR" in exc.message:
            if on_skip is not None:
                on_skip(rel, "DICOMDIR (media index) skipped; the images it lists are scanned directly")
            return None
        return _error_ref(root, path, "dicom", exc)
    except MediqaError as exc:
        return _error_ref(root, path, "dicom", exc)
    except Exception as exc:  # noqa: BLE001 - the per-file boundary
        return _error_ref(root, path, "dicom",
                          UnreadableInput(f"DICOM header could not be read ({type(exc).__name__})"))
    return None


def _nifti_ref(root: Path, path: Path, limits: ReadLimits) -> StudyRef:
    try:
        src = NiftiSource(path, limits=limits)
    except MediqaError as exc:
        return _error_ref(root, path, "nifti", exc)
    except Exception as exc:  # noqa: BLE001
        return _error_ref(root, path, "nifti", UnreadableInput(f"NIfTI could not be read ({type(exc).__name__})"))
    n = len(src)
    flags = list(src.flags) + (["single_slice"] if n == 1 else [])
    return StudyRef(kind="3d" if n >= 2 else "2d", format="nifti", root=root, files=[path],
                    rel_path=_rel(path, root), meta=dict(src.meta), flags=flags, n_slices=n,
                    spacing=src.spacing)


def _image_ref(root: Path, path: Path, limits: ReadLimits) -> StudyRef:
    try:
        meta = image_header(path, limits=limits)
    except MediqaError as exc:
        return _error_ref(root, path, "image", exc)
    return StudyRef(kind="2d", format="image", root=root, files=[path], rel_path=_rel(path, root),
                    meta=dict(meta), flags=["spacing_unknown"], n_slices=1, spacing=(1.0, 1.0, 1.0))


def _dicom_refs(root: Path, headers: list[DicomHeader]) -> list[StudyRef]:
    groups = group_headers(headers)
    provisional: list[tuple[str, StudyRef]] = []
    for grp in groups:
        files: list[Path] = []
        for p, _ in grp.slices:
            if not files or files[-1] != p:
                files.append(p)
        if len(files) == 1:
            base = _rel(files[0], root)
        else:   # a folder's headers only (discovery streams per folder): the folder
            folder = files[0].parent
            base = _rel(folder, root) if folder != root else "."
        ref = StudyRef(kind=grp.kind, format="dicom", root=root, files=files, rel_path=base,
                       series_uid=grp.series_uid, meta=grp.meta, flags=grp.flags, n_slices=len(grp.slices),
                       spacing=grp.spacing, _slices=grp.slices)
        provisional.append((base, ref))
    counts: dict[str, int] = {}
    for base, _ in provisional:
        counts[base] = counts.get(base, 0) + 1
    provisional.sort(key=lambda br: (br[0], br[1].meta.get("SeriesDescription") or "", br[1].series_uid or "",
                                     br[1].files[0].as_posix()))
    seen: dict[str, int] = {}
    out: list[StudyRef] = []
    for base, ref in provisional:
        if counts[base] > 1:
            seen[base] = seen.get(base, 0) + 1
            ref.rel_path = f"{base}#{seen[base]}"
        out.append(ref)
    return out


def _dicom_slices(ref: StudyRef, limits: ReadLimits) -> tuple[list[tuple[Path, int | None]], tuple[float, float, float], list[str], dict[str, Any]]:
    """(slices, spacing, flags, meta) of a DICOM ref; re-scans headers when the ref was built by hand."""
    if ref._slices is not None and ref.spacing is not None:
        return ref._slices, ref.spacing, ref.flags, ref.meta
    headers = [scan_header(p, limits=limits) for p in ref.files]
    groups = group_headers(headers)
    if len(groups) != 1:
        raise BadGeometry(f"the files of this study form {len(groups)} series, expected 1")
    grp = groups[0]
    return grp.slices, grp.spacing, grp.flags, grp.meta


def open_study(ref: StudyRef, *, limits: ReadLimits = DEFAULT_LIMITS) -> SliceSource:
    """A lazy ``SliceSource`` over the study: nothing is decoded until ``get_slice``.

    Raises the scan-time error of a failed ref, or a ``MediqaError`` subclass.
    """
    if ref.error is not None:
        raise ref.error
    if ref.format == "dicom":
        slices, spacing, flags, meta = _dicom_slices(ref, limits)
        return DicomSeriesSource(slices, spacing=spacing, meta=dict(meta), flags=list(flags), limits=limits)
    if ref.format == "nifti":
        return NiftiSource(ref.files[0], limits=limits)
    if ref.format == "image":
        return VolumeSource(read_image2d(ref.files[0], limits=limits))
    raise NotDicom(f"unknown study format {ref.format!r}")


def read_study(ref: StudyRef, *, limits: ReadLimits = DEFAULT_LIMITS) -> Volume:
    """Decode the whole study → ``Volume`` (float32 (Z, H, W) or (Z, H, W, 3), physical units).

    The study size is checked against ``limits.max_study_pixels`` before any slice is decoded.
    """
    if ref.error is not None:
        raise ref.error
    if ref.format == "image":
        return read_image2d(ref.files[0], limits=limits)
    src = open_study(ref, limits=limits)
    n = len(src)
    rows = int(src.meta.get("Rows") or 0)
    cols = int(src.meta.get("Columns") or 0)
    samples = int(src.meta.get("SamplesPerPixel") or 1)
    limits.check_study(n, rows, cols, samples)
    first = src.get_slice(0)
    out = np.empty((n,) + first.shape, dtype=np.float32)
    out[0] = first
    for i in range(1, n):
        sl = src.get_slice(i)
        if sl.shape != first.shape:
            raise BadGeometry(f"slice {i} has shape {sl.shape}, slice 0 has {first.shape}")
        out[i] = sl
    return Volume(array=out, spacing=tuple(float(s) for s in src.spacing), meta=dict(src.meta),  # type: ignore[arg-type]
                  flags=list(src.flags))
