"""Deterministic preprocessing shared by training and scoring (DESIGN §5).

One implementation: ``preprocess_slice`` turns one decoded slice in physical units into the
network input. The ``PreprocessConfig`` used to train a model is stored in its card and scoring
rebuilds it from there, never from command-line flags.

Steps:
1. intensity → [0, 1]: CT is windowed (by prompt type: lung 1500/-600, soft 400/40, bone
   2000/300; otherwise the series' WindowWidth/WindowCenter tags; otherwise soft) and clipped;
   every other modality uses a robust min-max between the ``percentiles`` of the slice.
   RGB images are scaled per image over all channels (colour balance is quality information).
2. grey → 3 channels by repetition; RGB stays RGB.
3. resize to ``image_size`` × ``image_size`` with anti-aliasing (Pillow's area-aware bilinear
   filter on float32 data, which widens its support when downscaling). With ``ct_pixel_mm``
   set, a CT slice whose in-plane spacing is known is instead resampled to that physical pixel
   size and centred on a fixed canvas of ``image_size`` pixels (``image_size × ct_pixel_mm`` mm
   across; larger fields of view are cropped to the centre, smaller ones padded with 0, the
   air of every CT window). One network pixel is then the same millimetres on every scanner,
   so blur in mm and noise per area mean the same on a 0.3 mm and a 1.7 mm reconstruction.
   Off (None) by default; a model trained with it records it in its card like every other
   step, and scoring applies it from there.
4. normalise: ``(x - mean) / std`` per channel → float32 (3, S, S), roughly in [-1, 1].
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
from PIL import Image


# options added after models were shipped, and their "off" value: to_dict leaves them out when off
_ABSENT_WHEN_OFF: dict[str, Any] = {"ct_pixel_mm": None, "keep_aspect": False}


@dataclass(frozen=True)
class PreprocessConfig:
    image_size: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # CT windows as (width, centre) in HU, selected by the prompt's ``type``.
    ct_windows: Mapping[str, tuple[float, float]] = field(
        default_factory=lambda: {"lung": (1500.0, -600.0), "soft": (400.0, 40.0), "bone": (2000.0, 300.0)}
    )
    ct_default_window: tuple[float, float] = (400.0, 40.0)
    use_window_tags: bool = True
    percentiles: tuple[float, float] = (0.5, 99.5)
    resample: str = "bilinear"
    ct_pixel_mm: float | None = None    # CT: resample to this in-plane pixel size (mm); None = off
    keep_aspect: bool = False           # True: one scale factor for both axes (long side → S, short
                                        # side padded with 0); False: stretch each axis to S

    def __post_init__(self) -> None:
        if self.ct_pixel_mm is not None and not (np.isfinite(self.ct_pixel_mm) and self.ct_pixel_mm > 0):
            raise ValueError(f"ct_pixel_mm must be a positive number of mm or None, got {self.ct_pixel_mm!r}")
        if not isinstance(self.keep_aspect, bool):
            raise ValueError(f"keep_aspect must be true or false, got {self.keep_aspect!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ct_windows"] = {k: list(v) for k, v in self.ct_windows.items()}
        for key, off in _ABSENT_WHEN_OFF.items():
            # absent when off: the cards (and input-cache keys) of models trained before the
            # option existed describe the same preprocessing as before
            if d[key] == off:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PreprocessConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown PreprocessConfig keys: {sorted(unknown)}")
        kw: dict[str, Any] = dict(d)
        for k in ("mean", "std", "percentiles", "ct_default_window"):
            if k in kw:
                kw[k] = tuple(float(x) for x in kw[k])
        if "ct_windows" in kw:
            kw["ct_windows"] = {k: (float(v[0]), float(v[1])) for k, v in kw["ct_windows"].items()}
        if kw.get("ct_pixel_mm") is not None:
            kw["ct_pixel_mm"] = float(kw["ct_pixel_mm"])
        return cls(**kw)


_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
             "area": Image.Resampling.BOX}


def ct_window_for(ptype: str | None, cfg: PreprocessConfig,
                  window_tags: tuple[float, float] | None = None) -> tuple[float, float]:
    """(width, centre) in HU for a CT slice of prompt type ``ptype``."""
    if ptype in cfg.ct_windows:
        return cfg.ct_windows[ptype]
    if cfg.use_window_tags and window_tags is not None and window_tags[0] > 1:
        return window_tags
    return cfg.ct_default_window


def apply_window(img: np.ndarray, width: float, centre: float) -> np.ndarray:
    """HU → [0, 1] with clipping. float32 in, float32 out, same shape."""
    lo = centre - width / 2.0
    out = (img.astype(np.float32) - np.float32(lo)) / np.float32(width)
    return np.clip(out, 0.0, 1.0, out=out)


# Exact percentiles by selection: below this many values np.percentile's own partition is as
# fast; above it a strided sample bounds the few values each percentile needs.
_SELECT_MIN = 4096
_SAMPLE = 2048


def _order_stats(flat: np.ndarray, ranks: tuple[int, int], bound: float, low: bool) -> tuple[float, float] | None:
    """The values at ascending sorted positions ``ranks`` of ``flat`` (no NaN), exactly, computed
    from the elements on the far side of ``bound`` (``<= bound`` when ``low``, else ``>= bound``)
    only; None when fewer elements than needed lie there (the caller then sorts everything)."""
    n = flat.size
    need = ranks[1] + 1 if low else n - ranks[0]
    if int(np.count_nonzero(flat <= bound if low else flat >= bound)) < need:
        return None
    # The elements strictly beyond ``bound`` are a contiguous block of the sorted array: its
    # start (low side) or its end (high side); every other needed position holds ``bound``.
    beyond = flat[flat < bound] if low else flat[flat > bound]
    offset = 0 if low else n - beyond.size
    inside = sorted({r - offset for r in ranks if 0 <= r - offset < beyond.size})
    if inside:
        beyond.partition(inside)
    a, b = (float(beyond[r - offset]) if 0 <= r - offset < beyond.size else float(bound) for r in ranks)
    return a, b


def exact_percentiles(values: np.ndarray, qs: tuple[float, ...]) -> list[float]:
    """``np.percentile(values, qs)`` (its default "linear" method, the same float64 results) for
    NaN-free data, in a fraction of the time on full-resolution images: each percentile needs two
    order statistics, which are selected among the few values beyond a bound read off a strided
    sample (checked by counting, so the result is exact whatever the sample) instead of
    partitioning every pixel. ``tests/test_preprocess.py`` compares it with ``np.percentile``."""
    flat = np.ravel(values)
    n = flat.size
    if n < _SELECT_MIN or flat.dtype not in (np.float32, np.float64):
        return [float(v) for v in np.percentile(flat, qs)]
    sample = np.sort(flat[:: max(1, n // _SAMPLE)])
    m = sample.size
    out: list[float] = []
    for q in np.asarray(qs, dtype=np.float64) / 100.0:
        virtual = (n - 1) * q
        prev = int(np.floor(virtual))
        ranks = (prev, min(prev + 1, n - 1))
        low = q <= 0.5
        # A bound about twice as far out as the rank's share of the sample: beyond it lie a few
        # more values than the rank needs, and few enough to select among cheaply.
        share = (ranks[1] + 1) / n if low else (n - ranks[0]) / n
        j = min(m - 1, int(np.ceil(share * m * 2)) + 8)
        stats = _order_stats(flat, ranks, float(sample[j] if low else sample[m - 1 - j]), low)
        if stats is None:
            return [float(v) for v in np.percentile(flat, qs)]
        a, b = stats
        gamma = virtual - prev
        diff = float(np.float32(b) - np.float32(a)) if flat.dtype == np.float32 else b - a
        # numpy's _lerp: from the nearer end, the difference taken in the input's dtype.
        out.append(b - diff * (1.0 - gamma) if gamma >= 0.5 else a + diff * gamma)
    return out


def robust_minmax(img: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """Scale to [0, 1] between the given percentiles; a constant image maps to zeros."""
    x = img.astype(np.float32, copy=False)
    finite_mask = np.isfinite(x)
    all_finite = bool(finite_mask.all())
    finite = x if all_finite else x[finite_mask]
    if finite.size == 0:
        return np.zeros_like(x, dtype=np.float32)
    lo, hi = exact_percentiles(finite, percentiles)
    if not hi > lo:
        lo, hi = float(finite.min()), float(finite.max())
    if not hi > lo:
        return np.zeros_like(x, dtype=np.float32)
    out = np.subtract(x if all_finite else np.nan_to_num(x, nan=lo), np.float32(lo), dtype=np.float32)
    out /= np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


def to_unit_range(img: np.ndarray, modality: str | None, ptype: str | None,
                  cfg: PreprocessConfig, window_tags: tuple[float, float] | None = None) -> np.ndarray:
    """Physical units → [0, 1]. (H, W) or (H, W, 3) float32."""
    if (modality or "").lower() == "ct" and img.ndim == 2:
        w, c = ct_window_for(ptype, cfg, window_tags)
        return apply_window(img, w, c)
    return robust_minmax(img, cfg.percentiles)


def resize_unit(img: np.ndarray, size: int, resample: str = "bilinear") -> np.ndarray:
    """Anti-aliased resize of a [0, 1] image to (size, size[, 3]) float32."""
    mode = _RESAMPLE[resample]
    if img.ndim == 2:
        return np.asarray(Image.fromarray(np.ascontiguousarray(img, dtype=np.float32), mode="F")
                          .resize((size, size), mode), dtype=np.float32)
    chans = [resize_unit(img[..., c], size, resample) for c in range(img.shape[-1])]
    return np.stack(chans, axis=-1)


def usable_pixel_mm(pixel_mm: Any) -> tuple[float, float] | None:
    """(row, col) spacing in mm when both are finite and positive, else None (also for None or
    anything that is not a pair of numbers)."""
    try:
        dy, dx = (float(v) for v in pixel_mm)
    except (TypeError, ValueError):
        return None
    return (dy, dx) if np.isfinite(dy) and np.isfinite(dx) and dy > 0 and dx > 0 else None


# resample_to_canvas never builds an intermediate image larger than this many canvases per side
_CANVAS_CAP = 4


def resample_to_canvas(unit: np.ndarray, pixel_mm: tuple[float, float], target_mm: float,
                       size: int, resample: str = "bilinear") -> np.ndarray:
    """A [0, 1] (H, W) slice with ``pixel_mm`` (row, col) spacing → (size, size) at ``target_mm``
    per pixel: anti-aliased resize to the physical size, then centre crop / zero pad."""
    h, w = unit.shape
    nh = max(1, int(round(h * pixel_mm[0] / target_mm)))
    nw = max(1, int(round(w * pixel_mm[1] / target_mm)))
    cap = _CANVAS_CAP * size
    if nh > cap or nw > cap:
        # An absurd spacing (a wrong tag: 50 mm pixels) would ask for a huge intermediate image;
        # only the centre reaches the canvas, so cut the source to the part that maps into the
        # cap first. Real fields of view (< 4 canvases) never take this path, so they resample
        # exactly as in training.
        keep_h = min(h, max(1, int(np.ceil(cap * target_mm / pixel_mm[0]))))
        keep_w = min(w, max(1, int(np.ceil(cap * target_mm / pixel_mm[1]))))
        y0, x0 = (h - keep_h) // 2, (w - keep_w) // 2
        unit = unit[y0:y0 + keep_h, x0:x0 + keep_w]
        h, w = unit.shape
        nh = max(1, min(cap, int(round(h * pixel_mm[0] / target_mm))))
        nw = max(1, min(cap, int(round(w * pixel_mm[1] / target_mm))))
    img = np.asarray(Image.fromarray(np.ascontiguousarray(unit, dtype=np.float32), mode="F")
                     .resize((nw, nh), _RESAMPLE[resample]), dtype=np.float32)
    out = np.zeros((size, size), np.float32)
    # centre on centre: crop offsets into the image, paste offsets into the canvas
    cy, cx = max(0, (nh - size) // 2), max(0, (nw - size) // 2)
    py, px = max(0, (size - nh) // 2), max(0, (size - nw) // 2)
    ch, cw = min(nh, size), min(nw, size)
    out[py:py + ch, px:px + cw] = img[cy:cy + ch, cx:cx + cw]
    return out


def to_network_size(unit: np.ndarray, modality: str | None, cfg: PreprocessConfig,
                    pixel_mm: Any = None, size: int | None = None) -> np.ndarray:
    """Step 3: a [0, 1] slice → (S, S[, 3]); physical resampling for CT when the config asks for
    it and the slice's spacing is known; else, with ``cfg.keep_aspect``, the aspect-preserving
    fit (:func:`fit_to_canvas`); else the plain anti-aliased resize of each axis to S."""
    size = cfg.image_size if size is None else size
    pix = usable_pixel_mm(pixel_mm)
    if cfg.ct_pixel_mm is not None and pix is not None and unit.ndim == 2 and (modality or "").lower() == "ct":
        target = cfg.ct_pixel_mm * cfg.image_size / size   # same field of view at any output size
        return resample_to_canvas(unit, pix, target, size, cfg.resample)
    if cfg.keep_aspect:
        return fit_to_canvas(unit, size, cfg.resample, pix)
    return resize_unit(unit, size, cfg.resample)


def fit_to_canvas(unit: np.ndarray, size: int, resample: str = "bilinear",
                  pixel_mm: tuple[float, float] | None = None) -> np.ndarray:
    """A [0, 1] (H, W[, 3]) image → (size, size[, 3]) with one scale factor for both axes: the
    longer physical side fills the canvas, the shorter one is centred and padded with 0.
    ``pixel_mm`` (row, col) only sets the aspect of non-square pixels; unknown = square.

    Against :func:`resize_unit` (each axis to S): a 256 × 128 image is no longer stretched
    1.75× along one axis and shrunk along the other, so blur, noise grain and an 8-px JPEG
    block grid keep one scale in both directions, the same on every image shape."""
    dy, dx = pixel_mm if pixel_mm is not None else (1.0, 1.0)
    h, w = unit.shape[:2]
    target = max(h * dy, w * dx) / size
    if unit.ndim == 2:
        return resample_to_canvas(unit, (dy, dx), target, size, resample)
    return np.stack([resample_to_canvas(unit[..., c], (dy, dx), target, size, resample)
                     for c in range(unit.shape[-1])], axis=-1)


def preprocess_slice(img: np.ndarray, modality: str | None, ptype: str | None,
                     cfg: PreprocessConfig, window_tags: tuple[float, float] | None = None,
                     *, compact_grey: bool = False, pixel_mm: Any = None) -> np.ndarray:
    """One slice in physical units → network input float32 (3, S, S), normalised with mean/std.

    img: (H, W) grey or (H, W, 3) RGB, any real dtype.
    compact_grey: return a grey slice as (1, S, S) — its three input channels are equal when
    ``cfg.mean`` and ``cfg.std`` are the same for every channel, and the scoring pipeline's
    readers send one (``grey_channels`` restores the three). RGB, or per-channel mean/std,
    always gives (3, S, S).
    pixel_mm: the slice's (row, col) spacing in mm, or None when unknown; used only by
    ``cfg.ct_pixel_mm`` (CT).
    """
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[-1] != 3):
        raise ValueError(f"expected (H, W) or (H, W, 3), got shape {img.shape}")
    unit = to_unit_range(img, modality, ptype, cfg, window_tags)
    small = to_network_size(unit, modality, cfg, pixel_mm)
    mean = np.asarray(cfg.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(cfg.std, dtype=np.float32)[:, None, None]
    if small.ndim == 2:
        if compact_grey and len(set(cfg.mean)) == 1 and len(set(cfg.std)) == 1:
            return ((small[None] - mean[:1]) / std[:1]).astype(np.float32, copy=False)
        small = np.repeat(small[None], 3, axis=0)
    else:
        small = np.ascontiguousarray(small.transpose(2, 0, 1))
    return ((small - mean) / std).astype(np.float32, copy=False)


def grey_channels(images: np.ndarray) -> np.ndarray:
    """(n, 1, S, S) from ``preprocess_slice(compact_grey=True)`` → a read-only (n, 3, S, S)
    broadcast view (no copy); (n, 3, S, S) unchanged."""
    if images.ndim == 4 and images.shape[1] == 1:
        return np.broadcast_to(images, (images.shape[0], 3) + images.shape[2:])
    return images
