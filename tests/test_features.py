"""The feature head (``engines.features``): the classical statistics of the network input, the
per-modality ridge, the blend rule, the card field, and the same blended score from ``mediqa
train feature-head`` → ``mediqa evaluate`` and ``mediqa score``."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.test_pipeline import _study_key  # noqa: F401
from tests.test_score_cli import _run
from tests.test_tta import artifact  # noqa: F401


def _retina_grey(retina_path: Path, size: int = 128) -> np.ndarray:
    from PIL import Image

    img = Image.open(retina_path).convert("L").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.float64) / 255.0


# ------------------------------------------------------------------------------ statistics

def test_each_statistic_moves_with_the_degradation_it_measures(retina_path: Path) -> None:
    """Noise raises the noise σ, blur lowers the Laplacian variance and fine energy, JPEG at
    quality 5 raises the 8 × 8 blockiness, a smooth illumination field raises the non-uniformity,
    over-exposure (a gain that saturates the bright tissue) raises the clipped-bright fraction."""
    from scipy import ndimage

    from engines.features import FEATURE_NAMES, slice_statistics
    from training.synth.degrade import jpeg_compress

    g = _retina_grey(retina_path)
    ix = {n: i for i, n in enumerate(FEATURE_NAMES)}
    clean = slice_statistics(g)
    assert clean.shape == (len(FEATURE_NAMES),) == (9,) and np.isfinite(clean).all()
    noisy = slice_statistics(np.clip(g + np.random.default_rng(0).normal(0, 0.08, g.shape), 0, 1))
    assert noisy[ix["log_noise_sigma"]] > clean[ix["log_noise_sigma"]] + 1.0
    blurred = slice_statistics(ndimage.gaussian_filter(g, 2.0))
    assert blurred[ix["log_laplacian_var"]] < clean[ix["log_laplacian_var"]] - 1.0
    assert blurred[ix["log_fine_energy"]] < clean[ix["log_fine_energy"]]
    jpeg = slice_statistics(jpeg_compress(g.astype(np.float32), 5))
    assert jpeg[ix["blockiness"]] > clean[ix["blockiness"]] * 1.5
    y = np.linspace(0.3, 1.7, g.shape[0])[:, None]
    lit = slice_statistics(np.clip(g * y, 0, 1))
    assert lit[ix["nonuniformity"]] > clean[ix["nonuniformity"]] + 0.1
    bright = clean[ix["clipped_bright"]]
    assert bright == pytest.approx(float((g >= 0.98).mean())) and bright < 0.01
    burnt = slice_statistics(np.clip(g * 3.0, 0, 1))
    assert burnt[ix["clipped_bright"]] > bright + 0.05
    assert burnt[ix["clipped_bright"]] == pytest.approx(float((g * 3.0 >= 0.98).mean()))
    with pytest.raises(ValueError, match="at least 16"):
        slice_statistics(np.zeros((8, 8)))


def test_input_statistics_undo_the_normalisation_and_average_slices(retina_path: Path) -> None:
    from engines.features import input_statistics, slice_statistics

    # float32 images as the network inputs are (the wavelet noise estimate of a smooth image moves
    # with float32 rounding, so the references are float32 too)
    g = _retina_grey(retina_path, 64).astype(np.float32).astype(np.float64)
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    x = ((g - 0.5) / 0.5).astype(np.float32)
    compact = input_statistics(x[None], mean, std)                 # (1, S, S): the readers' grey input
    three = input_statistics(np.repeat(x[None], 3, axis=0), mean, std)
    assert compact == pytest.approx(slice_statistics(g), abs=1e-5) and three == pytest.approx(compact, abs=1e-6)
    noise = np.random.default_rng(1).normal(0, 0.03, g.shape)
    h = np.clip(g[::-1] + noise, 0, 1).astype(np.float32).astype(np.float64)
    xh = ((h - 0.5) / 0.5).astype(np.float32)[None]
    both = input_statistics(np.stack([x[None], xh]), mean, std)   # (n, C, S, S)
    assert both == pytest.approx((slice_statistics(g) + slice_statistics(h)) / 2, abs=1e-4)


# ------------------------------------------------------------------------------ ridge, blend, card

def _toy(n_per: int, seed: int, sources: tuple[str, ...] = ("a", "b")):
    """Statistics whose first column is the target plus a little noise; a network score q that
    is mostly noise (ranking each source weakly); two sources per modality."""
    rng = np.random.default_rng(seed)
    n = n_per * len(sources)
    t = rng.uniform(0, 1, n)
    f = rng.normal(0, 1, (n, 9))
    f[:, 0] = t * 3 + rng.normal(0, 0.05, n)
    q = 0.4 * t + rng.normal(0, 0.3, n)
    groups = [sources[i % len(sources)] for i in range(n)]
    return f, t, q, groups


def test_ridge_fits_per_modality_and_blend_applies_the_weight() -> None:
    from engines.features import FeatureHead, fit_feature_head

    f, t, _, _ = _toy(40, 0)
    mods = ["xr"] * len(t)
    head = fit_feature_head(f, t, mods)
    assert set(head.heads) == {"xr"} and not head.active and head.heads["xr"].n_train == len(t)
    f2, t2, q2, _ = _toy(40, 1)
    r = head.heads["xr"].predict(f2)
    assert np.corrcoef(r, t2)[0, 1] > 0.98 and r.min() >= 0 and r.max() <= 1
    assert head.apply(0.3, f2[0], "xr") == 0.3                      # blend 0: the network's score
    h1 = dataclasses.replace(head, heads={"xr": dataclasses.replace(head.heads["xr"], blend=0.25)})
    assert h1.active and h1.apply(0.3, f2[0], "xr") == pytest.approx(0.75 * 0.3 + 0.25 * r[0])
    assert h1.describe() == "xr 0.25" and head.describe() == "none"
    assert h1.blends == {"xr": 0.25} and h1.blending == ("xr",) and head.blending == ()
    assert h1.apply(0.3, None, "ct") == 0.3                          # no ridge for CT
    with pytest.raises(ValueError, match="needs the study's input statistics"):
        h1.apply(0.3, None, "xr")
    assert FeatureHead.from_dict(json.loads(json.dumps(h1.to_dict()))) == dataclasses.replace(h1, selection={})
    # a study outside the training range is predicted as at the range's edge, not extrapolated
    h = head.heads["xr"]
    far = f2[0].copy()
    far[0] = h.hi[0] + 50.0
    edge = f2[0].copy()
    edge[0] = h.hi[0]
    assert h.predict(far) == pytest.approx(h.predict(edge))
    assert dataclasses.replace(h, lo=(), hi=()).predict(far)[0] in (0.0, 1.0)   # unclipped: saturates
    with pytest.raises(ValueError, match="lows <= 9 highs"):
        dataclasses.replace(h, lo=h.hi, hi=h.lo)
    # too few studies of a modality: no ridge for it
    assert fit_feature_head(f[:10], t[:10], ["mr"] * 10).heads == {}


def test_blend_needs_a_shown_gain_in_every_source_and_two_sources() -> None:
    from engines.features import choose_blend, fit_feature_head

    f, t, _, _ = _toy(60, 2)
    head = fit_feature_head(f, t, ["xr"] * len(t))
    head = dataclasses.replace(head, heads={**head.heads, "ct": head.heads["xr"], "mr": head.heads["xr"]})
    fv, tv, qv, gv = _toy(30, 3)
    # xr: two sources, network noisy → a blend wins; ct: the same studies but from one source only;
    # mr: the network ranks source "b" perfectly, so any blend loses there
    qm = qv.copy()
    b = np.array(gv) == "b"
    qm[b] = tv[b]
    fv3, tv3 = np.concatenate([fv] * 3), np.concatenate([tv] * 3)
    q3 = np.concatenate([qv, qv, qm])
    mods = ["xr"] * len(tv) + ["ct"] * len(tv) + ["mr"] * len(tv)
    groups = list(gv) + ["one"] * len(tv) + list(gv)
    chosen = choose_blend(head, fv3, q3, tv3, mods, groups)
    sel = chosen.selection["modalities"]
    assert chosen.heads["xr"].blend > 0 and sel["xr"]["interval"][str(chosen.heads["xr"].blend)][0] > 0
    assert chosen.heads["ct"].blend == 0 and sel["ct"]["sources"] == ["one"] and "srcc" not in sel["ct"]
    assert chosen.heads["mr"].blend == 0
    assert all(sel["mr"]["per_source"][a]["b"] < sel["mr"]["per_source"]["0"]["b"] for a in ("0.25", "1.0"))
    with pytest.raises(ValueError, match="one entry per study"):
        choose_blend(head, fv, qv, tv, ["xr"] * len(tv), gv[:-1])


def test_card_keeps_the_head_and_refuses_a_broken_one(artifact: Path) -> None:
    from engines.artifact import ModelCard, UnsupportedArtifact, load_card
    from engines.features import fit_feature_head

    card = load_card(artifact)
    assert card.feature_head == {} and "feature_head" not in card.to_dict()
    f, t, _, _ = _toy(20, 4)
    head = fit_feature_head(f, t, ["ct"] * len(t)).to_dict()
    with_head = dataclasses.replace(card, feature_head=head)
    assert ModelCard.from_json(with_head.to_json()).feature_head == json.loads(json.dumps(head))
    broken = json.loads(json.dumps(head))
    broken["heads"]["ct"]["coef"] = broken["heads"]["ct"]["coef"][:5]
    with pytest.raises(UnsupportedArtifact, match="feature_head"):
        dataclasses.replace(card, feature_head=broken)
    old = {**head, "version": 0}
    with pytest.raises(UnsupportedArtifact, match="statistics version 0"):
        dataclasses.replace(card, feature_head=old)
    # version 1 never defined clipped_bright
    with pytest.raises(UnsupportedArtifact, match="statistics version 1"):
        dataclasses.replace(card, feature_head={**head, "version": 1})
    assert head["version"] == 2 and head["features"][-1] == "clipped_bright"


def test_a_version_1_head_reads_its_eight_statistics_and_ignores_later_ones() -> None:
    """A head fitted on the first eight statistics (statistics version 1, as the bundled card's
    until 2026-12-06) is stored as version 1 and predicts from those columns of the version-2
    statistics: the ninth (clipped_bright) does not move its score, and its prediction is the
    ridge of the eight columns."""
    from engines.features import FEATURE_NAMES, VERSION_FEATURES, FeatureHead, fit_feature_head

    f, t, _, _ = _toy(40, 5)
    f[:, 8] = t * 5        # a perfect ninth statistic that the version-1 head must not see
    v1 = fit_feature_head(f, t, ["xr"] * len(t), features=VERSION_FEATURES[1])
    v2 = fit_feature_head(f, t, ["xr"] * len(t))
    assert v1.version == 1 and v1.to_dict()["features"] == list(FEATURE_NAMES[:8]) and v2.version == 2
    assert len(v1.heads["xr"].coef) == 17 and len(v2.heads["xr"].coef) == 19
    v1 = dataclasses.replace(v1, heads={"xr": dataclasses.replace(v1.heads["xr"], blend=1.0)})
    back = FeatureHead.from_dict(json.loads(json.dumps(v1.to_dict())))
    x = f[3].copy()
    y = x.copy()
    y[8] += 100.0
    assert back.apply(0.5, x, "xr") == back.apply(0.5, y, "xr") == pytest.approx(float(v1.heads["xr"].predict(x[:8])[0]))
    v2 = dataclasses.replace(v2, heads={"xr": dataclasses.replace(v2.heads["xr"], blend=1.0)})
    assert v2.apply(0.5, x, "xr") != v2.apply(0.5, y, "xr")
    with pytest.raises(ValueError, match="expected the 9 statistics"):
        back.apply(0.5, x[:8], "xr")
    # a head on a subset reads its columns by name, not the first k
    only = fit_feature_head(f, t, ["xr"] * len(t), features=("clipped_bright",))
    assert only.version == 2 and np.corrcoef(only.heads["xr"].predict(only.select(f)), t)[0, 1] > 0.99
    with pytest.raises(ValueError, match="the ridge for 'xr' has 8 statistics"):
        FeatureHead(heads=v1.heads, features=FEATURE_NAMES)
    with pytest.raises(ValueError, match="distinct statistics"):
        FeatureHead(features=("nonuniformity", "nonuniformity"))


def test_the_bundled_cards_head_still_loads_and_scores_from_its_statistics() -> None:
    """The bundled model's card head (version 1 until 2026-12-07, version 2 since) loads and
    blends its ridge's prediction of the statistics it names, whatever their version."""
    from engines.artifact import load_card
    from engines.features import FEATURE_NAMES, FeatureHead, card_feature_head

    card = load_card(Path(__file__).resolve().parents[1] / "engines" / "weights" / "default.safetensors")
    head = card_feature_head(card)
    assert isinstance(head, FeatureHead) and head.active
    ridge = head.heads[head.blending[0]]
    stats = np.array(ridge.mean + (0.3,)) if len(ridge.mean) < len(FEATURE_NAMES) else np.array(ridge.mean)
    m = head.blending[0]
    cols = [FEATURE_NAMES.index(n) for n in head.features]
    a = head.blend_for(m)
    assert head.apply(0.2, stats, m) == pytest.approx((1 - a) * 0.2 + a * float(ridge.predict(stats[cols])[0]))


