"""Physical degradation models with a known severity (pure numpy / scipy / scikit-image).

Every function takes an image in physical units, a severity parameter in physical units and,
where the model is random, a ``numpy.random.Generator``; it returns a new array of the same
shape and dtype float32. Nothing here reads or writes files.

Conventions
-----------
* CT images are (H, W) float in Hounsfield units (HU); ``pixel_mm`` is the in-plane pixel size.
* MR images are (H, W) or (Z, H, W) non-negative magnitudes in arbitrary scanner units.
* 2D photographs / radiographs are (H, W) or (H, W, 3) floats in [0, 1].

CT dose model (``ct_acquire``)
------------------------------
1. HU → linear attenuation: ``mu = MU_WATER * (1 + HU / 1000)`` (per mm), clipped at 0
   (``MU_WATER = 0.02 / mm``, water at an effective energy of about 70 keV, i.e. a 120 kVp beam).
2. The image is zero-padded to its diagonal so the whole slice lies inside the reconstruction
   circle, and forward-projected with ``skimage.transform.radon``: line integrals
   ``p = radon(mu) * pixel_mm`` (dimensionless), one detector bin per working-grid pixel.
3. Transmission with Poisson counting noise: ``N ~ Poisson(I0 * exp(-p))`` with
   ``I0 = PHOTONS_PER_MAS * mAs / n_views`` photons per detector bin per view, so the total
   number of photons (hence the dose) is proportional to the tube current-time product mAs,
   whatever the number of views. ``PHOTONS_PER_MAS`` is defined on the working grid (256² at about
   1 mm): 10 mAs gives clearly visible noise (σ ≈ 60 HU in water), 300 mAs nearly none (σ ≈ 11 HU).
4. ``p_noisy = -log(max(N, 0.5) / I0)``; filtered back-projection (ramp filter,
   ``skimage.transform.iradon``) → mu → HU.
   FBP is linear, so ``FBP(p_noisy) = FBP(p) + FBP(p_noisy - p)``. With ``n_views`` equal to the
   full ``FULL_VIEWS`` the first term is replaced by the input image itself (it already is a
   reconstruction; a second FBP would only blur it), and only the noise sinogram is back-projected;
   the counts' mean ``I0 * exp(-p)`` uses a half-resolution sinogram (it is smooth).
   With fewer views (sparse-view CT) the noisy sinogram of the actual image is reconstructed from
   those views only, which produces the streaks.
   Noise variance after FBP is proportional to ``1 / (I0 * n_views) ∝ 1 / mAs``: σ ∝ mAs^-1/2.

MR models
---------
* ``mr_noise_sigma``: ``σ = MR_NOISE_AT_1T * s_ref / B0``: SNR grows linearly with the field
  strength B0 (tesla); ``s_ref`` is the 99th percentile of the clean magnitude.
* ``mr_acquire``: complex image → k-space (2D FFT per slice) → truncation (Gibbs ringing) →
  motion phase errors (ghosting) → back → complex Gaussian noise of σ per channel → magnitude
  (Rician statistics). With ``band`` < 1 (a source acquired on a coarser matrix than the image
  grid) k-space is zero-filled beyond the acquired matrix and the truncation is a fraction of that
  matrix, so a kept fraction means the same loss of resolution whatever the source's matrix.
* ``bias_field``: smooth multiplicative field ``exp(b * g)`` with ``g`` a random quadratic
  polynomial of the normalised coordinates scaled to max |g| = 1.

2D models
---------
Gaussian blur (σ px), additive Gaussian noise (σ in [0, 1] units), JPEG compression (Pillow,
quality q; returns the decoded pixels), uneven illumination (multiplicative smooth field
``1 + b * g``); pixelation (block averages) and posterisation (n levels), used by
``train_extra_kinds`` and ``benchmarks/unseen_degradations.py``.
"""

from __future__ import annotations

import io
import logging
from functools import lru_cache

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.transform import iradon, radon

log = logging.getLogger(__name__)

