"""Classical image statistics of the network input and the feature head (hybrid scoring).

``input_statistics`` measures nine classical distortion statistics on exactly the images the
network sees (the preprocessed slices, back in [0, 1] and averaged to grey): the noise σ
(``skimage.restoration.estimate_sigma``), the Laplacian variance, the fine (< 1 px) and middle
(1–3 px) band energies and their ratio, the gradient energy (logs of these six), the 8 × 8
blockiness (mean absolute step across every 8th column over the mean step), the
low-frequency non-uniformity (σ / mean of the 8 × 8 block means blurred by 4 blocks, ≈ 32 px)
and the clipped-bright fraction (pixels ≥ 0.98: saturated highlights, e.g. an over-exposed
radiograph's burnt-out regions). Studies with several slices average them over their salient
slices. Measured on the network input, they see what the network sees at the same scale whatever
the file's size, and scoring, evaluation and fitting get the same numbers from the same arrays.

Statistics versions: a later version only appends statistics (``VERSION_FEATURES``), so the
columns of an earlier version keep their definitions. A head records the names of the statistics
its ridges were fitted on and reads those columns, so a version-1 head (the first eight) scores
exactly as it did when it was fitted.

The **feature head** is one ridge regression per modality on those statistics and their
squares, fitted on the training split to the (label-scaled) target (inputs clipped to the
training studies' range of each statistic), and a blend weight α per modality: a study's score
is ``(1 − α) · q + α · clip(ridge, 0, 1)`` with q the network's (fused) score, both on the
model's [0, 1] scale. α is chosen on the validation split (``choose_blend``): the α of the grid
with the highest validation SRCC among those that beat the network with a paired bootstrap
interval above 0 and lose in none of the modality's (at least two) validation sources, the gain
measured without the sources the network cannot rank (SRCC ≤ 0) when it ranks others; none →
α = 0 (the network alone). The head is stored in the model card (``ModelCard.feature_head``)
and applied by ``mediqa score`` and ``mediqa evaluate`` unless ``--no-features``.

Why: on the synthetic corpus the network ranks X-ray blur, noise and JPEG worse than these eight
numbers do (held-out tiles, 2026-12-05: network 0.60, ridge 0.77 within X-ray), while it is
the better model for CT and fundus; the head lets each modality use what its validation split
says helps.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)

#: every statistic ``slice_statistics`` computes, in column order
FEATURE_NAMES: tuple[str, ...] = ("log_noise_sigma", "log_laplacian_var", "log_fine_energy",
                                  "log_mid_energy", "log_fine_mid_ratio", "log_gradient_energy",
                                  "blockiness", "nonuniformity", "clipped_bright")
STATISTICS_VERSION = 2
#: the statistics each version defines (a prefix of ``FEATURE_NAMES``: versions only append)
VERSION_FEATURES: dict[int, tuple[str, ...]] = {1: FEATURE_NAMES[:8], 2: FEATURE_NAMES}
CLIPPED_BRIGHT = 0.98   # grey level from which a pixel counts as clipped bright
BLEND_GRID: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
_EPS = 1e-8


def slice_statistics(grey: np.ndarray) -> np.ndarray:
    """The statistics (``FEATURE_NAMES``) of one grey image in [0, 1], float64 (9,)."""
    from scipy import ndimage  # noqa: PLC0415
    from skimage.restoration import estimate_sigma  # noqa: PLC0415

    g = np.asarray(grey, dtype=np.float64)
    if g.ndim != 2 or min(g.shape) < 16:
        raise ValueError(f"expected a 2D image of at least 16 x 16 pixels, got shape {g.shape}")
    g1, g3 = (ndimage.gaussian_filter(g, s) for s in (1.0, 3.0))
    fine = float(((g - g1) ** 2).mean())
    mid = float(((g1 - g3) ** 2).mean())
    gy, gx = np.gradient(g)
    dx = np.abs(np.diff(g, axis=1))
    block = float(dx[:, 7::8].mean() / (dx.mean() + _EPS))
    # the image's low frequencies: 8 × 8 block means, then a Gaussian of 4 blocks (≈ 32 px at a
    # tenth of the cost of filtering the full image)
    h8, w8 = g.shape[0] // 8 * 8, g.shape[1] // 8 * 8
    low = ndimage.gaussian_filter(g[:h8, :w8].reshape(h8 // 8, 8, w8 // 8, 8).mean(axis=(1, 3)), 4.0)
    nonuni = float(low.std() / (abs(low.mean()) + _EPS))
    sigma = float(estimate_sigma(g))
    return np.array([np.log(sigma + _EPS), np.log(float(ndimage.laplace(g).var()) + _EPS),
                     np.log(fine + _EPS), np.log(mid + _EPS), np.log((fine + _EPS) / (mid + _EPS)),
                     np.log(float((gx ** 2 + gy ** 2).mean()) + _EPS), block, nonuni,
                     float((g >= CLIPPED_BRIGHT).mean())])


def input_statistics(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Mean ``slice_statistics`` over a study's network inputs.

    images: (C, S, S) or (n, C, S, S) float, normalised with the model's ``mean`` / ``std``
    (C = 1 for the compact grey inputs of the scoring readers, else 3)."""
    return np.mean([slice_statistics(g) for g in input_grey(images, mean, std)], axis=0)


