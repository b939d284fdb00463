"""Does a model rank degradations it never trained on? Real held-out images, five unseen kinds.

The synthetic corpus trains on CT dose / sparse views / blur, MR field-strength noise / ringing /
motion / bias and 2D blur / noise / JPEG / illumination. Archives hold other defects too. This
check takes the real base images of the corpus' **validation and test sources** (anatomy no
model here trained on: CT ``CT_small`` and the neck CT, MR ``emri``, EPI and ``MR_small``, the
held-out X-ray and fundus tiles; the middle slice of a volume), writes each clean and at three
strengths of:

* ``impulse``   — salt-and-pepper: a fraction 0.2 / 1 / 4 % of pixels set to black or white
  (dead / hot detector elements, transmission errors);
* ``pixelate``  — block averages of long-side / 160, / 96, / 56 pixels (at least 2, 3, 4)
  shown at full size (a low-resolution acquisition or a thumbnail upscaled with nearest
  neighbours);
* ``posterize`` — the intensity range quantised to 32 / 12 / 5 levels (bit-depth loss, banding);
* ``stripes``   — a horizontal sinusoid of 40 periods over the image, amplitude 3 / 7 / 15 % of
  the range (grid lines, an RF spike's stripe pattern, detector banding);
* ``contrast``  — the intensities pulled towards their mean, keeping 60 / 35 / 20 % of the
  spread (low tissue contrast; the scoring path's percentile normalisation largely undoes it,
  so a model can only see what the rescaling does not: quantisation and noise);

and, for reference, two kinds close to what the corpus trains on (``blur``: Gaussian σ =
long-side / 400, / 160, / 80 (at least 0.7, 1.4, 2.8 pixels), seen for CT, X-ray and fundus, not MR, whose nearest training
degradation is k-space truncation; ``noise``: Gaussian σ = 2 / 5 / 10 % of the range, seen by
every modality: CT dose, MR field strength, 2D noise). Degradations act on the image
scaled to [0, 1] by its own minimum and maximum (CT in HU, MR magnitudes, radiograph and fundus
grey levels) and are written back in the source's units: CT and MR as single-frame DICOM with
their modality tags, X-ray as CR DICOM, fundus as PNG (the classifier names its prompts).

Everything is scored once through ``engines.pipeline.score_studies`` with the defaults of
``mediqa score`` (``--tta auto``, the feature head); ``--tta none --no-features`` scores with the
network alone, which is how two networks are compared (a card's TTA policy and feature head
would otherwise differ between them). Per base image and kind, the Spearman
correlation between the score and minus the strength over the four files (clean = 0) says
whether the model orders them (1 = right, −1 = reversed); the table gives its mean per modality
and kind, and how often the clean image scores above the strongest degradation. Usage:

    python benchmarks/unseen_degradations.py [--model PATH[,PATH…]] [--tta auto|none|flip|d4[,MODE…]]
        [--no-features] [--modality mr] [--slices K] [--kinds impulse,…,ringing,ghosting,field,dose,sparse]
        [--json out.json]

``--slices K`` takes up to K distinct salient slices of each volume as base images instead of its
middle one; ``dose`` (200 / 50 / 15 mAs, every view) and ``sparse`` (90 / 45 / 24 views at
400 mAs) are CT defects the corpus trains on, re-acquired in the projection domain by
``training.synth.degrade.ct_acquire`` on the slice's own grid and pixel size; ``ringing``
(k-space truncation, 0.7 / 0.45 / 0.25 of each axis kept) and
``ghosting`` (periodic phase-encode motion, 1.5 / 3 / 6 px at 256) and ``field`` (the noise of a
3 / 1.5 / 1 T acquisition: Rician, σ = 0.04 · the image's 99th percentile / B0, the corpus'
physics, labels 0.91 / 0.75 / 0.59 against ≥ 0.9 for the corpus' 3–7 T studies; the clean file is
the stored image) are MR defects the corpus trains on, acquired with
``training.synth.degrade.mr_acquire``; several ``--tta`` modes and / or
several ``--model`` artifacts (comma-separated) score the same files once each, and every run is
compared with the first, per base image (its mean SRCC over the kinds) with a paired bootstrap
interval over the images.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

UNSEEN: tuple[str, ...] = ("impulse", "pixelate", "posterize", "stripes", "contrast")
SEEN: tuple[str, ...] = ("blur", "noise")
#: MR acquisition defects the corpus trains on, written only when asked for (``--kinds``):
#: k-space truncation, motion ghosting and the field strength's noise (the corpus' own physics)
MR_SEEN: tuple[str, ...] = ("ringing", "ghosting", "field")
#: two CT acquisition defects the corpus trains on (projection domain), written only when asked for
CT_SEEN: tuple[str, ...] = ("dose", "sparse")
#: the reference kinds each modality's training degradations resemble (``SEEN`` minus MR blur)
SEEN_BY_MODALITY: dict[str, tuple[str, ...]] = {"ct": SEEN + CT_SEEN, "mr": ("noise",) + MR_SEEN, "xr": SEEN,
                                                "fundus": SEEN}
LEVELS: dict[str, tuple[float, float, float]] = {
    "impulse": (0.002, 0.01, 0.04),      # fraction of pixels
    "pixelate": (160.0, 96.0, 56.0),     # blocks along the long side (``strengths``: pixels)
    "posterize": (32.0, 12.0, 5.0),      # grey levels
    "stripes": (0.03, 0.07, 0.15),       # amplitude, fraction of the range
    "contrast": (0.6, 0.35, 0.2),        # spread kept
    "blur": (400.0, 160.0, 80.0),        # σ = long side / this (``strengths``: pixels)
    "noise": (0.02, 0.05, 0.1),          # σ, fraction of the range
    "ringing": (0.7, 0.45, 0.25),        # central fraction of k-space kept per axis
    "ghosting": (1.5, 3.0, 6.0),         # motion amplitude, px at 256 (``strengths``: pixels)
    "field": (3.0, 1.5, 1.0),            # MR field strength, tesla: the corpus' noise at it, labels 0.91 / 0.75 / 0.59
    "dose": (200.0, 50.0, 15.0),         # tube current-time product, mAs (full views)
    "sparse": (90.0, 45.0, 24.0),        # projection views over 180° (at SPARSE_MAS)
}
SPARSE_MAS = 400.0   # the sparse-view acquisitions' dose: their streaks, not noise, are the defect
GHOST_PERIOD = 8.0   # phase-encode lines per motion cycle
STRIPE_PERIODS = 40


def strengths(kind: str, shape: tuple[int, ...]) -> tuple[float, ...]:
    """The three levels of ``kind`` for an image of ``shape``: ``LEVELS``, except the two that
    scale with the image, in pixels: ``pixelate``'s blocks of long-side / 160, / 96, / 56 pixels
    are at least 2, 3 and 4 pixels, and ``blur``'s σ of long-side / 400, / 160, / 80 at least
    0.7, 1.4 and 2.8 pixels, so that a 64-pixel MR gets three visible strengths too (shown at
    224 pixels, σ = 64 / 400 would be a 0.6-pixel blur)."""
    long_side = max(shape[:2])
    if kind == "pixelate":
        return tuple(float(max(k, round(long_side / n))) for k, n in zip((2, 3, 4), LEVELS[kind]))
    if kind == "blur":
        return tuple(max(k, long_side / n) for k, n in zip((0.7, 1.4, 2.8), LEVELS[kind]))
    if kind == "ghosting":   # the corpus's unit: a fraction of the field of view
        return tuple(a * long_side / 256.0 for a in LEVELS[kind])
    return LEVELS[kind]


def degrade(u: np.ndarray, kind: str, level: float, rng: np.random.Generator) -> np.ndarray:
    """``u`` (H, W) or (H, W, 3) in [0, 1], degraded by ``kind`` at ``level`` (``strengths``), in
    [0, 1]."""
    from scipy import ndimage

    x = np.asarray(u, dtype=np.float64)
    h, w = x.shape[:2]
    if kind == "impulse":
        hit = rng.uniform(size=(h, w)) < level
        salt = rng.uniform(size=(h, w)) < 0.5
        out = x.copy()
        out[hit & salt] = 1.0
        out[hit & ~salt] = 0.0
        return out
    if kind == "pixelate":
        from training.synth.degrade import pixelate

        return pixelate(x, int(level))
    if kind == "posterize":
        from training.synth.degrade import posterize

        return posterize(x, int(level))
    if kind == "stripes":
        rows = level * np.sin(2 * np.pi * STRIPE_PERIODS * np.arange(h) / h)
        return np.clip(x + rows.reshape((h,) + (1,) * (x.ndim - 1)), 0.0, 1.0)
    if kind == "contrast":
        m = x.mean()
        return np.clip(m + level * (x - m), 0.0, 1.0)
    if kind == "blur":
        return ndimage.gaussian_filter(x, (level, level) + (0,) * (x.ndim - 2))
    if kind == "noise":
        return np.clip(x + rng.normal(0.0, level, x.shape), 0.0, 1.0)
    if kind in MR_SEEN:   # through k-space as the corpus acquires MR (``training.synth.degrade``)
        from training.synth.degrade import mr_acquire

        if x.ndim != 2:
            raise ValueError(f"{kind} is a k-space defect of a grey (MR) image, got shape {x.shape}")
        if kind == "ringing":
            out = mr_acquire(x, rng, keep_fraction=level)
        elif kind == "field":   # σ relative to the image's 99th percentile, as the corpus adds it
            from training.synth.degrade import mr_noise_sigma

            out = mr_acquire(x, rng, sigma=mr_noise_sigma(float(np.percentile(x, 99.0)), level))
        else:
            out = mr_acquire(x, rng, motion_px=level, motion_period=GHOST_PERIOD)
        return np.clip(out.astype(np.float64), 0.0, 1.0)
    raise ValueError(f"unknown degradation {kind!r}; expected one of {UNSEEN + SEEN + MR_SEEN}"
                     + (" (CT kinds act on HU: ct_degrade)" if kind in CT_SEEN else ""))


def ct_degrade(hu: np.ndarray, kind: str, level: float, pixel_mm: float, rng: np.random.Generator) -> np.ndarray:
    """A CT slice ``hu`` (H, W, in HU, pixels of ``pixel_mm``) re-acquired as the corpus acquires
    CT (``training.synth.degrade.ct_acquire``): ``dose`` at ``level`` mAs with every view (its
    quantum noise added to the slice), ``sparse`` from ``level`` views at ``SPARSE_MAS`` (the
    slice reprojected and reconstructed from those views: streaks). On the slice's own grid, so
    the noise per pixel is that of its pixel size. Returns HU."""
    from training.synth.degrade import FULL_VIEWS, ct_acquire

    if kind == "dose":
        return ct_acquire(hu, level, pixel_mm, rng, n_views=FULL_VIEWS).astype(np.float64)
    if kind == "sparse":
        return ct_acquire(hu, SPARSE_MAS, pixel_mm, rng, n_views=int(level)).astype(np.float64)
    raise ValueError(f"unknown CT acquisition defect {kind!r}; expected one of {CT_SEEN}")


def slice_indices(array: np.ndarray, modality: str, slices: int) -> list[int]:
    """The middle slice of a volume (``slices`` = 1), or the distinct salient slices that
    ``engines.slices.select_salient_slices`` picks for ``k = slices`` (anatomy only, spread over
    z, as the scoring path chooses them)."""
    if slices <= 1 or array.shape[0] == 1:
        return [array.shape[0] // 2]
    from engines.io.volume import Volume, VolumeSource
    from engines.slices import select_salient_slices

    source = VolumeSource(Volume(np.asarray(array, dtype=np.float32)))
    sel = select_salient_slices(source, k=slices, modality=modality)
    return sorted(set(sel.indices))


def base_images(modalities: Iterable[str] | None = None, slices: int = 1
                ) -> list[tuple[str, str, np.ndarray, tuple[float, float]]]:
    """(unit id, modality, 2D image in source units, pixel mm) of every validation / test unit of
    ``modalities`` (all when None): the middle slice of a volume, or with ``slices`` > 1 its
    salient slices (``slice_indices``), each its own base image with ``@z<index>`` in its id."""
    from training.synth.sources import all_units, load_unit

    units = all_units() if modalities is None else [u for m in modalities for u in all_units(m)]
    out = []
    for unit in units:
        if unit.split not in ("val", "test"):
            continue
        b = load_unit(unit)
        picks = slice_indices(b.array, b.spec.modality, slices)
        for z in picks:
            uid = unit.unit_id if slices <= 1 else f"{unit.unit_id}@z{z}"
            out.append((uid, b.spec.modality, np.asarray(b.array[z], dtype=np.float64), b.pixel_mm))
    return out


def write_study(path: Path, modality: str, img: np.ndarray, pixel_mm: tuple[float, float], key: str) -> Path:
    """One degraded image in its source's units as the corpus writes it (CT / MR / CR DICOM, PNG)."""
    from training.synth.writers import hu_to_stored, to_uint16, write_dicom_image, write_png

    if modality == "fundus":
        return write_png(path.with_suffix(".png"), img)
    if modality == "ct":
        tags = {"RescaleIntercept": "-1024", "RescaleSlope": "1", "RescaleType": "HU",
                "WindowCenter": "40", "WindowWidth": "400", "KVP": "120"}
        return write_dicom_image(path.with_suffix(".dcm"), hu_to_stored(img), modality="CT", pixel_mm=pixel_mm,
                                 tags=tags, key=key, seed=0, index=0)
    if modality == "mr":
        scale = 1000.0 / max(float(np.percentile(img, 99.0)), 1e-6)
        tags = {"MagneticFieldStrength": "1.5", "RepetitionTime": "500", "EchoTime": "15"}
        return write_dicom_image(path.with_suffix(".dcm"), to_uint16(img * scale), modality="MR",
                                 pixel_mm=pixel_mm, tags=tags, key=key, seed=0, index=0)
    tags = {"WindowCenter": "2048", "WindowWidth": "4096"}
    return write_dicom_image(path.with_suffix(".dcm"), to_uint16(np.clip(img, 0, 1) * 4095.0), modality="CR",
                             pixel_mm=pixel_mm, tags=tags, key=key, seed=0, index=0)


