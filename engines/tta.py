"""Test-time augmentation (TTA) of the quality score over symmetries of the square.

Quality does not change when an image is flipped or turned by 90°, and the models trained here
see random flips and quarter turns (``TrainConfig.flip_augment`` / ``rot90_augment``). Scoring
can therefore average the model over such copies of each input; MANIQA's own evaluation averages
over several crops in the same spirit. Modes:

* ``none`` — the input as is (1 pass, the default);
* ``flip`` — the input and its left-right mirror (2 passes);
* ``d4``   — the 8 symmetries of the square: 4 quarter turns, each with and without the mirror.

Semantics, identical in every runtime (``TTABackend`` for torch / onnxruntime / TensorRT,
``engines.models.maniqa.TTANet`` for training-side evaluation): per image (a 2D image or one
salient slice of a 3D study) the ``score`` and the ``slice_logit`` are the means over the copies;
3D fusion (``engines.fusion``) then runs on those means exactly as without TTA. A transform is
``rot90(k)`` over the last two axes (counter-clockwise, as ``np.rot90`` / ``torch.rot90``), then
the mirror of the last axis when ``flip`` is set. The prompt classifier is not averaged.

Cost: inference time grows with the number of copies (2× / 8×); reading and preprocessing do not.
"""

from __future__ import annotations

import numpy as np

from engines import names
from engines.backends.base import Backend
from engines.fusion import fuse_slice_scores

# mode → the (quarter turns k, mirror) pairs applied; the identity comes first.
TTA_MODES: dict[str, tuple[tuple[int, bool], ...]] = {
    "none": ((0, False),),
    "flip": ((0, False), (0, True)),
    "d4": tuple((k, f) for k in range(4) for f in (False, True)),
}


def tta_transforms(mode: str) -> tuple[tuple[int, bool], ...]:
    """The (k, mirror) pairs of ``mode``; ValueError names the valid modes."""
    try:
        return TTA_MODES[mode]
    except KeyError:
        raise ValueError(f"unknown TTA mode {mode!r}; expected one of {', '.join(TTA_MODES)}") from None


def transform_images(images: np.ndarray, k: int, mirror: bool) -> np.ndarray:
    """(..., S, S) → the same array turned k quarter turns (then mirrored), C-contiguous."""
    out = np.rot90(images, k, axes=(-2, -1)) if k % 4 else images
    if mirror:
        out = out[..., ::-1]
    return np.ascontiguousarray(out)


def expand(images: np.ndarray, mode: str) -> np.ndarray:
    """(N, ..., S, S) → (T·N, ..., S, S): the T copies of ``mode``, copy-major (copy t of item i at t·N + i)."""
    return np.concatenate([transform_images(images, k, m) for k, m in tta_transforms(mode)])


def average_copies(values: np.ndarray, n: int) -> np.ndarray:
    """(T·N, ...) copy-major outputs → (N, ...) float32 means over the T copies."""
    v = np.asarray(values, dtype=np.float64)
    if v.shape[0] % n:
        raise ValueError(f"{v.shape[0]} outputs are not a whole number of copies of {n} inputs")
    return v.reshape(v.shape[0] // n, n, *v.shape[1:]).mean(axis=0).astype(np.float32)


def tta_suffix(mode: str) -> str:
    """``""`` for ``none``, else ``"+tta-<mode>"``: appended to model labels, resume keys and backend
    names so that scores made with TTA are never mistaken for plain ones."""
    tta_transforms(mode)
    return "" if mode == "none" else f"+tta-{mode}"


def with_tta(backend: Backend, mode: str) -> Backend:
    """``backend`` itself for ``none``, else a ``TTABackend`` around it."""
    tta_transforms(mode)
    return backend if mode == "none" else TTABackend(backend, mode)


class TTABackend(Backend):
    """Averages an open backend's per-image outputs over the copies of a TTA mode.

    The wrapped backend splits the T·N copies into the batches its runtime accepts, so a
    TensorRT profile's limits still hold. ``score_volume`` scores the K slices of each volume with
    TTA through ``score`` and fuses them with ``engines.fusion`` (the scoring path's fusion);
    ``classify`` is passed through unchanged. Closing this object closes the wrapped backend.
    """

    def __init__(self, inner: Backend, mode: str) -> None:
        self.transforms = tta_transforms(mode)
        self.mode = mode
        self.inner = inner
        super().__init__(inner.card, image_size=inner.image_size, prompt_dim=inner.prompt_dim,
                         n_slices=inner.n_slices)
        self.name = inner.name + tta_suffix(mode)
        self.path = getattr(inner, "path", None)

    @property
    def has_classifier(self) -> bool:
        return self.inner.has_classifier

    @property
    def has_volume_graph(self) -> bool:
        return True   # fused here from per-slice TTA scores, whatever the inner runtime offers

    def describe(self) -> str:
        return f"{self.inner.describe()} + TTA {self.mode} ({len(self.transforms)} copies)"

    def close(self) -> None:
        if not self._closed:
            self.inner.close()
        super().close()

    def _score(self, images: np.ndarray, prompt: np.ndarray) -> dict[str, np.ndarray]:
        n, t = len(images), len(self.transforms)
        out = self.inner.score(expand(images, self.mode), np.concatenate([prompt] * t))
        return {names.SCORE: average_copies(out[names.SCORE], n),
                names.SLICE_LOGIT: average_copies(out[names.SLICE_LOGIT], n)}

    def _score_volume(self, volumes: np.ndarray, prompt: np.ndarray) -> dict[str, np.ndarray]:
        n, k = volumes.shape[:2]
        flat = volumes.reshape(n * k, *volumes.shape[2:])
        out = self._score(flat, np.repeat(prompt, k, axis=0))
        s = out[names.SCORE].reshape(n, k)
        z = out[names.SLICE_LOGIT].reshape(n, k)
        fused = [fuse_slice_scores(s[i], z[i]) for i in range(n)]
        return {names.SCORE: np.array([f[0] for f in fused], np.float32),
                names.SLICE_SCORES: s.astype(np.float32),
                names.SLICE_WEIGHTS: np.stack([f[1] for f in fused]).astype(np.float32)}

    def _classify(self, images: np.ndarray) -> dict[str, np.ndarray]:
        out = self.inner.classify(images)
        if out is None:  # pragma: no cover - has_classifier guards the call
            raise RuntimeError("the wrapped backend has no classifier")
        return out

