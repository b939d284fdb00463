"""PyTorch backend: the reference runtime, on CPU or CUDA, optionally under bf16 / fp16 autocast.

Loads a ``.safetensors`` artifact with ``engines.models.loading.load_artifact`` (never unpickles).
Autocast keeps the numerically touchy parts (softmax, normalisation) in fp32 as PyTorch decides;
outputs are always returned as float32 numpy arrays.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

from engines import names
from engines.backends.base import Backend
from engines.errors import BackendUnavailable

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16")


class TorchBackend(Backend):
    """Runs the MedIQA ``nn.Module``s directly."""

    name = "torch"

    def __init__(self, path: str | Path | None = None, *, device: str = "cpu", precision: str = "fp32",
                 threads: int | None = None, loaded: Any = None, **_: Any) -> None:
        import torch

        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendUnavailable(f"device {device!r} requested but torch sees no CUDA GPU "
                                     "(install a CUDA build of PyTorch, or use device='cpu')")
        if threads:
            torch.set_num_threads(int(threads))
        if loaded is None:
            if path is None:
                raise ValueError("TorchBackend needs an artifact path or a loaded model")
            from engines.models.loading import load_artifact

            loaded = load_artifact(path, device=device)
        self.path = Path(path) if path is not None else None
        self.device = torch.device(device)
        self.precision = precision
        if loaded.iqa is None:  # a classifier-only artifact
            from engines.errors import UnsupportedArtifact

            raise UnsupportedArtifact(f"{self.path.name if self.path else 'the artifact'} holds only a prompt "
                                      "classifier; scoring needs an IQA model (task 'iqa')")
        self.iqa = loaded.iqa.to(self.device).eval()
        self.classifier = loaded.classifier.to(self.device).eval() if loaded.classifier is not None else None
        self._torch = torch
        card = loaded.card
        from engines.prompts import PromptVocab

        pre = card.preprocess if isinstance(card.preprocess, dict) else card.preprocess.to_dict()
        super().__init__(card, image_size=int(pre.get("image_size", 224)),
                         prompt_dim=PromptVocab.from_dict(card.prompt_vocab).size,
                         n_slices=int(getattr(card, "n_slices", 7)))

    @classmethod
    def from_modules(cls, iqa: Any, card: Any, classifier: Any = None, **kw: Any) -> "TorchBackend":
        """Wrap modules already in memory (export and tests use this)."""
        from types import SimpleNamespace

        return cls(None, loaded=SimpleNamespace(iqa=iqa, classifier=classifier, card=card), **kw)

    @property
    def has_classifier(self) -> bool:
        return self.classifier is not None

    @property
    def has_volume_graph(self) -> bool:
        return hasattr(self.iqa, "forward_volume")

    def describe(self) -> str:
        return f"torch {self._torch.__version__} {self.device} {self.precision}"

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = self._torch.bfloat16 if self.precision == "bf16" else self._torch.float16
        return self._torch.autocast(device_type=self.device.type, dtype=dtype)

    def _to(self, a: np.ndarray) -> Any:
        return self._torch.from_numpy(a).to(self.device, non_blocking=True)

    @staticmethod
    def _np(t: Any) -> np.ndarray:
        return t.detach().float().cpu().numpy()

    def _score(self, images: np.ndarray, prompt: np.ndarray) -> dict[str, np.ndarray]:
        with self._torch.inference_mode(), self._autocast():
            score, logit = self.iqa(self._to(images), self._to(prompt))
        return {names.SCORE: self._np(score), names.SLICE_LOGIT: self._np(logit)}

    def _score_volume(self, volumes: np.ndarray, prompt: np.ndarray) -> dict[str, np.ndarray]:
        with self._torch.inference_mode(), self._autocast():
            score, s, w = self.iqa.forward_volume(self._to(volumes), self._to(prompt))
        return {names.SCORE: self._np(score), names.SLICE_SCORES: self._np(s), names.SLICE_WEIGHTS: self._np(w)}

    def _classify(self, images: np.ndarray) -> dict[str, np.ndarray]:
        with self._torch.inference_mode(), self._autocast():
            outs = self.classifier(self._to(images))
        return {k: self._np(v) for k, v in zip(names.CLASSIFIER_OUTPUTS, outs)}

    def close(self) -> None:
        self.iqa = self.classifier = None
        super().close()
