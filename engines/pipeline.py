"""Batch scoring: discover → read in worker processes → salient slices → preprocess → batched
inference on one backend → fused per-study ``ScoreRecord``s, streamed in discovery order.

Data flow (DESIGN §8, §9)::

    discover_studies (header scan, streamed folder by folder, in a scanner process)
        └─► feeder thread ─► worker processes (killable; per study: open_study → select_salient_slices →
            preprocess_slice with the card's PreprocessConfig) ──► prepared studies
    main thread: prompt (tags, else the backend's classifier) → items of one (3, S, S) image each,
        2D images and 3D slices of different studies mixed in one batch → Backend.score
        (2D graph: ``score`` + ``slice_logit`` per input) → fusion of each series' K slices with
        ``engines.fusion.fuse_slice_scores`` → label scale of the card → ``ScoreRecord``.

Memory stays flat: the scanner holds one folder's headers and runs at most 64 studies ahead;
at most ``ScoreConfig.window`` studies are between discovery and the output (the reorder window
that keeps the output order equal to the discovery order), each holding only its K
preprocessed slices.

CPU sharing: the scanner and the readers run at ``ScoreConfig.reader_nice`` (default nice +10) and
onnxruntime's idle threads do not spin, so on a CPU-only machine the engine pre-empts reading
and reading fills the gaps between batches.

Time limit: every study is prepared in a worker process; when one takes longer than
``ScoreConfig.timeout_s`` the worker is killed (SIGKILL — a signal handler cannot interrupt a
stuck C decoder) and replaced, and the study gets ``status=error, error_code=timeout``.

Plugins: ``ScoreConfig.plugins`` (and the ``MEDIQA_PLUGINS`` environment variable, comma
separated) name ``"module:function"`` callables that every worker process calls once at start
and that the main process calls before discovery. They let a site register extra readers (see
``engines.io``); the test suite uses one to register a reader that never returns.

Errors: anything raised while preparing or scoring one study is caught and recorded on that
study's row (``engines.errors.error_code``); the batch goes on. Messages of non-MediqaError
exceptions are not recorded (they can echo raw tag values); only the exception's type is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import importlib
import io
import logging
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Sequence

import numpy as np

from engines.errors import MediqaError, StudyTimeout, error_code
from engines.fusion import fuse_slice_scores
from engines.features import card_feature_head, features_suffix, statistics_or_none
from engines.tta import effective_mode, tta_suffix, with_tta
from engines.preprocess import (PreprocessConfig, grey_channels, preprocess_slice, to_network_size, to_unit_range,
                                usable_pixel_mm)
from engines.prompts import GROUPS, PromptVocab

logger = logging.getLogger(__name__)

#: CSV columns, v1 (DESIGN §8). The order is the file's column order.
COLUMNS: tuple[str, ...] = (
    "study_id", "path", "kind", "status", "error_code", "error", "score", "modality", "region",
    "type", "prompt_source", "n_slices", "salient_slices", "slice_scores", "slice_weights",
    "flags", "manufacturer", "scanner_model", "kvp", "mas", "ctdivol", "field_strength", "model",
    "backend", "elapsed_ms",
)
PLUGINS_ENV = "MEDIQA_PLUGINS"
THUMB_SIZE = 96


@dataclass(frozen=True)
class ScoreConfig:
    """How to run a scoring batch. Preprocessing comes from the model card, never from here.

    batch_size: images per ``Backend.score`` call (2D images and 3D slices mixed).
    workers:    reader processes (0 is treated as 1: decoding never runs in the main process,
                so a stuck decoder can always be killed).
    timeout_s:  per-study limit on read + slice selection + preprocessing, seconds.
    window:     studies allowed between the oldest unfinished one and the newest dispatched;
                0 = ``4 * workers + 2 * batch_size``: one full batch of 2D studies can be
                prepared while the previous one is inferred.
    include / exclude: glob patterns passed to ``discover_studies``.
    thumbnails: also return small PNG thumbnails of the salient slices (for HTML reports).
    plugins:    ``"module:function"`` hooks called in every worker and in the main process.
    header_cache: SQLite file of cached DICOM header scans (``engines.io.header_cache``), or
                None to parse every header.
    tta:        test-time augmentation of the score (``engines.tta``): "none", "flip" (2 passes),
                "d4" (8 passes) or "auto" (the model card's per-modality policy; a card without
                one scores as "none"); recorded in the records' ``model`` column.
    features:   apply the model card's feature head (``engines.features``: classical statistics of
                the network input blended into the score per modality); False: the network alone.
                Off on a card with a head is recorded in the ``model`` column ("+no-features").
    reader_nice: CPU priority of the header scanner and the reader processes: 1..19 is added to
                their niceness (default 10), ≥ 20 asks for Linux's SCHED_IDLE class, 0 leaves
                them alone. On a CPU-only machine the engine's threads then pre-empt reading
                instead of stalling on it, and reading fills the gaps between batches.
    """

    batch_size: int = 16
    workers: int = 2
    timeout_s: float = 120.0
    window: int = 0
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    max_depth: int = 32
    min_fraction: float = 0.05
    thumbnails: bool = False
    hide_paths: bool = False
    privacy_key: bytes | None = None
    plugins: tuple[str, ...] = ()
    device: str = "cpu"
    backend: str = "auto"
    tta: str = "auto"
    features: bool = True
    reader_nice: int = 10
    header_cache: str | None = None

    def replace(self, **kw: Any) -> "ScoreConfig":
        return dataclasses.replace(self, **kw)


@dataclass
class ScoreRecord:
    """One row of the report (DESIGN §8 columns) plus a few fields that are not written."""

    study_id: str = ""
    path: str = ""
    kind: str = ""
    status: str = "ok"
    error_code: str = ""
    error: str = ""
    score: float | None = None
    modality: str = ""
    region: str = ""
    type: str = ""
    prompt_source: str = ""
    n_slices: int | None = None
    salient_slices: list[int] = field(default_factory=list)
    slice_scores: list[float] = field(default_factory=list)
    slice_weights: list[float] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    manufacturer: str = ""
    scanner_model: str = ""
    kvp: float | None = None
    mas: float | None = None
    ctdivol: float | None = None
    field_strength: float | None = None
    model: str = ""
    backend: str = ""
    elapsed_ms: float | None = None
    # Not written to the report:
    fingerprint: str = ""          # keyed hash of (relative path, size, mtime, series UID)
    n_decoded: int | None = None   # slices decoded to choose the salient ones
    reused: bool = False           # carried over from a previous run (--resume)
    n_files: int = 0               # files of the study (progress / ETA)
    thumbnails: list[bytes] | None = None  # PNGs of the salient slices, when asked for

    def to_row(self, *, hide_paths: bool = False) -> dict[str, str]:
        """The report row: every column as text (numbers formatted, lists ``;``-joined).

        Cells are escaped against spreadsheet formula injection with ``engines.privacy.escape_cell``.
        """
        from engines.privacy import escape_cell

        def num(v: float | None, nd: int = 4) -> str:
            return "" if v is None else f"{v:.{nd}f}"

        row = {
            "study_id": self.study_id, "path": "" if hide_paths else self.path, "kind": self.kind,
            "status": self.status, "error_code": self.error_code, "error": self.error,
            "score": num(self.score), "modality": self.modality, "region": self.region,
            "type": self.type, "prompt_source": self.prompt_source,
            "n_slices": "" if self.n_slices is None else str(self.n_slices),
            "salient_slices": ";".join(str(i) for i in self.salient_slices),
            "slice_scores": ";".join(f"{s:.4f}" for s in self.slice_scores),
            "slice_weights": ";".join(f"{w:.4f}" for w in self.slice_weights),
            "flags": ";".join(self.flags), "manufacturer": self.manufacturer,
            "scanner_model": self.scanner_model, "kvp": num(self.kvp, 1), "mas": num(self.mas, 1),
            "ctdivol": num(self.ctdivol, 2), "field_strength": num(self.field_strength, 2),
            "model": self.model, "backend": self.backend,
            "elapsed_ms": "" if self.elapsed_ms is None else f"{self.elapsed_ms:.0f}",
        }
        return {k: escape_cell(v) for k, v in row.items()}

    @classmethod
    def from_row(cls, row: dict[str, str]) -> "ScoreRecord":
        """Inverse of ``to_row`` (escaped cells stay escaped; used to carry rows over on resume)."""

        def f(k: str) -> float | None:
            v = row.get(k, "")
            try:
                return float(v) if v != "" else None
            except ValueError:
                return None

        def lst(k: str, typ: Callable[[str], Any]) -> list:
            v = row.get(k, "")
            return [typ(x) for x in v.split(";")] if v else []

        n = row.get("n_slices", "")
        return cls(
            study_id=row.get("study_id", ""), path=row.get("path", ""), kind=row.get("kind", ""),
            status=row.get("status", ""), error_code=row.get("error_code", ""),
            error=row.get("error", ""), score=f("score"), modality=row.get("modality", ""),
            region=row.get("region", ""), type=row.get("type", ""),
            prompt_source=row.get("prompt_source", ""), n_slices=int(n) if n.isdigit() else None,
            salient_slices=lst("salient_slices", int), slice_scores=lst("slice_scores", float),
            slice_weights=lst("slice_weights", float), flags=lst("flags", str),
            manufacturer=row.get("manufacturer", ""), scanner_model=row.get("scanner_model", ""),
            kvp=f("kvp"), mas=f("mas"), ctdivol=f("ctdivol"), field_strength=f("field_strength"),
            model=row.get("model", ""), backend=row.get("backend", ""), elapsed_ms=f("elapsed_ms"),
        )


# --------------------------------------------------------------------------------------------
# Small pure helpers
# --------------------------------------------------------------------------------------------

def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file (the model hash that ``--resume`` compares)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def study_fingerprint(ref: Any, key: bytes | None = None) -> str:
    """Keyed hash of (relative path, size and mtime of every file, series UID).

    Changes when a file is added, removed, rewritten or touched; contains no path in clear.
    """
    h = hashlib.blake2b(key=(key or b"")[:64], digest_size=16)
    h.update(ref.rel_path.encode("utf-8", "surrogateescape"))
    h.update(b"\0" + (ref.series_uid or "").encode())
    for p in ref.files:
        try:
            st = os.stat(p)
            h.update(f"\0{Path(p).name}\0{st.st_size}\0{st.st_mtime_ns}".encode("utf-8", "surrogateescape"))
        except OSError:
            h.update(b"\0missing")
    return h.hexdigest()


def scanner_fields(meta: dict[str, Any]) -> dict[str, Any]:
    """Scanner and protocol columns from whitelisted meta (numbers already validated floats)."""

    def num(k: str) -> float | None:
        v = meta.get(k)
        return float(v) if isinstance(v, (int, float)) and np.isfinite(v) else None

    mas = num("Exposure")
    if mas is None:
        cur, t = num("XRayTubeCurrent"), num("ExposureTime")  # mA, ms
        if cur is not None and t is not None:
            mas = cur * t / 1000.0
    fs = num("MagneticFieldStrength")
    if fs is not None and fs > 100:  # gauss
        fs = fs / 10000.0
    return {
        "manufacturer": str(meta.get("Manufacturer", "") or "")[:64],
        "scanner_model": str(meta.get("ManufacturerModelName", "") or "")[:64],
        "kvp": num("KVP"), "mas": mas, "ctdivol": num("CTDIvol"), "field_strength": fs,
    }


def window_tags(meta: dict[str, Any]) -> tuple[float, float] | None:
    """(width, centre) from the series' window tags when both are usable numbers."""
    w, c = meta.get("WindowWidth"), meta.get("WindowCenter")
    if isinstance(w, (list, tuple)):
        w = w[0] if w else None
    if isinstance(c, (list, tuple)):
        c = c[0] if c else None
    try:
        wf, cf = float(w), float(c)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return (wf, cf) if np.isfinite(wf) and np.isfinite(cf) and wf > 1 else None


