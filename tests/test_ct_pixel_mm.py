"""``PreprocessConfig.ct_pixel_mm``: CT inputs at one physical pixel size (train/serve parity).

The same anatomy reconstructed at two pixel sizes must reach the network at the same size in
pixels; models trained without the option keep their cards and input-cache keys."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engines.preprocess import (PreprocessConfig, preprocess_slice, resample_to_canvas, to_network_size,
                                usable_pixel_mm)


def _disc(n: int, pixel_mm: float, diameter_mm: float, value: float = 1.0) -> np.ndarray:
    """An (n, n) image of a centred disc of ``diameter_mm`` on a ``pixel_mm`` grid."""
    c = (np.arange(n) - (n - 1) / 2.0) * pixel_mm
    r = np.hypot(c[:, None], c[None, :])
    return np.where(r <= diameter_mm / 2.0, value, 0.0).astype(np.float32)


def _diameter_px(img: np.ndarray) -> float:
    """Equivalent diameter in pixels of the bright area (> 0.5)."""
    return float(2.0 * np.sqrt((img > 0.5).sum() / np.pi))


def test_the_same_disc_at_two_pixel_sizes_reaches_the_same_size() -> None:
    cfg = PreprocessConfig(image_size=64, ct_pixel_mm=1.0)
    fine = _disc(240, 0.5, 40.0)      # 120 mm field of view
    coarse = _disc(100, 1.6, 40.0)    # 160 mm field of view
    a = to_network_size(fine, "ct", cfg, (0.5, 0.5))
    b = to_network_size(coarse, "ct", cfg, (1.6, 1.6))
    assert a.shape == b.shape == (64, 64)
    assert _diameter_px(a) == pytest.approx(40.0, abs=1.5)
    assert _diameter_px(b) == pytest.approx(40.0, abs=1.5)
    # without the option the disc's size follows the field of view (64 px for 120 / 160 mm)
    plain = PreprocessConfig(image_size=64)
    assert _diameter_px(to_network_size(fine, "ct", plain, (0.5, 0.5))) == pytest.approx(40 * 64 / 120, abs=1.5)
    assert _diameter_px(to_network_size(coarse, "ct", plain, (1.6, 1.6))) == pytest.approx(40 * 64 / 160, abs=1.5)


def test_canvas_crops_large_and_pads_small_fields_about_the_centre() -> None:
    rng = np.random.default_rng(0)
    big = rng.uniform(0.2, 1.0, (100, 120)).astype(np.float32)
    out = resample_to_canvas(big, (1.0, 1.0), 1.0, 64)           # no resampling: a pure crop
    np.testing.assert_array_equal(out, big[18:82, 28:92])
    small = rng.uniform(0.2, 1.0, (20, 30)).astype(np.float32)
    out = resample_to_canvas(small, (1.0, 1.0), 1.0, 64)
    np.testing.assert_array_equal(out[22:42, 17:47], small)
    assert out.sum() == pytest.approx(small.sum(), rel=1e-6)        # zero (air) elsewhere
    # anisotropic pixels: 0.5 × 2 mm → twice as many rows as columns... reversed physically
    aniso = resample_to_canvas(np.ones((40, 10), np.float32), (0.5, 2.0), 1.0, 64)
    rows, cols = np.nonzero(aniso > 0.5)
    assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == (20, 20)


def test_only_ct_with_a_known_spacing_is_resampled() -> None:
    rng = np.random.default_rng(1)
    img = rng.normal(40, 30, (90, 90)).astype(np.float32)
    on, off = PreprocessConfig(image_size=32, ct_pixel_mm=1.0), PreprocessConfig(image_size=32)
    plain = preprocess_slice(img, "ct", "soft", off)
    np.testing.assert_array_equal(preprocess_slice(img, "ct", "soft", on), plain)            # spacing unknown
    np.testing.assert_array_equal(preprocess_slice(img, "ct", "soft", on, pixel_mm=(float("nan"), 1.0)), plain)
    assert not np.array_equal(preprocess_slice(img, "ct", "soft", on, pixel_mm=(0.5, 0.5)), plain)
    np.testing.assert_array_equal(preprocess_slice(img, "mr", None, on, pixel_mm=(0.5, 0.5)),
                                  preprocess_slice(img, "mr", None, off))                   # CT only
    assert usable_pixel_mm([0.7, "0.7"]) == (0.7, 0.7)
    assert usable_pixel_mm([0.0, 1.0]) is None and usable_pixel_mm("x") is None and usable_pixel_mm(None) is None


def test_config_round_trip_and_old_cards_unchanged() -> None:
    with pytest.raises(ValueError, match="ct_pixel_mm"):
        PreprocessConfig(ct_pixel_mm=0.0)
    with pytest.raises(ValueError, match="ct_pixel_mm"):
        PreprocessConfig(ct_pixel_mm=float("nan"))
    on = PreprocessConfig(ct_pixel_mm=1.25)
    assert PreprocessConfig.from_dict(json.loads(json.dumps(on.to_dict()))) == on
    off = PreprocessConfig().to_dict()
    # absent when off: a model trained before the option has the same card and cache keys
    assert "ct_pixel_mm" not in off
    before = {"image_size": 224, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
              "ct_windows": {"lung": [1500.0, -600.0], "soft": [400.0, 40.0], "bone": [2000.0, 300.0]},
              "ct_default_window": [400.0, 40.0], "use_window_tags": True, "percentiles": [0.5, 99.5],
              "resample": "bilinear"}   # the card of every model bundled before 2026-12-05
    assert json.loads(json.dumps(off)) == before
    assert PreprocessConfig.from_dict(before) == PreprocessConfig()
    from engines.artifact import load_card
    bundled = load_card(Path(__file__).resolve().parents[1] / "engines" / "weights" / "default.safetensors")
    assert PreprocessConfig.from_dict(bundled.preprocess).ct_pixel_mm == 1.0   # README: CT at 1 mm


def test_scoring_path_reads_the_spacing_of_a_dicom_ct(tmp_path: Path) -> None:
    from engines.io.discover import discover_studies
    from engines.pipeline import in_plane_spacing, prepare_study
    from engines.io.discover import open_study
    from training.synth.writers import hu_to_stored, write_dicom_image

    hu = np.where(_disc(128, 0.6, 50.0) > 0, 40.0, -1000.0).astype(np.float32)
    write_dicom_image(tmp_path / "ct.dcm", hu_to_stored(hu), modality="CT", pixel_mm=(0.6, 0.6),
                      tags={"WindowCenter": "40", "WindowWidth": "400", "RescaleIntercept": "-1024",
                            "RescaleSlope": "1"}, key="ct", seed=0, index=0)
    (ref,) = list(discover_studies(tmp_path))
    src = open_study(ref)
    assert in_plane_spacing(src, dict(src.meta), list(getattr(src, "flags", []))) == pytest.approx((0.6, 0.6))
    cfg = PreprocessConfig(image_size=64, ct_pixel_mm=1.0)
    prep = prepare_study(ref, cfg, 7)
    assert prep.pixel_mm == pytest.approx((0.6, 0.6))
    img = prep.images[0]
    expected = preprocess_slice(np.asarray(src.get_slice(0)), "ct", None, cfg, (400.0, 40.0), pixel_mm=(0.6, 0.6))
    np.testing.assert_allclose(img, expected, atol=1e-6)
    assert _diameter_px(img[0] + 0.75) == pytest.approx(50.0, abs=1.5)   # water 0 vs air -1: 50 mm → 50 px


def test_train_config_sets_it_and_validates() -> None:
    from engines.errors import ConfigError
    from training.config import TrainConfig
    from training.tasks import _preset_bits

    pcfg, _ = _preset_bits(TrainConfig(preset="mediqa-test", ct_pixel_mm=0.8))
    assert pcfg.ct_pixel_mm == 0.8
    assert _preset_bits(TrainConfig(preset="mediqa-test"))[0].ct_pixel_mm is None
    with pytest.raises(ConfigError, match="ct_pixel_mm"):
        TrainConfig(ct_pixel_mm=-1.0)


def test_an_absurd_spacing_stays_bounded_and_centred() -> None:
    """A wrong PixelSpacing tag (50 mm) must not build a 25,600² intermediate image; the canvas
    still shows the centre of the slice."""
    img = np.zeros((512, 512), np.float32)
    img[254:258, 254:258] = 1.0                    # a 4-px dot at the centre
    out = resample_to_canvas(img, (50.0, 50.0), 1.0, 64)
    assert out.shape == (64, 64) and out[28:36, 28:36].max() == 1.0 and out.sum() > 0
    tiny = resample_to_canvas(img, (1e-3, 1e-3), 1.0, 64)       # and a microscopic one: one pixel
    assert tiny.shape == (64, 64) and np.isfinite(tiny).all()


def test_export_parity_samples_are_prepared_as_scoring_prepares_them() -> None:
    """``mediqa export`` checks parity on real images preprocessed with the artifact's config:
    with ``ct_pixel_mm`` the CT samples (CT_small, PixelSpacing 0.66 mm) are resampled, the
    others are not."""
    pytest.importorskip("pydicom")
    from export.samples import sample_set

    on = sample_set(None, cfg=PreprocessConfig(ct_pixel_mm=1.0))
    off = sample_set(None, cfg=PreprocessConfig())
    changed = {lab.split(":")[0] for lab, a, b in zip(on.labels, on.images, off.images) if not np.array_equal(a, b)}
    assert changed == {"CT_small.dcm"}


def _nifti(path: Path, vol_zyx: np.ndarray, zooms_xyz: tuple[float, float, float]) -> None:
    import nibabel as nib

    data = np.ascontiguousarray(vol_zyx.transpose(2, 1, 0))          # (x, y, z)
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.diag([*zooms_xyz, 1.0])), str(path))


def test_a_nifti_ct_in_hu_is_prepared_as_ct(tmp_path: Path) -> None:
    """NIfTI has no Modality tag: a volume in HU is read as CT (HU slice rule, CT window, the
    1 mm canvas), flagged ``hu_intensities``; an MR magnitude volume and a phase map are not."""
    from engines.io.discover import discover_studies
    from engines.pipeline import looks_like_hu, prepare_study

    disc = _disc(100, 0.7, 40.0)
    ct = np.where(disc > 0, 40.0, -1000.0).astype(np.float32)
    vol = np.stack([np.full_like(ct, -1000.0)] * 2 + [ct] * 8 + [np.full_like(ct, -1000.0)] * 2)
    _nifti(tmp_path / "ct.nii.gz", vol, (0.7, 0.7, 2.5))
    mr = np.stack([disc * 300.0 + 5.0] * 12).astype(np.float32)
    (tmp_path / "mr").mkdir()
    _nifti(tmp_path / "mr" / "mr.nii.gz", mr, (0.7, 0.7, 2.5))
    cfg = PreprocessConfig(image_size=64, ct_pixel_mm=1.0)
    refs = {r.rel_path: r for r in discover_studies(tmp_path)}
    ctp = prepare_study(refs["ct.nii.gz"], cfg, 3)
    assert "hu_intensities" in ctp.flags and ctp.pixel_mm == pytest.approx((0.7, 0.7))
    assert all(2 <= i <= 9 for i in ctp.indices)                     # the HU rule skips the air slices
    expected = preprocess_slice(ct, "ct", None, cfg, pixel_mm=(0.7, 0.7))
    np.testing.assert_allclose(ctp.images[len(ctp.images) // 2], expected, atol=1e-6)
    assert _diameter_px(ctp.images[0][0] + 0.75) == pytest.approx(40.0, abs=1.5)   # 40 mm → 40 px
    mrp = prepare_study(refs["mr/mr.nii.gz"], cfg, 3)
    assert "hu_intensities" not in mrp.flags
    rng = np.random.default_rng(0)
    assert not looks_like_hu(rng.uniform(-4096, 4096, (128, 128)))     # phase map
    assert not looks_like_hu(rng.normal(0, 1, (128, 128)))              # z-scored
    assert looks_like_hu(ct) and not looks_like_hu(mr[0])
