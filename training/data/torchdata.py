"""Torch side of the data: prepared studies → tensors, and a collate that keeps 2D and 3D apart.

A batch may mix 2D images (3, S, S) and 3D studies (K, 3, S, S). :func:`collate_studies` stacks
each kind separately; the loop runs ``model.forward`` on the 2D group and
``model.forward_volume`` on the 3D group and combines the two losses weighted by their counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from training.data.cache import InputCache
from training.data.datasets import Sample

IGNORE = -100   # classifier label for a group neither tags nor manifest determine


@dataclass
class Item:
    """One prepared study ready for the loop.

    key:     its ``InputCache`` key.
    kind:    "2d" | "3d".
    prompt:  float32 (P,) one-hot groups (``engines.prompts.encode_prompt``).
    target:  label scaled to [0, 1] (IQA tasks); NaN for classifier-only data.
    labels:  classifier class index per group (modality, region, type); IGNORE when unknown.
    prompt_values / prompt_sources: the resolved prompt (for per-group metrics and reports).
    """

    key: str
    kind: str
    prompt: np.ndarray
    target: float
    sample: Sample
    labels: tuple[int, int, int] = (IGNORE, IGNORE, IGNORE)
    prompt_values: dict[str, str] = field(default_factory=dict)
    prompt_sources: dict[str, str] = field(default_factory=dict)


class StudyDataset(Dataset):
    """Items → dicts of tensors (training-only augmentation; evaluation is deterministic).

    ``flip``: random horizontal flip. ``rot90``: random multiple of 90° in the image plane; with
    ``flip`` that is the full dihedral group — content changes, noise / blur / ringing statistics
    do not, which pushes a small-data model towards degradation rather than anatomy.
    ``gamma``: a random monotone intensity curve per study, ``u ** exp(t)`` with ``t`` uniform in
    ``[-gamma, gamma]`` on the [0, 1] image (undoing and redoing the cache's mean / std
    normalisation; every slice of a volume gets the same curve): how bright a source's anatomy is
    and how its tissues are spread over the window changes, the degradation does not.
    """

    def __init__(self, items: list[Item], cache: InputCache, *, flip: bool = False, rot90: bool = False,
                 gamma: float = 0.0) -> None:
        self.items = items
        self.cache = cache
        self.content = content_ids(items)
        self.flip = flip
        self.rot90 = rot90
        self.gamma = float(gamma)
        cfg = getattr(cache, "cfg", None)
        self._mean = torch.tensor(getattr(cfg, "mean", (0.5, 0.5, 0.5)), dtype=torch.float32)[:, None, None]
        self._std = torch.tensor(getattr(cfg, "std", (0.5, 0.5, 0.5)), dtype=torch.float32)[:, None, None]

    def _intensity(self, x: torch.Tensor) -> torch.Tensor:
        t = float(torch.empty(()).uniform_(-self.gamma, self.gamma))
        unit = (x * self._std + self._mean).clamp_(0.0, 1.0)
        return (unit.pow_(float(np.exp(t))) - self._mean) / self._std

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        it = self.items[i]
        x = torch.from_numpy(np.ascontiguousarray(self.cache.get(it.key).images, dtype=np.float32))
        if self.flip and bool(torch.rand(()) < 0.5):
            x = x.flip(-1)
        if self.rot90:
            k = int(torch.randint(0, 4, ()))
            if k:
                x = torch.rot90(x, k, dims=(-2, -1))
        if self.gamma > 0:
            x = self._intensity(x)
        return {"x": x, "kind": it.kind, "prompt": torch.from_numpy(it.prompt),
                "target": torch.tensor(it.target, dtype=torch.float32),
                "labels": torch.tensor(it.labels, dtype=torch.long), "index": i,
                "content": self.content[i]}


def _indices_by_key(keys: list[Any], batch_size: int) -> list[list[int]]:
    """The indices of ``keys`` grouped by key, groups in sorted key order (the batch samplers'
    common start); ValueError when ``batch_size`` < 1."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    by: dict[Any, list[int]] = {}
    for i, k in enumerate(keys):
        by.setdefault(k, []).append(i)
    return [v for _, v in sorted(by.items())]


class GroupedBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices that share one group value (e.g. the modality).

    Each epoch shuffles the indices within each group, cuts every group into
    ``ceil(n / batch_size)`` batches of near-equal size (no batch of one when the group has
    more than one member; nothing is dropped) and shuffles the order of all batches. Every
    index appears exactly once per epoch. Randomness comes from ``generator`` only, so a run
    is reproducible for a given seed. With the ``mse+plcc`` loss the batch's PLCC term then
    measures a within-group correlation, the quantity the per-modality SRCC judges, instead
    of one dominated by offsets between modalities.
    """

    def __init__(self, groups: list[str], batch_size: int, generator: torch.Generator | None = None) -> None:
        self._groups = [np.asarray(v, dtype=np.int64) for v in _indices_by_key([str(g) for g in groups], batch_size)]
        self.batch_size = int(batch_size)
        self.generator = generator

    def _n_batches(self, n: int) -> int:
        return -(-n // self.batch_size)

    def __len__(self) -> int:
        return sum(self._n_batches(len(g)) for g in self._groups)

    def __iter__(self):  # type: ignore[no-untyped-def]
        batches: list[list[int]] = []
        for g in self._groups:
            perm = g[torch.randperm(len(g), generator=self.generator).numpy()]
            batches.extend(c.tolist() for c in np.array_split(perm, self._n_batches(len(g))))
        for j in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[j]


class RepeatSampler(Sampler[int]):
    """Dataset indices in which index ``i`` appears ``repeats[i]`` times per epoch, in one random
    order (``modality_repeat``: over-weighting the studies of a hard modality without copying rows).

    The epoch's length, ``sum(repeats)``, is fixed, so the schedule's step count holds; each copy
    goes through the dataset again, so its augmentation (flip, rotation, gamma) is drawn afresh.
    Randomness comes from ``generator`` only. ValueError for a repeat below 1.
    """

    def __init__(self, repeats: list[int], generator: torch.Generator | None = None) -> None:
        if any(int(r) < 1 for r in repeats):
            raise ValueError(f"every repeat must be >= 1, got {min(repeats)}")
        self._index = np.repeat(np.arange(len(repeats), dtype=np.int64), np.asarray(repeats, dtype=np.int64))
        self.generator = generator

    def __len__(self) -> int:
        return int(self._index.size)

    def __iter__(self):  # type: ignore[no-untyped-def]
        yield from self._index[torch.randperm(self._index.size, generator=self.generator).numpy()].tolist()


def content_key(sample: Sample) -> str:
    """The anatomy a study shows: the manifest's ``content`` column (a sibling's original, see
    ``mediqa synth --train-siblings``) or, without one, the study's own path."""
    return sample.extra.get("content") or sample.path


def content_ids(items: list[Item]) -> list[int]:
    """One integer per item; items that show the same content (``content_key``; an item without
    a sample: its cache key) share it."""
    ids: dict[str, int] = {}
    return [ids.setdefault(content_key(it.sample) if it.sample is not None else it.key, len(ids))
            for it in items]


class ContentBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices in which the studies of one content (``content_ids``: an
    original and its siblings) always travel together, for the ``pairdiff`` losses.

    ``ceil(n / batch_size)`` batches per epoch (fewer only with fewer contents), a fixed number, so
    the schedule's step count holds. Each epoch shuffles the contents and deals each, whole, to the
    batch that holds the fewest studies so far, then shuffles the batches: sizes differ by less
    than the largest content, and a batch exceeds ``batch_size`` by at most that content's size − 1.
    Every index appears exactly once per epoch; randomness comes from ``generator`` only.
    """

    def __init__(self, content: list[int], batch_size: int, generator: torch.Generator | None = None) -> None:
        self._groups = _indices_by_key([int(c) for c in content], batch_size)
        self.batch_size = int(batch_size)
        self.generator = generator
        self._n = min(len(self._groups), -(-len(content) // self.batch_size))

    def __len__(self) -> int:
        return self._n

    def __iter__(self):  # type: ignore[no-untyped-def]
        import heapq  # noqa: PLC0415

        batches: list[list[int]] = [[] for _ in range(self._n)]
        heap = [(0, k) for k in range(self._n)]   # (studies so far, batch)
        for g in torch.randperm(len(self._groups), generator=self.generator).tolist():
            load, k = heapq.heappop(heap)
            batches[k].extend(self._groups[g])
            heapq.heappush(heap, (load + len(self._groups[g]), k))
        for k in torch.randperm(self._n, generator=self.generator).tolist():
            yield batches[k]


def _stack(group: list[dict[str, Any]], name: str) -> dict[str, torch.Tensor] | None:
    if not group:
        return None
    return {name: torch.stack([g["x"] for g in group]),
            "prompt": torch.stack([g["prompt"] for g in group]),
            "target": torch.stack([g["target"] for g in group]),
            "labels": torch.stack([g["labels"] for g in group]),
            "index": torch.tensor([g["index"] for g in group], dtype=torch.long),
            "content": torch.tensor([g["content"] for g in group], dtype=torch.long)}


def collate_studies(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """{"2d": {"images" (n,3,S,S), "prompt" (n,P), "target" (n,), "labels" (n,3), "index" (n,)} | None,
        "3d": {"volumes" (m,K,3,S,S), ...} | None, "n": n + m}."""
    return {"2d": _stack([b for b in batch if b["kind"] != "3d"], "images"),
            "3d": _stack([b for b in batch if b["kind"] == "3d"], "volumes"),
            "n": len(batch)}