def write_set(root: Path, kinds: Iterable[str] = UNSEEN + SEEN, modalities: Iterable[str] | None = None,
              slices: int = 1) -> list[dict[str, Any]]:
    """Every base image (``base_images(modalities, slices)``) clean and at each kind's three
    strengths under ``root``; one row per file (``file`` stem, ``unit``, ``modality``, ``kind``,
    ``step`` 0–3). The CT and MR acquisition kinds (``CT_SEEN``, ``MR_SEEN``) are written for
    their own modality's images only."""
    rows = []
    kinds = tuple(kinds)
    for i, (unit, modality, arr, pixel_mm) in enumerate(base_images(modalities, slices)):
        lo, hi = float(arr.min()), float(arr.max())
        u = (arr - lo) / max(hi - lo, 1e-6)
        stem = f"{i:02d}-{unit.replace('#', '_').replace('@', '_')}"
        write_study(root / f"{stem}-clean", modality, arr, pixel_mm, f"{stem}-clean")
        rows.append({"file": f"{stem}-clean", "unit": unit, "modality": modality, "kind": "clean", "step": 0})
        for kind in kinds:
            if (kind in CT_SEEN and modality != "ct") or (kind in MR_SEEN and modality != "mr"):
                continue   # a scanner's own acquisition defect: only on its modality's images
            for step, level in enumerate(strengths(kind, u.shape), start=1):
                rng = np.random.default_rng([i, step, len(kind)])
                if kind in CT_SEEN:
                    img = ct_degrade(arr, kind, level, float(pixel_mm[0]), rng)
                else:
                    img = lo + degrade(u, kind, level, rng) * (hi - lo)
                name = f"{stem}-{kind}{step}"
                write_study(root / name, modality, img, pixel_mm, name)
                rows.append({"file": name, "unit": unit, "modality": modality, "kind": kind, "step": step})
    return rows