# ------------------------------------------------------------------------------ end to end

def _noise_corpus(root: Path) -> Path:
    """CT slices (CT_small anatomy; four 'sources', its views: two for training, two for validation)
    with Gaussian noise of known strength, score = 5 − 4σ / 200 (the test model's 1–5 scale); train 24 studies, val 2 × 8, one
    DICOM file each."""
    from tests.conftest import _testdata, _write_ct_series, ct_small_hu
    from tests.test_datasets import write_manifest

    base = ct_small_hu(_testdata("CT_small.dcm"))
    rng = np.random.default_rng(0)
    rows = []
    plan = [("train", "c" if i % 2 else "d", s) for i, s in enumerate(np.linspace(0, 200, 24))]
    plan += [("val", src, s) for src in ("a", "b") for s in np.linspace(5, 195, 8)]
    views = {"a": base, "b": base[:, ::-1], "c": base[::-1], "d": base.T}
    for i, (split, src, sigma) in enumerate(plan):
        img = np.ascontiguousarray(views[src])
        noisy = img + rng.normal(0.0, sigma, img.shape).astype(np.float32)
        _write_ct_series(root / f"s{i:02d}", [0.0], hu=lambda _, a=noisy: a)
        rows.append((f"s{i:02d}", f"{5 - 4 * sigma / 200:.4f}", "ct", "chest", "soft", split, src))
    return write_manifest(root, rows)


