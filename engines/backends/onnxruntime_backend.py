"""onnxruntime backend: ``model.onnx`` (2D graph) plus the sibling ``.3d.onnx`` and
``.classifier.onnx`` graphs when present (``model.int8.onnx`` shares ``model.classifier.onnx``).

CPU: the CPU execution provider with every graph optimisation (``ORT_ENABLE_ALL``) and a settable
intra-op thread count. GPU: the CUDA / TensorRT execution providers when ``onnxruntime-gpu`` is
installed. A requested provider that this onnxruntime build lacks, or that fails to initialise,
is logged as a WARNING naming the provider actually used — a silent fallback to CPU would turn a
GPU night into a CPU week without anyone noticing.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from engines import names
from engines.backends.base import Backend
from engines.errors import BackendUnavailable, UnsupportedArtifact

log = logging.getLogger(__name__)

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}
GPU_INSTALL = "pip install 'mediqa[gpu]'"


def _import_ort() -> Any:
    try:
        import onnxruntime as ort
    except ImportError:  # pragma: no cover - onnxruntime is a core dependency
        raise BackendUnavailable("onnxruntime is not installed: pip install onnxruntime "
                                 f"(or {GPU_INSTALL} for CUDA)") from None
    return ort


def sibling_graph(path: Path, kind: str) -> Path | None:
    """``model.onnx`` / ``model.int8.onnx`` → ``model.<kind>.onnx`` if it exists (kind: "3d" | "classifier")."""
    stem = path.name[: -len(".onnx")] if path.name.endswith(".onnx") else path.stem
    candidates = [path.with_name(f"{stem}.{kind}.onnx")]
    for tag in (".int8", ".fp16", ".fp32"):
        if stem.endswith(tag):
            candidates.append(path.with_name(f"{stem[: -len(tag)]}.{kind}.onnx"))
    return next((c for c in candidates if c.exists()), None)


def resolve_providers(requested: Sequence[str] | None, device: str, available: Sequence[str]) -> list[str]:
    """Requested provider names/aliases (or the device's default) → those this build has, CPU last.

    Logs a WARNING for each requested provider that is not available.
    """
    if requested is None:
        requested = ["cuda", "cpu"] if device.startswith("cuda") else ["cpu"]
    wanted = [PROVIDER_ALIASES.get(p.lower(), p) for p in requested]
    chosen = []
    for p in wanted:
        if p in available:
            if p not in chosen:
                chosen.append(p)
        else:
            log.warning("onnxruntime execution provider %s requested but not available in this build "
                        "(available: %s); falling back — install %s for CUDA/TensorRT providers",
                        p, ", ".join(available), GPU_INSTALL)
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


class OnnxRuntimeBackend(Backend):
    """Runs exported MedIQA ONNX graphs with onnxruntime."""

    name = "onnxruntime"

    def __init__(self, path: str | Path, *, device: str = "cpu", providers: Sequence[str] | None = None,
                 threads: int | None = None, spin: bool = True, card: Any = None,
                 **_: Any) -> None:
        ort = _import_ort()
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(self.path)
        if card is None:
            from engines.artifact import load_card

            card = load_card(self.path)
        self._ort = ort
        self.threads = threads
        self.spin = spin
        self.requested = list(providers) if providers is not None else None
        self.device = device
        self._main = self._session(self.path)
        self.providers = self._main.get_providers()
        vol = sibling_graph(self.path, "3d")
        cls = sibling_graph(self.path, "classifier")
        self._vol = self._session(vol) if vol else None
        self._cls = self._session(cls) if cls else None
        in_shapes = {i.name: i.shape for i in self._main.get_inputs()}
        if names.IMAGES not in in_shapes or names.PROMPT not in in_shapes:
            raise UnsupportedArtifact(f"{self.path}: not a MedIQA 2D graph (inputs {sorted(in_shapes)})")
        size = int(in_shapes[names.IMAGES][-1])
        pdim = int(in_shapes[names.PROMPT][-1])
        n_slices = int(getattr(card, "n_slices", 7))
        if self._vol is not None:
            n_slices = int({i.name: i.shape for i in self._vol.get_inputs()}[names.VOLUMES][1])
        super().__init__(card, image_size=size, prompt_dim=pdim, n_slices=n_slices)

    def _session(self, path: Path) -> Any:
        ort = self._ort
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.intra_op_num_threads = int(self.threads) if self.threads else (os.cpu_count() or 1)
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        # Idle intra-op threads spin (onnxruntime's default: fastest for the engine alone); the
        # scoring pipeline turns it off, since spinning steals the cores its readers need.
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin else "0")
        chosen = resolve_providers(self.requested, self.device, ort.get_available_providers())
        sess = ort.InferenceSession(str(path), sess_options=so, providers=chosen)
        got = sess.get_providers()
        dropped = [p for p in chosen if p not in got]
        if dropped:
            log.warning("onnxruntime could not initialise %s for %s; running on %s",
                        ", ".join(dropped), path.name, ", ".join(got))
        return sess

    def describe(self) -> str:
        return f"onnxruntime {self._ort.__version__} [{', '.join(self.providers)}] {self.path.name}"

    def _run(self, sess: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = sess.run(None, feeds)
        return {o.name: np.asarray(v, dtype=np.float32) for o, v in zip(sess.get_outputs(), outs)}

    def _score(self, images: np.ndarray, prompt: np.ndarray) -> dict[str, np.ndarray]:
        out = self._run(self._main, {names.IMAGES: images, names.PROMPT: prompt})
        return {names.SCORE: out[names.SCORE], names.SLICE_LOGIT: out[names.SLICE_LOGIT]}

    def _score_volume(self, volumes: np.ndarray, prompt: np.ndarray) -> dict[str, np.ndarray]:
        return self._run(self._vol, {names.VOLUMES: volumes, names.PROMPT: prompt})

    def _classify(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return self._run(self._cls, {names.IMAGES: images})

    def close(self) -> None:
        self._main = self._vol = self._cls = None
        super().close()
