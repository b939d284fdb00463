"""Label sources for the three training tasks (paper §2.1, §2.3; DESIGN §7).

A *sample* is one study (a 2D image, a DICOM series, a NIfTI volume) resolved through
``engines.io.discover_studies`` exactly as scoring would find it, plus its label:

- **pretraining** — a physical acquisition parameter read from the study's DICOM tags
  (:func:`physical_target`): CT tube current-time product in mAs (``Exposure``, else
  ``XRayTubeCurrent`` [mA] × ``ExposureTime`` [ms] / 1000), MR ``MagneticFieldStrength`` in tesla
  (values above 100 are gauss and divided by 10 000). Both rise with image quality (less noise).
  Targets are normalised per modality by :class:`TargetNormaliser` (natural log, then min–max
  over the *training* split → [0, 1]; the constants go into the model card). Studies without a
  usable tag are skipped and counted by reason.
- **fine-tuning** — a manifest CSV ``path,score[,modality,region,type,...]`` (paths relative to
  the CSV; a DICOM series is its folder) or the LDCTIQA2023 layout (image files + one JSON object
  mapping file name → mean radiologist score 0–4, see :func:`ldctiqa_samples`).
- **prompt classifier** — modality / region / type from the DICOM tags
  (``engines.prompts.prompts_from_tags``) where they determine the group, else the manifest's
  columns; groups known from neither are left out of the loss.

Rows that point at a missing or unreadable file are reported, skipped and counted
(:class:`DatasetReport`); only an empty result is fatal (:class:`~engines.errors.DatasetError`).
Non-numeric scores are fatal and listed by CSV line number, since they mean the file is wrong.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from engines.errors import DatasetError, MediqaError, error_code

logger = logging.getLogger(__name__)

PROMPT_LABEL_GROUPS = ("modality", "region", "type")
#: Manifest columns, beyond ``path`` and ``score``, carried along for per-group evaluation.
EXTRA_COLUMNS = ("dimension", "split", "source_id", "degradation", "severity", "group", "patient",
                 "content")
#: File names of a directory's manifest.
MANIFEST_NAME = "manifest.csv"
#: LDCTIQA2023: every image is an abdominal CT slice from the low-dose CT grand challenge data.
LDCTIQA_PROMPT = {"modality": "ct", "region": "abdomen", "type": "soft"}
LDCTIQA_RANGE = (0.0, 4.0)
_IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".dcm", ".bmp")


@dataclass
class Sample:
    """One study and its labels.

    path:    as written in the manifest / relative to the data root (for reports).
    ref:     the ``engines.io.discover.StudyRef`` scoring would build for it.
    target:  the raw label (score in dataset units, or mAs / tesla for pretraining); None for
             classifier-only data.
    labels:  manifest prompt labels per group (None = not given).
    group:   non-identifying group key for splitting (sha256 hex of series UID / source id / path).
    split:   "train" / "val" / "test" when the manifest fixes it, else None.
    extra:   other manifest columns (degradation, severity, source_id, ...).
    line:    1-based CSV line (0 when not from a CSV).
    """

    path: str
    ref: Any
    target: float | None = None
    labels: dict[str, str | None] = field(default_factory=dict)
    group: str = ""
    split: str | None = None
    extra: dict[str, str] = field(default_factory=dict)
    line: int = 0
    modality_key: str | None = None   # pretraining: the modality whose normaliser applies

    @property
    def dimension(self) -> str:
        return "3d" if getattr(self.ref, "kind", "2d") == "3d" else "2d"


@dataclass
class DatasetReport:
    """What was found, used and skipped (with reasons). Rendered in logs, cards and the CLI."""

    source: str
    kind: str                               # "manifest" | "ldctiqa" | "directory"
    n_found: int = 0
    n_used: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (path, reason)

    def skip(self, path: str, reason: str) -> None:
        self.skipped.append((path, reason))
        logger.warning("skipping %s: %s", path, reason)

    @property
    def skipped_by_reason(self) -> dict[str, int]:
        return dict(Counter(r.split(":")[0] for _, r in self.skipped))

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "kind": self.kind, "found": self.n_found,
                "used": self.n_used, "skipped": len(self.skipped),
                "skipped_by_reason": self.skipped_by_reason}

    def summary(self) -> str:
        s = f"{self.n_used} of {self.n_found} studies used from {self.kind} {self.source}"
        if self.skipped:
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped_by_reason.items()))
            s += f"; {len(self.skipped)} skipped ({reasons})"
        return s


# --------------------------------------------------------------------------------------------
# Physical targets (pretraining)

class TargetUnavailable(ValueError):
    """The study has no usable physical-parameter tag; ``str(exc)`` is the reason."""


PHYSICAL_UNITS = {"ct": "mAs", "mr": "T"}


def _num(value: Any) -> float | None:
    if value is None or isinstance(value, (bytes, bytearray, str)) and not str(value).strip():
        return None
    if isinstance(value, (list, tuple)):
        if not value:
            return None
        value = value[0]
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def physical_target(meta: Mapping[str, Any]) -> tuple[str, float]:
    """(modality key, value) from whitelisted header tags: ("ct", mAs) or ("mr", tesla).

    CT: ``Exposure`` (mAs) when positive, else ``XRayTubeCurrent`` (mA) × ``ExposureTime`` (ms)
    / 1000. MR: ``MagneticFieldStrength`` in tesla; a value above 100 is read as gauss.
    Raises TargetUnavailable with the reason otherwise.
    """
    modality = str(meta.get("Modality") or "").strip().upper()
    if modality == "CT":
        exposure = _num(meta.get("Exposure"))
        if exposure is not None and exposure > 0:
            return "ct", exposure
        current, time_ms = _num(meta.get("XRayTubeCurrent")), _num(meta.get("ExposureTime"))
        if current is not None and time_ms is not None and current > 0 and time_ms > 0:
            return "ct", current * time_ms / 1000.0
        raise TargetUnavailable("no_exposure: CT without Exposure or XRayTubeCurrent x ExposureTime")
    if modality == "MR":
        b0 = _num(meta.get("MagneticFieldStrength"))
        if b0 is None or b0 <= 0:
            raise TargetUnavailable("no_field_strength: MR without a positive MagneticFieldStrength")
        return "mr", b0 / 10000.0 if b0 > 100.0 else b0
    raise TargetUnavailable(f"no_physical_target: modality {modality or 'unknown'} has no pretraining target")


@dataclass(frozen=True)
class TargetNormaliser:
    """Per-modality ``(ln v - lo) / (hi - lo)``, lo/hi = min/max of ln v over the training split.

    The log makes dose ratios (half dose, quarter dose) equal steps, as noise variance goes
    with 1/mAs. A modality whose training values are all equal maps to 0.5 (logged: it teaches
    nothing). Values outside the training range extrapolate linearly (no clipping).
    """

    ranges: Mapping[str, tuple[float, float]]

    @classmethod
    def fit(cls, pairs: Iterable[tuple[str, float]]) -> "TargetNormaliser":
        logs: dict[str, list[float]] = {}
        for mod, v in pairs:
            logs.setdefault(mod, []).append(math.log(v))
        ranges = {m: (min(x), max(x)) for m, x in logs.items()}
        for m, (lo, hi) in ranges.items():
            if hi - lo < 1e-9:
                logger.warning("pretraining: every %s study has the same %s; it carries no signal",
                               m, PHYSICAL_UNITS.get(m, "value"))
        return cls(ranges)

    def __call__(self, modality: str, value: float) -> float:
        if modality not in self.ranges:
            raise DatasetError(f"no normalisation range for modality {modality!r} (not in the training split)")
        lo, hi = self.ranges[modality]
        if hi - lo < 1e-9:
            return 0.5
        return (math.log(value) - lo) / (hi - lo)

    def to_dict(self) -> dict[str, Any]:
        return {"transform": "log-minmax", "ranges": {m: {"log_min": lo, "log_max": hi,
                                                          "unit": PHYSICAL_UNITS.get(m, "")}
                                                      for m, (lo, hi) in self.ranges.items()}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TargetNormaliser":
        return cls({m: (float(r["log_min"]), float(r["log_max"])) for m, r in d["ranges"].items()})


# --------------------------------------------------------------------------------------------
# Study resolution

def hash_key(key: str) -> str:
    """Non-identifying group key: sha256 hex of a UID / source id / path."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _discover(root: Path) -> list[Any]:
    from engines.io import discover_studies  # noqa: PLC0415 - heavy, imported when used

    return list(discover_studies(root))


