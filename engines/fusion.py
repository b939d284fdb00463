"""Slice-score fusion outside the graph (numpy), identical to ``MedIQANet.forward_volume``.

Scoring mixes 2D images and 3D slices in one batch through the 2D graph, which also returns each
slice's fusion logit; the K slices of a series are then fused here.
"""

from __future__ import annotations

import numpy as np


def fuse_slice_scores(slice_scores: np.ndarray, slice_logits: np.ndarray) -> tuple[float, np.ndarray]:
    """(K,) scores and (K,) logits → (score, softmax weights (K,) float32 summing to 1)."""
    s = np.asarray(slice_scores, dtype=np.float64).reshape(-1)
    z = np.asarray(slice_logits, dtype=np.float64).reshape(-1)
    if s.shape != z.shape or s.size == 0:
        raise ValueError(f"need K matching scores and logits, got {s.shape} and {z.shape}")
    w = np.exp(z - z.max())
    w /= w.sum()
    return float((w * s).sum()), w.astype(np.float32)