MU_WATER = 0.02  # 1/mm, water at ~70 keV effective energy (120 kVp)
PHOTONS_PER_MAS = 8.0e3 * 180  # photons per detector bin per mAs, summed over all views
FULL_VIEWS = 180  # views over 180° for a "full" acquisition on the 256² working grid
MR_NOISE_AT_1T = 0.04  # σ / s_ref at 1 T  (0.5 T: 8 %, 1.5 T: 2.7 %, 3 T: 1.3 %, 7 T: 0.6 %)


def hu_to_mu(hu: np.ndarray) -> np.ndarray:
    """HU → linear attenuation per mm (float64, ≥ 0)."""
    return np.clip(MU_WATER * (1.0 + np.asarray(hu, dtype=np.float64) / 1000.0), 0.0, None)


def mu_to_hu(mu: np.ndarray) -> np.ndarray:
    """Linear attenuation per mm → HU (float64)."""
    return 1000.0 * (np.asarray(mu, dtype=np.float64) / MU_WATER - 1.0)


def _pad_to_circle(img: np.ndarray, fill: float = 0.0) -> tuple[np.ndarray, tuple[int, int]]:
    """Zero-pad (H, W) to a square of side ≥ its diagonal; returns the padded image and offsets."""
    h, w = img.shape
    side = int(np.ceil(np.hypot(h, w))) + 2
    out = np.full((side, side), fill, dtype=np.float64)
    oy, ox = (side - h) // 2, (side - w) // 2
    out[oy: oy + h, ox: ox + w] = img
    return out, (oy, ox)


@lru_cache(maxsize=8)
def _angles(n_views: int) -> np.ndarray:
    return np.linspace(0.0, 180.0, int(n_views), endpoint=False)