def summarise(rows: list[Mapping[str, Any]], scores: Mapping[str, float]) -> dict[str, dict[str, Any]]:
    """Per ``modality/kind``: the mean over base images of SRCC(score, −step) over clean + the
    kind's three files, its per-image values (``per_image``, in the order of ``units``), and the
    fraction of images whose clean file scores above the strongest one. Files without a score
    leave their image out of that kind."""
    from scipy.stats import spearmanr

    clean = {r["unit"]: scores.get(r["file"]) for r in rows if r["kind"] == "clean"}
    per: dict[tuple[str, str], list[tuple[float, bool, str]]] = {}
    units = {(r["unit"], r["modality"]) for r in rows}
    kinds = sorted({r["kind"] for r in rows} - {"clean"})
    for unit, modality in sorted(units):
        for kind in kinds:
            files = sorted((r for r in rows if r["unit"] == unit and r["kind"] == kind), key=lambda r: r["step"])
            s = [clean.get(unit)] + [scores.get(r["file"]) for r in files]
            if len(s) < 2 or any(v is None for v in s):
                continue
            rho = float(spearmanr(s, -np.arange(len(s)))[0]) if np.ptp(s) > 0 else 0.0
            per.setdefault((modality, kind), []).append((rho, s[0] > s[-1], unit))
    return {f"{m}/{k}": {"n_images": len(v), "srcc": float(np.mean([a for a, _, _ in v])),
                         "per_image": [round(a, 3) for a, _, _ in v], "units": [u for _, _, u in v],
                         "clean_above_strongest": float(np.mean([b for _, b, _ in v]))}
            for (m, k), v in sorted(per.items())}


