"""TensorRT backend: runs a MedIQA ``.engine`` file (header + plan, see ``engine_header``).

Before TensorRT sees the plan, the header is checked against this GPU's compute capability and
the installed TensorRT version; a mismatch is refused with the rebuild command. Buffers are torch
CUDA tensors bound by address (``set_tensor_address``) and run with ``execute_async_v3`` on a
torch CUDA stream. The batch of every call is checked against the engine's optimisation profile
(the base class splits larger batches and pads shorter ones to the profile).

A sibling classifier engine ``<stem>.classifier.engine`` (and ``<stem>.3d.engine``) is loaded
when present, as for ONNX.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from engines import names
from engines.backends.base import Backend
from engines.backends.engine_header import (BatchProfile, check_engine_compatible, unpack_engine)
from engines.errors import BackendUnavailable, UnsupportedArtifact

log = logging.getLogger(__name__)

TRT_INSTALL = "pip install 'mediqa[trt]'"


def import_tensorrt() -> Any:
    """``import tensorrt`` or BackendUnavailable naming the install line."""
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendUnavailable(f"TensorRT is not installed: {TRT_INSTALL} (needs an NVIDIA GPU "
                                 "and TensorRT >= 10); or score with the onnxruntime / torch backend") from None
    if int(str(trt.__version__).split(".")[0]) < 10:
        raise BackendUnavailable(f"TensorRT {trt.__version__} is too old (need >= 10): {TRT_INSTALL}")
    return trt


def cuda_device_facts(device: str = "cuda") -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") via torch."""
    import torch

    if not torch.cuda.is_available():
        raise BackendUnavailable("TensorRT needs a CUDA GPU, and torch sees none")
    idx = torch.device(device).index or 0
    major, minor = torch.cuda.get_device_capability(idx)
    return torch.cuda.get_device_name(idx), f"{major}.{minor}"


class _Engine:
    """One deserialised engine + execution context with torch-allocated I/O."""

    def __init__(self, trt: Any, runtime: Any, path: Path, device: Any) -> None:
        import torch

        self.path = path
        blob = path.read_bytes()
        self.header, plan = unpack_engine(blob, str(path))
        _, cc = cuda_device_facts(str(device))
        check_engine_compatible(self.header, trt_version=trt.__version__, compute_capability=cc, source=str(path))
        self.engine = runtime.deserialize_cuda_engine(bytes(plan))
        if self.engine is None:
            raise UnsupportedArtifact(f"{path}: TensorRT could not deserialise the plan; rebuild it with "
                                      "`mediqa export MODEL --trt`")
        self.context = self.engine.create_execution_context()
        self.profile = BatchProfile.from_dict(self.header["profile"])
        self.inputs, self.outputs = [], []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            (self.inputs if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else self.outputs).append(name)
        self._torch = torch
        self._trt = trt
        self.device = device

    def _torch_dtype(self, name: str) -> Any:
        t = self._trt.DataType
        m = {t.FLOAT: self._torch.float32, t.HALF: self._torch.float16, t.INT32: self._torch.int32}
        if hasattr(t, "BF16"):
            m[t.BF16] = self._torch.bfloat16
        return m[self.engine.get_tensor_dtype(name)]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        n = next(iter(feeds.values())).shape[0]
        if not self.profile.contains(n):
            raise ValueError(f"{self.path.name}: batch {n} outside the engine's profile {self.profile}")
        keep = []
        for name in self.inputs:
            t = torch.from_numpy(feeds[name]).to(self.device).to(self._torch_dtype(name)).contiguous()
            keep.append(t)
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            t = torch.empty(shape, dtype=self._torch_dtype(name), device=self.device)
            outs[name] = t
            self.context.set_tensor_address(name, t.data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.path.name}: TensorRT execution failed")
        stream.synchronize()
        return {k: v.float().cpu().numpy() for k, v in outs.items()}


class TensorRTBackend(Backend):
    """Runs MedIQA TensorRT engines (2D graph; classifier / 3D siblings when present)."""

    name = "tensorrt"

    def __init__(self, path: str | Path, *, device: str = "cuda", **_: Any) -> None:
        trt = import_tensorrt()
        import torch

        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(self.path)
        self._trt_logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._trt_logger)
        dev = torch.device(device if device.startswith("cuda") else "cuda")
        self._main = _Engine(trt, self._runtime, self.path, dev)
        stem = self.path.name[: -len(".engine")]
        base = stem.rsplit(".", 1)[0] if stem.endswith((".fp16", ".bf16", ".fp32", ".int8")) else stem
        prec = stem[len(base):]
        cls_p = self.path.with_name(f"{base}.classifier{prec}.engine")
        vol_p = self.path.with_name(f"{base}.3d{prec}.engine")
        self._cls = _Engine(trt, self._runtime, cls_p, dev) if cls_p.exists() else None
        self._vol = _Engine(trt, self._runtime, vol_p, dev) if vol_p.exists() else None
        from engines.artifact import ModelCard

        h = self._main.header
        card = ModelCard.from_dict(h["card"]) if hasattr(ModelCard, "from_dict") else h["card"]
        io = h.get("input_shapes", {})
        size = int(io.get(names.IMAGES, [3, 224, 224])[-1])
        pdim = int(io.get(names.PROMPT, [0])[-1])
        super().__init__(card, image_size=size, prompt_dim=pdim, n_slices=int(h.get("n_slices", 7)),
                         min_batch=self._main.profile.min, max_batch=self._main.profile.max)
        self.trt_version = trt.__version__

    def describe(self) -> str:
        h = self._main.header
        return f"tensorrt {self.trt_version} {h.get('precision')} profile {self._main.profile} on {h.get('gpu_name')}"

    def _score(self, images: np.ndarray, prompt: np.ndarray) -> dict[str, np.ndarray]:
        out = self._main.run({names.IMAGES: images, names.PROMPT: prompt})
        return {names.SCORE: out[names.SCORE], names.SLICE_LOGIT: out[names.SLICE_LOGIT]}

    def _score_volume(self, volumes: np.ndarray, prompt: np.ndarray) -> dict[str, np.ndarray]:
        # The 3D engine's profile counts volumes (the 2D budget / K), so chunk and pad by its own range.
        prof = self._vol.profile
        parts = []
        for i in range(0, len(volumes), prof.max):
            v, p = volumes[i: i + prof.max], prompt[i: i + prof.max]
            m = len(v)
            if m < prof.min:
                v = np.concatenate([v] + [v[-1:]] * (prof.min - m))
                p = np.concatenate([p] + [p[-1:]] * (prof.min - m))
            parts.append({k: o[:m] for k, o in self._vol.run({names.VOLUMES: np.ascontiguousarray(v),
                                                               names.PROMPT: np.ascontiguousarray(p)}).items()})
        return {k: np.concatenate([q[k] for q in parts]) for k in parts[0]}

    def _classify(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return self._cls.run({names.IMAGES: images})

    def close(self) -> None:
        self._main = self._cls = self._vol = None
        super().close()
