"""Per-modality test-time augmentation (``--tta auto``): the policy object and its card field,
the backend / torch module that apply it row by row, the selection rule, the resumable chooser,
the card rewrite and the ``mediqa train tta-policy`` command end to end."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from engines import names
from tests.test_pipeline import _study_key, small_corpus  # noqa: F401
from tests.test_tta import _images, _Probe, artifact  # noqa: F401
from tests.test_score_cli import _run


def _prompts(modalities: list[str], dimension: str = "2d") -> np.ndarray:
    from engines.prompts import DEFAULT_VOCAB, Prompt, encode_prompt

    return np.stack([encode_prompt(Prompt(dimension, m), DEFAULT_VOCAB) for m in modalities]).astype(np.float32)


class _VocabProbe(_Probe):
    """``_Probe`` with the default prompt vocabulary in its card (so a policy can read modalities)."""

    def __init__(self, policy: dict | None = None) -> None:
        from engines.artifact import ModelCard
        from engines.prompts import DEFAULT_VOCAB

        super().__init__()
        self.prompt_dim = DEFAULT_VOCAB.size
        self.card = ModelCard(task="iqa", preset="probe", prompt_vocab=DEFAULT_VOCAB.to_dict(), preprocess={},
                              label_scale={}, tta_policy=policy or {})


# ------------------------------------------------------------------------------ policy and card

def test_policy_maps_prompt_modalities_and_validates_modes() -> None:
    from engines.prompts import DEFAULT_VOCAB
    from engines.tta import TTAPolicy, resolve_policy

    pol = TTAPolicy.from_dict({"modes": {"xr": "d4", "fundus": "flip"}, "fallback": "none"})
    assert pol.modes_of(_prompts(["ct", "xr", "fundus", "us", "mr"]), DEFAULT_VOCAB) == \
        ["none", "d4", "flip", "none", "none"]
    assert TTAPolicy.from_dict(pol.to_dict()) == pol and not pol.is_plain
    assert TTAPolicy.from_dict({}).is_plain and TTAPolicy.from_dict(None).describe() == "none"
    assert pol.describe() == "fundus flip, xr d4, others none"
    with pytest.raises(ValueError, match="unknown TTA mode 'd8'"):
        TTAPolicy.from_dict({"modes": {"ct": "d8"}})
    with pytest.raises(ValueError, match="unknown TTA mode 'auto'"):   # auto is not a mode of a policy
        TTAPolicy(fallback="auto")
    card = _VocabProbe({"modes": {"ct": "flip"}}).card
    assert resolve_policy("auto", card).modes == {"ct": "flip"}
    assert resolve_policy("d4", card) == TTAPolicy.fixed("d4")


def test_card_leaves_out_an_empty_policy_and_refuses_a_bad_one(artifact: Path) -> None:
    from engines.artifact import CARD_KEY, ModelCard, UnsupportedArtifact, _safetensors_metadata, load_card

    card = load_card(artifact)
    assert card.tta_policy == {} and "tta_policy" not in card.to_dict()
    assert card.to_json() == ModelCard.from_json(_safetensors_metadata(artifact)[CARD_KEY]).to_json()
    with_pol = dataclasses.replace(card, tta_policy={"modes": {"xr": "d4"}})
    assert ModelCard.from_json(with_pol.to_json()).tta_policy == {"modes": {"xr": "d4"}}
    with pytest.raises(UnsupportedArtifact, match="tta_policy: unknown TTA mode 'd9'"):
        dataclasses.replace(card, tta_policy={"modes": {"xr": "d9"}})


# ------------------------------------------------------------------------------ applying it

def test_auto_backend_gives_each_row_its_modalitys_mode() -> None:
    from engines.tta import TTABackend, with_tta

    x = _images(6, seed=5)
    prompt = _prompts(["ct", "xr", "ct", "fundus", "xr", "mr"])
    inner = _VocabProbe({"modes": {"xr": "d4", "fundus": "flip"}})
    auto = with_tta(inner, "auto")
    assert isinstance(auto, TTABackend) and "xr d4" in auto.describe()
    out = auto.score(x, prompt)
    plain = _VocabProbe().score(x, prompt)
    d4 = TTABackend(_VocabProbe(), "d4").score(x, prompt)
    flip = TTABackend(_VocabProbe(), "flip").score(x, prompt)
    for key in (names.SCORE, names.SLICE_LOGIT):
        want = np.array([plain[key][0], d4[key][1], plain[key][2], flip[key][3], d4[key][4], plain[key][5]])
        assert out[key] == pytest.approx(want, abs=1e-6)
    # the probe is not symmetric: the averaged rows really differ from the plain ones
    assert abs(d4[names.SCORE][1] - plain[names.SCORE][1]) > 1e-3
    # one inner call per mode, in first-seen order: none (3 rows), d4 (2 rows x 8), flip (1 row x 2)
    assert inner.calls == [3, 16, 2]
    # volumes: every slice of a volume gets its volume's mode, then the usual fusion
    vol = auto.score_volume(x.reshape(2, 3, 3, 8, 8), _prompts(["xr", "ct"], "3d"))
    ref_xr = TTABackend(_VocabProbe(), "d4").score_volume(x[:3][None], _prompts(["xr"], "3d"))
    ref_ct = TTABackend(_VocabProbe(), "none").score_volume(x[3:][None], _prompts(["ct"], "3d"))
    assert vol[names.SCORE] == pytest.approx([ref_xr[names.SCORE][0], ref_ct[names.SCORE][0]], abs=1e-6)
    # a card without a policy: auto is the plain backend itself
    bare = _VocabProbe()
    assert with_tta(bare, "auto") is bare


def test_torch_module_applies_the_policy_like_the_backend(artifact: Path) -> None:
    import torch

    from engines.backends.torch_backend import TorchBackend
    from engines.models.maniqa import TTANet
    from engines.prompts import PromptVocab
    from engines.tta import TTABackend, TTAPolicy

    pol = TTAPolicy(modes={"xr": "d4"})
    with TorchBackend(artifact) as b:
        b.card = dataclasses.replace(b.card, tta_policy=pol.to_dict())
        vocab = PromptVocab.from_dict(b.card.prompt_vocab)
        x = _images(4, size=b.image_size, seed=2)
        from engines.prompts import Prompt, encode_prompt

        prompt = np.stack([encode_prompt(Prompt("2d", m), vocab) for m in ("xr", "ct", "xr", "mr")]).astype(np.float32)
        net = TTANet(b.iqa, pol, vocab).eval()
        with torch.no_grad():
            q, z = net(torch.from_numpy(x), torch.from_numpy(prompt))
            q_d4 = TTANet(b.iqa, "d4").eval()(torch.from_numpy(x), torch.from_numpy(prompt))[0]
        out = TTABackend(b, "auto").score(x, prompt)
        plain = b.score(x, prompt)[names.SCORE]
    assert out[names.SCORE] == pytest.approx(q.numpy(), abs=1e-5)
    assert out[names.SLICE_LOGIT] == pytest.approx(z.numpy(), abs=1e-5)
    assert q.numpy()[[0, 2]] == pytest.approx(q_d4.numpy()[[0, 2]], abs=1e-5)
    assert q.numpy()[[1, 3]] == pytest.approx(plain[[1, 3]], abs=1e-5)


# ------------------------------------------------------------------------------ choosing it

def _report(rows: list[tuple[str, str, float, float]]) -> dict:
    return {"predictions": [{"path": p, "modality": m, "target": t, "prediction": y} for p, m, t, y in rows]}


def _synthetic_reports(seed: int = 0) -> dict[str, dict]:
    """xr: d4 far better than plain; ct: d4 worse; fundus: flip and d4 equally better (tie → flip);
    mr: d4 better but only 8 studies."""
    rng = np.random.default_rng(seed)
    out: dict[str, list] = {"none": [], "flip": [], "d4": []}
    for modality, n, noise in (("xr", 80, {"none": 1.0, "flip": 0.9, "d4": 0.2}),
                               ("ct", 80, {"none": 0.2, "flip": 0.25, "d4": 1.0}),
                               ("fundus", 80, {"none": 1.0, "flip": 0.1, "d4": 0.1}),
                               ("mr", 8, {"none": 1.0, "flip": 1.0, "d4": 0.05})):
        t = rng.uniform(size=n)
        shared = rng.normal(size=n)
        for mode in out:
            pred = t + noise[mode] * (shared if mode != "none" and noise[mode] == 0.1 else rng.normal(size=n))
            out[mode] += [(f"{modality}{i}", modality, float(t[i]), float(pred[i])) for i in range(n)]
    return {m: _report(r) for m, r in out.items()}


def test_select_policy_keeps_only_shown_gains_and_prefers_the_cheaper_mode() -> None:
    from training.tta_policy import select_policy

    reports = _synthetic_reports()
    pol = select_policy(reports, n_resamples=500)
    assert pol.modes == {"xr": "d4", "fundus": "flip"} and pol.fallback == "none"
    table = pol.selection["modalities"]
    assert table["ct"]["chosen"] == "none" and table["ct"]["gain_ci"]["d4"][1] < 0
    assert table["mr"]["n"] == 8 and table["mr"]["chosen"] == "none"          # too few studies
    assert table["xr"]["srcc"]["d4"] > table["xr"]["srcc"]["none"] + 0.2
    # a study missing from one report is left out of every comparison
    reports["d4"]["predictions"] = [p for p in reports["d4"]["predictions"] if p["path"] != "xr0"]
    assert select_policy(reports, n_resamples=200).selection["modalities"]["xr"]["n"] == 79
    # a demanding margin turns the xr gain down too
    assert select_policy(_synthetic_reports(), min_gain=0.9, n_resamples=200).modes == {}
    with pytest.raises(ValueError, match="plain"):
        select_policy({"d4": reports["d4"]})
    # a modality of one or two studies has no rank correlation: kept plain, not an error
    few = {m: _report([("us0", "us", 0.2, 0.3), ("us1", "us", 0.6, 0.1)] + [
        (p["path"], p["modality"], p["target"], p["prediction"]) for p in r["predictions"]])
        for m, r in _synthetic_reports().items()}
    pol = select_policy(few, min_studies=1, n_resamples=200)
    assert pol.selection["modalities"]["us"] == {"n": 2, "srcc": {}, "gain_ci": {}, "chosen": "none",
                                                 "note": "fewer than 3 studies"}
    assert pol.modes["xr"] == "d4" and "us" not in pol.modes


def test_chooser_reuses_matching_reports_and_refuses_the_training_split(artifact: Path, tmp_path: Path) -> None:
    from engines.errors import DatasetError
    from training.tta_policy import choose_tta_policy

    reports = _synthetic_reports()
    calls: list[tuple[str, tuple[str, ...]]] = []

    def fake(model, data, *, split, modes, **kw):
        calls.append((split, tuple(modes)))
        return {m: reports[m] for m in modes}

    kw = dict(reports_dir=tmp_path / "r", evaluate=fake, n_resamples=200, progress=False)
    pol = choose_tta_policy(artifact, tmp_path, split="val", **kw)
    assert calls == [("val", ("none", "flip", "d4"))]                    # one pass for every mode
    assert pol.modes == {"xr": "d4", "fundus": "flip"} and pol.selection["split"] == "val"
    assert json.loads((tmp_path / "r" / "tta-d4.json").read_text())["split"] == "val"
    assert choose_tta_policy(artifact, tmp_path, split="val", **kw) == pol and len(calls) == 1   # all reused
    choose_tta_policy(artifact, tmp_path, split="test", **kw)                                    # a new split
    assert calls[1:] == [("test", ("none", "flip", "d4"))]
    (tmp_path / "r" / "tta-flip.json").unlink()                          # interrupted: only what is missing
    assert choose_tta_policy(artifact, tmp_path, split="test", **kw).modes == pol.modes
    assert calls[2:] == [("test", ("flip",))]
    # reports the caller has measured (a recipe's record pass): used and kept, only the rest measured
    kw2 = {**kw, "reports_dir": tmp_path / "r2"}
    given = choose_tta_policy(artifact, tmp_path, split="val", known={"none": reports["none"], "d4": reports["d4"]},
                              **kw2)
    assert calls[3:] == [("val", ("flip",))] and given.modes == pol.modes
    assert sorted(f.name for f in (tmp_path / "r2").iterdir()) == ["tta-d4.json", "tta-flip.json", "tta-none.json"]
    assert choose_tta_policy(artifact, tmp_path, split="val", known=reports, **kw2) == given and len(calls) == 4
    with pytest.raises(DatasetError, match="not on the training split"):
        choose_tta_policy(artifact, tmp_path, split="train", **kw)


def test_one_pass_over_several_modes_equals_one_evaluation_per_mode(artifact: Path, retina_path: Path,
                                                                     tmp_path: Path) -> None:
    """``evaluate_modes`` (what the chooser runs) gives, study by study and mode by mode, the
    predictions of ``evaluate_model`` with that mode, 2D images and fused 3D volumes alike."""
    from engines.errors import MediqaError
    from tests.test_datasets import build_scored_corpus
    from training.evaluate import evaluate_model, evaluate_modes

    manifest = build_scored_corpus(tmp_path / "corpus", retina_path, with_3d=True)
    together = evaluate_modes(artifact, manifest, modes=("none", "flip", "d4"), progress=False)
    assert list(together) == ["none", "flip", "d4"]
    dims = set()
    for mode, rep in together.items():
        alone = evaluate_model(artifact, manifest, tta=mode, progress=False)
        assert rep["tta"] == mode and rep["tta_policy"] == alone["tta_policy"]
        a = {p["path"]: p for p in alone["predictions"]}
        assert set(a) == {p["path"] for p in rep["predictions"]}
        for p in rep["predictions"]:
            assert p["prediction"] == pytest.approx(a[p["path"]]["prediction"], abs=1e-6), (mode, p["path"])
            dims.add(p["dimension"])
        assert rep["overall"] == pytest.approx(alone["overall"])
    assert dims == {"2d", "3d"}
    preds = [np.array([p["prediction"] for p in r["predictions"]]) for r in together.values()]
    assert not np.allclose(preds[0], preds[2])          # the modes differ (a test that cannot pass by accident)
    with pytest.raises(MediqaError, match="not auto"):
        evaluate_modes(artifact, manifest, modes=("none", "auto"), progress=False)


@pytest.mark.parametrize("dtype", [None, "fp16"])
def test_write_policy_changes_only_the_card(artifact: Path, tmp_path: Path, dtype: str | None) -> None:
    import torch

    from engines.artifact import DTYPE_KEY, _safetensors_metadata, load_card, load_tensors, save_artifact
    from engines.tta import TTAPolicy
    from training.tta_policy import write_policy

    src = tmp_path / "m.safetensors"
    mods, card = load_tensors(artifact)
    save_artifact(src, mods, card, dtype=dtype)
    pol = TTAPolicy(modes={"xr": "d4"}, selection={"split": "val"})
    out = write_policy(src, pol, tmp_path / "out.safetensors")
    a, _ = load_tensors(src)
    b, card_b = load_tensors(out)
    assert card_b.tta_policy == pol.to_dict() and load_card(out).tta_policy["modes"] == {"xr": "d4"}
    assert _safetensors_metadata(out)[DTYPE_KEY] == (dtype or "fp32")
    assert a.keys() == b.keys() and all(torch.equal(a[m][k], b[m][k]) for m in a for k in a[m])
    assert card_b.to_dict() == {**card.to_dict(), "tta_policy": pol.to_dict()}


def test_cli_tta_policy_then_auto_uses_each_modalitys_choice(artifact: Path, retina_path: Path,
                                                              tmp_path: Path) -> None:
    """``mediqa train tta-policy`` writes a card whose ``--tta auto`` predictions are, study by study,
    those of the mode chosen for the study's modality (read back from the kept reports)."""
    from engines.artifact import load_card
    from tests.test_datasets import build_scored_corpus

    manifest = build_scored_corpus(tmp_path / "corpus", retina_path, with_3d=True)
    out = tmp_path / "auto.safetensors"
    rdir = tmp_path / "reports"
    # --min-gain -2: every measured mode is eligible, so the best SRCC per modality wins
    code, stdout, stderr = _run(["train", "tta-policy", str(artifact), str(manifest), "--split", "all",
                                 "--min-studies", "1", "--min-gain", "-2", "--output", str(out),
                                 "--reports-dir", str(rdir), "--no-progress"])
    assert code == 0, stderr
    pol = load_card(out).tta_policy
    chosen = {m: row["chosen"] for m, row in pol["selection"]["modalities"].items()}
    reports = {m: json.loads((rdir / f"tta-{m}.json").read_text())["report"] for m in ("none", "flip", "d4")}
    kept = {m: {p["path"]: p["prediction"] for p in rep["predictions"]} for m, rep in reports.items()}
    # grouped by the prompt's modality (CT from tags; the PNGs' from the test model's random classifier)
    assert set(chosen) == {p["modality"] for p in reports["none"]["predictions"]} and len(chosen) == 2
    assert all(v in ("flip", "d4") for v in chosen.values()) and pol["modes"] == chosen and "policy:" in stdout
    code, stdout, _ = _run(["evaluate", str(out), str(manifest), "--tta", "auto", "--no-progress",
                            "--json", str(tmp_path / "auto.json")])
    assert code == 0 and "TTA auto" in stdout
    rep = json.loads((tmp_path / "auto.json").read_text())
    assert rep["tta_policy"]["modes"] == chosen
    for p in rep["predictions"]:
        assert p["prediction"] == pytest.approx(kept[chosen[p["modality"]]][p["path"]], abs=1e-5)
    # the unchanged original has no policy: auto is plain there
    assert load_card(artifact).tta_policy == {}
    code, _, stderr = _run(["train", "tta-policy", str(artifact), str(manifest), "--modes", "d8"])
    assert code == 2 and "--modes" in stderr