def image_means(table: Mapping[str, Mapping[str, Any]], modality: str | None = None) -> dict[str, float]:
    """Per base image (of ``modality``, or all), the mean of its SRCCs over the kinds it has."""
    acc: dict[str, list[float]] = {}
    for key, row in table.items():
        if modality is not None and key.split("/")[0] != modality:
            continue
        for unit, rho in zip(row["units"], row["per_image"]):
            acc.setdefault(unit, []).append(float(rho))
    return {u: float(np.mean(v)) for u, v in sorted(acc.items())}


def paired_gain(a: Mapping[str, float], b: Mapping[str, float], n_resamples: int = 2000, seed: int = 0,
                confidence: float = 0.95) -> dict[str, float]:
    """Mean of ``a`` − ``b`` over the base images both have, with a percentile bootstrap interval
    (resampling images)."""
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError("no base image in common")
    d = np.array([a[u] - b[u] for u in common])
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, len(d), size=(n_resamples, len(d)))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    return {"n": len(common), "mean": float(d.mean()), "lo": float(np.quantile(boot, tail)),
            "hi": float(np.quantile(boot, 1.0 - tail))}


def seen(modality: str, kind: str) -> bool:
    """Whether ``kind`` resembles a degradation ``modality`` trains on (``SEEN_BY_MODALITY``)."""
    return kind in SEEN_BY_MODALITY.get(modality, ())


