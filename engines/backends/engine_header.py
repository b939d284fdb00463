"""TensorRT engine file format and compatibility rules (pure Python: no tensorrt, no torch).

A MedIQA ``.engine`` file is::

    MAGIC (8 bytes, b"MEDIQAE1") | header length n (uint32, little endian) | n bytes of UTF-8 JSON | serialized TensorRT plan

The JSON header holds the model card (``"card"``) and everything needed to decide, before asking
TensorRT to deserialise anything, whether the plan can run here: ``trt_version``, ``gpu_name``,
``compute_capability`` ("8.9"), ``precision``, ``profile`` ({"min": 1, "opt": 8, "max": 32}),
``inputs``/``outputs`` names, ``graph`` ("2d" | "3d" | "classifier"), ``onnx_sha256`` and
``cache_key``. TensorRT plans are tied to one GPU architecture and one TensorRT release, so a
mismatch is refused with a message that says how to rebuild (``mediqa export --trt``).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from engines.errors import UnsupportedArtifact

ENGINE_MAGIC = b"MEDIQAE1"
_LEN = struct.Struct("<I")
MAX_HEADER_BYTES = 16 * 1024 * 1024
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
REBUILD_HINT = "rebuild it on this machine with `mediqa export MODEL --trt`"


@dataclass(frozen=True)
class BatchProfile:
    """TensorRT optimisation profile on the batch axis: min ≤ opt ≤ max, all ≥ 1."""

    min: int = 1
    opt: int = 8
    max: int = 32

    def __post_init__(self) -> None:
        for name in ("min", "opt", "max"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"batch profile {name} must be an integer ≥ 1, got {v!r}")
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"batch profile needs min ≤ opt ≤ max, got {self.min}:{self.opt}:{self.max}")

    def to_dict(self) -> dict[str, int]:
        return {"min": self.min, "opt": self.opt, "max": self.max}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "BatchProfile":
        return cls(int(d["min"]), int(d["opt"]), int(d["max"]))

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"

    def contains(self, batch: int) -> bool:
        return self.min <= batch <= self.max

    def shapes(self, item_shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) full shapes for an input whose per-item shape is ``item_shape``."""
        return ((self.min, *item_shape), (self.opt, *item_shape), (self.max, *item_shape))


def parse_batch_profile(text: str) -> BatchProfile:
    """``"1:8:32"`` → BatchProfile(1, 8, 32); ``"8"`` → BatchProfile(1, 8, 8). ValueError when malformed."""
    parts = [p.strip() for p in str(text).split(":")]
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"batch profile must be MIN:OPT:MAX integers, got {text!r}") from None
    if len(nums) == 1:
        return BatchProfile(1, nums[0], nums[0])
    if len(nums) != 3:
        raise ValueError(f"batch profile must be MIN:OPT:MAX (three integers), got {text!r}")
    return BatchProfile(*nums)


def pack_engine(header: Mapping[str, Any], plan: bytes) -> bytes:
    """Header dict + serialized TensorRT plan → the bytes of a ``.engine`` file."""
    raw = json.dumps(dict(header), sort_keys=True, separators=(",", ":")).encode("utf-8")
    if len(raw) > MAX_HEADER_BYTES:
        raise ValueError(f"engine header too large ({len(raw)} bytes)")
    return ENGINE_MAGIC + _LEN.pack(len(raw)) + raw + bytes(plan)