def test_fit_then_evaluate_and_score_give_the_same_blended_scores(artifact: Path, tmp_path: Path) -> None:
    """``mediqa train feature-head`` on a noise series the random test network cannot rank (in no
    source, so every source is evidence): CT blends; ``mediqa evaluate`` and ``mediqa score``
    (torch, and onnxruntime on the exported model) then give, study by study, (1 − α) · the
    network's score + α · the ridge's, and ``--no-features`` gives the network's own score."""
    from engines.artifact import load_card
    from engines.features import FeatureHead

    manifest = _noise_corpus(tmp_path / "corpus")
    out = tmp_path / "head.safetensors"
    code, stdout, stderr = _run(["train", "feature-head", str(artifact), str(manifest), "--min-studies", "8",
                                 "--output", str(out), "--no-progress"])
    assert code == 0, stderr
    head = FeatureHead.from_dict(load_card(out).feature_head)
    a = head.blend_for("ct")
    assert a > 0 and "-> blend" in stdout and head.selection["fit_split"] == "train"
    assert load_card(artifact).feature_head == {}                  # the input artifact is untouched
    # the same head from already-measured network scores (what a recipe reuses from its TTA step)
    from engines.tta import TTAPolicy
    from training.evaluate import evaluate_modes
    from training.feature_head import fit_feature_head_for
    from training.tta_policy import auto_predictions

    plain = evaluate_modes(artifact, manifest, modes=("none",), split="val", progress=False, features=False)
    reused = fit_feature_head_for(artifact, manifest, min_studies=8, progress=False,
                                  network=auto_predictions(TTAPolicy(), plain))
    assert reused.heads == head.heads and reused.selection["modalities"] == head.selection["modalities"]
    reps = {}
    for flag in ("--features", "--no-features"):
        js = tmp_path / f"eval{flag}.json"
        code, _, stderr = _run(["evaluate", str(out), str(manifest), "--split", "val", "--tta", "none", flag,
                                "--no-progress", "--json", str(js)])
        assert code == 0, stderr
        reps[flag] = {p["path"]: p["prediction"] for p in json.loads(js.read_text())["predictions"]}
    assert set(reps["--features"]) == {f"s{i:02d}" for i in range(24, 40)}
    from training.feature_head import split_rows

    rows = split_rows(out, manifest, split="val", progress=False)
    ridge = dict(zip([r["path"] for r in rows], head.heads["ct"].predict(np.stack([r["statistics"] for r in rows]))))
    assert set(ridge) == set(reps["--no-features"])
    for path, plain in reps["--no-features"].items():
        r = ridge[path]
        q = (plain - 1.0) / 4.0                                    # the model's [0, 1] scale
        assert reps["--features"][path] == pytest.approx(1.0 + 4.0 * ((1 - a) * q + a * r), abs=1e-5)
    from scipy.stats import spearmanr

    target = {p: 5 - 4 * s / 200 for p, s in zip(sorted(reps["--features"]), np.tile(np.linspace(5, 195, 8), 2))}
    keys = sorted(target)
    assert spearmanr([reps["--features"][k] for k in keys], [target[k] for k in keys])[0] > \
        spearmanr([reps["--no-features"][k] for k in keys], [target[k] for k in keys])[0]
    # scoring: the val studies only, same scores as evaluate, and the label marks --no-features
    val_dir = tmp_path / "val"
    val_dir.mkdir()
    for k in keys:
        shutil.copytree(tmp_path / "corpus" / k, val_dir / k)
    for flag in ("--features", "--no-features"):
        csv_out = tmp_path / f"scores{flag}.csv"
        code, _, stderr = _run(["score", str(val_dir), "--model", str(out), "-o", str(csv_out), "--tta", "none",
                                flag, "--workers", "1", "-q", "--header-cache", "off"])
        assert code == 0, stderr
        rows = {r["path"].split("/")[0]: r for r in csv.DictReader(csv_out.open())}   # sNN/slice_000.dcm
        assert set(rows) == set(keys)
        for k in keys:
            assert float(rows[k]["score"]) == pytest.approx(reps[flag][k], abs=1e-4), (flag, k)
            assert rows[k]["model"].endswith("+no-features") == (flag == "--no-features")
    # the ONNX export carries the card, so onnxruntime applies the same head
    code, _, stderr = _run(["export", str(out), "-o", str(tmp_path / "onnx"), "--exporter", "torchscript",
                            "--samples", "4"])
    assert code == 0, stderr
    onnx_model = tmp_path / "onnx" / "model.onnx"
    assert load_card(onnx_model).feature_head == load_card(out).feature_head
    code, _, stderr = _run(["score", str(val_dir), "--model", str(onnx_model), "-o", str(tmp_path / "onnx.csv"),
                            "--tta", "none", "--workers", "1", "-q", "--header-cache", "off"])
    assert code == 0, stderr
    for r in csv.DictReader((tmp_path / "onnx.csv").open()):
        assert float(r["score"]) == pytest.approx(reps["--features"][r["path"].split("/")[0]], abs=1e-4)


