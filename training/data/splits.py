"""Deterministic train / val / test splits grouped so that no patient, series or source image
appears in two splits (paper §3.1: 8:1:1; DESIGN §7).

Rule: the distinct group keys (already non-identifying sha256 hex, see
``datasets._group_key``) are ordered by ``sha256(salt + key)``; the first ``round(n·r_val)`` groups
go to val, the next ``round(n·r_test)`` to test, the rest to train. With at least three groups
and non-zero ratios val and test get one group each at minimum. The result depends only on the
set of keys and the salt, not on the order of the rows or the machine.

When a manifest fixes the split of every row (the synthetic corpus does, so that its test split
uses different source images), that split is used as is and only checked for leakage.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Iterable, Sequence, TypeVar

from engines.errors import DatasetError

SPLITS = ("train", "val", "test")
T = TypeVar("T")


def _order(key: str, salt: str) -> str:
    return hashlib.sha256(f"{salt}\x00{key}".encode("utf-8")).hexdigest()


def split_groups(keys: Iterable[str], ratios: Sequence[float] = (0.8, 0.1, 0.1),
                 salt: str = "mediqa-split-v1") -> dict[str, str]:
    """group key → "train" | "val" | "test"."""
    uniq = sorted(set(keys), key=lambda k: _order(k, salt))
    n = len(uniq)
    total = float(sum(ratios))
    r_val, r_test = ratios[1] / total, ratios[2] / total
    n_val, n_test = round(n * r_val), round(n * r_test)
    if n >= 3:
        n_val = max(n_val, 1 if r_val > 0 else 0)
        n_test = max(n_test, 1 if r_test > 0 else 0)
    n_val = min(n_val, n)
    n_test = min(n_test, n - n_val)
    out = {}
    for i, k in enumerate(uniq):
        out[k] = "val" if i < n_val else "test" if i < n_val + n_test else "train"
    return out


def check_no_leakage(assign: Iterable[tuple[str, str]]) -> None:
    """Raise DatasetError when one group key occurs in more than one split."""
    seen: dict[str, set[str]] = defaultdict(set)
    for key, split in assign:
        seen[key].add(split)
    leaks = [k for k, s in seen.items() if len(s) > 1]
    if leaks:
        raise DatasetError(f"{len(leaks)} group(s) occur in more than one split, e.g. key "
                           f"{leaks[0][:12]}… in {sorted(seen[leaks[0]])}; fix the manifest's split column")


def assign_splits(samples: Sequence[T], ratios: Sequence[float] = (0.8, 0.1, 0.1),
                  salt: str = "mediqa-split-v1") -> dict[str, list[T]]:
    """Samples (with ``.group`` and ``.split``) → {"train": [...], "val": [...], "test": [...]}.

    A manifest split is used when every sample has one; a partial split column is an error.
    """
    given = [getattr(s, "split", None) for s in samples]
    out: dict[str, list[T]] = {k: [] for k in SPLITS}
    if any(g is not None for g in given):
        if not all(g is not None for g in given):
            n_missing = sum(g is None for g in given)
            raise DatasetError(f"the split column is empty for {n_missing} of {len(given)} rows; "
                               "fill it everywhere or leave it out")
        check_no_leakage((s.group, s.split) for s in samples)  # type: ignore[attr-defined]
        for s in samples:
            out[s.split].append(s)  # type: ignore[attr-defined]
        return out
    table = split_groups((s.group for s in samples), ratios, salt)  # type: ignore[attr-defined]
    for s in samples:
        out[table[s.group]].append(s)  # type: ignore[attr-defined]
    return out
