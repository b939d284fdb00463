"""Model artifacts: the model card and the ``.safetensors`` checkpoint format (DESIGN §4).

A checkpoint is one ``.safetensors`` file (never pickle). Tensor keys are ``"<module>.<param>"``
where ``<module>`` is ``iqa`` (``iqa.0`` … ``iqa.{N-1}`` for an ensemble) or ``classifier``. The
file metadata holds:

- ``mediqa_card``: the ``ModelCard`` as JSON (preset, prompt vocabulary, preprocessing, label
  scale, data summary, metrics, code version …);
- ``mediqa_modules``: JSON list of the module names, so dotted names split unambiguously;
- ``mediqa_dtype``: ``"fp32"`` or ``"fp16"`` (floating tensors stored in half precision; the
  loader casts back into the float32 model).

ONNX files carry the same card JSON in ``metadata_props["mediqa_card"]``; TensorRT ``.engine``
files carry it as ``"card"`` in their JSON header (``engines.backends.engine_header``). Plain
``.json`` files holding a card are read too (e.g. a card next to an exported model).

Import cost: this module imports neither torch nor onnx at import time. ``load_card`` reads
safetensors metadata with ``safetensors.safe_open(framework="numpy")`` and ONNX metadata with
``onnx``; neither pulls in torch. Only ``save_artifact`` / ``load_tensors`` import torch.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import engines
from engines.errors import UnsupportedArtifact

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

log = logging.getLogger(__name__)

CARD_KEY = "mediqa_card"
MODULES_KEY = "mediqa_modules"
DTYPE_KEY = "mediqa_dtype"
TASKS = ("iqa", "pretrain", "classifier")


def bundled_model_path() -> Path:
    """The bundled default model, ``engines/weights/default.safetensors`` (may be absent in a source
    checkout without weights); what score, evaluate, export and info use when no model is given."""
    return Path(engines.__file__).resolve().parent / "weights" / "default.safetensors"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


@dataclass
class ModelCard:
    """Everything scoring needs to rebuild and use a model, stored inside the artifact.

    ``label_scale``: {"min": lo, "max": hi, "name": ...}; a model output q in [0, 1] maps to
    ``lo + q · (hi − lo)`` in the dataset's units.
    """

    task: str
    preset: str
    prompt_vocab: dict
    preprocess: dict
    label_scale: dict
    n_slices: int = 7
    classifier_preset: str | None = None
    ensemble_size: int = 1
    data_summary: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    #: per-modality test-time augmentation for ``--tta auto`` (``engines.tta.TTAPolicy``); empty: none
    tta_policy: dict = field(default_factory=dict)
    #: classical-statistics ridge per modality and its blend weight (``engines.features.FeatureHead``); empty: none
    feature_head: dict = field(default_factory=dict)
    code_version: str = engines.__version__
    created: str = field(default_factory=_now)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise UnsupportedArtifact(f"model card task {self.task!r} is not one of {TASKS}")
        if int(self.ensemble_size) < 1 or int(self.n_slices) < 1:
            raise UnsupportedArtifact("model card needs ensemble_size >= 1 and n_slices >= 1")
        # Normalise the free-form parts to their JSON form (tuples -> lists) so a card compares
        # equal to itself after a save / load, and fail early on anything JSON cannot hold.
        for name in ("prompt_vocab", "preprocess", "label_scale", "data_summary", "metrics", "training",
                     "tta_policy", "feature_head"):
            try:
                setattr(self, name, json.loads(json.dumps(getattr(self, name), allow_nan=True)))
            except (TypeError, ValueError) as exc:
                raise UnsupportedArtifact(f"model card field {name!r} is not JSON-serialisable: {exc}") from None
        if self.tta_policy:
            from engines.tta import TTAPolicy  # noqa: PLC0415  (engines.tta imports the backends)

            try:
                TTAPolicy.from_dict(self.tta_policy)
            except ValueError as exc:
                raise UnsupportedArtifact(str(exc)) from None
        if self.feature_head:
            from engines.features import FeatureHead  # noqa: PLC0415

            try:
                FeatureHead.from_dict(self.feature_head)
            except ValueError as exc:
                raise UnsupportedArtifact(f"model card feature_head: {exc}") from None

    def label_range(self) -> tuple[float, float]:
        """``(lo, hi)`` of ``label_scale`` (default 0, 1): a model output q maps to ``lo + q · (hi − lo)``."""
        scale = self.label_scale or {}
        return float(scale.get("min", 0.0)), float(scale.get("max", 1.0))

    def to_dict(self) -> dict[str, Any]:
        """The card as JSON-able dict; an empty ``tta_policy`` / ``feature_head`` is left out, so
        cards without one stay byte-identical to (and readable by) versions that predate the field."""
        d = dataclasses.asdict(self)
        for name in ("tta_policy", "feature_head"):
            if not d[name]:
                del d[name]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelCard":
        if not isinstance(d, Mapping):
            raise UnsupportedArtifact(f"model card must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UnsupportedArtifact(
                f"model card has unknown keys {unknown} (written by MedIQA "
                f"{d.get('code_version', '?')}, this is {engines.__version__}); upgrade mediqa"
            )
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(d))
        if missing:
            raise UnsupportedArtifact(f"model card lacks required keys {missing}")
        return cls(**dict(d))

    @classmethod
    def from_json(cls, text: str) -> "ModelCard":
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, TypeError) as exc:
            raise UnsupportedArtifact(f"model card is not valid JSON: {exc}") from None
        return cls.from_dict(d)


# --------------------------------------------------------------------------- reading cards

def load_card(path: str | os.PathLike[str]) -> ModelCard:
    """The card of a ``.safetensors``, ``.onnx``, ``.engine`` or ``.json`` artifact (no torch import)."""
    p = Path(path)
    if not p.is_file():
        raise UnsupportedArtifact(f"model file not found: {p}")
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        return ModelCard.from_json(_safetensors_metadata(p)[CARD_KEY])
    if suffix == ".onnx":
        return ModelCard.from_json(_onnx_card_json(p))
    if suffix == ".json":
        return ModelCard.from_json(p.read_text(encoding="utf-8"))
    if suffix == ".engine":
        # length-prefixed JSON header written by export/tensorrt.py; its "card" is this card
        from engines.backends.engine_header import read_engine_header

        header = read_engine_header(p)
        if "card" not in header:
            raise UnsupportedArtifact(f"{p.name}: TensorRT engine header carries no model card")
        return ModelCard.from_dict(header["card"])
    raise UnsupportedArtifact(
        f"{p.name}: cannot read a model card from {suffix or 'a file without suffix'!r} files "
        "(expected .safetensors, .onnx, .engine or .json)"
    )


def _safetensors_metadata(p: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="numpy") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own SafetensorError / OSError
        raise UnsupportedArtifact(f"{p.name}: not a readable safetensors file ({exc})") from None
    if CARD_KEY not in meta:
        raise UnsupportedArtifact(f"{p.name}: safetensors file has no {CARD_KEY!r} metadata; "
                                  "not a MedIQA checkpoint")
    return meta


def _onnx_card_json(p: Path) -> str:
    import onnx

    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends
        raise UnsupportedArtifact(f"{p.name}: not a readable ONNX file ({exc})") from None
    for prop in model.metadata_props:
        if prop.key == CARD_KEY:
            return prop.value
    raise UnsupportedArtifact(f"{p.name}: ONNX file has no {CARD_KEY!r} metadata; not a MedIQA export")


# --------------------------------------------------------------------------- tensors

def _deterministic_bytes(tensors: Mapping[str, "torch.Tensor"], meta: Mapping[str, str]) -> bytes:
    """The ``.safetensors`` file of ``tensors`` and ``meta`` with a canonical header.

    safetensors writes the metadata map in hash order, which changes from run to run, so the
    same tensors and card gave files with different sha256 (and a model hash, a recipe stage key
    or a kept TTA measurement that no longer matched). Here the header is rewritten with the
    metadata keys sorted and the tensor entries in data order; the data section is the library's
    own (its offsets are relative to it), so any safetensors reader loads the file as before."""
    import struct

    from safetensors.torch import save

    raw = save(dict(tensors), metadata=dict(meta))
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    md = header.pop("__metadata__", None) or {}
    entries = sorted(header.items(), key=lambda kv: (kv[1]["data_offsets"], kv[0]))
    canon: dict[str, Any] = {"__metadata__": {k: md[k] for k in sorted(md)}} if md else {}
    canon.update(entries)
    text = json.dumps(canon, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)     # the data section starts 8-byte aligned, as the library's
    return struct.pack("<Q", len(text)) + text + raw[8 + n:]


def save_artifact(path: str | os.PathLike[str], modules: Mapping[str, "nn.Module | Mapping[str, torch.Tensor]"],
                  card: ModelCard, dtype: str | None = None) -> Path:
    """Write ``modules`` (name → module or state dict) and ``card`` to one ``.safetensors`` file.

    ``dtype``: None keeps float32; ``"fp16"`` stores floating tensors in half precision (about
    half the size; the loader casts back). Written atomically (temp file + rename). Returns the path.
    """
    import torch

    if dtype not in (None, "fp32", "fp16"):
        raise ValueError(f"dtype must be None, 'fp32' or 'fp16', got {dtype!r}")
    p = Path(path)
    if p.suffix.lower() != ".safetensors":
        raise UnsupportedArtifact(f"checkpoints are .safetensors files, got {p.name}")
    names = list(modules)
    for a in names:
        for b in names:
            if a != b and b.startswith(a + "."):
                raise ValueError(f"module names {a!r} and {b!r} overlap")
    tensors: dict[str, torch.Tensor] = {}
    for name, mod in modules.items():
        state = mod.state_dict() if hasattr(mod, "state_dict") else dict(mod)
        for key, t in state.items():
            t = t.detach().to("cpu")
            if dtype == "fp16" and t.is_floating_point():
                t = t.to(torch.float16)
            # clone: safetensors refuses tensors that share storage (views, tied weights)
            tensors[f"{name}.{key}"] = t.contiguous().clone()
    meta = {CARD_KEY: card.to_json(), MODULES_KEY: json.dumps(names), DTYPE_KEY: dtype or "fp32"}
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=p.name + ".", suffix=".tmp", dir=p.parent)
    os.close(fd)
    try:
        Path(tmp).write_bytes(_deterministic_bytes(tensors, meta))
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("saved %s (%d tensors, %s, modules %s)", p, len(tensors), dtype or "fp32", names)
    return p


def load_tensors(path: str | os.PathLike[str]) -> tuple[dict[str, dict[str, "torch.Tensor"]], ModelCard]:
    """Read a checkpoint without unpickling: ({module: {param: tensor}}, card). Tensors as stored."""
    from safetensors.torch import load_file

    p = Path(path)
    if p.suffix.lower() != ".safetensors":
        raise UnsupportedArtifact(f"{p.name}: tensors can only be loaded from .safetensors checkpoints")
    meta = _safetensors_metadata(p)
    card = ModelCard.from_json(meta[CARD_KEY])
    try:
        names = json.loads(meta.get(MODULES_KEY, "[]"))
    except json.JSONDecodeError:
        raise UnsupportedArtifact(f"{p.name}: malformed {MODULES_KEY!r} metadata") from None
    flat = load_file(str(p), device="cpu")
    # longest name first so "iqa.1" wins over a hypothetical "iqa"
    order = sorted(names, key=len, reverse=True)
    out: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
    for key, t in flat.items():
        for n in order:
            if key.startswith(n + "."):
                out[n][key[len(n) + 1:]] = t
                break
        else:
            raise UnsupportedArtifact(f"{p.name}: tensor {key!r} belongs to no module of {names}")
    return out, card


def rewrite_card(model_path: str | Path, output: str | Path | None = None, **changes: Any) -> Path:
    """Copy of the ``.safetensors`` artifact at ``model_path`` whose card has ``changes`` (card
    fields; ``output`` None: replaced in place, atomically). Tensors are copied as stored (fp16
    stays fp16, bit for bit); only the card changes."""
    src = Path(model_path)
    modules, card = load_tensors(src)
    dtype = _safetensors_metadata(src).get(DTYPE_KEY, "fp32")
    card = dataclasses.replace(card, **changes)
    return save_artifact(Path(output) if output else src, modules, card,
                         dtype="fp16" if dtype == "fp16" else None)