def test_a_source_the_network_cannot_rank_shows_no_gain() -> None:
    """A validation source the network ranks at SRCC <= 0 does not count towards the blend's gain:
    where the network ranks nothing, any informative statistic "gains" (the val2 lineage's CT
    blends, chosen that way from ``CT_small``, lost on the held-out CT)."""
    from engines.features import choose_blend, fit_feature_head
    from engines.metrics import srcc, srcc_ci

    f, t, _, _ = _toy(60, 4)
    head = fit_feature_head(f, t, ["ct"] * len(t))
    fv0, tv, _, gv = _toy(30, 5, sources=("a", "b", "c"))
    fv, g = fv0.copy(), np.array(gv)
    rng = np.random.default_rng(6)
    qv = tv + rng.normal(0, 0.15, len(tv))        # a and b: the network ranks them well
    qv[g == "c"] = 1.0 - tv[g == "c"]             # c: it ranks them backwards
    fv[g != "c"] = f.mean(axis=0)                 # the ridge says nothing about a and b (one value)
    mix = 0.5 * qv + 0.5 * head.heads["ct"].predict(fv)
    assert srcc_ci(mix, tv, compare=qv)[0] > 0    # pooled over all three sources the blend "wins"
    assert srcc(mix[g == "c"], tv[g == "c"]) > srcc(qv[g == "c"], tv[g == "c"])
    chosen = choose_blend(head, fv, qv, tv, ["ct"] * len(tv), gv)
    rec = chosen.selection["modalities"]["ct"]
    assert rec["left_out"] == ["c"] and rec["n_gain"] == 60 and chosen.heads["ct"].blend == 0.0
    assert rec["srcc"]["0.5"] == pytest.approx(rec["srcc"]["0"])      # a and b: ranking unchanged
    assert not any(lo > 0 for lo, _ in rec["interval"].values())   # NaN at α 1: the ridge is one value
    # control: the same studies with c ranked (poorly, but above 0) count, and its gain wins
    q2 = qv.copy()
    q2[g == "c"] = tv[g == "c"] + rng.normal(0, 0.3, 30)
    assert srcc(q2[g == "c"], tv[g == "c"]) > 0
    chosen2 = choose_blend(head, fv, q2, tv, ["ct"] * len(tv), gv)
    rec2 = chosen2.selection["modalities"]["ct"]
    assert "left_out" not in rec2 and rec2["n_gain"] == 90 and chosen2.heads["ct"].blend > 0
    # a network that ranks no source at all: every source is evidence that the ridge does better
    back = choose_blend(head, fv0, 1.0 - tv + rng.normal(0, 0.05, len(tv)), tv, ["ct"] * len(tv), gv)
    rec3 = back.selection["modalities"]["ct"]
    assert back.heads["ct"].blend > 0 and "left_out" not in rec3 and rec3["n_gain"] == 90
    # two sources, one unranked: one source cannot show a gain, no SRCC is even recorded
    two = g != "b"
    one = choose_blend(head, fv[two], qv[two], tv[two], ["ct"] * int(two.sum()), list(g[two]))
    assert one.heads["ct"].blend == 0.0 and "srcc" not in one.selection["modalities"]["ct"]
    assert one.selection["modalities"]["ct"]["left_out"] == ["c"]