def _line_integrals_lowres(mu_pad: np.ndarray, pixel_mm: float, n_views: int) -> np.ndarray:
    """Line integrals of ``mu_pad`` (padded, square) sampled on (side, n_views), from a half-size radon."""
    side = mu_pad.shape[0]
    small = ndimage.zoom(mu_pad, 0.5, order=1, grid_mode=True, mode="grid-constant")
    low_views = max(n_views // 2, 16)
    p_low = radon(small, _angles(low_views), circle=True) * (pixel_mm * side / small.shape[0])
    return ndimage.zoom(p_low, (side / p_low.shape[0], n_views / low_views), order=1,
                        grid_mode=True, mode="nearest")


def ct_acquire(hu: np.ndarray, mas: float, pixel_mm: float, rng: np.random.Generator, *,
               n_views: int = FULL_VIEWS, photons_per_mas: float = PHOTONS_PER_MAS) -> np.ndarray:
    """Simulate a CT acquisition of a (H, W) HU slice at tube current-time product ``mas`` (mAs).

    ``n_views`` < ``FULL_VIEWS`` gives sparse-view streaks (the image is reprojected and
    reconstructed from those views only). Returns float32 (H, W) HU. See the module docstring
    for the formulas; noise σ in a uniform region scales as mAs^-1/2.
    """
    if mas <= 0:
        raise ValueError(f"mAs must be positive, got {mas}")
    if n_views < 4:
        raise ValueError(f"need at least 4 views, got {n_views}")
    hu = np.asarray(hu, dtype=np.float64)
    h, w = hu.shape
    mu_pad, (oy, ox) = _pad_to_circle(hu_to_mu(hu))
    theta = _angles(n_views)
    i0 = photons_per_mas * float(mas) / n_views
    sparse = n_views < FULL_VIEWS
    if sparse:
        p = radon(mu_pad, theta, circle=True) * pixel_mm
    else:
        p = _line_integrals_lowres(mu_pad, pixel_mm, n_views)
    counts = rng.poisson(i0 * np.exp(-np.clip(p, 0.0, None))).astype(np.float64)
    p_noisy = -np.log(np.maximum(counts, 0.5) / i0)
    side = mu_pad.shape[0]
    if sparse:
        mu_rec = iradon(p_noisy / pixel_mm, theta, output_size=side, filter_name="ramp", circle=True)
        out = mu_to_hu(mu_rec[oy: oy + h, ox: ox + w])
    else:
        mu_noise = iradon((p_noisy - p) / pixel_mm, theta, output_size=side, filter_name="ramp",
                          circle=True)
        out = hu + 1000.0 * mu_noise[oy: oy + h, ox: ox + w] / MU_WATER
    return out.astype(np.float32)


def ct_noise_sigma(hu: np.ndarray, mas: float, pixel_mm: float, rng: np.random.Generator,
                   body_hu: float = -500.0) -> float:
    """Standard deviation (HU) of the quantum noise a full-view acquisition of the (H, W) HU slice
    ``hu`` at ``mas`` puts into the body (pixels above ``body_hu``): the noise image of
    ``ct_acquire`` itself, so it depends on the anatomy's attenuation and the pixel size, not on
    mAs alone."""
    clean = np.asarray(hu, dtype=np.float32)
    body = clean > body_hu
    if not body.any():
        raise ValueError("the slice has no pixel above the body threshold")
    noise = ct_acquire(clean, mas, pixel_mm, rng) - clean
    return float(noise[body].std())


def gaussian_blur(img: np.ndarray, sigma_px: float) -> np.ndarray:
    """Gaussian point-spread function of standard deviation ``sigma_px`` pixels, in plane only.

    (H, W), (H, W, 3) (channels not mixed) or (Z, H, W) (each slice). ``sigma_px`` = 0 is identity.
    """
    x = np.asarray(img, dtype=np.float32)
    if sigma_px <= 0:
        return x.copy()
    if x.ndim == 2:
        sig: tuple[float, ...] = (sigma_px, sigma_px)
    elif x.ndim == 3 and x.shape[-1] == 3:
        sig = (sigma_px, sigma_px, 0.0)
    else:
        sig = (0.0, sigma_px, sigma_px)
    return ndimage.gaussian_filter(x, sig, mode="nearest").astype(np.float32)


def smooth_field(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Random quadratic polynomial of the normalised coordinates, float32 (H, W), max |g| = 1."""
    h, w = shape
    y, x = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    terms = np.stack([x, y, x * x, y * y, x * y])
    coef = rng.normal(size=5)
    g = np.tensordot(coef, terms, axes=1)
    g -= g.mean()
    m = float(np.abs(g).max())
    return (g / m if m > 0 else g).astype(np.float32)


def bias_field(img: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """MR intensity non-uniformity: ``img * exp(strength * g)`` with ``g`` = ``smooth_field``.

    One field for the whole (Z, H, W) volume, varying slowly along z as well. ``strength`` is the
    log-amplitude (0.5 → gains between e^-0.5 and e^0.5).
    """
    x = np.asarray(img, dtype=np.float32)
    if strength <= 0:
        return x.copy()
    g = smooth_field(x.shape[-2:], rng)
    if x.ndim == 3:
        z = np.linspace(-1.0, 1.0, x.shape[0], dtype=np.float32)
        tilt = float(rng.uniform(-0.3, 0.3))
        field = np.exp(strength * (g[None] + tilt * z[:, None, None]))
    else:
        field = np.exp(strength * g)
    return (x * field).astype(np.float32)


def mr_noise_sigma(s_ref: float, tesla: float) -> float:
    """Noise σ (per real / imaginary channel) for a scan at ``tesla`` with reference signal ``s_ref``."""
    if tesla <= 0:
        raise ValueError(f"field strength must be positive, got {tesla}")
    return MR_NOISE_AT_1T * float(s_ref) / float(tesla)


def _truncate_kspace(k: np.ndarray, keep: float, apodize: bool = False) -> np.ndarray:
    """Zero all but the central ``keep`` fraction of k-space along both in-plane axes (centred k);
    ``apodize``: the kept box is weighted by a separable Hamming window, as scanners' k-space
    filters do (no Gibbs ringing; a wider point-spread function, i.e. blur)."""
    h, w = k.shape[-2:]
    kh, kw = max(2, int(round(h * keep))), max(2, int(round(w * keep)))
    mask = np.zeros((h, w), dtype=np.float64)
    box = np.outer(np.hamming(kh), np.hamming(kw)) if apodize else 1.0
    mask[(h - kh) // 2: (h - kh) // 2 + kh, (w - kw) // 2: (w - kw) // 2 + kw] = box
    return k * mask


def _motion_phase(shape: tuple[int, int], amplitude_px: float, period_lines: float, phase0: float
                  ) -> np.ndarray:
    """Phase ramp for a periodic translation along the phase-encode (row) axis, complex (H, W).

    Line ``ky`` is acquired while the object is displaced by ``d = a sin(2π ky / period + φ)``
    pixels along y; a shift d multiplies that line by ``exp(-2πi ky_freq d)``.
    """
    h, w = shape
    lines = np.arange(h)
    disp = amplitude_px * np.sin(2 * np.pi * lines / period_lines + phase0)
    freq = np.fft.fftshift(np.fft.fftfreq(h))  # cycles per pixel, centred like the k-space
    return np.exp(-2j * np.pi * freq * disp)[:, None] * np.ones((1, w))


def mr_acquire(mag: np.ndarray, rng: np.random.Generator, *, sigma: float = 0.0,
               keep_fraction: float = 1.0, motion_px: float = 0.0,
               motion_period: float = 8.0, band: float = 1.0, apodize: bool = False,
               kspace_noise: bool = False) -> np.ndarray:
    """Re-acquire a magnitude image through k-space; (H, W) or (Z, H, W) float32 ≥ 0 out.

    keep_fraction: central fraction of the acquired k-space kept per axis (1 = all; < 1 gives
    Gibbs ringing).
    band: the fraction of the image grid's k-space (per axis) that the acquisition covers, e.g.
    0.25 for a 64-matrix scan shown on a 256 grid. Below 1 the image is reconstructed as scanners
    do, by zero-filling k-space beyond the acquired matrix, and ``keep_fraction`` is a fraction of
    that matrix: the central ``keep_fraction · band`` of the grid's k-space is kept (even at
    ``keep_fraction`` = 1). 1 (default): the grid is the acquired matrix.
    motion_px: amplitude of a periodic translation along the phase-encode axis (ghosts).
    sigma: Rician noise σ (complex Gaussian noise per channel before taking the magnitude).
    apodize: a truncated k-space (kept fraction < 1) is Hamming-filtered, so the resolution loss
    shows as blur instead of ringing (``train_mr_apodize``).
    kspace_noise: where k-space is truncated, the noise is acquired with it (added to k-space
    before the truncation, after the motion, which moves the object, not the thermal noise), so
    it is band-limited like the image: a low-resolution acquisition looks smooth, as a real one
    does (``train_band_noise``). Without truncation the noise is added to the image as by default.
    """
    if not 0.0 < band <= 1.0:
        raise ValueError(f"band must be in (0, 1], got {band}")
    x = np.asarray(mag, dtype=np.float64)
    vol = x[None] if x.ndim == 2 else x
    out = np.empty(vol.shape, dtype=np.float32)
    phase0 = float(rng.uniform(0, 2 * np.pi))
    kept = float(keep_fraction) * float(band)
    for z in range(vol.shape[0]):
        img: np.ndarray = vol[z].astype(np.complex128)
        in_kspace = kspace_noise and kept < 1.0 and sigma > 0   # the noise goes through the truncation
        if kept < 1.0 or motion_px > 0:
            k = np.fft.fftshift(np.fft.fft2(img))
            if in_kspace:   # motion moves the object, not the thermal noise: phase first
                if motion_px > 0:
                    k = k * _motion_phase(k.shape, motion_px, motion_period, phase0)
                noise = rng.normal(0.0, sigma, img.shape) + 1j * rng.normal(0.0, sigma, img.shape)
                k = _truncate_kspace(k + np.fft.fftshift(np.fft.fft2(noise)), kept, apodize)
            else:
                if kept < 1.0:
                    k = _truncate_kspace(k, kept, apodize)
                if motion_px > 0:
                    k = k * _motion_phase(k.shape, motion_px, motion_period, phase0)
            img = np.fft.ifft2(np.fft.ifftshift(k))
        if sigma > 0 and not in_kspace:
            img = img + rng.normal(0.0, sigma, img.shape) + 1j * rng.normal(0.0, sigma, img.shape)
        out[z] = np.abs(img)
    return out[0] if x.ndim == 2 else out


def add_gaussian_noise(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Additive white Gaussian noise of σ (image units), clipped to [0, 1]; (H, W) or (H, W, 3)."""
    x = np.asarray(img, dtype=np.float32)
    if sigma <= 0:
        return x.copy()
    return np.clip(x + rng.normal(0.0, sigma, x.shape).astype(np.float32), 0.0, 1.0)


def jpeg_compress(img: np.ndarray, quality: int) -> np.ndarray:
    """Encode [0, 1] (H, W) or (H, W, 3) as 8-bit JPEG at ``quality`` (1–95) and decode again.

    Returns float32 in [0, 1] of the same shape (the pixels a reader of that JPEG file sees).
    """
    q = int(np.clip(quality, 1, 95))
    x = np.asarray(img, dtype=np.float32)
    u8 = np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, format="JPEG", quality=q, subsampling=2 if u8.ndim == 3 else 0)
    dec = np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.float32) / 255.0
    return dec.reshape(x.shape)


