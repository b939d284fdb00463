"""benchmarks/sharpness_probe.py: the scale-4 edge energy above the noise floor falls with blur and
stays put under noise (on a constructed image and on the real MR probe slices), the noise floor
rises with noise, and the summary averages the right rows."""

from __future__ import annotations

import numpy as np
import pytest

from tests.benchmark_module import load_benchmark

sp = load_benchmark("sharpness_probe")


def _anatomy() -> np.ndarray:
    """224 × 224: discs of different intensity (edges) over faint smooth texture."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:224, :224]
    img = np.zeros((224, 224))
    for cy, cx, r, v in ((112, 112, 90, 0.5), (90, 100, 30, 0.8), (140, 130, 20, 0.2), (60, 150, 15, 0.9)):
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = v
    return img + 0.05 * ndimage.gaussian_filter(rng.standard_normal(img.shape), 4)


def test_edge_energy_above_the_floor_falls_with_blur_and_not_with_noise() -> None:
    from scipy import ndimage

    img = _anatomy()
    base = sp.input_statistics(img)
    rng = np.random.default_rng(1)
    noisy = [sp.input_statistics(img + rng.normal(0.0, s, img.shape)) for s in (0.02, 0.05, 0.1)]
    blurred = [sp.input_statistics(ndimage.gaussian_filter(img, b)) for b in (1.5, 3.0, 6.0)]
    floor = [base["floor_s1"]] + [d["floor_s1"] for d in noisy]
    assert all(b - a > 1.0 for a, b in zip(floor, floor[1:]))          # the noise level reads noise
    assert all(abs(d["net_s4"] - base["net_s4"]) < 0.15 for d in noisy)
    net = [base["net_s4"]] + [d["net_s4"] for d in blurred]
    assert all(b < a for a, b in zip(net, net[1:])) and net[1] - net[0] < -0.3 and net[-1] - net[0] < -2.0
    # without the floor subtracted at the pixel scale, noise inflates the busiest cells too
    assert noisy[-1]["edge_s1"] - base["edge_s1"] > 0.5


def test_on_the_real_mr_probe_slices() -> None:
    rows = sp.probe(slices=1, kinds=("noise", "field", "blur"))
    units = {r["unit"] for r in rows}
    assert len(units) >= 3
    for unit in units:
        mine = {(r["kind"], r["stat"]): r for r in rows if r["unit"] == unit}
        blur = [0.0] + mine[("blur", "net_s4")]["moves"]
        assert all(b < a for a, b in zip(blur, blur[1:])) and blur[-1] < -1.0, unit
        for kind in ("noise", "field"):
            assert max(abs(m) for m in mine[(kind, "net_s4")]["moves"]) < 0.3, (unit, kind)
        assert mine[("noise", "floor_s1")]["srcc"] == pytest.approx(1.0), unit
    table = sp.summarise(rows)
    assert table["net_s4"]["blur"] == pytest.approx(-1.0) and table["floor_s1"]["noise"] == pytest.approx(1.0)


def test_summarise_and_the_strength_correlation() -> None:
    assert sp.srcc_with_strength([0.0, 1.0, 2.0, 5.0]) == pytest.approx(1.0)
    assert sp.srcc_with_strength([3.0, 2.0, 1.0, 0.0]) == pytest.approx(-1.0)
    assert sp.srcc_with_strength([1.0, 1.0, 1.0, 1.0]) == 0.0
    rows = [{"unit": "a", "kind": "blur", "stat": "x", "srcc": -1.0},
            {"unit": "b", "kind": "blur", "stat": "x", "srcc": 0.0},
            {"unit": "a", "kind": "noise", "stat": "x", "srcc": 1.0},
            {"unit": "a", "kind": "blur", "stat": "y", "srcc": 0.5}]
    assert sp.summarise(rows) == {"x": {"blur": -0.5, "noise": 1.0}, "y": {"blur": 0.5}}


def test_net_s4_is_the_network_sharpness_statistic() -> None:
    """The probe's ``net_s4`` (numpy, edge-replicated borders, interpolated percentiles) and the
    noise term's ``TextureBranch.sharpness_statistic`` (torch, order statistics) are one statistic
    computed twice: on pydicom's real MR slice, clean, noisy and blurred, they agree to 0.25 while
    blur moves both by more than 3."""
    import pydicom
    import torch
    from scipy import ndimage

    from engines.models.maniqa import TextureBranch
    from engines.preprocess import PreprocessConfig, preprocess_slice
    from tests.conftest import _testdata

    raw = pydicom.dcmread(_testdata("MR_small.dcm")).pixel_array.astype(np.float64)
    u = (raw - raw.min()) / np.ptp(raw)
    rng = np.random.default_rng(0)
    images = ([u] + [u + rng.normal(0.0, s, u.shape) for s in (0.01, 0.03, 0.06)]
              + [ndimage.gaussian_filter(u, b) for b in (0.7, 1.5, 3.0)])
    branch = TextureBranch(patch=16, out_channels=8, scales=(1, 2), prompt_dim=4, sharpness=True)
    torch_stat, probe_stat = [], []
    for img in images:
        x = np.asarray(preprocess_slice(img, "mr", None, PreprocessConfig()))
        with torch.no_grad():
            torch_stat.append(float(branch.sharpness_statistic(torch.as_tensor(x)[None])[0]))
        probe_stat.append(sp.input_statistics(x.mean(axis=0))["net_s4"])
    assert np.abs(np.subtract(torch_stat, probe_stat)).max() < 0.25, (torch_stat, probe_stat)
    for stat in (torch_stat, probe_stat):
        assert stat[-1] - stat[0] < -3.0 and all(b < a for a, b in zip(stat[4:], stat[5:]))