def test_bundled_models_feature_head_was_chosen_on_validation_data() -> None:
    """The bundled card's feature head: ridges fitted on the training split, blend weights chosen
    on the validation split (never the test split the README reports) against ``--tta auto``,
    and each weight is exactly what the recorded measurements and the rule give."""
    from engines.artifact import bundled_model_path, load_card
    from engines.features import FeatureHead

    head = FeatureHead.from_dict(load_card(bundled_model_path()).feature_head)
    sel = head.selection
    assert sel["fit_split"] == "train" and sel["choose_split"] == "val" and sel["tta"] == "auto"
    assert head.active and set(sel["modalities"]) == set(head.heads)
    for m, row in sel["modalities"].items():
        assert row["blend"] == head.blend_for(m)
        if len(row["sources"]) < sel["min_sources"]:
            assert row["blend"] == 0.0
            continue
        base, per0 = row["srcc"]["0"], row["per_source"]["0"]
        ranked = [u for u in row["sources"] if per0[u] > 0]    # the rule's gain leaves the others out
        assert row.get("left_out", []) == ([u for u in row["sources"] if u not in ranked] if ranked else [])
        eligible = [a for a, (lo, _) in row["interval"].items()
                    if lo > 0 and row["srcc"][a] > base and all(row["per_source"][a][u] >= per0[u] for u in row["sources"])]
        want = float(max(eligible, key=lambda a: row["srcc"][a])) if eligible else 0.0
        assert row["blend"] == want, m


