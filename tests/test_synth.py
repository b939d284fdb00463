"""Synthetic corpus (training.synth): physics relations, determinism, written tags, CLI.

The base images are the real CT / MR / X-ray / fundus images shipped in pydicom, pydicom-data,
nibabel and scikit-image; the 3D series are built from real slices (see training.synth.corpus).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from scipy import ndimage

from mediqa_cli.commands.synth import synth as synth_command
from training.synth import degrade
from training.synth.corpus import (
    MANIFEST_COLUMNS, SEVERITY, generate_corpus, plan_corpus, quality_score, severities_of,
)
from training.synth.sources import SOURCES, all_units, load_unit, source_by_name, split_region


def _tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(root: Path) -> list[dict[str, str]]:
    with (root / "manifest.csv").open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "a"
    generate_corpus(out, seed=7, size="tiny", workers=1)
    return out


# --- physics -----------------------------------------------------------------------------------

def test_ct_noise_falls_as_inverse_sqrt_mas() -> None:
    phantom = degrade.water_phantom(256, pixel_mm=1.0, diameter_mm=200.0)
    mas = np.array([10.0, 30.0, 100.0, 300.0])
    sigmas = []
    for i, m in enumerate(mas):
        hu = degrade.ct_acquire(phantom, float(m), 1.0, np.random.default_rng(i))
        roi = hu[100:156, 100:156]
        assert abs(float(roi.mean())) < 10.0  # water stays at 0 HU on average
        sigmas.append(float(roi.std()))
    sigmas_arr = np.array(sigmas)
    assert np.all(np.diff(sigmas_arr) < 0), sigmas
    slope = np.polyfit(np.log(mas), np.log(sigmas_arr), 1)[0]
    assert -0.65 <= slope <= -0.35, (slope, sigmas)
    # documented calibration: 10 mAs clearly noisy, 300 mAs nearly clean on the working grid
    assert sigmas_arr[0] > 35.0 and sigmas_arr[-1] < 20.0, sigmas


def test_sparse_views_add_streaks() -> None:
    phantom = degrade.water_phantom(128, pixel_mm=2.0, diameter_mm=200.0)
    errs = []
    for views in (180, 60, 20):
        hu = degrade.ct_acquire(phantom, 400.0, 2.0, np.random.default_rng(0), n_views=views)
        errs.append(float(np.abs(hu - phantom)[32:96, 32:96].std()))
    assert errs[0] < errs[1] < errs[2], errs


def test_mr_noise_falls_with_field_strength() -> None:
    phantom = np.full((128, 128), 1000.0, np.float32)
    sig = []
    for b0 in (0.5, 1.5, 3.0, 7.0):
        s = degrade.mr_noise_sigma(1000.0, b0)
        mag = degrade.mr_acquire(phantom, np.random.default_rng(1), sigma=s)
        sig.append(float(mag.std()))
    assert np.all(np.diff(sig) < 0), sig
    assert sig[0] / sig[-1] == pytest.approx(7.0 / 0.5, rel=0.2)


@pytest.fixture(scope="module")
def ct_slice() -> tuple[np.ndarray, float]:
    base = load_unit(all_units("ct")[0])
    img = ndimage.zoom(base.array[0], 0.25, order=1)
    return img.astype(np.float32), base.pixel_mm[0] * 4


@pytest.fixture(scope="module")
def fundus_tile() -> np.ndarray:
    img = load_unit(all_units("fundus")[0]).array[0]
    return ndimage.zoom(img, (0.25, 0.25, 1), order=1).clip(0, 1).astype(np.float32)


def _lap_var(img: np.ndarray) -> float:
    g = img.mean(-1) if img.ndim == 3 else img
    return float(ndimage.laplace(g.astype(np.float64)).var())


def test_blur_monotone_on_real_image(fundus_tile: np.ndarray) -> None:
    v = [_lap_var(degrade.gaussian_blur(fundus_tile, s)) for s in (0.0, 0.7, 1.5, 3.0)]
    assert v[0] > v[1] > v[2] > v[3], v


def test_jpeg_error_grows_as_quality_falls(fundus_tile: np.ndarray) -> None:
    err = [float(np.abs(degrade.jpeg_compress(fundus_tile, q) - fundus_tile).mean())
           for q in (90, 50, 20, 5)]
    assert err[0] < err[1] < err[2] < err[3], err


def test_noise_and_illumination_monotone(fundus_tile: np.ndarray) -> None:
    dev_n = [float(np.abs(degrade.add_gaussian_noise(fundus_tile, s, np.random.default_rng(0))
                          - fundus_tile).mean()) for s in (0.01, 0.05, 0.1)]
    assert dev_n[0] < dev_n[1] < dev_n[2], dev_n
    dev_i = [float(np.abs(degrade.uneven_illumination(fundus_tile, b, np.random.default_rng(0))
                          - fundus_tile).mean()) for b in (0.1, 0.3, 0.6)]
    assert dev_i[0] < dev_i[1] < dev_i[2], dev_i


def test_mr_kspace_degradations_monotone() -> None:
    base = load_unit(source_by_name("mr-abdomen").units()[0]).array[0]
    img = ndimage.zoom(base, 0.25, order=1).astype(np.float32)
    rng = np.random.default_rng
    ring = [float(np.abs(degrade.mr_acquire(img, rng(0), keep_fraction=f) - img).mean())
            for f in (0.9, 0.5, 0.2)]
    assert ring[0] < ring[1] < ring[2], ring
    motion = [float(np.abs(degrade.mr_acquire(img, rng(0), motion_px=a, motion_period=6.0)
                           - img).mean()) for a in (0.5, 2.0, 5.0)]
    assert motion[0] < motion[1] < motion[2], motion
    cv = [float(np.std(degrade.bias_field(np.ones_like(img), b, rng(3)))) for b in (0.1, 0.4, 0.8)]
    assert cv[0] < cv[1] < cv[2], cv


def test_ct_blur_and_dose_on_real_slice(ct_slice: tuple[np.ndarray, float]) -> None:
    img, pixel = ct_slice
    lv = [_lap_var(degrade.gaussian_blur(img, s / pixel)) for s in (0.0, 1.0, 2.5)]
    assert lv[0] > lv[1] > lv[2], lv
    noise = [float((degrade.ct_acquire(img, m, pixel, np.random.default_rng(0)) - img).std())
             for m in (20.0, 80.0, 320.0)]
    assert noise[0] > noise[1] > noise[2], noise


def test_ct_noise_sigma_depends_on_anatomy_not_only_on_mas(ct_slice: tuple[np.ndarray, float]) -> None:
    """The measured noise behind ``dose_label="noise"``: ∝ mAs^-½ on one anatomy, and at the same
    mAs larger on a bigger, more attenuating body (a water disc of twice the diameter)."""
    img, pixel = ct_slice
    s = [degrade.ct_noise_sigma(img, m, pixel, np.random.default_rng(1)) for m in (25.0, 100.0, 400.0)]
    assert s[0] > s[1] > s[2]
    assert s[0] / s[2] == pytest.approx(4.0, rel=0.2)          # √(400 / 25)
    yy, xx = np.mgrid[:128, :128]
    r = np.hypot(yy - 63.5, xx - 63.5)
    small = np.where(r < 20, 0.0, -1000.0).astype(np.float32)  # water disc in air, HU
    large = np.where(r < 40, 0.0, -1000.0).astype(np.float32)
    a, b = (degrade.ct_noise_sigma(x, 100.0, 1.0, np.random.default_rng(2)) for x in (small, large))
    assert b > 1.3 * a, (a, b)
    with pytest.raises(ValueError, match="body"):
        degrade.ct_noise_sigma(np.full((32, 32), -1000.0, np.float32), 100.0, 1.0, np.random.default_rng(0))


# --- score and plan ----------------------------------------------------------------------------

def test_quality_score_monotone_in_each_severity() -> None:
    assert quality_score({}) == 1.0
    for key in SEVERITY:
        scores = [quality_score({key: s}) for s in np.linspace(0, 1, 6)]
        assert scores[0] == 1.0 and all(0.0 <= q <= 1.0 for q in scores)
        assert np.all(np.diff(scores) < 0), key
        # the parameter ↔ severity maps are inverse and monotone
        sev = SEVERITY[key]
        for s in (0.1, 0.5, 0.9):
            assert sev.to_s(sev.from_s(s)) == pytest.approx(s, abs=1e-9)
    assert severities_of("ct", {"mas": 10.0})["dose"] == pytest.approx(1.0)
    assert severities_of("ct", {"mas": 400.0})["dose"] == pytest.approx(0.0, abs=1e-9)
    assert severities_of("mr", {"tesla": 0.5})["field"] > severities_of("mr", {"tesla": 3.0})["field"]


def test_plan_is_deterministic_and_splits_hold_out_sources() -> None:
    a, b = plan_corpus(11, "small"), plan_corpus(11, "small")
    assert [(s.relpath, s.params, s.unit) for s in a] == [(s.relpath, s.params, s.unit) for s in b]
    assert [s.params for s in plan_corpus(12, "small")] != [s.params for s in a]
    by_split: dict[str, set[str]] = {}
    for s in a:
        by_split.setdefault(s.split, set()).add(s.unit.unit_id)
        assert s.unit.split == s.split
    assert set(by_split) == {"train", "val", "test"}
    assert not by_split["train"] & by_split["test"] and not by_split["train"] & by_split["val"]
    # CT and MR hold out whole physical sources (patients), not tiles
    for mod in ("ct", "mr"):
        srcs = {sp: {s.unit.source for s in a if s.modality == mod and s.split == sp}
                for sp in ("train", "val", "test")}
        assert srcs["test"] and not srcs["test"] & srcs["train"], srcs
    mods = {(s.modality, s.dimension) for s in a}
    assert {("ct", "3d"), ("mr", "3d"), ("xr", "2d"), ("fundus", "2d")} <= mods
    assert len({s.relpath for s in a}) == len(a)


def test_every_source_loads() -> None:
    for spec in SOURCES:
        arr = load_unit(spec.units()[0]).array
        assert arr.ndim in (3, 4) and np.isfinite(arr).all() and float(arr.std()) > 0, spec.name
        if spec.modality == "ct":
            assert arr.min() >= -1024 and arr.max() > 200  # HU with bone


def test_split_region_covers_the_splits_tiles_only() -> None:
    for spec in SOURCES:
        for unit in spec.units():
            tile = load_unit(unit).array
            region = split_region(unit)
            if unit.tile is None or unit.split != "train":
                assert region.shape == tile.shape and np.array_equal(region, tile), unit.unit_id
                continue
            # train tiles: the rectangle of the source's train tiles (top row / top two rows)
            same = [u.tile for u in spec.units() if u.split == "train"]
            rows = len({t[0] for t in same})
            cols = len({t[1] for t in same})
            assert abs(region.shape[1] - rows * tile.shape[1]) <= rows, unit.unit_id
            assert abs(region.shape[2] - cols * tile.shape[2]) <= cols, unit.unit_id
            # it holds the tile at its place, and no pixel of the held-out tiles
            r0 = min(t[0] for t in same)
            c0 = min(t[1] for t in same)
            th, tw = tile.shape[1:3]
            y, x = (unit.tile[0] - r0) * th, (unit.tile[1] - c0) * tw
            # (tile borders are at i * size // n, so the offset is exact to ±1 pixel)
            assert any(np.array_equal(region[:, y + dy:y + dy + th, x + dx:x + dx + tw], tile)
                       for dy in (-1, 0, 1) for dx in (-1, 0, 1) if y + dy >= 0 and x + dx >= 0), unit.unit_id
            assert rows * cols == len(same)   # the rectangle holds train tiles only


def test_random_window_keeps_aspect_and_fits() -> None:
    from training.synth.corpus import WINDOW_SCALE, random_window

    region = np.arange(300 * 600, dtype=np.float32).reshape(300, 600)
    sizes = set()
    for seed in range(40):
        w = random_window(region, (200, 100), np.random.default_rng(seed))
        h_, w_ = w.shape
        assert 200 * WINDOW_SCALE[0] - 1 <= h_ <= 200 * WINDOW_SCALE[1] + 1
        assert abs(h_ / w_ - 2.0) < 0.05                      # the tile's aspect
        y0, x0 = divmod(int(w[0, 0]), 600)
        assert np.array_equal(w, region[y0:y0 + h_, x0:x0 + w_])  # a real window of the region
        sizes.add((h_, y0, x0))
    assert len(sizes) > 30                                     # position and size vary
    # capped by the region: a tile as large as the region gives the region's size or less
    w = random_window(region[:200, :100], (200, 100), np.random.default_rng(0))
    assert w.shape[0] <= 200 and w.shape[1] <= 100
    a = random_window(region, (200, 100), np.random.default_rng(5))
    assert np.array_equal(a, random_window(region, (200, 100), np.random.default_rng(5)))


def _regenerate(tiny_corpus: Path, out: Path, **option: bool) -> tuple[dict, dict[str, list[bool]]]:
    """The tiny corpus again with a generator ``option``: (manifest rows by path, per study the
    list of its files that changed against ``tiny_corpus``)."""
    generate_corpus(out, seed=7, size="tiny", workers=1, **option)
    old, new = _tree_digest(tiny_corpus), _tree_digest(out)
    assert set(old) == set(new)
    rows = {r["path"]: r for r in _rows(out)}
    changed: dict[str, list[bool]] = {}
    for f in old:
        if f != "manifest.csv":
            study = next((p for p in rows if f == p or f.startswith(p + "/")), None)
            assert study is not None, f
            changed.setdefault(study, []).append(old[f] != new[f])
    return rows, changed


def _changes_only_training_studies_of(modalities: tuple[str, ...], tiny_corpus: Path, out: Path,
                                     **option: bool) -> tuple[dict, set[str]]:
    """Regenerate with ``option`` and check that exactly the training studies of ``modalities``
    changed (each in some file: the air slices of a series may match) while every other study
    stayed byte-identical and no manifest row moved (the option's generator is its own).
    Returns (manifest rows by path, the changed studies)."""
    rows, changed = _regenerate(tiny_corpus, out, **option)
    picked = {p for p, r in rows.items() if r["split"] == "train" and r["modality"] in modalities}
    assert picked
    for study, flags in changed.items():
        assert any(flags) if study in picked else not any(flags), study
    assert _rows(out) == _rows(tiny_corpus)
    return rows, picked


def test_train_windows_change_training_tiles_only(tiny_corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "w"
    rows, changed = _regenerate(tiny_corpus, out, train_windows=True)
    windowed = [p for p, r in rows.items() if r["split"] == "train" and r["modality"] in ("xr", "fundus")]
    assert windowed
    for study, flags in changed.items():
        if study in windowed:
            assert all(flags), study                   # another content: a random window
        else:
            assert not any(flags), study               # val / test / CT / MR: byte-identical
    # the manifest's labels and parameters do not depend on the window
    assert _rows(out) == _rows(tiny_corpus)
    plan = plan_corpus(7, "tiny", train_windows=True)
    assert {s.relpath for s in plan if s.window} == set(windowed)


def test_anatomy_warp_is_one_field_for_every_slice() -> None:
    from training.synth.corpus import anatomy_warp

    img = np.zeros((64, 64), np.float32)
    img[16:48, 20:44] = 1.0
    a = anatomy_warp(img, np.random.default_rng(3), fill=-5.0)
    assert a.shape == img.shape and a.dtype == np.float32
    assert np.array_equal(a, anatomy_warp(img, np.random.default_rng(3), fill=-5.0))   # seeded
    assert not np.allclose(a, img)                                   # it moves the anatomy
    b = anatomy_warp(img, np.random.default_rng(4), fill=-5.0)
    assert not np.allclose(a, b)                                     # another draw, another body
    # a stack gets one deformation: equal slices stay equal, and equal to the 2D result
    stack = anatomy_warp(np.stack([img, img, img]), np.random.default_rng(3), fill=-5.0)
    assert stack.shape == (3, 64, 64)
    assert np.array_equal(stack[0], stack[2]) and np.array_equal(stack[1], a)
    # outside the warped field of view the fill value enters (a zoom-out or a turn uncovers it),
    # and it stays in the range of the inputs (linear interpolation)
    flat = anatomy_warp(np.ones((64, 64), np.float32), np.random.default_rng(3), fill=-5.0)
    assert flat.min() >= -5.0 and flat.max() <= 1.0 + 1e-6
    assert (flat == 1.0).mean() > 0.5


def test_train_warp_changes_ct_mr_training_studies_only(tiny_corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "warp"
    rows, warped = _changes_only_training_studies_of(("ct", "mr"), tiny_corpus, out, train_warp=True)
    assert {rows[p]["dimension"] for p in warped} == {"2d", "3d"}
    assert {s.relpath for s in plan_corpus(7, "tiny", train_warp=True) if s.warp} == warped
    # the warped CT still carries the dose it was simulated at
    ct = next(p for p in warped if rows[p]["modality"] == "ct")
    first = sorted((out / ct).iterdir())[0]
    assert int(pydicom.dcmread(first).Exposure) == int(float(rows[ct]["physical"]))


def test_train_warp_2d_changes_xray_fundus_training_studies_only(tiny_corpus: Path, tmp_path: Path) -> None:
    rows, warped = _changes_only_training_studies_of(("xr", "fundus"), tiny_corpus, tmp_path / "w2",
                                                     train_warp_2d=True)
    assert {rows[p]["modality"] for p in warped} == {"xr", "fundus"}
    assert {s.relpath for s in plan_corpus(7, "tiny", train_warp_2d=True) if s.warp} == warped
    # independent of train_warp: both together warp exactly the union
    both = {s.relpath for s in plan_corpus(7, "tiny", train_warp=True, train_warp_2d=True) if s.warp}
    assert both == warped | {s.relpath for s in plan_corpus(7, "tiny", train_warp=True) if s.warp}


def test_train_tone_mr_changes_mr_training_studies_only(tiny_corpus: Path, tmp_path: Path) -> None:
    from training.synth.corpus import tone_curve

    _, toned = _changes_only_training_studies_of(("mr",), tiny_corpus, tmp_path / "tone", train_tone_mr=True)
    assert {s.relpath for s in plan_corpus(7, "tiny", train_tone_mr=True) if s.tone} == toned
    # the curve keeps 0 and the reference, is monotone, and bends the rest one way
    x = np.linspace(0.0, 2.0, 201, dtype=np.float32)
    y = tone_curve(x, np.random.default_rng(1), ref=1.0)
    assert y[0] == 0.0 and y[100] == pytest.approx(1.0) and np.all(np.diff(y) > 0)
    assert np.all(y[1:100] > x[1:100]) or np.all(y[1:100] < x[1:100])


def test_train_ct_windows_change_the_window_tags_and_type_of_ct_training_studies_only(
        tiny_corpus: Path, tmp_path: Path) -> None:
    from engines.prompts import prompts_from_tags
    from training.synth.corpus import CT_TRAIN_WINDOWS, CT_WINDOWS, render_study

    # the whole tiny corpus: the manifest moves only in the type of CT training studies (never
    # the score), and only a study whose type moved has other bytes
    rows, changed = _regenerate(tiny_corpus, tmp_path / "ctw", train_ct_windows=True)
    before = {r["path"]: r for r in _rows(tiny_corpus)}
    ct_train = {p for p, r in rows.items() if r["split"] == "train" and r["modality"] == "ct"}
    assert ct_train
    for p, r in rows.items():
        assert {k: v for k, v in r.items() if k != "type"} == {k: v for k, v in before[p].items() if k != "type"}
        assert r["type"] in CT_TRAIN_WINDOWS if p in ct_train else r["type"] == before[p]["type"]
        assert any(changed[p]) == (r["type"] != before[p]["type"]), p
    # a larger plan: all three windows, about equally, on CT training studies only; the rest of
    # the plan is the same
    plan = plan_corpus(0, "small", train_ct_windows=True)
    base = plan_corpus(0, "small")
    counts = {t: sum(1 for s in plan if s.modality == "ct" and s.split == "train" and s.type == t)
              for t in CT_TRAIN_WINDOWS}
    assert min(counts.values()) >= 0.2 * sum(counts.values()), counts
    assert [dataclasses.replace(s, type="") for s in plan] == [dataclasses.replace(s, type="") for s in base]
    assert all(a.type == b.type for a, b in zip(plan, base) if not (a.modality == "ct" and a.split == "train"))
    # a lung- and a bone-window study: the same HU as without the option, the window in the tags,
    # and the scorer reads the manifest's type back from them
    for want in ("lung", "bone"):
        i = next(k for k, s in enumerate(plan)
                 if s.modality == "ct" and s.split == "train" and s.dimension == "2d" and s.type == want)
        assert base[i].type == "soft"          # the option moved it (validation chest CT is lung too)
        row = render_study(plan[i], tmp_path / want)
        assert row["type"] == want and row["score"] == render_study(base[i], tmp_path / "soft")["score"]
        new = pydicom.dcmread(tmp_path / want / plan[i].relpath)
        old = pydicom.dcmread(tmp_path / "soft" / base[i].relpath)
        assert np.array_equal(new.pixel_array, old.pixel_array)
        centre, width = CT_WINDOWS[want]
        assert (float(new.WindowCenter), float(new.WindowWidth)) == (centre, width)
        meta = {k: new.get(k) for k in ("Modality", "WindowCenter", "WindowWidth", "ConvolutionKernel")}
        assert prompts_from_tags(meta, "2d")["type"] == want


def _mr_grid_slice(name: str, size: int = 256) -> np.ndarray:
    """The middle slice of an MR source on the ``size`` grid, as the renderer makes it (long side
    resized, 99th percentile at 1)."""
    from training.synth.corpus import _resize_long_side

    arr = load_unit(source_by_name(name).units()[0]).array
    img = _resize_long_side(arr[arr.shape[0] // 2], size)[0]
    return img / float(np.percentile(img, 99.0))


def test_mr_band_zero_fills_beyond_the_acquired_matrix_and_keeps_a_fraction_of_it() -> None:
    """``band``: a 64-matrix scan on the 256 grid is reconstructed with k-space zero beyond its
    own 64 lines, and a kept fraction is a fraction of those lines. Without it a 128-matrix
    source (the test split's EPI head) barely changes until more than half of the grid's k-space
    is cut — the ringing label then names a change the image does not show — while with it the
    same kept fraction changes it about as much as it changes a source acquired at 256."""
    from training.synth.corpus import mr_band

    rng = np.random.default_rng
    small = _mr_grid_slice("mr-small")                       # 64 × 64 matrix
    assert mr_band((64, 64), 256) == 0.25 and mr_band((96, 128), 256) == 0.5 and mr_band((1024, 1024), 256) == 1.0
    assert np.array_equal(degrade.mr_acquire(small, rng(0)), small.astype(np.float32))   # band 1, keep 1: as is
    def outside(img: np.ndarray, lines: int) -> float:
        """Share of the image's spectral energy beyond the central ``lines`` × ``lines`` of k-space."""
        k = np.abs(np.fft.fftshift(np.fft.fft2(img))) ** 2
        c0 = (k.shape[0] - lines) // 2
        return 1.0 - float(k[c0:c0 + lines, c0:c0 + lines].sum() / k.sum())

    full = degrade.mr_acquire(small, rng(0), band=0.25)
    # bilinear interpolation leaves energy beyond the acquired 64 lines; zero filling does not
    # (what is left comes from taking the magnitude of the complex image)
    assert outside(small, 64) > 2e-3 and outside(full, 64) < 1e-4
    assert np.abs(full - small).mean() > 1e-3
    half = degrade.mr_acquire(small, rng(0), keep_fraction=0.5, band=0.25)
    assert outside(half, 32) < 5e-4 < 5e-3 < outside(degrade.mr_acquire(small, rng(0), keep_fraction=0.5), 32)
    with pytest.raises(ValueError, match="band"):
        degrade.mr_acquire(small, rng(0), band=0.0)

    def change(img: np.ndarray, keep: float, band: float) -> float:
        ref = degrade.mr_acquire(img, rng(0), band=band)
        return float(np.sqrt(((degrade.mr_acquire(img, rng(0), keep_fraction=keep, band=band) - ref) ** 2).mean()))

    epi, t1 = _mr_grid_slice("mr-epi"), _mr_grid_slice("mr-t1cor")   # 96 × 128 and 256 × 256 matrices
    for keep in (0.7, 0.5):
        ref = change(t1, keep, 1.0)
        assert change(epi, keep, 1.0) < 0.5 * ref, keep         # the grid fraction: hardly visible
        assert 0.6 * ref < change(epi, keep, 0.5) < 3.0 * ref, keep   # the acquired matrix's fraction


def _first_2d_mr_study_per_source(plan: list) -> dict[str, object]:
    """Source name → the plan's first single-slice MR study of that source."""
    picked: dict[str, object] = {}
    for s in plan:
        if s.modality == "mr" and s.dimension == "2d":
            picked.setdefault(s.unit.source, s)
    return picked


def test_mr_native_kspace_changes_only_the_mr_images_of_coarse_sources(tmp_path: Path) -> None:
    """The option leaves the plan, the parameters and the scores as they are; of the MR studies it
    changes the pixels of sources acquired coarser than the grid (in every split) and no other."""
    from training.synth.corpus import mr_band, render_study

    plan, base = plan_corpus(3, "small", mr_native_kspace=True), plan_corpus(3, "small")
    assert [dataclasses.replace(s, native_kspace=False) for s in plan] == base
    assert {s.modality for s in plan if s.native_kspace} == {"mr"}
    assert all(s.native_kspace for s in plan if s.modality == "mr")
    picked = _first_2d_mr_study_per_source(plan)
    coarse = {"mr-small", "mr-epi"} & set(picked)             # the test split's sources (64², 96 × 128)
    assert coarse and "mr-t1cor" in picked                     # and a 256² training source
    for name, spec in picked.items():
        new = render_study(spec, tmp_path / "new")
        old = render_study(dataclasses.replace(spec, native_kspace=False), tmp_path / "old")
        assert new == old                                      # same manifest row, score included
        a = pydicom.dcmread(tmp_path / "new" / spec.relpath).pixel_array
        b = pydicom.dcmread(tmp_path / "old" / spec.relpath).pixel_array
        native = load_unit(spec.unit).array.shape[1:3]
        assert (not np.array_equal(a, b)) == (mr_band(native, spec.image_size) < 1.0), name
        assert (name in coarse) <= (not np.array_equal(a, b))


def test_mr_native_matrix_writes_coarse_sources_on_their_own_matrix(tmp_path: Path) -> None:
    """With the option an MR study of a source coarser than the grid is written on the source's
    matrix and pixel spacing (an archive's file, which the scorer resizes), a finer source as
    before; plan, rows and scores do not change, and the file reads back through engines.io."""
    from engines.io.discover import discover_studies, read_study
    from training.synth.corpus import render_study

    plan, base = plan_corpus(3, "small", mr_native_matrix=True), plan_corpus(3, "small")
    assert [dataclasses.replace(s, native_matrix=False) for s in plan] == base
    assert {s.modality for s in plan if s.native_matrix} == {"mr"}
    picked = _first_2d_mr_study_per_source(plan)
    assert {"mr-small", "mr-t1cor"} <= set(picked)
    for name, spec in picked.items():
        new = render_study(spec, tmp_path / "new")
        old = render_study(dataclasses.replace(spec, native_matrix=False), tmp_path / "old")
        assert new == old, name                                # same row, score included
        ds = pydicom.dcmread(tmp_path / "new" / spec.relpath)
        src = load_unit(spec.unit)
        native = max(src.array.shape[1:3])
        assert max(ds.Rows, ds.Columns) == min(native, spec.image_size), name
        assert float(ds.PixelSpacing[0]) == pytest.approx(src.pixel_mm[0] * max(native / spec.image_size, 1.0),
                                                          rel=1e-3), name
    refs = {r.rel_path: r for r in discover_studies(tmp_path / "new")}
    ref = refs[picked["mr-small"].relpath]
    assert ref.error is None and float(ref.meta["MagneticFieldStrength"]) > 0
    assert read_study(ref).array.shape[-2:] == (64, 64)


def test_train_mr_matrix_writes_half_the_mr_training_studies_on_a_coarser_matrix(tmp_path: Path) -> None:
    """The option draws a coarser acquisition matrix for about half of the MR training studies and
    for nothing else; such a study is written on that matrix at the same field of view (a larger
    pixel), with the same manifest row and score. Every other study's spec, hence its file, is the
    same as without the option."""
    from training.synth.corpus import TRAIN_MR_MATRICES, render_study

    plan, base = plan_corpus(3, "small", train_mr_matrix=True), plan_corpus(3, "small")
    assert [dataclasses.replace(s, acq_matrix=0) for s in plan] == base
    drawn = [s for s in plan if s.acq_matrix]
    assert {(s.modality, s.split) for s in drawn} == {("mr", "train")}
    mr_train = [s for s in plan if s.modality == "mr" and s.split == "train"]
    assert 0.3 < len(drawn) / len(mr_train) < 0.7
    assert {s.acq_matrix for s in drawn} == set(TRAIN_MR_MATRICES)
    assert plan_corpus(3, "small", train_mr_matrix=True) == plan        # deterministic
    two_d = [s for s in drawn if s.dimension == "2d" and s.fmt == "dicom"]
    fine = [s for s in two_d if max(load_unit(s.unit).array.shape[1:3]) >= s.image_size]
    assert fine
    spec = min(fine, key=lambda s: s.acq_matrix)
    new = render_study(spec, tmp_path / "new")
    old = render_study(dataclasses.replace(spec, acq_matrix=0), tmp_path / "old")
    assert new == old                                                  # same row, score included
    a = pydicom.dcmread(tmp_path / "new" / spec.relpath)
    b = pydicom.dcmread(tmp_path / "old" / spec.relpath)
    assert max(a.Rows, a.Columns) == spec.acq_matrix < max(b.Rows, b.Columns) == spec.image_size
    fov_a = float(a.PixelSpacing[0]) * max(a.Rows, a.Columns)
    fov_b = float(b.PixelSpacing[0]) * max(b.Rows, b.Columns)
    assert fov_a == pytest.approx(fov_b, rel=1e-3)                     # same field of view


def test_apodized_truncation_blurs_without_ringing() -> None:
    """A hard k-space cut overshoots at an edge (Gibbs); the Hamming-filtered cut of the same
    kept fraction does not, and it is at least as blurred (a wider edge)."""
    rng = np.random.default_rng
    edge = np.zeros((128, 128))
    edge[:, 64:] = 1.0
    hard = degrade.mr_acquire(edge, rng(0), keep_fraction=0.25)
    soft = degrade.mr_acquire(edge, rng(0), keep_fraction=0.25, apodize=True)
    row_h, row_s = hard[64].astype(np.float64), soft[64].astype(np.float64)
    assert row_h.max() > 1.05 and row_s.max() < 1.01                   # overshoot only without the filter
    width = lambda r: int(((r > 0.1) & (r < 0.9))[40:90].sum())       # noqa: E731 - 10-90 % rise, central edge
    assert width(row_s) > width(row_h) >= 1
    assert np.array_equal(degrade.mr_acquire(edge, rng(0), apodize=True), degrade.mr_acquire(edge, rng(0)))


def test_train_mr_apodize_filters_half_the_truncated_mr_training_studies(tmp_path: Path) -> None:
    """Only MR training specs draw the filter (about half, deterministically); every other spec is
    the same as without the option; a drawn study with ringing renders other pixels with the same
    manifest row, one without truncation renders the same file."""
    from training.synth.corpus import render_study

    plan, base = plan_corpus(3, "small", train_mr_apodize=True), plan_corpus(3, "small")
    assert [dataclasses.replace(s, apodize=False) for s in plan] == base
    drawn = [s for s in plan if s.apodize]
    assert {(s.modality, s.split) for s in drawn} == {("mr", "train")}
    mr_train = [s for s in plan if s.modality == "mr" and s.split == "train"]
    assert 0.3 < len(drawn) / len(mr_train) < 0.7
    assert plan_corpus(3, "small", train_mr_apodize=True) == plan
    ringing = next(s for s in drawn if s.params.get("keep", 1.0) < 0.9 and s.dimension == "2d" and s.fmt == "dicom")
    new = render_study(ringing, tmp_path / "new")
    old = render_study(dataclasses.replace(ringing, apodize=False), tmp_path / "old")
    assert new == old                                                   # same row, score included
    a = pydicom.dcmread(tmp_path / "new" / ringing.relpath).pixel_array
    b = pydicom.dcmread(tmp_path / "old" / ringing.relpath).pixel_array
    assert a.shape == b.shape and not np.array_equal(a, b)
    plain = next((s for s in drawn if s.params.get("keep", 1.0) >= 1.0 and s.dimension == "2d"
                  and s.fmt == "dicom"), None)
    if plain is not None:
        render_study(plain, tmp_path / "p1")
        render_study(dataclasses.replace(plain, apodize=False), tmp_path / "p0")
        assert (tmp_path / "p1" / plain.relpath).read_bytes() == (tmp_path / "p0" / plain.relpath).read_bytes()


def test_kspace_noise_is_band_limited_with_a_truncated_acquisition() -> None:
    """Noise acquired in k-space goes through the truncation: on a uniform image it falls to about
    σ · kept and becomes correlated between neighbours; image-domain noise stays white at σ. With
    nothing truncated the option changes nothing."""
    rng = np.random.default_rng
    flat = np.full((128, 128), 100.0)

    def stats(img: np.ndarray) -> tuple[float, float]:
        r = img[16:-16, 16:-16].astype(np.float64) - 100.0
        return float(r.std()), float(np.corrcoef(r[:, :-1].ravel(), r[:, 1:].ravel())[0, 1])

    white = stats(degrade.mr_acquire(flat, rng(0), sigma=5.0, keep_fraction=0.25))
    band = stats(degrade.mr_acquire(flat, rng(0), sigma=5.0, keep_fraction=0.25, kspace_noise=True))
    assert white[0] == pytest.approx(5.0, rel=0.1) and abs(white[1]) < 0.1
    assert band[0] == pytest.approx(5.0 * 0.25, rel=0.2) and band[1] > 0.5
    assert np.array_equal(degrade.mr_acquire(flat, rng(0), sigma=5.0, kspace_noise=True),
                          degrade.mr_acquire(flat, rng(0), sigma=5.0))


def test_train_band_noise_draws_half_the_ct_and_mr_training_studies(tmp_path: Path) -> None:
    """Only CT / MR training specs draw it (about half each, deterministically), every other spec
    is unchanged; a drawn blurred CT study renders smoother pixels (the noise is blurred too) with
    the same manifest row."""
    from training.synth.corpus import render_study

    plan, base = plan_corpus(3, "small", train_band_noise=True), plan_corpus(3, "small")
    assert [dataclasses.replace(s, band_noise=False) for s in plan] == base
    drawn = [s for s in plan if s.band_noise]
    assert {(s.modality, s.split) for s in drawn} == {("ct", "train"), ("mr", "train")}
    for mod in ("ct", "mr"):
        train = [s for s in plan if s.modality == mod and s.split == "train"]
        assert 0.3 < sum(s.band_noise for s in train) / len(train) < 0.7
    assert plan_corpus(3, "small", train_band_noise=True) == plan
    ct = max((s for s in drawn if s.modality == "ct" and s.dimension == "2d"), key=lambda s: s.params.get("blur_mm", 0.0))
    assert ct.params.get("blur_mm", 0.0) > 0.3
    new = render_study(ct, tmp_path / "new")
    old = render_study(dataclasses.replace(ct, band_noise=False), tmp_path / "old")
    assert new == old                                                   # same row, score included
    a = pydicom.dcmread(tmp_path / "new" / ct.relpath).pixel_array.astype(np.float64)
    b = pydicom.dcmread(tmp_path / "old" / ct.relpath).pixel_array.astype(np.float64)
    assert a.shape == b.shape and np.abs(np.diff(a, axis=1)).mean() < np.abs(np.diff(b, axis=1)).mean()


def test_train_ct_fov_crops_half_the_ct_training_studies_after_the_acquisition(tmp_path: Path) -> None:
    """Only CT training specs draw a small field of view (about half, side fraction in
    ``TRAIN_CT_FOV``), every other spec is unchanged; a drawn study's pixels are exactly a square,
    anatomy-centred crop of the same study rendered without the option (same acquisition, same
    noise), at the same pixel spacing and with the same manifest row; 3D crops every slice alike."""
    from training.synth.corpus import TRAIN_CT_FOV, render_study

    plan, base = plan_corpus(5, "small", train_ct_fov=True), plan_corpus(5, "small")
    assert [dataclasses.replace(s, fov=1.0) for s in plan] == base
    drawn = [s for s in plan if s.fov < 1.0]
    assert {(s.modality, s.split) for s in drawn} == {("ct", "train")}
    train = [s for s in plan if s.modality == "ct" and s.split == "train"]
    assert 0.3 < len(drawn) / len(train) < 0.7
    assert all(TRAIN_CT_FOV[0] <= s.fov <= TRAIN_CT_FOV[1] for s in drawn)
    assert plan_corpus(5, "small", train_ct_fov=True) == plan
    for dim in ("2d", "3d"):
        ct = next(s for s in drawn if s.dimension == dim)
        new = render_study(ct, tmp_path / "new")
        old = render_study(dataclasses.replace(ct, fov=1.0), tmp_path / "old")
        assert new == old                                               # same row, score included
        if dim == "2d":
            files_new, files_old = [tmp_path / "new" / ct.relpath], [tmp_path / "old" / ct.relpath]
        else:
            files_new = sorted((tmp_path / "new" / ct.relpath).iterdir())
            files_old = sorted((tmp_path / "old" / ct.relpath).iterdir())
        a = [pydicom.dcmread(f) for f in files_new]
        b = [pydicom.dcmread(f) for f in files_old]
        assert len(a) == len(b)
        big, small = b[len(b) // 2].pixel_array, a[len(a) // 2].pixel_array
        side = small.shape[0]
        assert small.shape == (side, side) and side == round(ct.fov * min(big.shape))
        assert a[0].PixelSpacing == b[0].PixelSpacing
        # the crop is found in the full image at one offset, the same for every slice
        hits = [(y, x) for y in range(big.shape[0] - side + 1) for x in range(big.shape[1] - side + 1)
                if big[y, x] == small[0, 0] and np.array_equal(big[y:y + side, x:x + side], small)]
        assert len(hits) == 1
        y, x = hits[0]
        for fa, fb in zip(a, b):
            assert np.array_equal(fa.pixel_array, fb.pixel_array[y:y + side, x:x + side])
        hu = small.astype(np.float64) * float(a[0].RescaleSlope) + float(a[0].RescaleIntercept)
        assert (hu > -500).mean() > 0.2                                 # centred on anatomy, not air


def test_train_extra_kinds_adds_a_scored_defect_to_some_training_studies_of_every_modality(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """About ``TRAIN_EXTRA_KINDS_P`` of the training specs of each modality, and no val / test spec,
    get pixelation or quantisation: its parameter in ``params``, its name in ``degradation``, the
    file name and everything else unchanged; the drawn study is the same render with the defect
    applied on top (X-ray, CT, MR), and its score is the plain one times (1 − w·s)."""
    from training.synth.corpus import (EXTRA_KINDS, SEVERITY, TRAIN_EXTRA_KINDS_P, apply_extra_kind,
                                       render_study)

    plan, base = plan_corpus(5, "small", train_extra_kinds=True), plan_corpus(5, "small")
    assert plan_corpus(5, "small", train_extra_kinds=True) == plan
    drawn = [(s, b) for s, b in zip(plan, base) if s != b]
    assert all(s.split == "train" for s, _ in drawn)
    for mod in ("ct", "mr", "xr", "fundus"):
        train = [b for b in base if b.modality == mod and b.split == "train"]
        mine = [s for s, _ in drawn if s.modality == mod]
        assert abs(len(mine) / len(train) - TRAIN_EXTRA_KINDS_P) < 0.15, mod
    kinds = set()
    for s, b in drawn:
        kind = s.degradation.split("+")[-1]
        kinds.add(kind)
        assert s.degradation == f"{b.degradation}+{kind}" and s.relpath == b.relpath and s.primary == b.primary + (kind,)
        param = SEVERITY[kind].param
        assert {k: v for k, v in s.params.items() if k != param} == b.params and param not in b.params
        assert 0.0 <= SEVERITY[kind].to_s(s.params[param]) <= 1.0
    assert kinds == set(EXTRA_KINDS)
    import training.synth.corpus as corpus_mod

    seen: list[tuple[np.ndarray, np.ndarray]] = []

    def recording(x, params, modality, size):   # what each render puts on top, and of what
        out = apply_extra_kind(x, params, modality, size)
        seen.append((np.array(x, copy=True), np.array(out, copy=True)))
        return out

    monkeypatch.setattr(corpus_mod, "apply_extra_kind", recording)
    for mod in ("xr", "ct", "mr"):
        s, b = next((s, b) for s, b in drawn if s.modality == mod and s.dimension == "2d")
        kind = s.degradation.split("+")[-1]
        seen.clear()
        new, old = render_study(s, tmp_path / "new"), render_study(b, tmp_path / "old")
        (x_new, y_new), (x_old, y_old) = seen
        assert np.array_equal(x_new, x_old) and np.array_equal(y_old, x_old)   # same render; old: nothing on top
        assert np.array_equal(y_new, apply_extra_kind(x_old, s.params, mod, s.image_size))
        sev = SEVERITY[kind].to_s(s.params[SEVERITY[kind].param])
        if sev > 0:
            assert not np.array_equal(y_new, x_new)
        assert float(new["score"]) == pytest.approx(float(old["score"]) * (1 - SEVERITY[kind].weight * sev), abs=2e-6)
        assert json.loads(new["params"])["severities"][kind] == pytest.approx(sev, abs=1e-6)
        assert new["degradation"] == s.degradation and new["path"] == old["path"]


def test_train_siblings_show_the_same_anatomy_with_other_degradations(tmp_path: Path) -> None:
    """``train_siblings``: the planned studies are unchanged, about ``TRAIN_SIBLINGS_P`` of the
    training studies (and no val / test study) get a sibling appended after them, which renders the
    same anatomy with its own degradation, scored by its own parameters, and names its original in
    the manifest's ``content`` column (absent from a corpus without siblings)."""
    from training.synth.corpus import TRAIN_SIBLINGS_P, render_corpus, render_study

    plan, base = plan_corpus(5, "small", train_siblings=True), plan_corpus(5, "small")
    assert plan_corpus(5, "small", train_siblings=True) == plan
    assert plan[:len(base)] == base
    sibs = plan[len(base):]
    by_index = {s.index: s for s in base}
    train = [s for s in base if s.split == "train"]
    assert abs(len(sibs) / len(train) - TRAIN_SIBLINGS_P) < 0.1
    assert [s.index for s in sibs] == list(range(len(base), len(plan)))
    assert len({s.relpath for s in plan}) == len(plan)
    for s in sibs:
        o = by_index[s.content]
        assert o.split == "train" and s.content_path == o.relpath and s.content_index == o.index
        assert (s.modality, s.dimension, s.unit, s.n_anat, s.n_air, s.warp, s.window) == \
               (o.modality, o.dimension, o.unit, o.n_anat, o.n_air, o.warp, o.window)
        assert s.fmt == "jpeg" if "jpeg" in s.degradation else s.fmt != "jpeg"
    assert sum(s.params != by_index[s.content].params for s in sibs) == len(sibs)
    assert {s.modality for s in sibs} == {"ct", "mr", "xr", "fundus"}
    # same anatomy: a 2D sibling and its original re-rendered without degradation (CT at a huge
    # dose, MR at 7 T) correlate; another study of the same source does not as much
    from PIL import Image

    from training.synth.degrade import FULL_VIEWS

    clean = {"xr": {}, "ct": {"mas": 1e7, "views": float(FULL_VIEWS), "exposure_time_ms": 1000.0},
             "mr": {"tesla": 7.0, "motion_period": 5.0}}

    def pixels(spec, tag: str) -> np.ndarray:
        rel = f"{tag}/{spec.modality}-{spec.index}" + (".png" if spec.modality == "xr" else ".dcm")
        row = render_study(dataclasses.replace(spec, params=clean[spec.modality], relpath=rel,
                                               fmt="png" if spec.modality == "xr" else spec.fmt), tmp_path)
        f = tmp_path / row["path"]
        return np.asarray(Image.open(f) if f.suffix == ".png" else pydicom.dcmread(f).pixel_array, np.float64)

    for mod in ("xr", "ct", "mr"):
        s = next(s for s in sibs if s.modality == mod and s.dimension == "2d")
        o = by_index[s.content]
        a, b = pixels(s, "a"), pixels(o, "b")
        corr = np.corrcoef(a.ravel(), b.ravel())[0, 1]
        assert corr > 0.99, (mod, corr)
        other = next(x for x in base if x.modality == mod and x.dimension == "2d" and x.split == "train"
                     and x.unit.source == o.unit.source and x.index != o.index)
        c = pixels(other, "c")
        if c.shape == b.shape:
            assert np.corrcoef(c.ravel(), b.ravel())[0, 1] < corr - 0.02, mod
    # the manifest names the original; a corpus without siblings has no content column
    few = [s for s in plan if s.index in (sibs[0].index, sibs[0].content)]
    rows = {r["path"]: r for r in csv.DictReader(open(render_corpus(tmp_path / "m", few)))}
    sib = rows[sibs[0].relpath]
    assert sib["content"] == sibs[0].content_path and rows[sibs[0].content_path]["content"] == ""
    assert float(sib["score"]) == pytest.approx(float(render_study(sibs[0], tmp_path / "r")["score"]))
    plain = open(render_corpus(tmp_path / "p", [by_index[sibs[0].content]])).readline()
    assert "content" not in plain


def test_extra_kinds_pixelate_in_blocks_and_quantise_to_levels() -> None:
    from training.synth.corpus import apply_extra_kind

    rng = np.random.default_rng(0)
    img = rng.uniform(size=(64, 64))
    pix = apply_extra_kind(img, {"pixel_block": 8.0}, "xr", 64)         # 8 px at 256 → 2 px on a 64 grid
    assert np.array_equal(pix[::2, ::2], pix[1::2, 1::2]) and pix[0, 0] == pytest.approx(img[:2, :2].mean())
    assert np.array_equal(apply_extra_kind(img, {"pixel_block": 1.0}, "xr", 256), img)
    q = apply_extra_kind(img, {"levels": 4.0}, "fundus", 256)
    assert len(np.unique(q)) == 4
    hu = rng.uniform(-1000, 1000, size=(3, 32, 32))
    qh = apply_extra_kind(hu, {"levels": 8.0}, "ct", 256)              # steps of 400 / 8 = 50 HU
    assert qh.shape == hu.shape and np.allclose(qh / 50.0, np.round(qh / 50.0)) and np.abs(qh - hu).max() <= 25.0
    vol = apply_extra_kind(hu, {"pixel_block": 4.0}, "mr", 256)        # every slice in 4 × 4 blocks
    assert np.array_equal(vol[:, 0, 0], vol[:, 3, 3]) and not np.array_equal(vol[0], vol[1])
    rgb = apply_extra_kind(np.repeat(img[..., None], 3, axis=2), {"pixel_block": 8.0}, "fundus", 64)
    assert rgb.shape == (64, 64, 3) and np.allclose(rgb[..., 0], pix)


def test_warp_2d_moves_every_channel_together_and_changes_the_tone() -> None:
    from training.synth.corpus import TONE_LOG_GAMMA, warp_2d

    rng = np.random.default_rng(0)
    grey = np.clip(ndimage.gaussian_filter(rng.uniform(size=(64, 96)), 3) * 2 - 0.5, 0, 1).astype(np.float32)
    a = warp_2d(grey, np.random.default_rng(5))
    assert a.shape == grey.shape and a.dtype == np.float32 and 0.0 <= a.min() and a.max() <= 1.0
    assert np.array_equal(a, warp_2d(grey, np.random.default_rng(5)))          # seeded
    rgb = np.stack([grey, grey, grey], axis=-1)
    b = warp_2d(rgb, np.random.default_rng(5))
    assert b.shape == rgb.shape                                                # one field for all channels:
    assert np.array_equal(b[..., 0], b[..., 2]) and np.allclose(b[..., 1], a, atol=1e-6)
    # the tone curve: a flat image keeps no value but x ** gamma, gamma within the documented range
    flat = warp_2d(np.full((64, 64), 0.5, np.float32), np.random.default_rng(5))
    centre = float(flat[32, 32])
    gamma = math.log(centre) / math.log(0.5)
    assert math.exp(-TONE_LOG_GAMMA) - 1e-4 <= gamma <= math.exp(TONE_LOG_GAMMA) + 1e-4
    gammas = {round(math.log(float(warp_2d(np.full((32, 32), 0.5, np.float32),
                                           np.random.default_rng(k))[16, 16])) / math.log(0.5), 3)
              for k in range(6)}
    assert len(gammas) > 3                                                     # drawn, not fixed


def test_generator_options_table_drives_the_cli_and_checks_values() -> None:
    from training.synth.corpus import GENERATOR_OPTIONS, generator_options

    names = [o.name for o in GENERATOR_OPTIONS]
    assert names == ["train_windows", "dose_label", "train_warp", "train_warp_2d", "train_tone_mr", "val_sources",
                     "train_extra_mr", "train_ct_windows", "mr_native_kspace",
                     "mr_native_matrix", "train_mr_matrix", "train_mr_apodize", "train_band_noise", "train_more_mr", "train_ct_fov",
                     "train_extra_kinds", "train_siblings", "train_mr_fields"]
    import inspect

    planned = inspect.signature(plan_corpus).parameters      # each is a keyword of the planner, with
    assert all(planned[n].default == o.default for n, o in zip(names, GENERATOR_OPTIONS))   # the same default
    params = {p.name: p for p in synth_command.params}
    for o in GENERATOR_OPTIONS:                        # every option is a flag of `mediqa synth`
        assert o.name in params and o.flag in params[o.name].opts and params[o.name].default == o.default
    assert generator_options() == {o.name: o.default for o in GENERATOR_OPTIONS}
    assert generator_options({"train_warp_2d": True, "size": "x"})["train_warp_2d"] is True
    with pytest.raises(ValueError, match="train_warp_2d must be true or false"):
        generator_options({"train_warp_2d": "yes"})
    with pytest.raises(ValueError, match="dose_label must be one of"):
        generator_options({"dose_label": "hu"})
    opt = {o.name: o for o in GENERATOR_OPTIONS}
    assert opt["dose_label"].cli_args("noise") == ["--dose-label", "noise"] and opt["dose_label"].cli_args("mas") == []
    assert opt["train_warp_2d"].cli_args(True) == ["--train-warp-2d"]


def test_val_sources_two_moves_one_ct_and_one_mr_source_to_validation() -> None:
    """``val_sources="two"``: validation holds two CT and two MR sources (each with studies), the
    moved sources leave training entirely, test keeps its held-out sources; X-ray / fundus units
    are unchanged; "one" is the plan as before (the shipped corpora keep their identity)."""
    from training.recipe import corpus_identity
    from training.synth.corpus import VAL_MOVES

    one, two = plan_corpus(3, "medium"), plan_corpus(3, "medium", val_sources="two")

    def sources(specs, split):
        return {(s.modality, s.unit.source) for s in specs if s.split == split}

    assert len(one) == len(two)
    for mod in ("ct", "mr"):
        val = {src for m, src in sources(two, "val") if m == mod}
        assert len(val) == 2 and len({src for m, src in sources(one, "val") if m == mod}) == 1
        assert val & set(VAL_MOVES["two"]) and not val & {src for m, src in sources(two, "train") if m == mod}
    assert sources(one, "test") == sources(two, "test")                 # the held-out sources stay
    assert {u for m, u in sources(two, "train") if m in ("xr", "fundus")} == \
        {u for m, u in sources(one, "train") if m in ("xr", "fundus")}
    assert all(s.split == "val" for s in two if s.unit.source in VAL_MOVES["two"])
    assert plan_corpus(3, "medium", val_sources="one") == one
    assert "val_sources" not in corpus_identity("medium", 3, val_sources="one")
    assert corpus_identity("medium", 3, val_sources="two")["val_sources"] == "two"
    with pytest.raises(ValueError, match="val_sources must be one of"):
        plan_corpus(3, "tiny", val_sources="three")


def test_dose_label_noise_changes_only_the_ct_scores(tiny_corpus: Path, tmp_path: Path) -> None:
    from training.synth.corpus import DOSE_NOISE_HU, dose_severity_from_noise

    out = tmp_path / "n"
    generate_corpus(out, seed=7, size="tiny", workers=1, dose_label="noise")
    old, new = _tree_digest(tiny_corpus), _tree_digest(out)
    assert {f: h for f, h in old.items() if f != "manifest.csv"} == \
        {f: h for f, h in new.items() if f != "manifest.csv"}          # same images and tags
    before = {r["path"]: r for r in _rows(tiny_corpus)}
    ct = 0
    for r in _rows(out):
        b = before[r["path"]]
        p = json.loads(r["params"])
        if r["modality"] != "ct":
            assert r == b
            continue
        ct += 1
        assert p["dose_label"] == "noise" and p["noise_hu"] > 0
        s = p["severities"]["dose"]
        assert s == dose_severity_from_noise(p["noise_hu"])
        assert s == pytest.approx(np.clip((p["noise_hu"] - DOSE_NOISE_HU[0]) / (DOSE_NOISE_HU[1] - DOSE_NOISE_HU[0]),
                                          0, 1), abs=1e-6)
        assert float(r["score"]) == pytest.approx(quality_score(p["severities"]), abs=1e-6)
        assert p["mas"] == json.loads(b["params"])["mas"] and r["physical"] == b["physical"]
        assert json.loads(b["params"])["severities"]["dose"] != s      # the mAs-based one differs
    assert ct >= 2
    again = tmp_path / "n2"
    generate_corpus(again, seed=7, size="tiny", workers=2, dose_label="noise")
    assert _tree_digest(again) == new                                   # deterministic
    with pytest.raises(ValueError, match="dose_label"):
        plan_corpus(7, "tiny", dose_label="hu")


# --- generated corpus --------------------------------------------------------------------------

def test_tiny_corpus_is_deterministic(tiny_corpus: Path, tmp_path: Path) -> None:
    again = tmp_path / "b"
    generate_corpus(again, seed=7, size="tiny", workers=2)  # workers must not change the output
    assert _tree_digest(again) == _tree_digest(tiny_corpus)
    other = tmp_path / "c"
    generate_corpus(other, seed=8, size="tiny", workers=1)
    assert (other / "manifest.csv").read_bytes() != (tiny_corpus / "manifest.csv").read_bytes()


def test_manifest_rows_and_files(tiny_corpus: Path) -> None:
    with (tiny_corpus / "manifest.csv").open(newline="", encoding="utf-8") as fh:
        assert tuple(next(csv.reader(fh))) == MANIFEST_COLUMNS
    rows = _rows(tiny_corpus)
    assert len(rows) == len(plan_corpus(7, "tiny"))
    from engines.prompts import DEFAULT_VOCAB

    for r in rows:
        assert (tiny_corpus / r["path"]).exists(), r["path"]
        assert 0.0 <= float(r["score"]) <= 1.0
        for g in ("modality", "region", "type", "dimension"):
            assert r[g] in DEFAULT_VOCAB.labels(g), (g, r[g])
        params = json.loads(r["params"])
        assert quality_score(params["severities"]) == pytest.approx(float(r["score"]), abs=1e-6)
        if r["dimension"] == "3d":
            assert int(r["n_slices"]) > 4


def test_written_dicom_tags(tiny_corpus: Path) -> None:
    rows = _rows(tiny_corpus)
    ct = [r for r in rows if r["modality"] == "ct" and r["dimension"] == "3d"][0]
    files = sorted((tiny_corpus / ct["path"]).glob("*.dcm"))
    assert len(files) == int(ct["n_slices"])
    params = json.loads(ct["params"])
    zs, series = [], set()
    for f in files:
        ds = pydicom.dcmread(f)
        assert ds.Modality == "CT" and float(ds.KVP) == 120
        assert int(ds.Exposure) == int(params["mas"]) == int(float(ct["physical"]))
        assert int(ds.XRayTubeCurrent) * int(ds.ExposureTime) / 1000 == pytest.approx(int(ds.Exposure))
        assert float(ds.RescaleIntercept) == -1024 and float(ds.RescaleSlope) == 1
        assert str(ds.PatientName).startswith("SYNTH^") and "PatientBirthDate" not in ds
        zs.append(float(ds.ImagePositionPatient[2]))
        series.add(ds.SeriesInstanceUID)
    assert len(series) == 1 and np.all(np.diff(zs) > 0)
    # anatomy-free air slices at both ends
    first = pydicom.dcmread(files[0]).pixel_array.astype(float) - 1024
    mid = pydicom.dcmread(files[len(files) // 2]).pixel_array.astype(float) - 1024
    assert np.mean(first > -500) < 0.01 < np.mean(mid > -500)
    mr = [r for r in rows if r["modality"] == "mr" and r["format"] == "dicom"]
    assert mr
    for r in mr:
        p = tiny_corpus / r["path"]
        f = sorted(p.glob("*.dcm"))[0] if p.is_dir() else p
        ds = pydicom.dcmread(f)
        assert ds.Modality == "MR"
        assert float(ds.MagneticFieldStrength) == pytest.approx(float(r["physical"]))
        assert float(ds.RepetitionTime) > 0 and float(ds.EchoTime) > 0 and ds.SeriesDescription


def test_corpus_reads_back_through_engines_io(tiny_corpus: Path) -> None:
    from engines.io.discover import discover_studies, read_study

    refs = {r.rel_path: r for r in discover_studies(tiny_corpus)}
    rows = _rows(tiny_corpus)
    assert set(refs) == {r["path"] for r in rows}
    for r in rows:
        ref = refs[r["path"]]
        assert ref.error is None, (r["path"], ref.error)
        assert ref.kind == r["dimension"]
        vol = read_study(ref)
        assert vol.n_slices == int(r["n_slices"])
        if r["modality"] == "ct":
            assert float(ref.meta["Exposure"]) == pytest.approx(float(r["physical"]))
            assert -1100 < float(vol.array.min()) and float(vol.array.max()) > 100  # HU
        if r["modality"] == "mr" and r["format"] == "dicom":
            assert float(ref.meta["MagneticFieldStrength"]) == pytest.approx(float(r["physical"]))


def test_cli_synth_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import training.synth.corpus as corpus_mod
    from mediqa_cli.main import cli

    plans: list[tuple] = []

    def counted(*args: object, **kwargs: object) -> list:
        plans.append(args)
        return plan_corpus(*args, **kwargs)

    monkeypatch.setattr(corpus_mod, "plan_corpus", counted)
    out = tmp_path / "corpus"
    runner = CliRunner()
    res = runner.invoke(cli, ["synth", str(out), "--size", "tiny", "--seed", "3", "--workers", "1",
                              "--no-progress"])
    assert res.exit_code == 0, res.output
    assert plans == [(3, "tiny")]                      # planned once: checked, then rendered
    monkeypatch.undo()
    assert len(_rows(out)) == len(plan_corpus(3, "tiny"))
    assert _tree_digest(out) == _tree_digest(generate_corpus(tmp_path / "api", seed=3, size="tiny").parent)
    res = runner.invoke(cli, ["synth", str(out), "--size", "tiny", "--no-progress"])
    assert res.exit_code != 0 and "not empty" in res.output
    res = runner.invoke(cli, ["synth", str(out), "--size", "tiny", "--seed", "4", "--workers", "1",
                              "--no-progress", "--force"])
    assert res.exit_code == 0, res.output
    # --train-warp reaches the generator: the CT / MR training studies change, nothing else
    plain = _tree_digest(out)
    res = runner.invoke(cli, ["synth", str(out), "--size", "tiny", "--seed", "4", "--workers", "1",
                              "--no-progress", "--force", "--train-warp"])
    assert res.exit_code == 0, res.output
    warped = {s.relpath for s in plan_corpus(4, "tiny", train_warp=True) if s.warp}
    moved = {f for f, h in _tree_digest(out).items() if plain[f] != h}
    assert warped and moved and all(any(f == w or f.startswith(w + "/") for w in warped) for f in moved)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("user data")
    res = runner.invoke(cli, ["synth", str(tmp_path / "other"), "--size", "tiny", "--force",
                              "--no-progress"])
    assert res.exit_code != 0 and (tmp_path / "other" / "keep.txt").exists()


def test_cli_synth_splits_renders_the_full_corpus_held_out_studies(tiny_corpus: Path, tmp_path: Path) -> None:
    """``--splits val,test``: exactly the full corpus' val / test studies, byte for byte, and their
    manifest rows in the same order; a bad split name is refused before anything is written."""
    from mediqa_cli.main import cli

    out = tmp_path / "held"
    res = CliRunner().invoke(cli, ["synth", str(out), "--size", "tiny", "--seed", "7", "--workers", "1",
                                   "--no-progress", "--splits", "val,test"])
    assert res.exit_code == 0, res.output
    full_rows = [r for r in _rows(tiny_corpus) if r["split"] in ("val", "test")]
    assert full_rows and _rows(out) == full_rows
    assert {r["split"] for r in _rows(tiny_corpus)} - {"val", "test"}      # the full one has more
    full, held = _tree_digest(tiny_corpus), _tree_digest(out)
    assert set(held) == {f for f in full if f.split("/")[0] in ("val", "test")} | {"manifest.csv"}
    assert all(held[f] == full[f] for f in held if f != "manifest.csv")
    res = CliRunner().invoke(cli, ["synth", str(tmp_path / "bad"), "--size", "tiny", "--no-progress",
                                   "--splits", "val,holdout"])
    assert res.exit_code != 0 and "--splits" in res.output and not (tmp_path / "bad").exists()


# --- train_extra_mr: two more MR training subjects from heudiconv's test data ----------------

def _needs_heudiconv() -> None:
    import importlib.util

    if importlib.util.find_spec("heudiconv") is None:
        pytest.skip("heudiconv is not installed (make install adds it: pip install --no-deps heudiconv)")


def test_extra_mr_mosaics_are_cut_back_into_their_slices() -> None:
    """The two Siemens mosaics become volumes of their NumberOfImagesInMosaic slices at the tile
    size, with the DICOM pixel spacing; anatomy sits in the middle slices, and slices differ."""
    _needs_heudiconv()
    from training.synth.sources import EXTRA_MR, _load_source

    shapes = {"mr-bold": ((35, 64, 64), 3.25), "mr-dwi-mb": ((81, 152, 150), 1.5)}
    assert {s.name for s in EXTRA_MR} == set(shapes)
    for name, (shape, mm) in shapes.items():
        vol, pixel, thick = _load_source(name)
        assert vol.shape == shape and vol.dtype == np.float32 and vol.min() >= 0.0
        assert pixel == pytest.approx((mm, mm)) and 1.0 < thick < 5.0
        z = shape[0]
        mid = vol[z // 2]
        # the brain fills the middle tile; the mosaic's empty padding tiles were not taken as slices
        assert (mid > 0.2 * np.percentile(vol, 99)).mean() > 0.15
        assert all(vol[k].max() > 0 for k in range(z))
        assert not np.array_equal(vol[z // 2], vol[z // 2 + 1])
        assert source_by_name(name).splits == ("train",)


def test_mosaic_loader_refuses_a_dicom_that_is_not_a_mosaic(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydicom.data import get_testdata_file

    from training.synth import sources

    monkeypatch.setattr(sources, "_heudiconv_file", lambda name: Path(get_testdata_file("MR_small.dcm")))
    with pytest.raises(ValueError, match="not a Siemens mosaic"):
        sources._load_mosaic("MR_small.dcm")
    import importlib.util

    monkeypatch.undo()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps heudiconv"):
        sources._heudiconv_file("axasc35.dcm")


def test_mosaic_loader_reads_an_implicit_vr_slice_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In implicit VR without a private creator, pydicom hands NumberOfImagesInMosaic back as raw
    little-endian bytes: the loader must decode them, cut a 2 × 2 grid into 3 tiles in row-major
    order (the fourth, empty tile dropped), and take SpacingBetweenSlices as the slice spacing."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

    from training.synth import sources

    tile = 16
    img = np.zeros((2 * tile, 2 * tile), np.uint16)
    for k, v in enumerate((100, 200, 300, 0)):
        img[(k // 2) * tile:(k // 2 + 1) * tile, (k % 2) * tile:(k % 2 + 1) * tile] = v
    img[0, 0] = 150   # marks tile 0's top-left corner: the tiles must not be flipped or transposed

    def write(path: Path, syntax: str) -> Path:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = syntax
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "MR"
        ds.Rows, ds.Columns = img.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelSpacing, ds.SliceThickness, ds.SpacingBetweenSlices = [2.0, 2.0], 3.0, 3.5
        ds.PixelData = img.tobytes()
        ds.add_new((0x0019, 0x100A), "US", 3)
        ds.save_as(path, enforce_file_format=True)
        return path

    implicit = write(tmp_path / "implicit.dcm", ImplicitVRLittleEndian)
    raw = pydicom.dcmread(implicit)[(0x0019, 0x100A)].value
    assert isinstance(raw, bytes), "the bytes branch is what this test is for"
    explicit = write(tmp_path / "explicit.dcm", ExplicitVRLittleEndian)
    for path in (implicit, explicit):
        monkeypatch.setattr(sources, "_heudiconv_file", lambda name, p=path: p)
        vol, pixel, thick = sources._load_mosaic(path.name)
        assert vol.shape == (3, tile, tile)
        assert [float(np.median(s)) for s in vol] == [100.0, 200.0, 300.0]
        assert vol[0, 0, 0] == 150 and vol[1, 0, 0] == 200
        assert pixel == (2.0, 2.0) and thick == 3.5


def test_synth_refuses_before_writing_when_a_base_image_cannot_be_loaded(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing package (here heudiconv, for ``--train-extra-mr``) fails in about a second with
    every unloadable source and its install line named, before OUT_DIR is touched: ``--force``
    does not delete the previous corpus, and the library call writes nothing either."""
    from engines.errors import DatasetError
    from training.synth import sources
    from training.synth.corpus import MANIFEST_COLUMNS, MANIFEST_NAME, generate_corpus

    def no_heudiconv(name: str) -> Path:
        raise FileNotFoundError(f"{name} ships in heudiconv: pip install --no-deps heudiconv")

    monkeypatch.setattr(sources, "_heudiconv_file", no_heudiconv)
    sources._load_source.cache_clear()
    try:
        old = tmp_path / "old"
        (old / "train").mkdir(parents=True)
        (old / MANIFEST_NAME).write_text(",".join(MANIFEST_COLUMNS) + "\n")
        (old / "train" / "kept.dcm").write_bytes(b"x")
        res = CliRunner().invoke(synth_command, [str(old), "--size", "small", "--train-extra-mr", "--force",
                                                 "--no-progress", "--workers", "1"])
        assert res.exit_code != 0
        assert "mr-bold" in res.output and "mr-dwi-mb" in res.output and "pip install --no-deps heudiconv" in res.output
        assert "mr-small" not in res.output                       # the loadable sources are not listed
        assert (old / "train" / "kept.dcm").read_bytes() == b"x"  # the previous corpus is intact
        fresh = tmp_path / "fresh"
        with pytest.raises(DatasetError, match="nothing was written") as err:
            generate_corpus(fresh, seed=0, size="tiny", train_extra_mr=True)
        assert not fresh.exists()
        assert "mr-bold" in err.value.message and "mr-dwi-mb" not in err.value.message   # tiny uses one of them
        # without the option the same machine renders: only the sources a plan uses are required
        generate_corpus(fresh, seed=0, size="tiny")
        assert (fresh / MANIFEST_NAME).is_file()
    finally:
        sources._load_source.cache_clear()   # no failed or patched load leaks into other tests


@pytest.mark.parametrize("option", ["train_extra_mr", "train_more_mr"])
def test_train_extra_and_more_mr_change_only_mr_training_studies(option: str) -> None:
    """With ``train_extra_mr`` MR training studies draw from seven sources instead of five, with
    ``train_more_mr`` from six (both: eight); every other study (all of validation and test, every
    CT / X-ray / fundus study) is planned identically, and the corpus identity (sources
    fingerprint) changes only when the option is on."""
    from training.recipe import corpus_identity
    from training.synth.sources import EXTRA_MR, MORE_MR, sources_fingerprint

    added = {"train_extra_mr": EXTRA_MR, "train_more_mr": MORE_MR}[option]
    base, extra = plan_corpus(5, "medium"), plan_corpus(5, "medium", **{option: True})
    assert len(base) == len(extra)
    changed = [(a, b) for a, b in zip(base, extra) if a != b]
    assert changed
    assert all(a.modality == b.modality == "mr" and a.split == b.split == "train" for a, b in changed)
    new = {s.unit.source for s in extra if s.unit.source in {e.name for e in added}}
    assert new == {e.name for e in added}
    assert not {s.unit.source for s in base} & new
    # only the unit (and the labels that come with it) differs: the degradations are the same
    assert all(a.params == b.params and a.degradation == b.degradation for a, b in changed)
    assert {b.split for b in extra if b.unit.source in new} == {"train"}
    assert sources_fingerprint() == corpus_identity("medium", 5)["sources"]
    ident = corpus_identity("medium", 5, **{option: True})
    assert ident[option] is True and ident["sources"] == sources_fingerprint([option]) != sources_fingerprint()
    both = plan_corpus(5, "medium", train_extra_mr=True, train_more_mr=True)
    assert {e.name for e in EXTRA_MR + MORE_MR} <= {s.unit.source for s in both}
    subsets = [(), ("train_extra_mr",), ("train_more_mr",), ("train_extra_mr", "train_more_mr")]
    assert len({sources_fingerprint(o) for o in subsets}) == 4
    with pytest.raises(ValueError, match="no optional source group"):
        sources_fingerprint(["train_extra_MR"])


def test_more_mr_source_is_a_coarse_whole_brain_volume() -> None:
    """dipy's aniso_vox: 24 slices of 58 × 58 at 4 × 4 mm (5 mm apart), anatomy in the middle
    slices, slices that differ; training only."""
    from training.synth.sources import MORE_MR, _load_source

    assert [s.name for s in MORE_MR] == ["mr-aniso"]
    vol, pixel, thick = _load_source("mr-aniso")
    assert vol.shape == (24, 58, 58) and vol.dtype == np.float32 and vol.min() >= 0.0
    assert pixel == pytest.approx((4.0, 4.0)) and thick == pytest.approx(5.0)
    mid = vol[12]
    assert (mid > 0.2 * np.percentile(vol, 99)).mean() > 0.15
    assert not np.array_equal(vol[12], vol[13])
    assert source_by_name("mr-aniso").splits == ("train",)


@pytest.mark.parametrize("option, names", [("train_extra_mr", ("mr-bold", "mr-dwi-mb")),
                                           ("train_more_mr", ("mr-aniso",))])
def test_extra_mr_studies_render_and_read_back(tmp_path: Path, option: str, names: tuple[str, ...]) -> None:
    """A 2D and a 3D study of each new source render through the usual MR path and read back
    through engines.io with the simulated field strength and the source's labels."""
    if option == "train_extra_mr":
        _needs_heudiconv()
    from engines.io import discover_studies, read_study
    from training.synth.corpus import SizeConfig, render_study

    small_mr = SizeConfig({"mr": 40}, {"mr-dicom": 10, "mr-nifti": 10}, image_size=64,
                          anat_slices=(6, 6), air_slices=(2, 2))
    plan = plan_corpus(5, small_mr, **{option: True})
    picked = []
    for name in names:
        mine = [s for s in plan if s.unit.source == name]
        picked += [next(s for s in mine if s.dimension == "2d"), next(s for s in mine if s.dimension == "3d")]
    rows = {s.relpath: (s, render_study(s, tmp_path)) for s in picked}
    studies = {ref.rel_path: ref for ref in discover_studies(tmp_path)}
    assert set(studies) == set(rows)
    for rel, (spec, row) in rows.items():
        vol = read_study(studies[rel])
        assert row["source_id"] == spec.unit.source and row["region"] == "head"
        assert row["type"] == source_by_name(spec.unit.source).type
        assert float(row["physical"]) == pytest.approx(spec.params["tesla"])
        assert vol.n_slices == int(row["n_slices"]) and (vol.n_slices > 1) == (spec.dimension == "3d")
        if spec.fmt == "dicom":
            assert vol.meta.get("MagneticFieldStrength") == pytest.approx(spec.params["tesla"])


def test_train_mr_fields_draws_the_five_field_strengths_equally() -> None:
    """``train_mr_fields``: only MR training studies whose noise the plan draws change, and only
    their ``tesla``; it is one of ``MR_FIELDS``, each about a fifth of the time (the snapped
    uniform severity gives 7 T to about 3 %); val / test and the paths are unchanged."""
    from collections import Counter

    from training.synth.corpus import MR_FIELDS

    base, plan = plan_corpus(2, "large"), plan_corpus(2, "large", train_mr_fields=True)
    assert plan_corpus(2, "large", train_mr_fields=True) == plan
    assert [s.relpath for s in plan] == [s.relpath for s in base]
    eligible = [i for i, s in enumerate(base) if s.modality == "mr" and s.split == "train" and "field" in s.primary]
    for i, (a, b) in enumerate(zip(base, plan)):
        if i not in eligible:
            assert a == b
        else:
            assert dataclasses.replace(b, params=a.params) == a
            assert {k: v for k, v in b.params.items() if k != "tesla"} == \
                   {k: v for k, v in a.params.items() if k != "tesla"}
    assert len(eligible) > 100
    share = Counter(plan[i].params["tesla"] for i in eligible)
    assert set(share) == set(MR_FIELDS)
    assert all(0.12 < n / len(eligible) < 0.28 for n in share.values()), share
    old7 = sum(base[i].params["tesla"] == 7.0 for i in eligible) / len(eligible)
    assert old7 < 0.08                                            # what the option is for
    # the score follows the field: 7 T carries no field severity, 0.5 T the whole weight
    s7 = next(plan[i] for i in eligible if plan[i].params["tesla"] == 7.0)
    assert severities_of("mr", s7.params)["field"] == 0.0


def test_update_corpus_renders_only_the_changed_studies(tmp_path: Path) -> None:
    """``update_corpus`` turns one plan's corpus into another's by rendering the changed studies
    only: the result is byte-identical to a corpus rendered from nothing, and a corpus whose files
    it shares as hard links (``cp -al``) is left untouched. Plans that do not pair up, or a corpus
    that is not the old plan's, are refused with nothing touched."""
    import os
    import shutil

    from training.synth.corpus import SizeConfig, render_corpus, update_corpus

    cfg = SizeConfig({"mr": 24, "ct": 2}, {}, image_size=48)
    old, new = plan_corpus(3, cfg), plan_corpus(3, cfg, train_mr_fields=True)
    changed = [b for a, b in zip(old, new) if a != b]
    assert 0 < len(changed) < len(new)
    src, dst, fresh = tmp_path / "src", tmp_path / "dst", tmp_path / "fresh"
    render_corpus(src, old)
    before = _tree_digest(src)
    shutil.copytree(src, dst, copy_function=os.link)
    assert update_corpus(dst, old[:-1], new) is None              # plans of other lengths
    assert update_corpus(dst, old, plan_corpus(4, cfg)) is None     # studies at other paths
    assert _tree_digest(dst) == before                       # refused: nothing touched
    cut = tmp_path / "cut"                                    # an update cut short: no manifest
    shutil.copytree(src, cut, copy_function=os.link)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("training.synth.corpus.render_study", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            update_corpus(cut, old, new)
    assert not (cut / "manifest.csv").exists() and _tree_digest(src) == before
    assert update_corpus(dst, old, new, workers=2) == (dst / "manifest.csv", len(changed))
    assert _tree_digest(src) == before                       # the hard-linked original is intact
    render_corpus(fresh, new)
    assert _tree_digest(dst) == _tree_digest(fresh)
    rows = {r["path"]: r for r in _rows(dst)}
    for s in changed:
        assert json.loads(rows[s.relpath]["params"])["tesla"] == s.params["tesla"]
        assert rows[s.relpath]["physical"] == f"{s.params['tesla']:g}"
    (fresh / old[0].relpath).unlink()                         # a study missing: not old's corpus
    assert update_corpus(fresh, old, new) is None
