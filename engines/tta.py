"""Test-time augmentation (TTA) of the quality score over symmetries of the square.

Quality does not change when an image is flipped or turned by 90°, and the models trained here
see random flips and quarter turns (``TrainConfig.flip_augment`` / ``rot90_augment``). Scoring
can therefore average the model over such copies of each input; MANIQA's own evaluation averages
over several crops in the same spirit. Modes:

* ``none`` — the input as is (1 pass);
* ``flip`` — the input and its left-right mirror (2 passes);
* ``d4``   — the 8 symmetries of the square: 4 quarter turns, each with and without the mirror;
* ``auto`` — the model's own per-modality policy (``TTAPolicy``), recorded in its card
  (``ModelCard.tta_policy``) by ``mediqa train tta-policy``, which measures every mode on a
  validation split and, per modality, keeps a mode only where a paired bootstrap interval shows
  its SRCC gain over the plain score (``training.tta_policy``). Each image (each slice of a
  volume) gets the mode of the modality in its prompt; a model whose card holds no policy scores
  as ``none``. The default of ``mediqa score`` / ``mediqa evaluate``.

Semantics, identical in every runtime (``TTABackend`` for torch / onnxruntime / TensorRT,
``engines.models.maniqa.TTANet`` for training-side evaluation): per image (a 2D image or one
salient slice of a 3D study) the ``score`` and the ``slice_logit`` are the means over the copies;
3D fusion (``engines.fusion``) then runs on those means exactly as without TTA. A transform is
``rot90(k)`` over the last two axes (counter-clockwise, as ``np.rot90`` / ``torch.rot90``), then
the mirror of the last axis when ``flip`` is set. The prompt classifier is not averaged.

Cost: inference time grows with the number of copies (2× / 8×); reading and preprocessing do not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from engines import names
from engines.backends.base import Backend
from engines.fusion import fuse_slice_scores
from engines.prompts import DEFAULT_VOCAB, PromptVocab

# mode → the (quarter turns k, mirror) pairs applied; the identity comes first.
TTA_MODES: dict[str, tuple[tuple[int, bool], ...]] = {
    "none": ((0, False),),
    "flip": ((0, False), (0, True)),
    "d4": tuple((k, f) for k in range(4) for f in (False, True)),
}


AUTO = "auto"
#: What ``--tta`` accepts: the fixed modes and ``auto`` (the card's per-modality policy).
TTA_CHOICES: tuple[str, ...] = (*TTA_MODES, AUTO)


def tta_transforms(mode: str) -> tuple[tuple[int, bool], ...]:
    """The (k, mirror) pairs of ``mode``; ValueError names the valid modes."""
    try:
        return TTA_MODES[mode]
    except KeyError:
        raise ValueError(f"unknown TTA mode {mode!r}; expected one of {', '.join(TTA_MODES)}") from None


@dataclass(frozen=True)
class TTAPolicy:
    """Which fixed TTA mode each modality gets. ``modes``: modality label → mode (modalities not
    listed get ``fallback``); ``selection``: how the modes were chosen (split, per-modality SRCC
    of every mode, the margin), kept for the card and ``mediqa info``, never read at run time."""

    modes: Mapping[str, str] = field(default_factory=dict)
    fallback: str = "none"
    selection: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for mode in (*self.modes.values(), self.fallback):
            tta_transforms(mode)

    @classmethod
    def fixed(cls, mode: str) -> "TTAPolicy":
        """Every modality gets ``mode``."""
        return cls(fallback=mode)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "TTAPolicy":
        """A card's ``tta_policy`` (empty or None: no policy, every modality ``none``)."""
        d = dict(d or {})
        try:
            return cls(modes=dict(d.get("modes", {})), fallback=str(d.get("fallback", "none")),
                       selection=dict(d.get("selection", {})))
        except ValueError as exc:
            raise ValueError(f"model card tta_policy: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return {"modes": dict(self.modes), "fallback": self.fallback, "selection": dict(self.selection)}

    def mode_for(self, modality: str | None) -> str:
        return self.modes.get(modality or "", self.fallback)

    @property
    def used_modes(self) -> set[str]:
        return {*self.modes.values(), self.fallback}

    @property
    def is_plain(self) -> bool:
        """True when every modality is scored without TTA."""
        return self.used_modes == {"none"}

    def describe(self) -> str:
        if not self.modes:
            return self.fallback
        listed = ", ".join(f"{m} {v}" for m, v in sorted(self.modes.items()))
        return f"{listed}, others {self.fallback}"

    def modes_of(self, prompt: np.ndarray, vocab: PromptVocab) -> list[str]:
        """The mode of each row of an (N, P) prompt array, from its modality one-hot."""
        if not self.modes:
            return [self.fallback] * len(prompt)
        labels = vocab.labels("modality")
        idx = np.asarray(prompt)[:, vocab.columns("modality")].argmax(axis=1)
        return [self.mode_for(labels[int(i)]) for i in idx]


def resolve_policy(mode: str, card: Any) -> TTAPolicy:
    """``--tta`` value → policy: a fixed mode for every modality, or the card's own for ``auto``."""
    if mode == AUTO:
        return TTAPolicy.from_dict(getattr(card, "tta_policy", None))
    return TTAPolicy.fixed(mode)


def effective_mode(mode: str, card: Any) -> str:
    """``mode``, except ``auto`` on a card without TTA in its policy, which is ``none``: what the
    scores will actually be, so labels and resume keys name it (``tta_suffix(effective_mode(...))``)."""
    return "none" if mode == AUTO and resolve_policy(mode, card).is_plain else mode


def card_vocab(card: Any) -> PromptVocab:
    vocab = getattr(card, "prompt_vocab", None)
    return PromptVocab.from_dict(vocab) if vocab else DEFAULT_VOCAB


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
    names so that scores made with TTA are never mistaken for plain ones. (``auto`` needs no more:
    the policy lives in the card, so the model hash in the same label pins it.)"""
    if mode != AUTO:
        try:
            tta_transforms(mode)
        except ValueError:
            raise ValueError(f"unknown TTA mode {mode!r}; expected one of {', '.join(TTA_CHOICES)}") from None
    return "" if mode == "none" else f"+tta-{mode}"


def with_tta(backend: Backend, mode: str) -> Backend:
    """``backend`` itself for ``none`` (or ``auto`` with a card that holds no TTA), else a
    ``TTABackend`` around it."""
    policy = resolve_policy(mode, backend.card)
    return backend if policy.is_plain else TTABackend(backend, mode)


class TTABackend(Backend):
    """Averages an open backend's per-image outputs over the copies of a TTA mode.

    ``mode`` ``auto`` reads the policy from the wrapped backend's card: the rows of each call are
    grouped by the mode their prompt's modality gets, each group is expanded and averaged with its
    own mode, and the outputs go back in the rows' order. The wrapped backend splits the T·N copies into the batches its runtime accepts, so a
    TensorRT profile's limits still hold. ``score_volume`` scores the K slices of each volume with
    TTA through ``score`` and fuses them with ``engines.fusion`` (the scoring path's fusion);
    ``classify`` is passed through unchanged. Closing this object closes the wrapped backend.
    """

    def __init__(self, inner: Backend, mode: str) -> None:
        self.policy = resolve_policy(mode, inner.card)
        self.vocab = card_vocab(inner.card)
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
        if self.mode == AUTO:
            return f"{self.inner.describe()} + TTA auto ({self.policy.describe()})"
        return f"{self.inner.describe()} + TTA {self.mode} ({len(tta_transforms(self.mode))} copies)"

    def close(self) -> None:
        if not self._closed:
            self.inner.close()
        super().close()

    def _score(self, images: np.ndarray, prompt: np.ndarray) -> dict[str, np.ndarray]:
        modes = np.array(self.policy.modes_of(prompt, self.vocab))
        score = np.zeros(len(images), np.float32)
        logit = np.zeros(len(images), np.float32)
        for mode in dict.fromkeys(modes.tolist()):   # first-seen order: deterministic calls
            rows = np.flatnonzero(modes == mode)
            x, p = images[rows], prompt[rows]
            t = len(tta_transforms(mode))
            out = self.inner.score(expand(x, mode), np.concatenate([p] * t))
            score[rows] = average_copies(out[names.SCORE], len(rows))
            logit[rows] = average_copies(out[names.SLICE_LOGIT], len(rows))
        return {names.SCORE: score, names.SLICE_LOGIT: logit}

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