def uneven_illumination(img: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Multiplicative smooth illumination field ``max(1 + strength * g, 0.05)``, clipped to [0, 1]."""
    x = np.asarray(img, dtype=np.float32)
    if strength <= 0:
        return x.copy()
    field = np.maximum(1.0 + strength * smooth_field(x.shape[:2], rng), 0.05)
    if x.ndim == 3:
        field = field[..., None]
    return np.clip(x * field, 0.0, 1.0).astype(np.float32)


def pixelate(img: np.ndarray, block: int, axis: int = 0) -> np.ndarray:
    """Block averages of ``block`` × ``block`` pixels over the spatial axes ``axis`` and ``axis`` + 1
    (0 for (H, W[, 3]) images, 1 for (Z, H, W) volumes), shown at full size (nearest-neighbour
    upscaling); the last partial blocks average the edge-padded image. Same shape and dtype;
    ``block`` ≤ 1 returns a copy."""
    x = np.asarray(img)
    b = int(block)
    if b <= 1:
        return x.copy()
    h, w = x.shape[axis], x.shape[axis + 1]
    hb, wb = -(-h // b), -(-w // b)
    pad = [(0, 0)] * x.ndim
    pad[axis], pad[axis + 1] = (0, hb * b - h), (0, wb * b - w)
    p = np.pad(x, pad, mode="edge")
    blocks = p.reshape(x.shape[:axis] + (hb, b, wb, b) + x.shape[axis + 2:]).mean(axis=(axis + 1, axis + 3))
    out = np.repeat(np.repeat(blocks, b, axis=axis), b, axis=axis + 1)
    return out[(slice(None),) * axis + (slice(0, h), slice(0, w))].astype(x.dtype)


def posterize(img: np.ndarray, levels: int) -> np.ndarray:
    """[0, 1] intensities rounded to ``levels`` evenly spaced values (bit-depth loss); same dtype."""
    x = np.asarray(img)
    n = int(levels) - 1
    return (np.round(np.clip(x, 0.0, 1.0) * n) / n).astype(x.dtype)


def water_phantom(size: int = 256, pixel_mm: float = 1.0, diameter_mm: float = 200.0) -> np.ndarray:
    """A water cylinder (0 HU) in air (−1000 HU), float32 (size, size); for calibration and tests."""
    c = (size - 1) / 2.0
    y, x = np.mgrid[:size, :size]
    r = np.hypot(y - c, x - c) * pixel_mm
    return np.where(r <= diameter_mm / 2.0, 0.0, -1000.0).astype(np.float32)