def _parse_prefix(prefix: bytes, total: int | None, source: str) -> tuple[int, int]:
    """Validate magic + length; return (header start, header end) offsets."""
    if len(prefix) < len(ENGINE_MAGIC) + _LEN.size:
        raise UnsupportedArtifact(f"{source}: too short to be a MedIQA TensorRT engine ({len(prefix)} bytes)")
    if prefix[: len(ENGINE_MAGIC)] != ENGINE_MAGIC:
        raise UnsupportedArtifact(
            f"{source}: not a MedIQA engine (no {ENGINE_MAGIC!r} header); engines built by other tools "
            f"carry no model card — {REBUILD_HINT}")
    (n,) = _LEN.unpack_from(prefix, len(ENGINE_MAGIC))
    start = len(ENGINE_MAGIC) + _LEN.size
    if n == 0 or n > MAX_HEADER_BYTES or (total is not None and start + n > total):
        raise UnsupportedArtifact(f"{source}: truncated or corrupt engine header (length {n})")
    return start, start + n


def _decode_header(raw: bytes, source: str) -> dict[str, Any]:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnsupportedArtifact(f"{source}: corrupt engine header ({exc})") from None
    if not isinstance(header, dict):
        raise UnsupportedArtifact(f"{source}: engine header is not a JSON object")
    return header


def unpack_engine(blob: bytes, source: str = "engine") -> tuple[dict[str, Any], memoryview]:
    """Bytes of a ``.engine`` file → (header dict, plan bytes view). UnsupportedArtifact when malformed."""
    start, end = _parse_prefix(blob[: len(ENGINE_MAGIC) + _LEN.size], len(blob), source)
    header = _decode_header(bytes(blob[start:end]), source)
    plan = memoryview(blob)[end:]
    if len(plan) == 0:
        raise UnsupportedArtifact(f"{source}: engine file holds a header but no TensorRT plan (truncated)")
    return header, plan


def read_engine_header(path: str | Path) -> dict[str, Any]:
    """Read only the JSON header of a ``.engine`` file (cheap: the plan is not loaded)."""
    path = Path(path)
    total = path.stat().st_size
    with path.open("rb") as fh:
        start, end = _parse_prefix(fh.read(len(ENGINE_MAGIC) + _LEN.size), total, str(path))
        raw = fh.read(end - start)
    if end >= total:
        raise UnsupportedArtifact(f"{path}: engine file holds a header but no TensorRT plan (truncated)")
    return _decode_header(raw, str(path))


def _major_minor(version: str) -> tuple[int, ...]:
    nums = []
    for part in str(version).split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        nums.append(int(digits) if digits else 0)
    return tuple(nums)


def engine_incompatibilities(header: Mapping[str, Any], *, trt_version: str,
                             compute_capability: str) -> list[str]:
    """Reasons why an engine with ``header`` cannot run under this TensorRT / on this GPU ([] = fine).

    TensorRT plans are not portable across GPU architectures (compute capability) nor across
    TensorRT releases (major.minor; patch releases of the same minor are accepted — TensorRT itself
    still refuses a plan it cannot read, which the backend reports the same way).
    """
    problems = []
    built_cc = str(header.get("compute_capability", "?"))
    if built_cc != str(compute_capability):
        problems.append(f"built for compute capability {built_cc} ({header.get('gpu_name', 'unknown GPU')}), "
                        f"this GPU is {compute_capability}")
    built_trt = str(header.get("trt_version", "?"))
    if _major_minor(built_trt) != _major_minor(trt_version):
        problems.append(f"built with TensorRT {built_trt}, this machine has TensorRT {trt_version}")
    prec = header.get("precision")
    if prec not in PRECISIONS:
        problems.append(f"unknown precision {prec!r}")
    if "profile" not in header:
        problems.append("no optimisation profile in the header")
    return problems


def check_engine_compatible(header: Mapping[str, Any], *, trt_version: str, compute_capability: str,
                            source: str = "engine") -> None:
    """Raise UnsupportedArtifact (with the rebuild command) when ``engine_incompatibilities`` finds any."""
    problems = engine_incompatibilities(header, trt_version=trt_version, compute_capability=compute_capability)
    if problems:
        raise UnsupportedArtifact(f"{source} cannot run here: " + "; ".join(problems) + f". {REBUILD_HINT[0].upper()}{REBUILD_HINT[1:]}.")
