"""Pick the runtime from the artifact's file suffix (like Ultralytics' AutoBackend).

``.safetensors`` → torch, ``.onnx`` → onnxruntime, ``.engine`` → TensorRT. ``backend=`` forces one
("torch" | "onnxruntime" | "tensorrt"); a runtime that cannot read the suffix is refused.
Runtimes are imported only when chosen, so scoring with ONNX never imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engines.backends.base import Backend
from engines.errors import UnsupportedArtifact

SUFFIX_BACKENDS = {".safetensors": "torch", ".onnx": "onnxruntime", ".engine": "tensorrt"}
BACKENDS = ("torch", "onnxruntime", "tensorrt")
_ALIASES = {"ort": "onnxruntime", "onnx": "onnxruntime", "trt": "tensorrt", "pytorch": "torch"}


def backend_for(path: str | Path, backend: str = "auto") -> str:
    """The backend name that will open ``path`` (UnsupportedArtifact when none can)."""
    suffix = Path(path).suffix.lower()
    expected = SUFFIX_BACKENDS.get(suffix)
    if expected is None:
        raise UnsupportedArtifact(f"{Path(path).name}: unknown model file type {suffix or '(no suffix)'!r}; "
                                  f"expected one of {', '.join(SUFFIX_BACKENDS)}")
    name = _ALIASES.get(backend.lower(), backend.lower())
    if name == "auto":
        return expected
    if name not in BACKENDS:
        raise UnsupportedArtifact(f"unknown backend {backend!r}; expected auto or one of {BACKENDS}")
    if name != expected:
        raise UnsupportedArtifact(f"the {name} backend cannot run {suffix} files ({expected} does); "
                                  "export the model first: mediqa export MODEL")
    return name


def open_backend(path: str | Path, *, backend: str = "auto", device: str = "cpu", **opts: Any) -> Backend:
    """Open a model artifact with the backend its suffix calls for. ``opts`` go to the backend
    (torch: precision, threads; onnxruntime: providers, threads, spin; tensorrt: none); an option
    the chosen backend does not take is ignored."""
    name = backend_for(path, backend)
    if not Path(path).is_file():
        raise UnsupportedArtifact(f"model file not found: {path}")
    if name == "torch":
        from engines.backends.torch_backend import TorchBackend

        return TorchBackend(path, device=device, **opts)
    if name == "onnxruntime":
        from engines.backends.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend(path, device=device, **opts)
    from engines.backends.tensorrt_backend import TensorRTBackend

    return TensorRTBackend(path, device=device if device.startswith("cuda") else "cuda", **opts)