def test_score_pipeline_with_auto_matches_the_fixed_modes_per_study(artifact: Path, small_corpus: Path,
                                                                    tmp_path: Path) -> None:
    """``score --tta auto`` with a policy of d4 for CT: CT studies score as with ``--tta d4``, the
    rest as without TTA; the model column says ``+tta-auto``."""
    from engines.artifact import load_card
    from engines.pipeline import score_studies
    from engines.tta import TTAPolicy
    from tests.test_pipeline import _cfg
    from training.tta_policy import write_policy

    model = write_policy(artifact, TTAPolicy(modes={"ct": "d4"}), tmp_path / "ct-d4.safetensors")
    assert load_card(model).tta_policy["modes"] == {"ct": "d4"}
    runs = {mode: {r.path: r for r in score_studies(small_corpus, model, _cfg(tta=mode, backend="torch"))}
            for mode in ("none", "d4", "auto")}
    assert {r.modality for r in runs["auto"].values()} >= {"ct", "mr"}
    for path, rec in runs["auto"].items():
        want = runs["d4" if rec.modality == "ct" else "none"][path]
        assert rec.score == pytest.approx(want.score, abs=1e-4), path
        assert rec.model.endswith("+tta-auto")
    # both sides of the split are tested: d4 really moves the CT scores and the others' scores
    for is_ct in (True, False):
        assert any(abs(runs["d4"][p].score - runs["none"][p].score) > 1e-4
                   for p, r in runs["auto"].items() if (r.modality == "ct") == is_ct)