def test_feature_head_cli_refuses_bad_requests(artifact: Path, tmp_path: Path) -> None:
    from tests.test_datasets import write_manifest

    manifest = write_manifest(tmp_path, [])
    code, _, stderr = _run(["train", "feature-head", str(artifact), str(manifest), "--fit-split", "val"])
    assert code == 1 and "two different splits" in stderr
    code, _, stderr = _run(["train", "feature-head", str(artifact), str(manifest), "--output", str(tmp_path / "m.onnx")])
    assert code == 2 and "the head is written into a .safetensors artifact" in stderr


def test_statistics_that_cannot_be_measured_never_cost_a_study_its_score(monkeypatch, retina_path: Path,
                                                                         tmp_path: Path) -> None:
    """The reader measures the statistics with the images; a failure (or a non-finite value)
    leaves them None — the study is then scored by the network alone, flagged — instead of
    failing the study."""
    from PIL import Image

    from engines import features, pipeline
    from engines.io.discover import discover_studies
    from engines.preprocess import PreprocessConfig

    Image.open(retina_path).convert("L").resize((96, 96)).save(tmp_path / "a.png")
    ref = next(iter(discover_studies(tmp_path)))
    cfg = PreprocessConfig(image_size=64)
    # a PNG has no modality tag: the classifier decides later, so the reader measures it
    good = pipeline.prepare_study(ref, cfg, 7, statistics=("xr",))
    assert good.stats is not None and good.stats.shape == (9,)
    assert pipeline.prepare_study(ref, cfg, 7).stats is None          # not asked for: not measured

    def broken(*a, **k):
        raise FloatingPointError("boom")

    monkeypatch.setattr(features, "input_statistics", broken)
    bad = pipeline.prepare_study(ref, cfg, 7, statistics=("xr",))
    assert bad.stats is None and np.array_equal(bad.images, good.images)
    monkeypatch.setattr(features, "input_statistics", lambda *a, **k: np.full(9, np.nan))
    assert features.statistics_or_none(good.images, cfg.mean, cfg.std) is None


def test_readers_measure_only_studies_whose_modality_can_blend(tmp_path: Path) -> None:
    """A study whose tags name a modality without a blend (CT here) gets no statistics in the
    reader — that modality keeps the network's score, so they would be work for nothing."""
    from engines import pipeline
    from engines.io.discover import discover_studies
    from engines.preprocess import PreprocessConfig
    from tests.conftest import _write_ct_series

    _write_ct_series(tmp_path / "ct", [0.0])
    ref = next(iter(discover_studies(tmp_path)))
    cfg = PreprocessConfig(image_size=64)
    assert pipeline.prepare_study(ref, cfg, 7, statistics=("xr",)).stats is None
    assert pipeline.prepare_study(ref, cfg, 7, statistics=("ct", "xr")).stats.shape == (9,)
