"""benchmarks/unseen_degradations.py: each degradation does what it is named for at the strength
it names, the written studies re-read through ``engines.io`` in the source's units and with the
modality the prompts need, and the summary's rank correlation is right on constructed scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.benchmark_module import load_benchmark

ud = load_benchmark("unseen_degradations")


def _texture(shape: tuple[int, ...] = (120, 160)) -> np.ndarray:
    from scipy import ndimage

    rng = np.random.default_rng(0)
    return np.clip(0.5 + 3.0 * ndimage.gaussian_filter(rng.standard_normal(shape), 3.0), 0.0, 1.0)


@pytest.mark.parametrize("kind", ud.UNSEEN + ud.SEEN + ud.MR_SEEN)
def test_each_kind_departs_further_from_the_clean_image_at_each_step(kind: str) -> None:
    u = _texture()
    levels = ud.strengths(kind, u.shape)
    err = [float(np.sqrt(((ud.degrade(u, kind, lv, np.random.default_rng(1)) - u) ** 2).mean()))
           for lv in levels]
    assert 0 < err[0] < err[1] < err[2]
    out = ud.degrade(u, kind, levels[-1], np.random.default_rng(1))
    assert out.shape == u.shape and out.min() >= 0.0 and out.max() <= 1.0


def test_the_strengths_are_the_ones_named() -> None:
    u = _texture()
    rng = np.random.default_rng(2)
    imp = ud.degrade(u, "impulse", 0.04, rng)
    changed = (imp != u) & ((imp == 0) | (imp == 1))
    assert changed.mean() == pytest.approx(0.04, abs=0.01)
    assert ud.strengths("pixelate", (64, 64)) == (2.0, 3.0, 4.0)      # the floors: still 3 strengths
    assert ud.strengths("pixelate", (980, 900)) == (6.0, 10.0, 18.0)  # long side / 160, / 96, / 56
    assert ud.strengths("blur", (64, 64)) == (0.7, 1.4, 2.8)
    assert ud.strengths("blur", (800, 600)) == (2.0, 5.0, 10.0)
    pix = ud.degrade(u, "pixelate", 8.0, rng)
    assert np.all(pix[:8, :8] == pix[0, 0]) and pix[0, 0] == pytest.approx(u[:8, :8].mean())
    assert len(np.unique(ud.degrade(u, "posterize", 5.0, rng))) <= 5
    st = ud.degrade(np.full((200, 10), 0.5), "stripes", 0.1, rng)
    assert st.max() == pytest.approx(0.6, abs=0.01) and st.min() == pytest.approx(0.4, abs=0.01)
    assert np.allclose(st, st[:, :1])                     # horizontal: constant along each row
    c = ud.degrade(u, "contrast", 0.2, rng)
    assert c.mean() == pytest.approx(u.mean(), abs=0.01) and c.std() == pytest.approx(0.2 * u.std(), rel=0.05)
    rgb = ud.degrade(np.repeat(u[..., None], 3, axis=2), "blur", 4.0, rng)
    assert rgb.shape == u.shape + (3,) and np.allclose(rgb[..., 0], rgb[..., 2])
    with pytest.raises(ValueError, match="unknown degradation"):
        ud.degrade(u, "ghost", 1.0, rng)


def test_written_studies_reread_in_source_units_with_their_modality(tmp_path: Path) -> None:
    from engines.io.discover import discover_studies, open_study
    from engines.prompts import prompts_from_tags

    hu = -1000.0 + 1500.0 * _texture((64, 64))
    ud.write_study(tmp_path / "ct", "ct", hu, (0.7, 0.7), "ct")
    mr = 400.0 * _texture((48, 48))
    ud.write_study(tmp_path / "mr", "mr", mr, (1.0, 1.0), "mr")
    ud.write_study(tmp_path / "xr", "xr", _texture((64, 64)), (0.15, 0.15), "xr")
    ud.write_study(tmp_path / "fundus", "fundus", np.repeat(_texture((64, 64))[..., None], 3, 2), (0.01, 0.01), "f")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.dcm", "fundus.png", "mr.dcm", "xr.dcm"]
    studies = {Path(s.rel_path).stem: s for s in discover_studies(tmp_path)}
    ct = open_study(studies["ct"])
    assert ct.get_slice(0) == pytest.approx(np.round(hu), abs=0.51)     # HU back through the rescale
    mods = {k: prompts_from_tags(open_study(studies[k]).meta, "2d")["modality"] for k in ("ct", "mr", "xr")}
    assert mods == {"ct": "ct", "mr": "mr", "xr": "xr"}


def test_summary_ranks_each_image_and_kind() -> None:
    rows = [{"file": f"{u}-clean", "unit": u, "modality": "xr", "kind": "clean", "step": 0} for u in ("a", "b")]
    rows += [{"file": f"{u}-k{s}", "unit": u, "modality": "xr", "kind": "k", "step": s}
             for u in ("a", "b") for s in (1, 2, 3)]
    scores = {"a-clean": 0.9, "a-k1": 0.8, "a-k2": 0.5, "a-k3": 0.1,      # ordered: +1
              "b-clean": 0.1, "b-k1": 0.2, "b-k2": 0.3, "b-k3": 0.4}      # reversed: -1
    out = ud.summarise(rows, scores)
    assert out["xr/k"]["per_image"] == [1.0, -1.0] and out["xr/k"]["srcc"] == 0.0
    assert out["xr/k"]["clean_above_strongest"] == 0.5
    del scores["b-k2"]                                                   # unscored: b leaves the row
    assert ud.summarise(rows, scores)["xr/k"]["n_images"] == 1
    assert ud.seen("xr", "blur") and not ud.seen("mr", "blur") and ud.seen("mr", "noise")


def test_mr_kinds_ring_at_edges_and_ghost_along_the_phase_encode_axis() -> None:
    rng = np.random.default_rng(3)
    step = np.zeros((64, 64))
    step[:, 32:] = 0.5                                   # a vertical edge: ringing runs along x
    ring = ud.degrade(step, "ringing", 0.25, rng)
    assert ring[:, 32:40].max() > 0.53                   # Gibbs overshoot on the bright side
    assert ring[:, 24:31].max() > 0.02                   # and ripples on the dark side
    disk = np.zeros((64, 64))
    yy, xx = np.mgrid[:64, :64]
    disk[(yy - 32) ** 2 + (xx - 32) ** 2 < 12 ** 2] = 1.0
    ghost = [ud.degrade(disk, "ghosting", a, np.random.default_rng(4)) for a in ud.strengths("ghosting", disk.shape)]
    above, beside = slice(0, 14), slice(0, 14)
    # ghosts are copies shifted along y (rows): signal above the object, little beside it
    assert ghost[0][above, 26:38].mean() < ghost[2][above, 26:38].mean()
    assert ghost[2][above, 26:38].mean() > 5 * ghost[2][26:38, beside].mean()
    assert ud.strengths("ghosting", (64, 64)) == (0.375, 0.75, 1.5)     # 1.5 / 3 / 6 px at 256
    with pytest.raises(ValueError, match="grey"):
        ud.degrade(np.zeros((8, 8, 3)), "ringing", 0.5, rng)
    assert ud.seen("mr", "ringing") and ud.seen("mr", "ghosting") and not ud.seen("ct", "ringing")


def test_salient_slices_of_a_volume_are_distinct_anatomy_slices() -> None:
    vol = np.zeros((20, 32, 32), dtype=np.float32)
    vol[4:16, 8:24, 8:24] = 100.0 + np.arange(12, dtype=np.float32)[:, None, None]
    assert ud.slice_indices(vol, "mr", 1) == [10]                       # the middle slice
    picks = ud.slice_indices(vol, "mr", 7)
    assert len(picks) == 7 and len(set(picks)) == 7 and all(4 <= z < 16 for z in picks)
    assert ud.slice_indices(vol[:1], "mr", 7) == [0]


def test_paired_gain_over_base_images() -> None:
    rows = []
    for u in ("a", "b", "c"):
        rows += [{"file": f"{u}-clean", "unit": u, "modality": "mr", "kind": "clean", "step": 0}]
        rows += [{"file": f"{u}-{k}{s}", "unit": u, "modality": "mr", "kind": k, "step": s}
                 for k in ("p", "q") for s in (1, 2, 3)]
    good = {r["file"]: 1.0 - 0.2 * r["step"] for r in rows}                       # every kind ordered
    bad = dict(good, **{f"{u}-p{s}": 1.0 + 0.2 * s for u in ("a", "b", "c") for s in (1, 2, 3)})  # p reversed
    tg, tb = ud.summarise(rows, good), ud.summarise(rows, bad)
    assert ud.image_means(tg) == {"a": 1.0, "b": 1.0, "c": 1.0}
    assert ud.image_means(tb, "mr") == {"a": 0.0, "b": 0.0, "c": 0.0}              # (−1 + 1) / 2
    assert ud.image_means(tb, "ct") == {}
    g = ud.paired_gain(ud.image_means(tg), ud.image_means(tb))
    assert g["n"] == 3 and g["mean"] == pytest.approx(1.0) and g["lo"] == pytest.approx(1.0)
    mixed = {"a": 0.5, "b": -0.5, "c": 0.0}
    g = ud.paired_gain(mixed, {"a": 0.0, "b": 0.0, "c": 0.0})
    assert g["lo"] < 0 < g["hi"]
    with pytest.raises(ValueError, match="in common"):
        ud.paired_gain({"a": 1.0}, {"b": 1.0})


def _phantom_hu(size: int = 96) -> np.ndarray:
    """A water disc with a bone insert in air: a CT slice in HU."""
    yy, xx = np.mgrid[:size, :size] - size / 2
    hu = np.full((size, size), -1000.0)
    hu[xx ** 2 + yy ** 2 < (0.4 * size) ** 2] = 0.0
    hu[(xx - 10) ** 2 + yy ** 2 < 36] = 800.0
    return hu


def test_ct_dose_adds_more_noise_at_lower_mas_and_sparse_views_streak_more() -> None:
    hu = _phantom_hu()
    water = np.zeros(hu.shape, bool)
    water[30:66, 20:40] = True                                        # inside the disc, off the insert
    sd = [float(ud.ct_degrade(hu, "dose", m, 0.7, np.random.default_rng(0))[water].std())
          for m in ud.strengths("dose", hu.shape)]
    assert 0 < sd[0] < sd[1] < sd[2]
    assert sd[2] / sd[0] == pytest.approx(np.sqrt(200 / 15), rel=0.3)  # σ ∝ mAs^-½
    air = np.zeros(hu.shape, bool)
    air[:6, :] = True                                                 # outside the body: streaks land here
    err = [float(np.abs(ud.ct_degrade(hu, "sparse", v, 0.7, np.random.default_rng(0)) - hu)[air].mean())
           for v in ud.strengths("sparse", hu.shape)]
    assert err[0] < err[1] < err[2]
    assert ud.seen("ct", "dose") and ud.seen("ct", "sparse") and not ud.seen("mr", "dose")
    with pytest.raises(ValueError, match="ct_degrade"):
        ud.degrade(np.zeros((8, 8)), "dose", 50.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="CT acquisition"):
        ud.ct_degrade(hu, "blur", 1.0, 0.7, np.random.default_rng(0))


def test_ct_and_mr_acquisition_kinds_are_written_for_their_modality_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bases = [("ct-x", "ct", _phantom_hu(64), (0.7, 0.7)), ("xr-y", "xr", _texture((64, 64)), (0.15, 0.15))]
    monkeypatch.setattr(ud, "base_images", lambda modalities=None, slices=1: bases)
    rows = ud.write_set(tmp_path, ("dose", "noise", "ringing"), None, 1)
    kinds = {(r["modality"], r["kind"]) for r in rows}
    assert kinds == {("ct", "clean"), ("ct", "dose"), ("ct", "noise"), ("xr", "clean"), ("xr", "noise")}
    assert len(list(tmp_path.glob("*-dose*.dcm"))) == 3


def test_run_labels_name_each_model_and_mode() -> None:
    assert list(ud.run_labels(["m.safetensors"], ["d4", "none"])) == ["d4", "none"]
    two = ud.run_labels(["runs/a/model.safetensors", "runs/b/model.safetensors", "x/s4.safetensors"], ["none"])
    assert two == {"a:model.safetensors": ("runs/a/model.safetensors", "none"),
                   "b:model.safetensors": ("runs/b/model.safetensors", "none"),
                   "s4.safetensors": ("x/s4.safetensors", "none")}
    both = ud.run_labels(["p/m.safetensors", "q/n.safetensors"], ["none", "d4"])
    assert list(both) == ["m.safetensors/none", "m.safetensors/d4", "n.safetensors/none", "n.safetensors/d4"]
    same = ud.run_labels(["m.safetensors", "m.safetensors"], ["none"])
    assert list(same) == [":m.safetensors", ":m.safetensors#2"]


def test_field_kind_adds_the_corpus_noise_of_each_field_strength() -> None:
    """``field``: Rician noise of σ = 0.04 · p99 / B0, so in a flat bright region the noise grows as
    the field falls (3 → 1 T: 3×), as ``training.synth.degrade.mr_noise_sigma`` says."""
    flat = np.full((96, 96), 0.8)
    levels = ud.strengths("field", flat.shape)
    assert levels == (3.0, 1.5, 1.0)
    sd = [ud.degrade(flat, "field", b, np.random.default_rng(5))[8:-8, 8:-8].std() for b in levels]
    assert sd[0] < sd[1] < sd[2]
    assert sd[0] == pytest.approx(0.04 * 0.8 / 3.0, rel=0.1) and sd[2] / sd[0] == pytest.approx(3.0, rel=0.15)
    assert ud.seen("mr", "field") and not ud.seen("xr", "field")
