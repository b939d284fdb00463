"""Backend base class: one object per loaded model artifact, whatever the runtime.

A backend takes preprocessed numpy batches and returns numpy outputs, named as in
``engines.names``. It checks the inputs against its declared input spec before running
(shape, dtype, batch range), splits batches larger than the runtime accepts, and is a
context manager that releases the runtime's resources on exit. Batches above ``max_batch`` are
split into chunks; a chunk below ``min_batch`` (a TensorRT profile's minimum) is padded by
repeating its last item and the padding is cut from the outputs.

Inputs (the contract, see docs/INTERFACES.md):
- ``images``  (N, 3, S, S) float32, normalised with the card's mean/std (roughly [-1, 1]);
- ``prompt``  (N, P) float32, concatenated one-hot groups (P = card's vocabulary size);
- ``volumes`` (N, K, 3, S, S) float32 (3D graph, K = card.n_slices).
Outputs: ``score`` (N,) in the model's [0, 1] label scale, ``slice_logit`` (N,);
3D: ``score`` (N,), ``slice_scores`` (N, K), ``slice_weights`` (N, K);
classifier: ``modality``, ``region``, ``type`` logits (N, n_labels).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from engines import names

if TYPE_CHECKING:  # pragma: no cover
    from engines.artifact import ModelCard

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorSpec:
    """One named input: per-item shape (without the batch axis) and dtype."""

    name: str
    item_shape: tuple[int, ...]
    dtype: str = "float32"


class Backend(ABC):
    """Runs one MedIQA artifact. Subclasses implement ``_score`` (and optionally ``_score_volume``,
    ``_classify``) on already validated, contiguous float32 inputs of an accepted batch size."""

    name: str = "base"

    def __init__(self, card: "ModelCard", *, image_size: int, prompt_dim: int, n_slices: int = 7,
                 min_batch: int = 1, max_batch: int | None = None) -> None:
        self.card = card
        self.image_size = int(image_size)
        self.prompt_dim = int(prompt_dim)
        self.n_slices = int(n_slices)
        self.min_batch = int(min_batch)
        self.max_batch = None if max_batch is None else int(max_batch)
        self._closed = False

    # ----------------------------------------------------------------- description
    @property
    def input_spec(self) -> dict[str, TensorSpec]:
        s = self.image_size
        return {
            names.IMAGES: TensorSpec(names.IMAGES, (3, s, s)),
            names.PROMPT: TensorSpec(names.PROMPT, (self.prompt_dim,)),
            names.VOLUMES: TensorSpec(names.VOLUMES, (self.n_slices, 3, s, s)),
        }

    # Runtimes that load the classifier / 3D graph as optional side-by-side sessions set these.
    _cls: Any = None
    _vol: Any = None

    @property
    def has_classifier(self) -> bool:
        return self._cls is not None

    @property
    def has_volume_graph(self) -> bool:
        return self._vol is not None

    def describe(self) -> str:
        return f"{self.name}"

    # ----------------------------------------------------------------- public API
    def score(self, images: np.ndarray, prompt: np.ndarray) -> dict[str, np.ndarray]:
        """(N, 3, S, S) + (N, P) float32 → {"score": (N,), "slice_logit": (N,)} float32."""
        self._check_open()
        n = self._check(names.IMAGES, images)
        if self._check(names.PROMPT, prompt) != n:
            raise ValueError(f"images and prompt batch sizes differ: {n} vs {len(prompt)}")
        return self._chunked(self._score, n, images, prompt)

    def score_volume(self, volumes: np.ndarray, prompt: np.ndarray) -> dict[str, np.ndarray] | None:
        """(N, K, 3, S, S) + (N, P) → {"score", "slice_scores", "slice_weights"}, or None without a 3D graph."""
        self._check_open()
        if not self.has_volume_graph:
            return None
        n = self._check(names.VOLUMES, volumes)
        if self._check(names.PROMPT, prompt) != n:
            raise ValueError(f"volumes and prompt batch sizes differ: {n} vs {len(prompt)}")
        return self._chunked(self._score_volume, n, volumes, prompt)

    def classify(self, images: np.ndarray) -> dict[str, np.ndarray] | None:
        """(N, 3, S, S) float32 → {"modality", "region", "type"} logits, or None when the artifact has no classifier."""
        self._check_open()
        if not self.has_classifier:
            return None
        n = self._check(names.IMAGES, images)
        return self._chunked(self._classify, n, images)

    def close(self) -> None:
        self._closed = True

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ----------------------------------------------------------------- to implement
    @abstractmethod
    def _score(self, images: np.ndarray, prompt: np.ndarray) -> dict[str, np.ndarray]: ...

    def _score_volume(self, volumes: np.ndarray, prompt: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _classify(self, images: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    # ----------------------------------------------------------------- helpers
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self.name} backend is closed")

    def _check(self, name: str, arr: np.ndarray) -> int:
        """Validate one input against the spec; return its batch size."""
        spec = self.input_spec[name]
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"{name}: expected a numpy array, got {type(arr).__name__}")
        if arr.dtype != np.dtype(spec.dtype):
            raise TypeError(f"{name}: expected dtype {spec.dtype}, got {arr.dtype}")
        if arr.ndim != 1 + len(spec.item_shape) or tuple(arr.shape[1:]) != spec.item_shape:
            raise ValueError(f"{name}: expected shape (N, {', '.join(map(str, spec.item_shape))}), "
                             f"got {tuple(arr.shape)}")
        n = int(arr.shape[0])
        if n < 1:
            raise ValueError(f"{name}: empty batch")
        return n

    def _chunked(self, fn: Callable[..., dict[str, np.ndarray]], n: int, *arrays: np.ndarray) -> dict[str, np.ndarray]:
        step = self.max_batch or n
        parts: list[dict[str, np.ndarray]] = []
        for i in range(0, n, step):
            chunk = [np.ascontiguousarray(a[i: i + step]) for a in arrays]
            if len(chunk[0]) < self.min_batch:  # a short tail: pad by repetition, then cut
                m = len(chunk[0])
                reps = [np.concatenate([c] + [c[-1:]] * (self.min_batch - m)) for c in chunk]
                out = {k: v[:m] for k, v in fn(*reps).items()}
            else:
                out = fn(*chunk)
            parts.append(out)
        if len(parts) == 1:
            return {k: np.asarray(v, dtype=np.float32) for k, v in parts[0].items()}
        return {k: np.concatenate([p[k] for p in parts]).astype(np.float32, copy=False) for k in parts[0]}