def test_bundled_models_policy_was_chosen_on_validation_data() -> None:
    """The bundled card's ``--tta auto`` policy is well-formed, was chosen on the validation split
    (never the test split the README reports), and is exactly what its own measurements and rule
    give — every measured choice has a paired gain interval above the margin — except where an
    override, recorded with its reason and evidence, set a modality by hand (MR: d4 → none after
    the real-MR check, ``benchmarks/unseen_degradations.py --modality mr --slices 7``)."""
    from engines.artifact import bundled_model_path, load_card
    from engines.tta import TTAPolicy
    from training.tta_policy import effective_choice

    card = load_card(bundled_model_path())
    pol = TTAPolicy.from_dict(card.tta_policy)
    sel = pol.selection
    assert sel["split"] == "val" and len(sel["model_sha256"]) == 64
    overridden = {o["modality"] for o in sel.get("overrides", [])}
    for o in sel.get("overrides", []):
        assert o["reason"] and len(o["evidence"]["sha256"]) == 64 and o["from"] != o["to"]
    for modality, row in sel["modalities"].items():
        assert row["n"] >= sel["min_studies"] or row["chosen"] == "none"
        assert pol.mode_for(modality) == effective_choice(pol, modality)
        if modality in overridden:
            continue
        if row["chosen"] == "none":
            assert modality not in pol.modes
            assert all(ci[0] is None or ci[0] <= sel["min_gain"] or row["n"] < sel["min_studies"]
                       for ci in row["gain_ci"].values())
        else:
            assert pol.modes[modality] == row["chosen"] and row["gain_ci"][row["chosen"]][0] > sel["min_gain"]
            assert row["srcc"][row["chosen"]] == max(row["srcc"][m] for m in row["gain_ci"]
                                                     if row["gain_ci"][m][0] > sel["min_gain"])


