"""Prompt vocabulary (paper §2.2: dimension / modality / region / type) and one-hot encoding.

The vocabulary is fixed per model artifact and recorded in its card; this module's
``DEFAULT_VOCAB`` is what new models are trained with. Each group is one-hot encoded separately
and the four groups are concatenated (``prompt`` vector, length ``vocab.size``). Unknown values
map to the group's ``other`` entry.

The DICOM-tag → prompt rules live in ``prompts_from_tags`` (below the vocabulary) and are
documented rule by rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

GROUPS: tuple[str, ...] = ("dimension", "modality", "region", "type")


@dataclass(frozen=True)
class PromptVocab:
    """Ordered labels per group. ``other`` must be the last entry of the non-dimension groups."""

    dimension: tuple[str, ...] = ("2d", "3d")
    modality: tuple[str, ...] = ("ct", "mr", "xr", "fundus", "us", "nm", "other")
    region: tuple[str, ...] = (
        "head", "chest", "abdomen", "pelvis", "breast", "spine", "extremity", "eye", "other",
    )
    type: tuple[str, ...] = (
        "lung", "soft", "bone", "t1", "t2", "flair", "dwi", "pd", "color", "grey", "other",
    )

    def labels(self, group: str) -> tuple[str, ...]:
        if group not in GROUPS:
            raise KeyError(f"unknown prompt group {group!r}; expected one of {GROUPS}")
        return getattr(self, group)

    @property
    def size(self) -> int:
        return sum(len(self.labels(g)) for g in GROUPS)

    def offsets(self) -> dict[str, int]:
        out, o = {}, 0
        for g in GROUPS:
            out[g] = o
            o += len(self.labels(g))
        return out

    def index(self, group: str, value: str | None) -> int:
        labels = self.labels(group)
        v = (value or "").lower()
        if v in labels:
            return labels.index(v)
        if group == "dimension":
            raise ValueError(f"dimension must be one of {labels}, got {value!r}")
        return labels.index("other")

    def to_dict(self) -> dict[str, list[str]]:
        return {g: list(self.labels(g)) for g in GROUPS}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PromptVocab":
        return cls(**{g: tuple(d[g]) for g in GROUPS})


DEFAULT_VOCAB = PromptVocab()


@dataclass(frozen=True)
class Prompt:
    """One study's prompt. ``source`` says where each group came from: tags / classifier / input / manifest."""

    dimension: str
    modality: str = "other"
    region: str = "other"
    type: str = "other"
    source: dict[str, str] = field(default_factory=dict, compare=False)

    def as_dict(self) -> dict[str, str]:
        return {g: getattr(self, g) for g in GROUPS}


def encode_prompt(prompt: Prompt, vocab: PromptVocab = DEFAULT_VOCAB) -> np.ndarray:
    """Concatenated one-hot vector, float32 (vocab.size,)."""
    vec = np.zeros(vocab.size, dtype=np.float32)
    offs = vocab.offsets()
    for g in GROUPS:
        vec[offs[g] + vocab.index(g, getattr(prompt, g))] = 1.0
    return vec


def decode_prompt(vec: np.ndarray, vocab: PromptVocab = DEFAULT_VOCAB) -> Prompt:
    """Inverse of ``encode_prompt`` (argmax per group)."""
    offs = vocab.offsets()
    vals = {}
    for g in GROUPS:
        labels = vocab.labels(g)
        vals[g] = labels[int(np.argmax(vec[offs[g]: offs[g] + len(labels)]))]
    return Prompt(**vals)