HU_AIR_BAND = (-1100.0, -900.0)   # air (−1000) and the usual −1024 padding outside the FOV
HU_AIR_SHARE = 0.10


def looks_like_hu(img: np.ndarray) -> bool:
    """True for a 2D slice in Hounsfield units: at least ``HU_AIR_SHARE`` of its pixels in the
    air band and nothing above 5000. MR magnitudes (≥ 0), z-scored images (|x| of a few units)
    and phase maps (spread evenly over ±4096: ~2 % in the band) fail it."""
    x = np.asarray(img, dtype=np.float32)
    if x.ndim != 2 or x.size == 0:
        return False
    x = x[:: max(1, x.shape[0] // 128), :: max(1, x.shape[1] // 128)]
    x = x[np.isfinite(x)]
    if x.size == 0 or float(x.max()) > 5000.0:
        return False
    lo, hi = HU_AIR_BAND
    return float(np.count_nonzero((x >= lo) & (x <= hi))) / x.size >= HU_AIR_SHARE


def in_plane_spacing(src: Any, meta: dict[str, Any], flags: list[str]) -> tuple[float, float] | None:
    """(row, col) pixel spacing in mm of an opened study, or None when unknown: DICOM
    PixelSpacing / ImagerPixelSpacing from the header, else the reader's in-plane spacing (NIfTI
    zooms, enhanced-DICOM functional groups) unless it flagged the spacing unknown; plain images
    have none."""
    for tag in ("PixelSpacing", "ImagerPixelSpacing"):
        pix = usable_pixel_mm(meta.get(tag))
        if pix is not None:
            return pix
    spacing = getattr(src, "spacing", None)
    if spacing is None or "spacing_unknown" in flags or len(spacing) < 3:
        return None
    return usable_pixel_mm(spacing[1:3])


def thumbnail_png(img: np.ndarray, modality: str | None, ptype: str | None,
                  cfg: PreprocessConfig, wtags: tuple[float, float] | None = None,
                  size: int = THUMB_SIZE, pixel_mm: tuple[float, float] | None = None) -> bytes:
    """A small 8-bit PNG of one slice as the model sees it (same window / min-max, and the same
    physical resampling of CT when the card sets ``ct_pixel_mm``)."""
    from PIL import Image

    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    unit = to_unit_range(img, modality, ptype, cfg, wtags)
    small = to_network_size(unit, modality, cfg, pixel_mm, size)
    arr = (np.clip(small, 0, 1) * 255 + 0.5).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def scrub_paths(text: str, ref: Any) -> str:
    """Remove the study's absolute / relative paths and file names from a message."""
    out = text
    cands = {str(ref.root), ref.rel_path, ref.rel_path.split("#")[0]}
    for p in ref.files:
        cands.update({str(p), Path(p).name})
    for c in sorted((c for c in cands if c and len(c) > 2), key=len, reverse=True):
        out = out.replace(c, "<path>")
    return out


def safe_error_message(exc: BaseException, ref: Any | None = None) -> str:
    """A message fit for the report: MediqaError messages (written to be PHI-free), else the type."""
    msg = exc.message if isinstance(exc, MediqaError) else type(exc).__name__
    msg = " ".join(str(msg).split())[:300]
    return scrub_paths(msg, ref) if ref is not None else msg


#: Extra study openers registered by plugins: (predicate on the StudyRef, opener → SliceSource).
_OPENERS: list[tuple[Callable[[Any], bool], Callable[[Any], Any]]] = []


def register_opener(match: Callable[[Any], bool], opener: Callable[[Any], Any]) -> None:
    """Let a plugin open some studies itself (checked before ``engines.io.discover.open_study``).

    ``match(ref) -> bool`` picks the studies; ``opener(ref)`` returns a ``SliceSource``. Call it
    from a plugin hook so that it runs in every worker process.
    """
    _OPENERS.append((match, opener))


def _open(ref: Any) -> Any:
    from engines.io.discover import open_study

    for match, opener in _OPENERS:
        if match(ref):
            return opener(ref)
    return open_study(ref)


def run_plugins(names: Sequence[str]) -> None:
    """Import and call ``module:function`` hooks (config first, then ``MEDIQA_PLUGINS``)."""
    env = [s.strip() for s in os.environ.get(PLUGINS_ENV, "").split(",") if s.strip()]
    for spec in list(names) + env:
        mod, _, fn = spec.partition(":")
        getattr(importlib.import_module(mod), fn or "register")()


# --------------------------------------------------------------------------------------------
# Worker side: everything a worker process does for one study
# --------------------------------------------------------------------------------------------

@dataclass
class _Prepared:
    """What a worker sends back for one study."""

    images: np.ndarray              # (n, 3, S, S) float32 preprocessed (n = 1 for 2D, K for 3D)
    indices: list[int]
    n_total: int
    n_decoded: int
    tag_prompts: dict[str, str | None]
    meta: dict[str, Any]
    flags: list[str]
    ptype_used: str | None
    raw: list[np.ndarray] | None    # the decoded slices, kept only when the CT window is undecided
    thumbs: list[bytes] | None
    elapsed_s: float = 0.0          # time the worker spent on this study
    pixel_mm: tuple[float, float] | None = None   # in-plane spacing (``in_plane_spacing``)
    stats: np.ndarray | None = None  # ``engines.features.input_statistics`` of ``images`` (when asked)


def prepare_study(ref: Any, cfg: PreprocessConfig, k: int, *, min_fraction: float = 0.05,
                  thumbnails: bool = False, compact_grey: bool = False,
                  statistics: Collection[str] = ()) -> _Prepared:
    """Read one study lazily, choose its salient slices and preprocess them (runs in a worker).

    ``compact_grey``: a grey study's images are (n, 1, S, S) (``preprocess_slice``'s
    ``compact_grey``): a third of the bytes to pickle and pipe, and no repeated channels to
    compute; the main process restores the three with the zero-copy ``grey_channels``.
    ``statistics``: the modalities whose feature head blends: a study of one of them, or one whose
    modality the tags leave open (the classifier decides later), also gets the input statistics
    of its images, measured here in the worker, off the engine's thread."""
    from engines.prompts import prompts_from_tags
    from engines.slices import select_salient_slices

    t0 = time.perf_counter()
    src = _open(ref)
    meta = dict(getattr(src, "meta", None) or ref.meta or {})
    flags = list(dict.fromkeys(list(ref.flags or []) + list(getattr(src, "flags", []) or [])))
    tags = dict(prompts_from_tags(meta, ref.kind))
    modality = tags.get("modality") or str(meta.get("Modality", "")).lower() or None
    n_total = len(src)
    if modality is None and ref.format == "nifti" and n_total >= 1:
        # NIfTI has no Modality tag. A volume in Hounsfield units (a large share of air near
        # −1000) is read as CT — HU salient-slice rule, CT window, ``ct_pixel_mm`` — as a DICOM
        # CT would be; the modality *prompt* still comes from the classifier. Flagged.
        if looks_like_hu(np.asarray(src.get_slice(n_total // 2))):
            modality = "ct"
            flags.append("hu_intensities")
    if ref.kind == "2d" or n_total == 1:
        slices, indices, n_decoded = [src.get_slice(0)], [0], 1
    else:
        sel = select_salient_slices(src, k, modality=modality, min_fraction=min_fraction)
        slices, indices, n_decoded = list(sel.slices), list(sel.indices), int(sel.n_decoded)
        flags += [f for f in getattr(sel, "flags", []) if f not in flags]
    ptype = tags.get("type")
    wt = window_tags(meta)
    pix = in_plane_spacing(src, meta, flags)
    per_slice = [preprocess_slice(np.asarray(s), modality, ptype, cfg, wt, compact_grey=compact_grey,
                                  pixel_mm=pix)
                 for s in slices]
    if len({a.shape[0] for a in per_slice}) > 1:   # grey and RGB slices in one study
        per_slice = [grey_channels(a[None])[0] for a in per_slice]
    images = np.stack(per_slice)
    undecided_ct = (modality == "ct" and not ptype)
    thumbs = ([thumbnail_png(np.asarray(s), modality, ptype, cfg, wt, pixel_mm=pix) for s in slices]
              if thumbnails else None)
    images = images.astype(np.float32, copy=False)
    return _Prepared(images=images, indices=indices,
                     n_total=n_total, n_decoded=n_decoded, tag_prompts=tags, meta=meta,
                     flags=flags, ptype_used=ptype,
                     raw=[np.asarray(s, dtype=np.float32) for s in slices] if undecided_ct else None,
                     thumbs=thumbs, elapsed_s=time.perf_counter() - t0, pixel_mm=pix,
                     stats=(statistics_or_none(images, cfg.mean, cfg.std)
                            if statistics and (tags.get("modality") is None or tags["modality"] in statistics)
                            else None))


def _lower_priority(nice: int) -> None:
    """Lower the calling process's CPU priority for reading: ``nice`` ≥ 20 asks for Linux's
    SCHED_IDLE class (runs only on otherwise idle CPU time), 1..19 adds that much niceness,
    0 leaves it alone. Not permitted / not available → normal priority, logged at debug."""
    if nice <= 0:
        return
    try:
        if nice >= 20 and hasattr(os, "SCHED_IDLE"):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            return
        os.setpriority(os.PRIO_PROCESS, 0, min(19, os.getpriority(os.PRIO_PROCESS, 0) + nice))
    except (AttributeError, OSError):
        logger.debug("could not lower the reader priority", exc_info=True)


def _quiet_child(log_level: int) -> None:
    """Logging in a child process: warnings and up, PHI scrubbed, pydicom's value echoes off."""
    import warnings

    logging.basicConfig(level=max(log_level, logging.WARNING))
    # pydicom warnings can echo raw tag values (PHI); they never reach a log from a child.
    warnings.simplefilter("ignore")
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    try:
        from engines.privacy import install_log_scrubber  # type: ignore[attr-defined]
        install_log_scrubber()
    except Exception:  # noqa: BLE001 - optional helper
        pass


def _scanner_main(conn: mpc.Connection, root: str, max_depth: int, include: tuple[str, ...],
                  exclude: tuple[str, ...], nice: int, log_level: int, ahead: int,
                  header_cache: str | None = None) -> None:
    """Header-scanner process: walks ``root`` with ``discover_studies`` and sends
    ("ref", StudyRef) ... ("end", header-cache stats or None), or ("error", exception). Up to ``ahead`` refs are
    scanned ahead of the consumer (a sender thread does the blocking sends)."""
    from engines.io.discover import discover_studies

    _lower_priority(nice)
    _quiet_child(log_level)
    out: queue.Queue = queue.Queue(maxsize=max(1, ahead))

    def sender() -> None:
        while True:
            msg = out.get()
            try:
                try:
                    conn.send(msg)
                except (EOFError, OSError):
                    raise
                except Exception as exc:  # noqa: BLE001 - e.g. an error object that won't pickle
                    # Nothing was written (pickling comes first): pass the study on as failed.
                    if msg[0] != "ref":
                        raise
                    ref = msg[1]
                    ref.error = MediqaError(f"study reference could not be passed on "
                                            f"({type(exc).__name__})", code="internal")
                    ref.meta, ref._slices = {}, None
                    conn.send(msg)
            except (EOFError, OSError):
                os._exit(0)   # the consumer is gone
            if msg[0] != "ref":
                return

    t = threading.Thread(target=sender, name="mediqa-scan-sender", daemon=True)
    t.start()
    cache = None
    try:
        if header_cache:
            from engines.io.header_cache import HeaderCache

            cache = HeaderCache(header_cache)
        for ref in discover_studies(root, max_depth=max_depth, include=include, exclude=exclude,
                                    header_cache=cache):
            out.put(("ref", ref))
        stats = None
        if cache is not None:
            cache.close()
            stats = {"path": str(cache.path), "hits": cache.hits, "misses": cache.misses}
        out.put(("end", stats))
    except MediqaError as exc:
        out.put(("error", exc))
    except BaseException as exc:  # noqa: BLE001 - reported to the consumer
        out.put(("error", MediqaError(f"scanning the root failed ({type(exc).__name__})",
                                      code="internal")))
    t.join()


class _RefSource:
    """The study references, scanned in their own process: header parsing runs in parallel
    with reading and inference and never holds the main process's GIL."""

    def __init__(self, ctx: Any, root: Path, cfg: "ScoreConfig", log_level: int, ahead: int = 64) -> None:
        self.conn, child = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=_scanner_main, name="mediqa-scanner", daemon=True,
                                args=(child, str(root), cfg.max_depth, tuple(cfg.include),
                                      tuple(cfg.exclude), cfg.reader_nice, log_level, ahead,
                                      cfg.header_cache))
        self.proc.start()
        child.close()
        self.done = False

    def take(self) -> Any | None:
        """The next ``StudyRef``; None when none is ready yet; ``StopIteration`` at the end."""
        if self.done:
            raise StopIteration
        if not self.conn.poll():
            if not self.proc.is_alive() and not self.conn.poll():
                self.done = True
                raise MediqaError("the header-scanner process died", code="internal")
            return None
        try:
            kind, payload = self.conn.recv()
        except (EOFError, OSError):
            self.done = True
            raise MediqaError("the header-scanner process died", code="internal") from None
        if kind == "ref":
            return payload
        self.done = True
        if kind == "error":
            raise payload
        if payload:
            logger.info("header cache %s: %d files served from it, %d parsed", payload["path"],
                        payload["hits"], payload["misses"])
        raise StopIteration

    def close(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()


def _warm_imports(statistics: bool = False) -> None:
    """Import what nearly every study needs before the first one arrives: a fresh reader spends
    ~0.4 core-s importing pydicom and Pillow, and it would otherwise do so on the first study,
    while the engine waits (the header scanner is busy with the first series meanwhile).
    Imported when first used instead: nibabel (NIfTI) and scikit-image's Otsu threshold (only
    non-CT volumes need it; importing it, with SciPy's ndimage, costs each reader another ~0.4
    core-s, taken from the engine on a busy machine, for CT-only or 2D-only archives for nothing).
    ``statistics``: the readers measure the feature head's statistics, so its modules (SciPy's
    ndimage, scikit-image's wavelet noise estimate) are needed anyway."""
    import importlib

    names = ["pydicom", "pydicom.pixels", "PIL.Image", "PIL.PngImagePlugin", "PIL.JpegImagePlugin"]
    if statistics:
        names += ["scipy.ndimage", "skimage.restoration"]
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a missing optional module is imported (and reported) when used
            logger.debug("warm import of %s failed", name, exc_info=True)


def _worker_main(conn: mpc.Connection, plugins: tuple[str, ...], cfg_dict: dict, k: int,
                 min_fraction: float, thumbnails: bool, log_level: int, nice: int = 0,
                 statistics: tuple[str, ...] = ()) -> None:
    """Worker process loop: receive (seq, ref), send (seq, ok, payload)."""
    _lower_priority(nice)
    _quiet_child(log_level)
    cfg = PreprocessConfig.from_dict(cfg_dict)
    run_plugins(plugins)
    _warm_imports(bool(statistics))
    try:
        conn.send(_READY)   # the study clock starts now, not at spawn (see _Worker.deadline)
    except (EOFError, OSError, BrokenPipeError):
        return
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        seq, ref = msg
        try:
            prep = prepare_study(ref, cfg, k, min_fraction=min_fraction, thumbnails=thumbnails,
                                 compact_grey=True, statistics=statistics)
            out: tuple = (seq, True, prep)
        except BaseException as exc:  # noqa: BLE001 - per-study boundary
            out = (seq, False, (error_code(exc), safe_error_message(exc, ref)))
        try:
            conn.send(out)
        except (EOFError, OSError, BrokenPipeError):
            return


_READY = "ready"          # a reader's first message: imports done, studies can be timed
STARTUP_LIMIT_S = 60.0    # a reader that is not ready after this long counts as stuck
MAX_STARTUP_FAILURES = 3  # readers dying before they are ready more often: the run stops with an error


class _Worker:
    """One killable reader process with a duplex pipe and its queue of assigned studies.

    ``started``: when the current study's clock started (assignment, or the worker's ready
    message when it came later). Until the ready message, the limit is ``STARTUP_LIMIT_S``:
    spawning and importing (a second or more on a loaded machine or a cold disk) must not eat
    the first study's time limit."""

    def __init__(self, ctx: Any, args: tuple) -> None:
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child,) + args, daemon=True)
        self.proc.start()
        child.close()
        self.tasks: deque[tuple[int, Any]] = deque()
        self.started = time.monotonic()
        self.ready = False

    def deadline(self, timeout_s: float) -> float:
        return self.started + (timeout_s if self.ready else max(timeout_s, STARTUP_LIMIT_S))

    def kill(self) -> None:
        try:
            self.proc.kill()
        except Exception:  # noqa: BLE001
            pass
        self.proc.join(5)
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except Exception:  # noqa: BLE001
            pass
        self.proc.join(2)
        if self.proc.is_alive():
            self.kill()
        else:
            self.conn.close()


# --------------------------------------------------------------------------------------------
# Main side
# --------------------------------------------------------------------------------------------

@dataclass
class _Study:
    seq: int
    ref: Any
    t0: float
    record: ScoreRecord
    prep: _Prepared | None = None
    scores: np.ndarray | None = None
    logits: np.ndarray | None = None
    remaining: int = 0
    done: bool = False
    busy_s: float = 0.0   # worker time + this study's share of inference time
    stats: np.ndarray | None = None   # input statistics for the feature head (its modality blends)


_DONE = object()


class _Feeder(threading.Thread):
    """Walks the discovery generator and drives the worker processes; posts events to ``out``.

    Events: ("new", seq, ref) when a study enters the pipeline, ("ready", seq, prepared),
    ("fail", seq, (code, message)), ("reuse", seq, record) and finally _DONE.
    """

    def __init__(self, root: Path, cfg: ScoreConfig, worker_args: tuple,
                 emitted: Callable[[], int], reuse: Callable[[Any], ScoreRecord | None] | None,
                 log_level: int) -> None:
        super().__init__(name="mediqa-feeder", daemon=True)
        self.root, self.cfg, self.worker_args, self.log_level = root, cfg, worker_args, log_level
        self.emitted, self.reuse = emitted, reuse
        self.out: queue.Queue = queue.Queue()
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.ctx = mp.get_context("spawn")
        self.n_workers = max(1, cfg.workers)
        self.window = cfg.window or (4 * self.n_workers + 2 * cfg.batch_size)
        self.timeouts = 0
        self.restarts = 0
        self.startup_failures = 0
        self.in_flight = 0

    def run(self) -> None:
        workers: list[_Worker] = []
        source: _RefSource | None = None
        try:
            source = _RefSource(self.ctx, self.root, self.cfg, self.log_level)
            workers = [_Worker(self.ctx, self.worker_args) for _ in range(self.n_workers)]
            self._loop(workers, source)
        except BaseException as exc:  # noqa: BLE001 - reported to the consumer
            self.error = exc
        finally:
            if source is not None:
                source.close()
            for w in workers:
                if w.tasks:
                    w.kill()
                else:
                    w.stop()
            self.out.put(_DONE)

    def _loop(self, workers: list[_Worker], source: _RefSource) -> None:
        seq = 0
        exhausted = False
        retry: deque[tuple[int, Any]] = deque()
        depth = 2
        while not self.stop_event.is_set():
            # Hand out studies while the reorder window allows.
            for w in workers:
                while len(w.tasks) < depth and (retry or not exhausted):
                    if not retry and seq - self.emitted() >= self.window:
                        break
                    if retry:
                        item = retry.popleft()
                    else:
                        try:
                            ref = source.take()
                        except StopIteration:
                            exhausted = True
                            break
                        if ref is None:   # the scanner has nothing ready yet
                            break
                        item = (seq, ref)
                        seq += 1
                        self.out.put(("new", item[0], ref))
                        prev = self.reuse(ref) if self.reuse is not None else None
                        if prev is not None:
                            self.out.put(("reuse", item[0], prev))
                            continue
                        if getattr(ref, "error", None) is not None:
                            self.out.put(("scanfail", item[0], ref.error))
                            continue
                    if not w.tasks:
                        w.started = time.monotonic()
                    w.tasks.append(item)
                    w.conn.send(item)
            busy = [w for w in workers if w.tasks]
            starting = [w for w in workers if not w.ready and not w.tasks]
            # A scanner still walking the tree counts only once it has studies ready: while it is
            # busy (a huge folder), the consumer may run the partial batch it already holds.
            self.in_flight = (sum(len(w.tasks) for w in busy) + len(retry)
                              + (1 if not exhausted and source.conn.poll() else 0))
            if exhausted and not busy and not retry:
                return
            # Wait for a worker's result, or for the scanner when a study could be handed out.
            want_ref = (not exhausted and seq - self.emitted() < self.window
                        and any(len(w.tasks) < depth for w in workers))
            waitables = ([w.conn for w in busy] + [w.conn for w in starting]
                         + ([source.conn] if want_ref else []))
            if not waitables:
                # Window full of studies waiting for inference: let the consumer catch up.
                time.sleep(0.005)
                continue
            now = time.monotonic()
            wait_s = min([w.deadline(self.cfg.timeout_s) for w in busy], default=now + 0.25) - now
            ready = mpc.wait(waitables, timeout=min(max(0.0, wait_s), 0.25))
            for w in busy + starting:
                if w.conn in ready:
                    try:
                        msg = w.conn.recv()
                    except (EOFError, OSError):
                        if not w.ready:   # died while starting: no study is to blame
                            self.startup_failures += 1
                            if self.startup_failures > MAX_STARTUP_FAILURES:
                                raise MediqaError("reader processes die while starting (see the "
                                                  "log of a run with --verbose)", code="internal")
                            self._replace(workers, w, retry)
                            continue
                        # The process died (e.g. killed by the OOM killer): its current study fails.
                        self._replace(workers, w, retry, code="internal",
                                      message="reader process died")
                        continue
                    if msg == _READY:
                        w.ready = True
                        w.started = time.monotonic()
                        continue
                    s, ok, payload = msg
                    w.tasks.popleft()
                    w.started = time.monotonic()
                    self.out.put(("ready" if ok else "fail", s, payload))
            now = time.monotonic()
            for w in list(workers):
                if w.tasks and now > w.deadline(self.cfg.timeout_s):
                    self.timeouts += 1
                    self._replace(workers, w, retry, code="timeout",
                                  message=(f"reading took longer than {self.cfg.timeout_s:g} s; "
                                           "the reader process was killed") if w.ready else
                                  f"the reader process did not start within {STARTUP_LIMIT_S:g} s")

    def _replace(self, workers: list[_Worker], w: _Worker, retry: deque, *, code: str | None = None,
                 message: str = "") -> None:
        """Kill ``w`` and start another reader. With ``code`` its current study fails with it;
        without (a reader that died while starting) every study it held is retried."""
        failed = w.tasks.popleft() if code is not None else None
        others = list(w.tasks)
        w.tasks.clear()
        w.kill()
        self.restarts += 1
        workers[workers.index(w)] = _Worker(self.ctx, self.worker_args)
        retry.extendleft(reversed(others))
        if failed is not None:
            self.out.put(("fail", failed[0], (code, message)))


def _classifier_prompts_row(out: dict[str, np.ndarray], j: int, vocab: PromptVocab) -> dict[str, str]:
    """Argmax label per group for row ``j`` of the classifier's logits."""
    res: dict[str, str] = {}
    for g in ("modality", "region", "type"):
        if g in out:
            logits = np.asarray(out[g], dtype=np.float64)
            logits = logits.reshape(logits.shape[0], -1)[j]
            labels = vocab.labels(g)
            res[g] = labels[int(np.argmax(logits))] if len(labels) == logits.size else "other"
    return res


def score_studies(root: str | os.PathLike[str], backend_or_model_path: Any,
                  config: ScoreConfig = ScoreConfig(), *,
                  reuse: Callable[[Any], ScoreRecord | None] | None = None,
                  log_level: int | None = None, model_hash: str | None = None) -> Iterator[ScoreRecord]:
    """Score every study under ``root``; yields one ``ScoreRecord`` per study in discovery order.

    backend_or_model_path: an open ``Backend`` (left open) or a model file (opened with
        ``open_backend(path, backend=config.backend, device=config.device)`` and closed at the end).
    reuse: called in discovery order with each ``StudyRef``; returns a previous record to emit
        unchanged (``record.reused`` set) or None to score the study (``--resume``).
    model_hash: the model file's sha256 when the caller has it already (the records' ``model``
        column is ``preset@hash[:12]``); None: computed here.
    Per-study problems become error records; only setup problems (no model, unreadable root)
    raise.
    """
    from engines.privacy import study_id as make_study_id
    from engines.privacy import study_key

    root = Path(root).resolve()
    if not root.is_dir():
        raise MediqaError(f"scan root is not a directory: {root}", code="config")
    try:
        tta_suffix(config.tta)   # an unknown mode fails here, before any work
    except ValueError as exc:
        raise MediqaError(str(exc), code="config") from None
    run_plugins(config.plugins)
    if config.privacy_key is None:
        config = config.replace(privacy_key=study_key())

    opened: list[Any] = []   # the backend this call opened itself (closed at the end)
    if not hasattr(backend_or_model_path, "score"):
        from engines.artifact import load_card
        from engines.backends.auto import open_backend

        model_path: Any = Path(backend_or_model_path)
        # The card alone (no weights): _run starts the scanner and readers, which spawn and
        # import, and only then calls get_backend to load the model.
        card = load_card(model_path)

        def get_backend() -> Any:
            # spin=False: onnxruntime's idle threads would spin on the cores the readers need.
            opened.append(with_tta(open_backend(model_path, backend=config.backend, device=config.device,
                                                spin=False), config.tta))
            return opened[0]
    else:
        card = backend_or_model_path.card
        model_path = getattr(backend_or_model_path, "path", None)

        def get_backend() -> Any:
            # A TTABackend around a caller's backend is not closed (closing it would close theirs).
            return with_tta(backend_or_model_path, config.tta)
    try:
        if model_hash is None:   # the CLI passes the hash it computed for --resume (one read of the model)
            model_hash = file_sha256(model_path) if model_path and Path(model_path).is_file() else ""
        label_suffix = tta_suffix(effective_mode(config.tta, card)) + features_suffix(card, config.features)
        head = card_feature_head(card, config.features)
        model_label = (f"{card.preset}@{model_hash[:12]}" if model_hash else str(card.preset)) + label_suffix
        pcfg = PreprocessConfig.from_dict(card.preprocess) if card.preprocess else PreprocessConfig()
        vocab = PromptVocab.from_dict(card.prompt_vocab) if card.prompt_vocab else PromptVocab()
        k = int(getattr(card, "n_slices", 7) or 7)
        lo, hi = card.label_range()
        yield from _run(root, get_backend, config, reuse, make_study_id, pcfg, vocab,
                        k, lo, hi, model_label, head,
                        logging.getLogger().getEffectiveLevel() if log_level is None else log_level)
    finally:
        for backend in opened:
            try:
                backend.__exit__(None, None, None)
            except Exception:  # noqa: BLE001
                logger.debug("closing the backend failed", exc_info=True)


def _run(root: Path, get_backend: Callable[[], Any], config: ScoreConfig, reuse: Any,
         make_study_id: Any, pcfg: PreprocessConfig, vocab: PromptVocab, k: int, lo: float,
         hi: float, model_label: str, head: Any, log_level: int) -> Iterator[ScoreRecord]:
    from engines.prompts import Prompt, encode_prompt

    state: dict[int, _Study] = {}
    next_emit = 0
    worker_args = (tuple(config.plugins), pcfg.to_dict(), k, config.min_fraction,
                   config.thumbnails, log_level, config.reader_nice,
                   head.blending if head is not None else ())
    feeder = _Feeder(root, config, worker_args, lambda: next_emit, reuse, log_level)
    items: deque[tuple[int, int, np.ndarray, np.ndarray]] = deque()   # (seq, slice i, image, prompt)
    to_classify: deque[int] = deque()
    feeder.start()
    finished_feeding = False
    try:
        backend = get_backend()   # opened after the feeder started: model load and reader start overlap
    except BaseException:
        feeder.stop_event.set()
        feeder.join(10)
        raise
    backend_name = str(getattr(backend, "name", type(backend).__name__))

    def sid(ref: Any) -> str:
        # Series split by orientation / echo share a UID: the "#n" suffix keeps their ids apart;
        # the later parts of a series spread over several folders add their folder.
        if ref.series_uid and "series_split_across_folders" in (ref.flags or []):
            key_src = f"{ref.series_uid}@{ref.rel_path}"
        elif ref.series_uid and "#" in ref.rel_path:
            key_src = ref.series_uid + ref.rel_path[ref.rel_path.rfind("#"):]
        else:
            key_src = ref.series_uid or ref.rel_path
        return make_study_id(key_src, key=config.privacy_key)

    def fail(st: _Study, code: str, message: str) -> None:
        st.record.status, st.record.error_code = "error", code
        st.record.error = scrub_paths(message, st.ref)
        st.done = True

    def finish_prompt(st: _Study, cls: dict[str, str] | None) -> None:
        p = st.prep
        assert p is not None
        values: dict[str, str] = {"dimension": st.ref.kind}
        sources: dict[str, str] = {}
        for g in ("modality", "region", "type"):
            t = p.tag_prompts.get(g)
            if t:
                values[g], sources[g] = t, "tags"
            elif cls is not None and g in cls:
                values[g], sources[g] = cls[g], "classifier"
            else:
                values[g], sources[g] = "other", "default"
        kinds = set(sources.values())
        st.record.prompt_source = kinds.pop() if len(kinds) == 1 else "mixed"
        st.record.modality, st.record.region, st.record.type = values["modality"], values["region"], values["type"]
        images = p.images
        if (p.raw is not None and values["modality"] == "ct" and values["type"] != p.ptype_used
                and values["type"] in pcfg.ct_windows):
            # The classifier chose a CT type with its own window: redo the window on the raw slices.
            images = np.stack([preprocess_slice(r, "ct", values["type"], pcfg, window_tags(p.meta),
                                                pixel_mm=p.pixel_mm)
                               for r in p.raw])
        prompt = encode_prompt(Prompt(**values), vocab)
        if head is not None and head.blend_for(values["modality"]) > 0:
            # measured by the reader on the images it sent; again here after a re-window (or if
            # the reader could not); still none: the network's score alone, flagged
            st.stats = p.stats if images is p.images and p.stats is not None \
                else statistics_or_none(images, pcfg.mean, pcfg.std)
            if st.stats is None:
                st.record.flags.append("features_unavailable")
        st.scores = np.zeros(len(images), np.float64)
        st.logits = np.zeros(len(images), np.float64)
        st.remaining = len(images)
        for i in range(len(images)):
            items.append((st.seq, i, images[i], prompt))
        p.raw = None

    def run_classifier(force: bool) -> None:
        """One classifier call for up to ``batch_size`` studies: each contributes its middle
        salient slice (the image itself for 2D)."""
        while to_classify and (len(to_classify) >= config.batch_size or force):
            batch = [to_classify.popleft() for _ in range(min(config.batch_size, len(to_classify)))]
            batch = [s for s in batch if s in state and not state[s].done]
            if not batch:
                continue
            imgs = np.stack([state[s].prep.images[len(state[s].prep.images) // 2]  # type: ignore[union-attr]
                             for s in batch]).astype(np.float32, copy=False)
            try:
                out = backend.classify(imgs)
                per: list[dict[str, str] | None] = [None] * len(batch)
                if out is not None:
                    for j in range(len(batch)):
                        per[j] = _classifier_prompts_row(out, j, vocab)
            except Exception as exc:  # noqa: BLE001 - these studies fail, the run goes on
                for s in batch:
                    fail(state[s], error_code(exc), safe_error_message(exc, state[s].ref))
                continue
            for j, s in enumerate(batch):
                try:
                    finish_prompt(state[s], per[j])
                except Exception as exc:  # noqa: BLE001 - per-study boundary
                    fail(state[s], error_code(exc), safe_error_message(exc, state[s].ref))

    def run_batch(force: bool) -> None:
        while len(items) >= config.batch_size or (force and items):
            n = min(config.batch_size, len(items))
            chunk = [items.popleft() for _ in range(n)]
            imgs = np.stack([c[2] for c in chunk]).astype(np.float32, copy=False)
            prm = np.stack([c[3] for c in chunk]).astype(np.float32, copy=False)
            tb = time.perf_counter()
            try:
                out = backend.score(imgs, prm)
                sc = np.asarray(out["score"], dtype=np.float64).reshape(-1)
                lg = np.asarray(out["slice_logit"], dtype=np.float64).reshape(-1)
                if sc.size != n or lg.size != n:
                    raise MediqaError(f"backend returned {sc.size} scores for {n} inputs", code="internal")
            except Exception as exc:  # noqa: BLE001 - the batch's studies fail, the run goes on
                logger.error("inference failed on a batch of %d: %s", n, type(exc).__name__)
                for s in {c[0] for c in chunk}:
                    if s in state and not state[s].done:
                        fail(state[s], error_code(exc), safe_error_message(exc, state[s].ref))
                continue
            share = (time.perf_counter() - tb) / n
            for j, (s, i, _, _) in enumerate(chunk):
                st = state.get(s)
                if st is None or st.done:
                    continue
                st.busy_s += share
                st.scores[i], st.logits[i] = sc[j], lg[j]  # type: ignore[index]
                st.remaining -= 1
                if st.remaining == 0:
                    complete(st)

    def complete(st: _Study) -> None:
        p, r = st.prep, st.record
        assert p is not None and st.scores is not None and st.logits is not None
        try:
            if st.ref.kind == "3d" and len(st.scores) > 1:
                q, w = fuse_slice_scores(st.scores, st.logits)
            else:
                q, w = float(st.scores[0]), np.ones(len(st.scores), np.float32)
            if st.stats is not None:
                q = float(head.apply(q, st.stats, r.modality))
            r.score = lo + q * (hi - lo)
            r.slice_scores = [lo + float(s) * (hi - lo) for s in st.scores]
            r.slice_weights = [float(x) for x in w]
            if not np.isfinite(r.score):
                raise MediqaError("the model returned a non-finite score", code="internal")
        except Exception as exc:  # noqa: BLE001
            fail(st, error_code(exc), safe_error_message(exc, st.ref))
            return
        st.done = True

    def on_event(ev: Any) -> None:
        nonlocal finished_feeding
        if ev is _DONE:
            finished_feeding = True
            return
        kind, s, payload = ev
        if kind == "new":
            ref = payload
            rec = ScoreRecord(study_id=sid(ref), path=ref.rel_path, kind=ref.kind,
                              model=model_label, backend=backend_name, flags=list(ref.flags or []),
                              n_files=len(ref.files or []))
            rec.fingerprint = study_fingerprint(ref, config.privacy_key)
            rec.__dict__.update({k2: v for k2, v in scanner_fields(ref.meta or {}).items()})
            state[s] = _Study(seq=s, ref=ref, t0=time.monotonic(), record=rec)
            return
        st = state[s]
        if kind == "scanfail":
            fail(st, error_code(payload), safe_error_message(payload, st.ref))
        elif kind == "reuse":
            prev: ScoreRecord = payload
            prev.reused = True
            prev.fingerprint = st.record.fingerprint
            prev.path, prev.n_files = st.record.path, st.record.n_files
            st.record, st.done = prev, True
        elif kind == "fail":
            code, msg = payload
            fail(st, code, msg)
        elif kind == "ready":
            p: _Prepared = payload
            p.images = grey_channels(p.images)
            st.prep = p
            st.busy_s += p.elapsed_s
            r = st.record
            r.n_slices, r.n_decoded = p.n_total, p.n_decoded
            r.salient_slices = list(p.indices)
            r.flags = list(dict.fromkeys(r.flags + p.flags))
            r.__dict__.update(scanner_fields(p.meta))
            r.thumbnails = p.thumbs
            p.thumbs = None
            needs_cls = any(not p.tag_prompts.get(g) for g in ("modality", "region", "type"))
            if needs_cls:
                to_classify.append(s)
            else:
                try:
                    finish_prompt(st, None)
                except Exception as exc:  # noqa: BLE001
                    fail(st, error_code(exc), safe_error_message(exc, st.ref))

    try:
        while True:
            # Drain what the feeder produced; block briefly only when there is nothing to compute.
            try:
                # A full batch waiting: don't block. A partial one: wait for more arrivals rather
                # than spin (spinning stole a core from the readers and the engine).
                full = len(items) >= config.batch_size or len(to_classify) >= config.batch_size
                timeout = 0.0 if full else 0.05
                ev = feeder.out.get(timeout=timeout) if timeout else feeder.out.get_nowait()
                on_event(ev)
                while True:
                    on_event(feeder.out.get_nowait())
            except queue.Empty:
                pass
            # Partial batches only when no more work can arrive soon: keeps the engine's batches full.
            window_full = len(state) >= feeder.window
            starving = finished_feeding or window_full or (feeder.in_flight == 0 and feeder.out.empty())
            run_classifier(force=starving)
            run_batch(force=starving)
            while next_emit in state and state[next_emit].done:
                st = state.pop(next_emit)
                if not st.record.reused:
                    st.record.elapsed_ms = (st.busy_s or (time.monotonic() - st.t0)) * 1000.0
                next_emit += 1
                yield st.record
            if finished_feeding and not state:
                break
            if finished_feeding and not items and not to_classify and state:
                # Defensive: nothing can complete the remaining studies.
                for st in state.values():
                    if not st.done:
                        fail(st, "internal", "study was lost in the pipeline")
        if feeder.error is not None:
            raise feeder.error
        logger.debug("pipeline done: %d timeouts, %d worker restarts", feeder.timeouts, feeder.restarts)
    finally:
        feeder.stop_event.set()
        feeder.join(10)