def test_override_keeps_the_measured_choice_and_records_why(tmp_path: Path) -> None:
    import hashlib

    from engines.tta import TTAPolicy
    from training.tta_policy import effective_choice, override_policy

    measured = {"split": "val", "modalities": {"mr": {"chosen": "d4"}, "ct": {"chosen": "none"}}}
    pol = TTAPolicy(modes={"mr": "d4", "fundus": "flip"}, selection=measured)
    ev = tmp_path / "real-mr.json"
    ev.write_text('{"paired": 1}')
    out = override_policy(pol, {"mr": "none", "ct": "flip"}, reason="real MR check", evidence=ev,
                          when="2026-12-06T18:00:00Z")
    assert out.modes == {"fundus": "flip", "ct": "flip"}           # mr back to the fallback: unlisted
    assert out.mode_for("mr") == "none" and out.selection["modalities"] == measured["modalities"]
    ov = {o["modality"]: o for o in out.selection["overrides"]}
    assert ov["mr"]["from"] == "d4" and ov["mr"]["to"] == "none" and ov["ct"]["from"] == "none"
    assert ov["mr"]["evidence"] == {"file": "real-mr.json", "sha256": hashlib.sha256(b'{"paired": 1}').hexdigest()}
    assert effective_choice(out, "mr") == "none" and effective_choice(pol, "mr") == "d4"
    assert effective_choice(out, "xr") == "none"
    again = override_policy(out, {"mr": "flip"}, reason="second look", when="2026-12-07T00:00:00Z")
    assert [o["to"] for o in again.selection["overrides"] if o["modality"] == "mr"] == ["none", "flip"]
    assert effective_choice(again, "mr") == "flip" == again.mode_for("mr")
    assert pol.mode_for("mr") == "d4" and "overrides" not in pol.selection      # the input is untouched
    with pytest.raises(ValueError, match="reason"):
        override_policy(pol, {"mr": "none"}, reason=" ")
    with pytest.raises(ValueError, match="unknown TTA mode"):
        override_policy(pol, {"mr": "d8"}, reason="x")