def input_grey(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Network inputs (C, S, S) or (n, C, S, S), normalised with ``mean`` / ``std``, back to grey
    images in [0, 1], (n, S, S) float32: un-normalised, clipped, averaged over the channels."""
    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"expected (C, S, S) or (n, C, S, S) inputs, got shape {x.shape}")
    c = x.shape[1]
    m = np.asarray(mean, dtype=np.float32)[:c, None, None]
    s = np.asarray(std, dtype=np.float32)[:c, None, None]
    return np.clip(x * s + m, 0.0, 1.0).mean(axis=1)


def statistics_or_none(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray | None:
    """``input_statistics``, or None when they cannot be measured (an exception, a non-finite
    value): the study is then scored by the network alone, never lost."""
    try:
        stats = input_statistics(images, mean, std)
    except Exception:  # noqa: BLE001 - a statistic must never cost a study its score
        logger.warning("input statistics failed; the network's score is used", exc_info=True)
        return None
    return stats if np.isfinite(stats).all() else None


def _design(f: np.ndarray, mu: np.ndarray, sd: np.ndarray) -> np.ndarray:
    z = (np.atleast_2d(f) - mu) / sd
    return np.concatenate([np.ones((len(z), 1)), z, z ** 2], axis=1)


@dataclass(frozen=True)
class RidgeHead:
    """One modality's ridge on k statistics (z-scored, plus squares) and its blend weight; which
    k statistics is the ``FeatureHead``'s ``features``."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    coef: tuple[float, ...]          # intercept, k linear, k squared terms
    blend: float = 0.0               # α: 0 = the network alone
    n_train: int = 0
    lo: tuple[float, ...] = ()       # the training studies' range of each statistic: inputs are
    hi: tuple[float, ...] = ()       # clipped to it, so the squares never extrapolate (() = no clip)

    def __post_init__(self) -> None:
        n = len(self.mean)
        if n == 0 or len(self.std) != n or len(self.coef) != 1 + 2 * n:
            raise ValueError(f"a ridge head needs {n} means / stds and {1 + 2 * n} coefficients")
        if not 0.0 <= float(self.blend) <= 1.0:
            raise ValueError(f"blend weight must be in [0, 1], got {self.blend}")
        if not all(np.isfinite(v) for v in (*self.mean, *self.std, *self.coef)) or min(self.std) <= 0:
            raise ValueError("a ridge head's numbers must be finite (std > 0)")
        if (self.lo or self.hi) and not (len(self.lo) == len(self.hi) == n
                                         and all(a <= b for a, b in zip(self.lo, self.hi))):
            raise ValueError(f"a ridge head's range needs {n} lows <= {n} highs")

    def predict(self, stats: np.ndarray) -> np.ndarray:
        """Ridge predictions on the model's [0, 1] scale, clipped to it; stats (k,) or (n, k),
        each clipped to the training range first (an image unlike every training study gets the
        prediction of the nearest edge of that range, not a quadratic extrapolation)."""
        f = np.asarray(stats, dtype=np.float64)
        if self.lo:
            f = np.clip(f, np.asarray(self.lo), np.asarray(self.hi))
        x = _design(f, np.asarray(self.mean), np.asarray(self.std))
        return np.clip(x @ np.asarray(self.coef), 0.0, 1.0)


@dataclass(frozen=True)
class FeatureHead:
    """Per-modality ``RidgeHead``s (see the module docstring); modalities without one keep q."""

    heads: Mapping[str, RidgeHead] = field(default_factory=dict)
    penalty: float = 1.0
    features: tuple[str, ...] = FEATURE_NAMES   # the statistics the ridges read, by name
    selection: Mapping[str, Any] = field(default_factory=dict)   # how the α were chosen (report)

    def __post_init__(self) -> None:
        unknown = [n for n in self.features if n not in FEATURE_NAMES]
        if not self.features or unknown or len(set(self.features)) != len(self.features):
            raise ValueError(f"a feature head needs distinct statistics of {list(FEATURE_NAMES)}, "
                             f"got {list(self.features)}")
        for m, h in self.heads.items():
            if len(h.mean) != len(self.features):
                raise ValueError(f"the ridge for {m!r} has {len(h.mean)} statistics, the head names "
                                 f"{len(self.features)}")

    @property
    def version(self) -> int:
        """The first statistics version that defines every statistic the head reads."""
        return min(v for v, names in VERSION_FEATURES.items() if set(self.features) <= set(names))

    def select(self, stats: np.ndarray) -> np.ndarray:
        """The head's columns of full statistics (``FEATURE_NAMES``), (..., k)."""
        f = np.asarray(stats, dtype=np.float64)
        if f.shape[-1] != len(FEATURE_NAMES):
            raise ValueError(f"expected the {len(FEATURE_NAMES)} statistics of version {STATISTICS_VERSION}, "
                             f"got shape {f.shape}")
        return f[..., [FEATURE_NAMES.index(n) for n in self.features]]

    @property
    def blends(self) -> dict[str, float]:
        """Blend weight α per modality with a ridge, by name."""
        return {m: float(h.blend) for m, h in sorted(self.heads.items())}

    @property
    def blending(self) -> tuple[str, ...]:
        """The modalities whose α > 0 (their studies need the input statistics), by name."""
        return tuple(m for m, a in self.blends.items() if a > 0)

    @property
    def active(self) -> bool:
        return bool(self.blending)

    def blend_for(self, modality: str | None) -> float:
        h = self.heads.get(modality or "")
        return float(h.blend) if h is not None else 0.0

    def apply(self, q: np.ndarray | float, stats: np.ndarray | None, modality: str | None) -> np.ndarray | float:
        """``(1 − α) q + α ridge(stats)`` for the modality's α; q unchanged where α = 0."""
        a = self.blend_for(modality)
        if a <= 0:
            return q
        if stats is None:
            raise ValueError("the feature head needs the study's input statistics")
        r = self.heads[modality or ""].predict(self.select(stats))
        out = (1.0 - a) * np.asarray(q, dtype=np.float64) + a * (r if np.ndim(q) else float(r[0]))
        return float(out) if np.ndim(q) == 0 else out

    def describe(self) -> str:
        """"xr 0.75" — the modalities that blend and their weights; "none" when none does."""
        return describe_blends(self.blends)

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "penalty": self.penalty, "features": list(self.features),
                "heads": {m: {k: (list(v) if isinstance(v, tuple) else v)
                              for k, v in dataclasses.asdict(h).items()} for m, h in sorted(self.heads.items())},
                "selection": dict(self.selection)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FeatureHead":
        if not isinstance(d, Mapping):
            raise ValueError(f"feature_head must be a JSON object, got {type(d).__name__}")
        version = int(d.get("version", 0))
        names = [str(n) for n in d.get("features", [])]
        if version not in VERSION_FEATURES or not set(names) <= set(VERSION_FEATURES[version]):
            raise ValueError(f"feature_head was fitted on statistics version {version} / "
                             f"{d.get('features')}; this version computes versions "
                             f"{sorted(VERSION_FEATURES)} ({list(FEATURE_NAMES)})")
        heads = {}
        for m, h in dict(d.get("heads", {})).items():
            try:
                heads[str(m)] = RidgeHead(mean=tuple(map(float, h["mean"])), std=tuple(map(float, h["std"])),
                                          coef=tuple(map(float, h["coef"])), blend=float(h.get("blend", 0.0)),
                                          n_train=int(h.get("n_train", 0)), lo=tuple(map(float, h.get("lo", ()))),
                                          hi=tuple(map(float, h.get("hi", ()))))
            except (KeyError, TypeError) as exc:
                raise ValueError(f"feature_head for {m!r} is incomplete: {exc}") from None
        return cls(heads=heads, penalty=float(d.get("penalty", 1.0)), features=tuple(names),
                   selection=dict(d.get("selection", {})))


def describe_blends(blends: Mapping[str, float]) -> str:
    """``{"xr": 0.75, "ct": 0.0}`` → ``"xr 0.75"``: the modalities that blend, by name; "none"."""
    parts = [f"{m} {a:g}" for m, a in sorted(blends.items()) if a > 0]
    return ", ".join(parts) if parts else "none"


def fit_feature_head(stats: np.ndarray, targets: np.ndarray, modalities: Sequence[str | None], *,
                     penalty: float = 1.0, min_studies: int = 20,
                     features: Sequence[str] = FEATURE_NAMES) -> FeatureHead:
    """One ridge per modality with at least ``min_studies`` studies on the named ``features``;
    every blend weight 0.

    stats (n, 9): every statistic (``FEATURE_NAMES``); targets (n,) on the model's [0, 1] scale."""
    f = np.asarray(stats, dtype=np.float64)
    t = np.asarray(targets, dtype=np.float64)
    mods = np.asarray([m or "" for m in modalities])
    if f.ndim != 2 or f.shape[1] != len(FEATURE_NAMES) or len(f) != len(t) or len(t) != len(mods):
        raise ValueError(f"stats must be (n, {len(FEATURE_NAMES)}) with one target and modality each")
    empty = FeatureHead(penalty=penalty, features=tuple(features))
    f = empty.select(f)
    heads: dict[str, RidgeHead] = {}
    for m in sorted({str(v) for v in mods} - {""}):
        sel = (mods == m) & np.isfinite(f).all(axis=1) & np.isfinite(t)
        if sel.sum() < min_studies:
            logger.info("feature head: %s has %d studies (< %d); no ridge", m, int(sel.sum()), min_studies)
            continue
        mu, sd = f[sel].mean(axis=0), f[sel].std(axis=0) + 1e-8
        x = _design(f[sel], mu, sd)
        reg = penalty * np.eye(x.shape[1])
        reg[0, 0] = 0.0   # the intercept is not shrunk
        coef = np.linalg.solve(x.T @ x + reg, x.T @ t[sel])
        heads[m] = RidgeHead(mean=tuple(mu), std=tuple(sd), coef=tuple(coef), n_train=int(sel.sum()),
                             lo=tuple(f[sel].min(axis=0)), hi=tuple(f[sel].max(axis=0)))
    return dataclasses.replace(empty, heads=heads)


def choose_blend(head: FeatureHead, stats: np.ndarray, q: np.ndarray, targets: np.ndarray,
                 modalities: Sequence[str | None], groups: Sequence[str | None], *,
                 grid: Sequence[float] = BLEND_GRID, confidence: float = 0.95, min_studies: int = 20,
                 min_groups: int = 2, seed: int = 0) -> FeatureHead:
    """``head`` with each modality's α chosen on these (validation) studies.

    q: the network's scores of the same studies on the [0, 1] scale (with the TTA the model
    scores with); groups: each study's source (base image, patient), None = unknown.
    A weight α of ``grid`` is eligible for a modality when (1) its studies come from at least
    ``min_groups`` sources with ``min_studies`` studies each, (2) the paired bootstrap interval
    of SRCC(blend) − SRCC(q) over the modality's studies lies above 0 and (3) within every such
    source the blend's SRCC is at least the network's. The eligible α with the largest SRCC
    wins; none → 0. (2) alone is not enough: a validation split holding one image of a modality
    tells about that image — on the 2026-12-05 corpus it picked α = 0.5 for CT from one CT
    source the network could not rank (−0.04), and the held-out CT source lost 0.25.
    When the network ranks some of the sources (SRCC > 0), the others are left out of (1) and of
    the pooled SRCC and interval of (2), though not of (3): where the network ranks nothing, any
    statistic that tracks the degradation "gains", and that says nothing about the blend where
    the network works (when it ranks no source at all, every source counts). Twice on the
    two-source validation split (val2 lineage, 2026-12-05) such a source (``CT_small``, network
    −0.17 / −0.27) carried a CT blend whose pooled interval lay above 0 (without it:
    [−0.018, +0.073] and [−0.014, +0.069]); on the held-out CT both blends lost (0.650 vs 0.659,
    0.550 vs 0.565). The returned head's ``selection`` records every number
    the choice looked at (``srcc`` / ``interval`` over the ``n_gain`` studies, ``left_out``)."""
    from engines.metrics import srcc, srcc_ci  # noqa: PLC0415

    f = np.asarray(stats, dtype=np.float64)
    qq = np.asarray(q, dtype=np.float64)
    t = np.asarray(targets, dtype=np.float64)
    mods = np.asarray([m or "" for m in modalities])
    grp = np.asarray([g or "" for g in groups])
    if not (len(f) == len(qq) == len(t) == len(mods) == len(grp)):
        raise ValueError("stats, q, targets, modalities and groups must have one entry per study")
    heads = dict(head.heads)
    selection: dict[str, Any] = {
        "rule": (f"largest validation SRCC among the blend weights whose paired {confidence:.0%} bootstrap "
                 f"interval against the network lies above 0 and that lose in no source; needs "
                 f">= {min_groups} sources of >= {min_studies} studies; SRCC and interval without the "
                 f"sources the network ranks <= 0 when it ranks others"),
        "grid": list(grid), "confidence": confidence, "min_studies": min_studies, "min_sources": min_groups,
        "modalities": {}}
    for m, h in sorted(heads.items()):
        sel = mods == m
        names, counts = np.unique(grp[sel & (grp != "")], return_counts=True)
        # a source needs min_studies studies, and at least 3 to have a rank correlation at all
        sources = [str(n) for n, c in zip(names, counts) if c >= max(min_studies, 3)]
        rec: dict[str, Any] = {"n": int(sel.sum()), "sources": sources}
        best = 0.0
        qs, ts, gs = qq[sel], t[sel], grp[sel]
        per_base = {u: srcc(qs[gs == u], ts[gs == u]) for u in sources}
        # sources the network ranks at SRCC <= 0 (NaN: a constant score) show no gain when it
        # ranks others; when it ranks none, every source is evidence that the head does better
        ranked = [u for u in sources if per_base[u] > 0]
        left_out = [u for u in sources if u not in ranked] if ranked else []
        if left_out:
            rec["left_out"] = left_out
        if len(sources) - len(left_out) >= min_groups:
            ridge_all = h.predict(head.select(f[sel])) if sel.any() else np.zeros(0)
            ev = ~np.isin(gs, left_out)                      # the studies that can show a gain
            base = srcc(qs[ev], ts[ev])
            rec["n_gain"] = int(ev.sum())
            rec["srcc"], rec["interval"], rec["per_source"] = {"0": base}, {}, {"0": per_base}
            best_srcc = base
            for a in grid:
                mix = (1.0 - a) * qs + a * ridge_all
                s = srcc(mix[ev], ts[ev])
                lo, hi = srcc_ci(mix[ev], ts[ev], compare=qs[ev], confidence=confidence, seed=seed)
                per = {u: srcc(mix[gs == u], ts[gs == u]) for u in sources}
                rec["srcc"][str(a)], rec["interval"][str(a)], rec["per_source"][str(a)] = s, [lo, hi], per
                holds = all(per[u] >= per_base[u] for u in sources)
                if np.isfinite(lo) and lo > 0 and holds and s > best_srcc:
                    best, best_srcc = float(a), s
        rec["blend"] = best
        selection["modalities"][m] = rec
        heads[m] = dataclasses.replace(h, blend=best)
        logger.info("feature head: %s blend %.2f over %d studies from %d sources%s", m, best, rec["n"], len(sources),
                    f" ({', '.join(left_out)} not ranked by the network: left out of the gain)" if left_out else "")
    return dataclasses.replace(head, heads=heads, selection=selection)


def card_feature_head(card: Any, use: bool = True) -> FeatureHead | None:
    """The card's feature head when ``use`` and it blends any modality, else None."""
    d = getattr(card, "feature_head", None)
    if not use or not d:
        return None
    head = FeatureHead.from_dict(d)
    return head if head.active else None


def features_suffix(card: Any, use: bool) -> str:
    """``"+no-features"`` when ``use`` is False on a card whose feature head blends a modality
    (the model hash in a label pins the head, so on needs no suffix); else ``""``. Appended to
    model labels and resume keys like ``engines.tta.tta_suffix``."""
    return "+no-features" if not use and card_feature_head(card, True) is not None else ""
