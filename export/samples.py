"""Real, preprocessed model inputs for parity checks, int8 calibration and benchmarks.

Sources are real images that ship inside installed packages: pydicom's test files (CT, MR,
multi-frame MR, ultrasound; rescaled to physical units) and scikit-image's retina fundus
photograph and camera image. pydicom is optional here (the GPU machine has none): without it
only the scikit-image images are used, and ``SampleSet.sources`` says so.

To give the scores a spread (a validation set on which a rank correlation means something),
each base image also appears degraded by additive Gaussian noise and by Gaussian blur at a few
severities, deterministic for a given seed. Everything goes through
``engines.preprocess.preprocess_slice`` with the artifact's ``PreprocessConfig``, exactly as
scoring does.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np

from engines.preprocess import PreprocessConfig, preprocess_slice, usable_pixel_mm
from engines.prompts import DEFAULT_VOCAB, Prompt, PromptVocab, encode_prompt

log = logging.getLogger(__name__)

# (pydicom test file, frame or None, modality, region, type)
_DICOM_SOURCES: tuple[tuple[str, int | None, str, str, str], ...] = (
    ("CT_small.dcm", None, "ct", "chest", "soft"),
    ("CT_small.dcm", None, "ct", "chest", "lung"),
    ("MR_small.dcm", None, "mr", "head", "t1"),
    ("emri_small.dcm", 2, "mr", "head", "t2"),
    ("emri_small.dcm", 6, "mr", "head", "t2"),
    ("MR2_UNCR.dcm", None, "mr", "head", "t1"),
    ("US1_UNCR.dcm", None, "us", "abdomen", "color"),
    ("OBXXXX1A.dcm", None, "us", "abdomen", "grey"),
)
# (noise sigma as a fraction of the image's robust range, blur sigma in pixels)
_DEGRADATIONS: tuple[tuple[float, float], ...] = (
    (0.0, 0.0), (0.03, 0.0), (0.08, 0.0), (0.2, 0.0), (0.0, 1.5), (0.0, 4.0), (0.05, 2.0),
)


@dataclass(frozen=True)
class BaseImage:
    """One real image in physical units: (H, W) or (H, W, 3) float32, plus its prompt."""

    name: str
    image: np.ndarray
    modality: str
    region: str
    type: str
    pixel_mm: tuple[float, float] | None = None   # in-plane spacing (DICOM PixelSpacing), if any


@dataclass
class SampleSet:
    """images (N, 3, S, S) float32 normalised; prompts (N, P) float32 one-hot; labels (N,) descriptions."""

    images: np.ndarray
    prompts: np.ndarray
    labels: list[str]
    sources: list[str]

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(self.images[i: i + batch_size], self.prompts[i: i + batch_size])
                for i in range(0, len(self), batch_size)]


def _dicom_images() -> list[BaseImage]:
    try:
        import pydicom
        from pydicom.data import get_testdata_file
    except ImportError:
        log.info("pydicom not installed: real DICOM samples skipped, using scikit-image images only")
        return []
    out = []
    for fname, frame, mod, region, ptype in _DICOM_SOURCES:
        path = get_testdata_file(fname)
        if path is None:
            continue
        try:
            ds = pydicom.dcmread(path)
            arr = np.asarray(ds.pixel_array)
        except Exception as exc:  # a decoder plugin may be missing; the others still serve
            log.warning("sample %s unreadable (%s); skipped", fname, exc)
            continue
        if frame is not None:
            arr = arr[frame]
        elif arr.ndim == 4 or (arr.ndim == 3 and arr.shape[-1] != 3):
            arr = arr[len(arr) // 2]
        img = arr.astype(np.float32)
        if arr.ndim == 2:
            slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
            intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
            img = img * np.float32(slope) + np.float32(intercept)
        out.append(BaseImage(f"{fname}" + (f"[{frame}]" if frame is not None else "") + f":{ptype}",
                             img, mod, region, ptype,
                             usable_pixel_mm(ds.get("PixelSpacing"))))
    return out


def _skimage_images() -> list[BaseImage]:
    from skimage import data

    return [
        BaseImage("skimage.retina", data.retina().astype(np.float32), "fundus", "eye", "color"),
        BaseImage("skimage.camera", data.camera().astype(np.float32), "other", "other", "grey"),
    ]


@functools.lru_cache(maxsize=2)
def _base_images_cached(use_dicom: bool) -> tuple[BaseImage, ...]:
    return tuple((_dicom_images() if use_dicom else []) + _skimage_images())


def base_images(*, use_dicom: bool = True) -> list[BaseImage]:
    """The real base images available on this machine (DICOM ones only when pydicom is installed).

    Decoded once per process and cached; the arrays are shared, so treat them as read-only.
    """
    imgs = list(_base_images_cached(bool(use_dicom)))
    if not imgs:  # pragma: no cover - scikit-image is a hard dependency
        raise RuntimeError("no sample images available")
    return imgs


def _degrade(img: np.ndarray, noise: float, blur: float, rng: np.random.Generator) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    out = img.astype(np.float32, copy=True)
    if blur > 0:
        sig = (blur, blur, 0) if out.ndim == 3 else blur
        out = gaussian_filter(out, sigma=sig).astype(np.float32)
    if noise > 0:
        lo, hi = np.percentile(out, (1, 99))
        out = out + rng.normal(0.0, noise * float(hi - lo or 1.0), size=out.shape).astype(np.float32)
    return out


def sample_set(n: int | None = None, *, cfg: PreprocessConfig | None = None,
               vocab: PromptVocab = DEFAULT_VOCAB, degrade: bool = True, seed: int = 0,
               use_dicom: bool = True, dimension: str = "2d") -> SampleSet:
    """Preprocessed real samples. ``n`` None → every (base image × degradation) once; otherwise
    the first ``n`` of that list, cycling with fresh noise when ``n`` is larger."""
    cfg = cfg or PreprocessConfig()
    rng = np.random.default_rng(seed)
    bases = base_images(use_dicom=use_dicom)
    degs = _DEGRADATIONS if degrade else ((0.0, 0.0),)
    plan = [(b, d) for d in degs for b in bases]
    total = len(plan) if n is None else int(n)
    imgs, prompts, labels = [], [], []
    for i in range(total):
        base, (noise, blur) = plan[i % len(plan)]
        img = _degrade(base.image, noise, blur, rng) if (noise or blur) else base.image
        imgs.append(preprocess_slice(img, base.modality, base.type, cfg, pixel_mm=base.pixel_mm))
        p = Prompt(dimension=dimension, modality=base.modality, region=base.region, type=base.type)
        prompts.append(encode_prompt(p, vocab))
        labels.append(f"{base.name} noise={noise:g} blur={blur:g}")
    return SampleSet(np.stack(imgs).astype(np.float32), np.stack(prompts).astype(np.float32),
                     labels, sorted({b.name.split(':')[0] for b in bases}))


def sample_volumes(n: int, k: int = 7, *, cfg: PreprocessConfig | None = None,
                   vocab: PromptVocab = DEFAULT_VOCAB, seed: int = 0,
                   use_dicom: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(n, k, 3, S, S) float32 volumes of real slices (k consecutive samples each) and (n, P) 3D prompts."""
    s = sample_set(n * k, cfg=cfg, vocab=vocab, seed=seed, use_dicom=use_dicom, dimension="3d")
    size = s.images.shape[-1]
    vols = s.images.reshape(n, k, 3, size, size)
    return np.ascontiguousarray(vols), np.ascontiguousarray(s.prompts[::k])