def test_cli_tta_set_rewrites_only_the_policy(artifact: Path, tmp_path: Path) -> None:
    import torch

    from engines.artifact import load_card, load_tensors
    from training.tta_policy import write_policy
    from engines.tta import TTAPolicy

    src = write_policy(artifact, TTAPolicy(modes={"mr": "d4"}, selection={"split": "val"}), tmp_path / "p.safetensors")
    ev = tmp_path / "ev.json"
    ev.write_text("{}")
    out = tmp_path / "set.safetensors"
    code, stdout, stderr = _run(["train", "tta-set", str(src), "mr=none", "xr=flip", "--reason", "real images",
                                 "--evidence", str(ev), "--output", str(out)])
    assert code == 0, stderr
    pol = load_card(out).tta_policy
    assert pol["modes"] == {"xr": "flip"} and pol["selection"]["split"] == "val"
    assert [(o["modality"], o["from"], o["to"]) for o in pol["selection"]["overrides"]] == \
        [("mr", "d4", "none"), ("xr", "none", "flip")]
    a, card_a = load_tensors(src)
    b, card_b = load_tensors(out)
    assert all(torch.equal(a[m][k], b[m][k]) for m in a for k in a[m])
    assert {**card_b.to_dict(), "tta_policy": None} == {**card_a.to_dict(), "tta_policy": None}
    code, stdout, _ = _run(["info", "--json", "--model", str(out)])
    shown = json.loads(stdout)["model"]["tta_auto_overrides"]
    assert code == 0 and len(shown) == 2 and shown[0].startswith("mr d4 -> none (") and "real images" in shown[0]
    for bad, msg in ((["mr"], "MODALITY=MODE"), (["pet=none"], "unknown modalities"), (["mr=d8"], "unknown TTA mode")):
        code, _, stderr = _run(["train", "tta-set", str(src), *bad, "--reason", "x", "--output", str(out)])
        assert code == 2 and msg in stderr, stderr
    code, _, stderr = _run(["train", "tta-set", str(src), "mr=none"])
    assert code == 2 and "--reason" in stderr


def test_auto_predictions_take_each_studys_mode_from_the_reports() -> None:
    from engines.tta import TTAPolicy
    from training.tta_policy import auto_predictions

    def rep(vals: dict[str, float]) -> dict:
        return {"predictions": [{"path": p, "modality": p.split("/")[0], "prediction": v} for p, v in vals.items()]}

    reports = {"none": rep({"xr/a": 0.1, "ct/b": 0.2}), "d4": rep({"xr/a": 0.3, "ct/b": 0.4})}
    auto = auto_predictions(TTAPolicy(modes={"xr": "d4"}), reports)
    assert auto == {"xr/a": (0.3, "xr"), "ct/b": (0.2, "ct")}
    with pytest.raises(ValueError, match="TTA flip, which the reports lack"):
        auto_predictions(TTAPolicy(modes={"ct": "flip"}), reports)
