"""``PreprocessConfig.keep_aspect``: one scale factor for both axes (train/serve parity).

A non-square image must reach the network without being stretched: a disc stays round, an
8-px pattern keeps one period in both directions; square images are unchanged, and models
trained without the option keep their cards and input-cache keys."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engines.preprocess import PreprocessConfig, fit_to_canvas, preprocess_slice, resize_unit, to_network_size
from tests.test_ct_pixel_mm import _disc


def _extent(mask: np.ndarray) -> tuple[int, int]:
    rows, cols = np.nonzero(mask)
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)


def _period(profile: np.ndarray) -> float:
    """Dominant period (px) of a 1D profile, from its spectrum."""
    p = profile - profile.mean()
    spec = np.abs(np.fft.rfft(p, n=4096))
    spec[:8] = 0.0
    return 4096.0 / float(np.argmax(spec))


def test_a_wide_image_is_fitted_not_stretched() -> None:
    img = np.zeros((128, 256), np.float32)
    img[:, 64:192] = _disc(128, 1.0, 100.0)            # a round disc, 100 px across
    cfg = PreprocessConfig(image_size=224, keep_aspect=True)
    out = to_network_size(img, "xr", cfg)
    assert out.shape == (224, 224)
    h, w = _extent(out > 0.5)
    assert h == pytest.approx(w, abs=1) and h == pytest.approx(100 * 224 / 256, abs=2)
    assert np.all(out[:50] == 0) and np.all(out[-50:] == 0)     # 112 rows of image, centred
    # the plain resize stretches the rows 1.75× and shrinks the columns 0.875×
    h2, w2 = _extent(to_network_size(img, "xr", PreprocessConfig(image_size=224)) > 0.5)
    assert h2 == pytest.approx(175, abs=3) and w2 == pytest.approx(87.5, abs=3)


def test_an_8px_grid_keeps_one_period_in_both_directions() -> None:
    y, x = np.mgrid[:128, :256]
    grid = (0.5 + 0.25 * np.cos(2 * np.pi * x / 8) + 0.25 * np.cos(2 * np.pi * y / 8)).astype(np.float32)
    fit = fit_to_canvas(grid, 224)
    rows = fit[56:168]                                  # the image band
    assert _period(rows.mean(axis=0)) == pytest.approx(7.0, abs=0.15)
    assert _period(rows[:, 40:184].mean(axis=1)) == pytest.approx(7.0, abs=0.15)
    plain = resize_unit(grid, 224)
    assert _period(plain.mean(axis=1)) == pytest.approx(14.0, abs=0.3)   # stretched along y


def test_square_images_rgb_and_non_square_pixels() -> None:
    rng = np.random.default_rng(0)
    sq = rng.uniform(0, 1, (256, 256)).astype(np.float32)
    np.testing.assert_allclose(fit_to_canvas(sq, 224), resize_unit(sq, 224), atol=1e-6)
    rgb = rng.uniform(0, 1, (100, 60, 3)).astype(np.float32)
    out = fit_to_canvas(rgb, 50)
    assert out.shape == (50, 50, 3)
    np.testing.assert_allclose(out[..., 1], fit_to_canvas(rgb[..., 1], 50), atol=1e-6)
    assert np.all(out[:, :9] == 0) and np.all(out[:, -9:] == 0)          # 30 columns of image
    # 40 rows × 10 columns of 0.5 × 2 mm pixels are 20 × 20 mm: a square on the canvas
    aniso = fit_to_canvas(np.ones((40, 10), np.float32), 64, pixel_mm=(0.5, 2.0))
    assert _extent(aniso > 0.5) == (64, 64)


def test_config_round_trip_old_cards_and_training_config() -> None:
    from engines.errors import ConfigError
    from training.config import TrainConfig
    from training.tasks import _preset_bits

    assert "keep_aspect" not in PreprocessConfig().to_dict()      # old cards / cache keys unchanged
    on = PreprocessConfig(keep_aspect=True)
    assert on.to_dict()["keep_aspect"] is True
    assert PreprocessConfig.from_dict(json.loads(json.dumps(on.to_dict()))) == on
    with pytest.raises(ValueError, match="keep_aspect"):
        PreprocessConfig.from_dict({"keep_aspect": "yes"})
    assert _preset_bits(TrainConfig(preset="mediqa-test", keep_aspect=True))[0].keep_aspect is True
    assert _preset_bits(TrainConfig(preset="mediqa-test"))[0].keep_aspect is False
    with pytest.raises(ConfigError, match="keep_aspect"):
        TrainConfig().replace(keep_aspect="maybe")        # YAML / flag values are coerced and checked
    assert TrainConfig().replace(keep_aspect="true").keep_aspect is True


def test_ct_physical_resampling_takes_precedence_and_preprocess_slice_applies_it() -> None:
    img = np.zeros((64, 128), np.float32)
    img[16:48, 48:80] = 1.0
    both = PreprocessConfig(image_size=64, keep_aspect=True, ct_pixel_mm=1.0)
    # CT with a spacing: the 1 mm canvas (a 32 mm square stays 32 px), not the fit (16 px)
    assert _extent(to_network_size(img, "ct", both, (1.0, 1.0)) > 0.5) == (32, 32)
    assert _extent(to_network_size(img, "xr", both, (1.0, 1.0)) > 0.5) == (16, 16)
    x = preprocess_slice(img * 1000.0, "mr", None, PreprocessConfig(image_size=64, keep_aspect=True))
    assert x.shape == (3, 64, 64)
    unit = x[0] * 0.5 + 0.5
    assert _extent(unit > 0.5) == (16, 16) and np.all(unit[:16] == 0)