class StudyIndex:
    """All studies under a root, found once, looked up by file or folder path."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.refs = _discover(self.root)
        self._by_file: dict[Path, Any] = {}
        for ref in self.refs:
            for f in ref.files:
                self._by_file[Path(f).resolve()] = ref

    def lookup(self, path: Path) -> Any:
        """The study at ``path`` (a file, or a folder holding one series). Raises DatasetError."""
        p = path.resolve()
        if p.is_file():
            ref = self._by_file.get(p)
            if ref is None:
                raise DatasetError("unsupported: not recognised as an image or DICOM file")
            return ref
        if p.is_dir():
            inside = [r for r in self.refs if r.files and all(_under(Path(f), p) for f in r.files)]
            good = [r for r in inside if r.error is None]
            if not inside:
                raise DatasetError("empty: no study in this folder")
            if not good:
                raise inside[0].error
            if len(good) > 1:
                logger.info("%s holds %d studies; using the one with most files", p.name, len(good))
            return max(good, key=lambda r: len(r.files))
        raise DatasetError("missing: no such file or folder")


def _under(f: Path, folder: Path) -> bool:
    try:
        f.resolve().relative_to(folder)
        return True
    except ValueError:
        return False


def _check_ref(ref: Any) -> None:
    if getattr(ref, "error", None) is not None:
        raise ref.error


def _group_key(ref: Any, row: Mapping[str, str] | None, fallback: str) -> str:
    """Patient-level key when the manifest gives one, else source image, series UID, path."""
    row = row or {}
    for col in ("patient", "group", "source_id"):
        v = (row.get(col) or "").strip()
        if v:
            return hash_key(f"{col}:{v}")
    uid = getattr(ref, "series_uid", None)
    if uid:
        return hash_key(f"series:{uid}")
    return hash_key(f"path:{fallback}")


# --------------------------------------------------------------------------------------------
# Manifests and adapters

def _norm_split(value: str | None) -> str | None:
    v = (value or "").strip().lower()
    if not v:
        return None
    aliases = {"train": "train", "training": "train", "val": "val", "valid": "val",
               "validation": "val", "dev": "val", "test": "test", "testing": "test"}
    if v not in aliases:
        raise DatasetError(f"unknown split value {value!r}; use train, val or test")
    return aliases[v]


def resolve_manifest(data: str | Path) -> Path | None:
    """The manifest CSV for ``data`` (a CSV, or a folder holding manifest.csv), else None."""
    p = Path(data)
    if p.is_file() and p.suffix.lower() == ".csv":
        return p
    if p.is_dir() and (p / MANIFEST_NAME).is_file():
        return p / MANIFEST_NAME
    return None


def read_manifest(path: str | Path, *, require_score: bool = True) -> tuple[list[Sample], DatasetReport]:
    """Samples from a manifest CSV. See the module docstring for the rules.

    Raises DatasetError for a missing ``path`` / ``score`` column, non-numeric scores (listing
    their line numbers) or when no row is usable.
    """
    csv_path = Path(path)
    report = DatasetReport(source=str(csv_path), kind="manifest")
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            rows = [({(k or "").strip(): (v or "").strip() for k, v in r.items() if k is not None},
                     reader.line_num) for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"cannot read manifest {csv_path}: {exc}") from exc
    if "path" not in columns:
        raise DatasetError(f"manifest {csv_path} has no 'path' column (columns: {', '.join(columns) or 'none'})")
    if require_score and "score" not in columns:
        raise DatasetError(f"manifest {csv_path} has no 'score' column")
    report.n_found = len(rows)
    if not rows:
        raise DatasetError(f"manifest {csv_path} has no rows")

    bad: list[int] = []
    scores: list[float | None] = []
    for r, line in rows:
        v = _num(r.get("score")) if "score" in columns else None
        if "score" in columns and v is None and (require_score or r.get("score")):
            bad.append(line)
        scores.append(v)
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (" ..." if len(bad) > 10 else "")
        raise DatasetError(f"manifest {csv_path}: {len(bad)} row(s) with a missing or non-numeric score "
                           f"(CSV lines {shown})")

    index = StudyIndex(csv_path.parent)
    samples: list[Sample] = []
    for (r, line), score in zip(rows, scores):
        rel = r.get("path", "")
        if not rel:
            report.skip(f"line {line}", "missing: empty path")
            continue
        try:
            ref = index.lookup(csv_path.parent / rel)
            _check_ref(ref)
            split = _norm_split(r.get("split"))
        except MediqaError as exc:
            report.skip(rel, f"{error_code(exc)}: {exc.message}")
            continue
        labels = {g: (r.get(g) or None) for g in PROMPT_LABEL_GROUPS}
        labels = {g: v.lower() if v else None for g, v in labels.items()}
        extra = {c: r[c] for c in EXTRA_COLUMNS if r.get(c)}
        samples.append(Sample(path=rel, ref=ref, target=score, labels=labels,
                              group=_group_key(ref, r, rel), split=split, extra=extra, line=line))
    report.n_used = len(samples)
    if not samples:
        raise DatasetError(f"no usable study in manifest {csv_path}: {report.summary()}")
    return samples, report


def find_ldctiqa_json(root: Path) -> Path | None:
    """The one JSON file (in ``root`` or one level down) that maps image names to numbers."""
    candidates = sorted(root.glob("*.json")) + sorted(root.glob("*/*.json"))
    for c in candidates:
        try:
            d = json.loads(c.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(d, dict) and d and all(isinstance(k, str) for k in d) and \
                sum(_num(v) is not None for v in d.values()) == len(d):
            return c
    return None


def ldctiqa_samples(root: str | Path) -> tuple[list[Sample], DatasetReport]:
    """The LDCTIQA2023 layout: image files plus one JSON ``{"0000.tif": 2.4, ...}`` (scores 0–4).

    Images are looked up by name next to the JSON, then in its ``image/`` or ``images/`` folder.
    Every image gets the prompt ct / abdomen / soft and its own group (the challenge publishes
    no patient key). Scores outside 0–4 are rejected as non-numeric would be.
    """
    root = Path(root)
    js = find_ldctiqa_json(root)
    if js is None:
        raise DatasetError(f"{root}: no manifest.csv and no JSON mapping image names to scores")
    mapping = json.loads(js.read_text(encoding="utf-8"))
    report = DatasetReport(source=str(js), kind="ldctiqa", n_found=len(mapping))
    out_of_range = [k for k, v in mapping.items() if not LDCTIQA_RANGE[0] <= float(v) <= LDCTIQA_RANGE[1]]
    if out_of_range:
        raise DatasetError(f"{js}: {len(out_of_range)} score(s) outside 0-4, e.g. for {out_of_range[0]!r}")
    index = StudyIndex(js.parent)
    samples = []
    for name, score in sorted(mapping.items()):
        cands = [js.parent / name, js.parent / "image" / name, js.parent / "images" / name]
        path = next((c for c in cands if c.exists()), None)
        if path is None:
            report.skip(name, "missing: image file not found")
            continue
        try:
            ref = index.lookup(path)
            _check_ref(ref)
        except MediqaError as exc:
            report.skip(name, f"{error_code(exc)}: {exc.message}")
            continue
        rel = str(path.relative_to(js.parent))
        samples.append(Sample(path=rel, ref=ref, target=float(score), labels=dict(LDCTIQA_PROMPT),
                              group=hash_key(f"path:{rel}")))
    report.n_used = len(samples)
    if not samples:
        raise DatasetError(f"no usable image for {js}: {report.summary()}")
    return samples, report


def directory_samples(root: str | Path) -> tuple[list[Sample], DatasetReport]:
    """Every study under ``root`` without labels (pretraining and classifier on tags)."""
    root = Path(root)
    index = StudyIndex(root)
    report = DatasetReport(source=str(root), kind="directory", n_found=len(index.refs))
    samples = []
    for ref in index.refs:
        rel = getattr(ref, "rel_path", None) or str(ref.files[0])
        if ref.error is not None:
            report.skip(rel, f"{error_code(ref.error)}: {ref.error.message if isinstance(ref.error, MediqaError) else ref.error}")
            continue
        samples.append(Sample(path=rel, ref=ref, group=_group_key(ref, None, rel),
                              labels={g: None for g in PROMPT_LABEL_GROUPS}))
    report.n_used = len(samples)
    if not samples:
        raise DatasetError(f"no usable study under {root}: {report.summary()}")
    return samples, report


def load_scored(data: str | Path) -> tuple[list[Sample], DatasetReport]:
    """Fine-tuning / evaluation data: a manifest (CSV or folder with manifest.csv) or LDCTIQA."""
    p = Path(data)
    if not p.exists():
        raise DatasetError(f"{p}: no such file or folder")
    manifest = resolve_manifest(p)
    if manifest is not None:
        return read_manifest(manifest, require_score=True)
    if p.is_dir():
        return ldctiqa_samples(p)
    raise DatasetError(f"{p}: expected a manifest .csv or a folder (manifest.csv or LDCTIQA2023 layout)")


def load_unscored(data: str | Path) -> tuple[list[Sample], DatasetReport]:
    """Pretraining / classifier data: a manifest (scores optional) or any folder of studies."""
    p = Path(data)
    if not p.exists():
        raise DatasetError(f"{p}: no such file or folder")
    manifest = resolve_manifest(p)
    if manifest is not None:
        return read_manifest(manifest, require_score=False)
    if p.is_dir():
        return directory_samples(p)
    raise DatasetError(f"{p}: expected a folder of studies or a manifest .csv")


def pretrain_samples(data: str | Path) -> tuple[list[Sample], DatasetReport]:
    """Studies with a physical target; ``Sample.target`` is the raw mAs / tesla value.

    Studies without a usable tag are skipped with the reason (``no_exposure``,
    ``no_field_strength``, ``no_physical_target``) and counted in the report.
    """
    samples, report = load_unscored(data)
    kept = []
    for s in samples:
        try:
            mod, value = physical_target(s.ref.meta or {})
        except TargetUnavailable as exc:
            report.skip(s.path, str(exc))
            continue
        s.target, s.modality_key = value, mod
        kept.append(s)
    report.n_used = len(kept)
    if not kept:
        raise DatasetError(f"no study with a usable physical-parameter tag in {data}: {report.summary()}")
    logger.info("pretraining data: %s", report.summary())
    return kept, report


# --------------------------------------------------------------------------------------------
# Prompts and classifier labels

def resolve_prompt(sample: Sample, tag_prompts: Mapping[str, str | None],
                   fill: Mapping[str, str] | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """The prompt a study is trained / evaluated with, and where each group came from.

    Per group: the tags (``prompts_from_tags`` of the opened study) win; then ``fill`` (the
    prompt classifier's answer, as in scoring); then the manifest label; then ``other``.
    Returns ({"dimension", "modality", "region", "type"} → label, group → source).
    """
    values = {"dimension": sample.dimension}
    sources = {"dimension": "input"}
    for g in PROMPT_LABEL_GROUPS:
        for src, v in (("tags", tag_prompts.get(g)), ("classifier", (fill or {}).get(g)),
                       ("manifest", sample.labels.get(g))):
            if v:
                values[g], sources[g] = v, src
                break
        else:
            values[g], sources[g] = "other", "default"
    return values, sources


def classifier_labels(sample: Sample, tag_prompts: Mapping[str, str | None]) -> dict[str, str | None]:
    """Classifier targets per group: tags, else manifest, else None (left out of the loss)."""
    return {g: tag_prompts.get(g) or sample.labels.get(g) for g in PROMPT_LABEL_GROUPS}