def _print_table(table: Mapping[str, Mapping[str, Any]]) -> None:
    print("| modality | kind | seen in training | images | mean SRCC (score vs strength) | clean above strongest |")
    print("|---|---|---|---|---|---|")
    for key, row in table.items():
        m, k = key.split("/")
        print(f"| {m} | {k} | {'yes' if seen(m, k) else 'no'} | {row['n_images']} | {row['srcc']:+.2f} | "
              f"{row['clean_above_strongest']:.2f} |")
    for flag in (False, True):
        vals = [r["srcc"] for key, r in table.items() if seen(*key.split("/")) == flag]
        if vals:
            print(f"mean over {'seen' if flag else 'unseen'} modality / kind rows ({len(vals)}): {np.mean(vals):+.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None,
                    help="the artifact to score with (default: the bundled one); several, comma-separated, score "
                         "the same files once each and compare each with the first")
    ap.add_argument("--tta", default="auto",
                    help="test-time augmentation as `mediqa score --tta`; several, comma-separated (e.g. "
                         "d4,none,flip), score the same files once per mode and compare each with the first")
    ap.add_argument("--no-features", dest="features", action="store_false",
                    help="the network alone, without the card's feature head")
    ap.add_argument("--modality", action="append", default=None, choices=("ct", "mr", "xr", "fundus"),
                    help="only the base images of this modality (repeatable; default: all)")
    ap.add_argument("--slices", type=int, default=1,
                    help="base images per volume: 1 = its middle slice, K = its distinct salient slices for k = K")
    ap.add_argument("--kinds", default=",".join(UNSEEN + SEEN),
                    help=f"comma-separated degradations (default: the unseen and reference kinds; "
                         f"MR also: {', '.join(MR_SEEN)}; CT also: {', '.join(CT_SEEN)})")
    ap.add_argument("--json", default=None, help="also write the summary and every score here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from engines.artifact import bundled_model_path
    from engines.pipeline import ScoreConfig, score_studies

    models = [m.strip() for m in (args.model or str(bundled_model_path())).split(",") if m.strip()]
    modes = [m.strip() for m in args.tta.split(",") if m.strip()]
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    unknown = set(kinds) - set(UNSEEN + SEEN + MR_SEEN + CT_SEEN)
    if unknown:
        ap.error(f"unknown kinds {sorted(unknown)}")
    runs = run_labels(models, modes)
    per_mode: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = write_set(root, kinds, args.modality, args.slices)
        for label, (model, mode) in runs.items():
            cfg = ScoreConfig(workers=2, batch_size=16, tta=mode, features=args.features)
            results = {Path(r.path).name.split(".")[0]: r for r in score_studies(root, model, cfg)}
            scores = {k: r.score for k, r in results.items() if r.score is not None}
            per_mode[label] = {"model": model, "tta": mode, "scores": scores, "summary": summarise(rows, scores)}
    n_images = len({r["unit"] for r in rows})
    for label, res in per_mode.items():
        print(f"\nmodel: {res['model']} (tta {res['tta']}, feature head {'on' if args.features else 'off'}); "
              f"{len(res['scores'])} of {len(rows)} files scored, {n_images} base images")
        _print_table(res["summary"])
    paired: dict[str, dict[str, Any]] = {}
    if len(runs) > 1:
        ref = next(iter(runs))
        mods = sorted({r["modality"] for r in rows})
        print(f"\nper base image, the mean SRCC over its kinds; paired against {ref} (95 % bootstrap over images)")
        print("| modality | run | images | mean | − " + ref + " | 95 % interval |")
        print("|---|---|---|---|---|---|")
        for m in mods + (["all"] if len(mods) > 1 else []):   # "all": every base image together
            m_sel = None if m == "all" else m
            base = image_means(per_mode[ref]["summary"], m_sel)
            for label in runs:
                means = image_means(per_mode[label]["summary"], m_sel)
                g = paired_gain(means, base)
                paired[f"{m}/{label}"] = {"image_mean": float(np.mean(list(means.values()))), **g}
                print(f"| {m} | {label} | {len(means)} | {np.mean(list(means.values())):+.3f} | {g['mean']:+.3f} | "
                      f"[{g['lo']:+.3f}, {g['hi']:+.3f}] |")
    if args.json:
        first = per_mode[next(iter(runs))]
        Path(args.json).write_text(json.dumps({"model": first["model"], "tta": first["tta"],
                                               "features": args.features, "summary": first["summary"],
                                               "scores": first["scores"], "modes": per_mode, "paired": paired,
                                               "files": rows}, indent=1))


def run_labels(models: list[str], modes: list[str]) -> dict[str, tuple[str, str]]:
    """One run per (model, TTA mode), in that order, keyed by a label: the mode when there is one
    model, the model's file name when there is one mode, else both (``name/mode``). Models that
    share a file name (``runs/X/model.safetensors``) are named ``folder:file``, and still equal
    names get their position (``#2``)."""
    files = [Path(m).name for m in models]
    names: list[str] = []
    for m, file in zip(models, files):
        name = file if files.count(file) == 1 else f"{Path(m).parent.name}:{file}"
        names.append(name if name not in names else f"{name}#{len(names) + 1}")
    out: dict[str, tuple[str, str]] = {}
    for name, model in zip(names, models):
        for mode in modes:
            label = mode if len(models) == 1 else name if len(modes) == 1 else f"{name}/{mode}"
            out[label] = (model, mode)
    return out


if __name__ == "__main__":
    main()
