"""Training loop, tasks and configuration with the tiny ``mediqa-test`` preset on real images."""

from __future__ import annotations

import csv

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from engines.artifact import ModelCard, load_card, load_tensors
from engines.errors import ConfigError, UnsupportedArtifact
from engines.models.loading import load_artifact
from tests.test_datasets import build_scored_corpus
from training.config import TrainConfig, load_config
from training.loop import LOG_NAME, STATE_JSON, STATE_TENSORS, fit_epochs_to_budget, lr_factor
from training.tasks import load_pretrained_into, run_classifier, run_finetune, run_pretrain

FAST = dict(preset="mediqa-test", batch_size=4, lr=2e-3, amp=False, progress=False, warmup_epochs=0.5,
            patience=0, cache_dir="memory")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, retina_path: Path) -> Path:
    return build_scored_corpus(tmp_path_factory.mktemp("corpus"), retina_path)


@pytest.fixture(scope="module")
def finetuned(corpus: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("ft")
    cfg = TrainConfig(task="finetune", epochs=4, out=str(out), **FAST)
    return cfg, run_finetune(corpus, cfg)


# ------------------------------------------------------------------------------ config

def test_yaml_typo_fails_with_suggestion(tmp_path: Path) -> None:
    y = tmp_path / "c.yaml"
    y.write_text("epoch: 3\nlr: 1e-4\n")
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        load_config(y)
    y.write_text("epochs: 3\nlr: 1e-4\nbatch_size: 2\n")
    cfg = load_config(y, {"lr": 5e-5, "seed": None})
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.seed) == (3, 5e-5, 2, 0)   # flag wins, None = not given
    y.write_text("epochs: many\n")
    with pytest.raises(ConfigError, match="bad value for epochs"):
        load_config(y)
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        load_config(None, {"batch-sise": 3})


def test_lr_schedule_warmup_then_cosine() -> None:
    f = [lr_factor(s, 100, 10, start=0.01, floor=0.01) for s in range(101)]
    assert f[0] == pytest.approx(0.01) and f[10] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:10], f[1:11]))                       # warm-up rises
    assert all(a >= b for a, b in zip(f[10:], f[11:]))                       # cosine falls
    assert f[55] == pytest.approx(0.505, abs=1e-3) and f[100] == pytest.approx(0.01)


def test_prompt_lr_mult_gives_the_prompt_projections_their_own_learning_rate() -> None:
    """``prompt_lr_mult``: the real model's Swin-stage prompt projections (and only they) form a
    second parameter group at lr × mult; Adam's first step moves each weight by about its group's
    lr, so the prompt weights move ``mult`` times as far. At 1 there is one group, as before."""
    from engines.models.registry import create_model
    from engines.prompts import DEFAULT_VOCAB
    from training.loop import param_groups

    torch.manual_seed(0)
    model = create_model("mediqa-vitt16")
    names = {id(p): n for n, p in model.named_parameters()}
    one = param_groups(model, TrainConfig(lr=1e-4))
    assert len(one) == 1 and len(one[0]["params"]) == sum(1 for p in model.parameters() if p.requires_grad)
    groups = param_groups(model, TrainConfig(lr=1e-4, prompt_lr_mult=50.0))
    assert len(groups) == 2 and groups[1]["lr"] == pytest.approx(5e-3) and "lr" not in groups[0]
    prompt = {names[id(p)] for p in groups[1]["params"]}
    assert prompt and all(".prompt_proj." in n for n in prompt)
    assert prompt == {n for n in names.values() if ".prompt_proj." in n}
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(one[0]["params"])
    with pytest.raises(ValueError, match="prompt_lr_mult"):
        param_groups(model, TrainConfig(prompt_lr_mult=0.0))

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(groups, lr=1e-4, weight_decay=0.0)
    x, prompt_vec = torch.rand(2, 3, 224, 224), torch.zeros(2, DEFAULT_VOCAB.size)
    prompt_vec[:, 0] = 1.0
    score, _ = model(x, prompt_vec)
    score.sum().backward()
    opt.step()
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters()}
    assert max(v for n, v in moved.items() if n in prompt) == pytest.approx(5e-3, rel=0.05)
    assert max(v for n, v in moved.items() if n not in prompt) == pytest.approx(1e-4, rel=0.05)


def test_prompt_groups_switch_groups_off_in_the_saved_network(corpus: Path, tmp_path: Path) -> None:
    """``prompt_groups``: the prompt columns of the groups left out are zero in every Swin stage
    of the fine-tuned artifact (with weight decay on) while the kept ones are not, so the saved network's score does
    not depend on the region / type one-hots at all; an unknown or repeated group is refused."""
    from engines.prompts import DEFAULT_VOCAB, GROUPS

    cfg = TrainConfig(task="finetune", epochs=2, out=str(tmp_path / "ft"), weight_decay=0.05,
                      prompt_groups=("dimension", "modality"), **FAST)
    outcome = run_finetune(corpus, cfg)
    state = load_tensors(outcome.artifact)[0]["iqa"]
    projections = [k for k in state if k.endswith("prompt_proj.weight")]
    assert len(projections) >= 2
    for k in projections:
        w = state[k].float()
        for g in GROUPS:
            cols = w[:, DEFAULT_VOCAB.columns(g)]
            if g in ("region", "type"):
                assert torch.count_nonzero(cols) == 0, (k, g)
            else:
                assert torch.count_nonzero(cols) == cols.numel(), (k, g)
    loaded = load_artifact(outcome.artifact)
    model, size = loaded.iqa, loaded.card.preprocess["image_size"]
    x = torch.rand(3, 3, size, size)

    def one_hot(**values: str) -> torch.Tensor:
        vec = torch.zeros(3, DEFAULT_VOCAB.size)
        for g, v in values.items():
            vec[:, DEFAULT_VOCAB.columns(g).start + DEFAULT_VOCAB.index(g, v)] = 1.0
        return vec

    a = one_hot(dimension="2d", modality="xr", region="chest", type="grey")
    b = one_hot(dimension="2d", modality="xr", region="head", type="t1")
    with torch.no_grad():
        sa, sb = model(x, a)[0], model(x, b)[0]
        m = model(x, one_hot(dimension="2d", modality="ct", region="chest", type="grey"))[0]
    assert torch.equal(sa, sb)
    assert not torch.allclose(sa, m)            # the modality one-hot still reaches the score

    with pytest.raises(ConfigError, match="prompt_groups"):
        TrainConfig(prompt_groups=("modality", "anatomy"))
    with pytest.raises(ConfigError, match="prompt_groups"):
        TrainConfig(prompt_groups=("modality", "modality"))
    assert cfg.replace(prompt_groups=["type"]).prompt_groups == ("type",)


def test_schedule_fitted_to_time_budget() -> None:
    # first epoch took 100 s of a 1000 s budget: 9 more fit, so a 50-epoch plan shrinks to 10
    assert fit_epochs_to_budget(1, 1, 100.0, 1000.0, 50) == 10
    assert fit_epochs_to_budget(1, 1, 100.0, 1000.0, 6) == 6        # never longer than planned
    assert fit_epochs_to_budget(1, 1, 900.0, 100.0, 50) == 1        # over budget: the epoch done
    # resumed at epoch 4: this run's first epoch (its 5th) took 200 s of a 700 s budget
    assert fit_epochs_to_budget(5, 1, 200.0, 700.0, 50) == 7


def test_time_budget_ends_schedule_and_training(corpus: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(task="finetune", epochs=3, out=str(tmp_path), time_budget_s=1e-3, **FAST)
    run_finetune(corpus, cfg)
    log = [json.loads(line) for line in (tmp_path / LOG_NAME).read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1]
    assert json.loads((tmp_path / STATE_JSON).read_text())["budget_epochs"] == 1
    # resuming with more epochs keeps the fitted schedule: nothing more to train
    run_finetune(corpus, cfg.replace(resume=True, time_budget_s=None))
    assert len((tmp_path / LOG_NAME).read_text().splitlines()) == 1


# ------------------------------------------------------------------------------ fine-tune smoke run

def _mse_on_train(model: torch.nn.Module, cfg: TrainConfig, corpus: Path) -> float:
    from engines.prompts import DEFAULT_VOCAB
    from training.data.datasets import read_manifest
    from training.loop import IQATask, predict_all
    from training.tasks import _cache, _loader, build_items

    samples, report = read_manifest(corpus)
    train = [s for s in samples if s.split == "train"]
    pcfg = model.preset.preprocess_config()
    cache = _cache(cfg, pcfg)
    items = build_items(train, cfg, cache, DEFAULT_VOCAB, report, lambda s: s.target)
    pred, target, _ = predict_all(model, IQATask(), _loader(items, cache, cfg, train=False), torch.device("cpu"), False)
    return float(np.mean((pred - target) ** 2))


def test_finetune_lowers_loss_and_writes_loadable_artifact(finetuned, corpus: Path) -> None:
    cfg, outcome = finetuned
    out = Path(cfg.out)
    log = [json.loads(line) for line in (out / LOG_NAME).read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4]
    assert log[-1]["train_loss"] < log[0]["train_loss"]
    assert all(r["images_per_s"] > 0 and "srcc" in r["val"] for r in log)

    loaded = load_artifact(outcome.artifact)
    card = loaded.card
    assert card.task == "iqa" and card.preset == "mediqa-test" and card.ensemble_size == 1
    assert card.label_scale["min"] == 0.0 and card.label_scale["max"] == 1.0
    assert card.data_summary["splits"] == {"train": 6, "val": 2, "test": 2}
    assert card.preprocess["image_size"] == 64 and card.n_slices == 7
    assert set(card.metrics) >= {"val", "test"} and card.metrics["test"]["n"] == 2
    assert ModelCard.from_json(card.to_json()) == card == load_card(outcome.artifact)

    # the trained model fits the training scores better than the same network untrained
    from engines.models.registry import create_model
    torch.manual_seed(cfg.seed)
    fresh = create_model("mediqa-test", loaded.iqa.prompt_dim)
    assert _mse_on_train(loaded.iqa, cfg, corpus) < _mse_on_train(fresh.eval(), cfg, corpus)


def test_resume_continues_epochs_and_optimizer(corpus: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    cfg = TrainConfig(task="finetune", epochs=1, out=str(tmp_path), **FAST)
    run_finetune(corpus, cfg)
    first = json.loads((tmp_path / STATE_JSON).read_text())
    saved = load_file(str(tmp_path / STATE_TENSORS))
    steps_1 = saved["opt.0.step"].item()
    assert first["epoch"] == 1 and steps_1 > 0 and "opt.0.exp_avg" in saved

    run_finetune(corpus, cfg.replace(epochs=2, resume=True))
    log = [json.loads(line) for line in (tmp_path / LOG_NAME).read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]                             # appended, not restarted
    after = json.loads((tmp_path / STATE_JSON).read_text())
    steps_2 = load_file(str(tmp_path / STATE_TENSORS))["opt.0.step"].item()
    assert after["epoch"] == 2 and steps_2 == pytest.approx(2 * steps_1)    # Adam's counter went on
    assert after["scheduler"]["last_epoch"] == 2 * first["scheduler"]["last_epoch"]
    # a finished run resumed again trains nothing more
    run_finetune(corpus, cfg.replace(epochs=2, resume=True))
    assert len((tmp_path / LOG_NAME).read_text().splitlines()) == 2
    # its best epoch was kept by the pooled SRCC: resuming it to keep epochs by another metric is refused
    with pytest.raises(ConfigError, match="select 'primary'"):
        run_finetune(corpus, cfg.replace(epochs=3, resume=True, select="srcc_within"))


def test_handover_keeps_encoder_and_prompt_fcs(finetuned, tmp_path: Path) -> None:
    from engines.models.registry import create_model
    _, outcome = finetuned
    groups, _ = load_tensors(outcome.artifact)
    src = groups["iqa"]
    model = create_model("mediqa-test")
    counts = load_pretrained_into(model, outcome.artifact, "mediqa-test", ("score_head",))
    sd = model.state_dict()
    prompt_keys = [k for k in sd if "prompt" in k]
    assert prompt_keys, "the model has prompt FCs"
    for k in [k for k in sd if k.startswith("encoder.")] + prompt_keys + ["weight_head.0.weight", "slice_head.weight"]:
        assert torch.equal(sd[k], src[k].float()), k
    assert not torch.equal(sd["score_head.0.weight"], src["score_head.0.weight"].float())
    assert counts["reinitialised"] == 2 and counts["loaded"] == len(src)
    with pytest.raises(UnsupportedArtifact, match="preset 'mediqa-test'"):
        load_pretrained_into(create_model("mediqa-test"), outcome.artifact, "mediqa-vitt16", ())
    with pytest.raises(UnsupportedArtifact, match="mediqa-test"):
        run_finetune(tmp_path, TrainConfig(task="finetune", out=str(tmp_path / "x"),
                                           from_checkpoint=str(outcome.artifact), **{**FAST, "preset": "mediqa-vitt16"}))


def test_pretrain_ensemble_and_classifier(corpus: Path, tmp_path: Path) -> None:
    pre = run_pretrain(corpus, TrainConfig(task="pretrain", epochs=1, seeds=2, out=str(tmp_path / "pre"), **FAST))
    loaded = load_artifact(pre.artifact)
    assert loaded.card.task == "pretrain" and loaded.card.ensemble_size == 2
    assert set(load_tensors(pre.artifact)[0]) == {"iqa.0", "iqa.1"}
    norm = loaded.card.label_scale["normaliser"]["ranges"]["ct"]
    assert norm["log_min"] == pytest.approx(np.log(200.0)) and norm["log_max"] == pytest.approx(np.log(400.0))
    assert pre.data_summary["used"] == 6     # 6 CT studies; the 4 PNGs have no physical tag
    assert pre.data_summary["skipped_by_reason"] == {"no_physical_target": 4}

    cl = run_classifier(corpus, TrainConfig(task="classifier", epochs=1, out=str(tmp_path / "cl"), **FAST))
    lc = load_artifact(cl.artifact)
    assert lc.classifier is not None and lc.iqa is None and lc.card.task == "classifier"
    assert 0.0 <= cl.metrics["val"]["accuracy"] <= 1.0


def test_plcc_loss_rewards_ranking_and_punishes_collapse() -> None:
    import torch

    from training.loop import IQATask, plcc_loss

    t = torch.tensor([0.1, 0.4, 0.5, 0.9])
    assert float(plcc_loss(2 * t + 1, t)) == pytest.approx(0.0, abs=1e-5)       # linear: 0
    assert float(plcc_loss(-t, t)) == pytest.approx(2.0, abs=1e-5)              # reversed: 2
    const = torch.full_like(t, 0.5, requires_grad=True)
    loss = plcc_loss(const, t)                                                  # collapsed: 1
    assert float(loss) == pytest.approx(1.0, abs=1e-4)
    loss.backward()
    assert torch.isfinite(const.grad).all() and float(const.grad.abs().sum()) > 0  # and it pushes
    assert float(plcc_loss(t, torch.full_like(t, 0.3))) == 0.0                  # no ranking info
    with pytest.raises(ValueError):
        IQATask("l1")
    from engines.errors import ConfigError
    from training.config import TrainConfig

    with pytest.raises(ConfigError, match="loss must be one of"):
        TrainConfig(loss="l1")              # a typo in a recipe fails before any data is read


def test_grouped_plcc_loss_judges_ranking_within_each_group() -> None:
    """Two modalities each ranked perfectly but offset against each other: the batch-wide PLCC
    loss is large, the per-group one is 0; a group ranked backwards is punished; groups with < 3
    items are left out; no informative group falls back to the batch-wide loss."""
    import torch

    from training.loop import IQATask, grouped_plcc_loss, plcc_loss

    t = torch.tensor([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    p = torch.tensor([0.6, 0.7, 0.8, 0.1, 0.2, 0.3], requires_grad=True)
    g = torch.tensor([0, 0, 0, 1, 1, 1])
    assert float(plcc_loss(p, t)) > 1.0
    assert float(grouped_plcc_loss(p, t, g)) == pytest.approx(0.0, abs=1e-5)
    rev = torch.tensor([0.8, 0.7, 0.6, 0.1, 0.2, 0.3])
    assert float(grouped_plcc_loss(rev, t, g)) == pytest.approx(1.0, abs=1e-4)   # (2 + 0) / 2
    loss = grouped_plcc_loss(p * torch.tensor([1, 1, 1, 1, 1, -1.0]), t, g)
    loss.backward()
    assert float(loss) > 0 and float(p.grad.abs().sum()) > 0
    # group 2 has 2 items: ignored; the rest as before
    g3 = torch.tensor([0, 0, 0, 2, 1, 1])
    t3 = torch.tensor([0.1, 0.2, 0.3, 0.5, 0.8, 0.9])
    assert float(grouped_plcc_loss(torch.tensor([0.6, 0.7, 0.8, 0.0, 0.2, 0.1]), t3, g3)) == pytest.approx(0.0, abs=1e-5)
    # no group of 3: the batch-wide loss
    g4 = torch.tensor([0, 0, 1, 1, 2, 2])
    assert float(grouped_plcc_loss(p.detach(), t, g4)) == pytest.approx(float(plcc_loss(p.detach(), t)))
    with pytest.raises(ValueError, match="modality_columns"):
        IQATask("mse+plcc-modality")
    # the combined loss is MSE + batch-wide PLCC + per-group PLCC, each term as defined above;
    # the groups come from the batch's prompts (2D items first, then 3D, as outputs() orders them)
    task = IQATask("mse+plcc+plcc-modality", slice(1, 3))
    prompts = torch.cat([torch.ones(6, 1), torch.nn.functional.one_hot(g, 2).float()], dim=1)
    batch = {"2d": {"prompt": prompts[:4]}, "3d": {"prompt": prompts[4:]}}
    task.outputs = lambda *a: (p.detach(), t, None, 6)  # type: ignore[method-assign]  # outputs() stubbed
    want = float(torch.nn.functional.mse_loss(p, t) + plcc_loss(p, t) + grouped_plcc_loss(p, t, g))
    assert float(task.loss(None, batch, torch.device("cpu"), False)[0]) == pytest.approx(want, abs=1e-5)


def test_pair_difference_loss_fits_differences_within_one_content() -> None:
    """An offset shared by a content's studies costs nothing; two siblings placed the wrong way
    round cost the squared error of their difference; studies of different contents never pair;
    no pair gives 0 with a gradient path. IQATask adds it to MSE (+ PLCC) with the batch's content
    ids, 2D items first, then 3D."""
    import torch

    from training.loop import IQATask, pair_difference_loss, plcc_loss

    t = torch.tensor([0.2, 0.6, 0.3, 0.9])
    c = torch.tensor([0, 0, 1, 1])
    p = t + torch.tensor([0.3, 0.3, -0.2, -0.2])                    # an offset per content
    assert float(pair_difference_loss(p, t, c)) == pytest.approx(0.0, abs=1e-7)
    swapped = torch.tensor([0.6, 0.2, 0.3, 0.9])                      # content 0 backwards
    assert float(pair_difference_loss(swapped, t, c)) == pytest.approx((0.8 ** 2 + 0.0) / 2, abs=1e-6)
    triple = torch.tensor([0, 0, 0, 1])                                # three siblings: three pairs
    want = (((0.1 - 0.5) - (0.2 - 0.6)) ** 2 + ((0.1 - 0.0) - (0.2 - 0.3)) ** 2
            + ((0.5 - 0.0) - (0.6 - 0.3)) ** 2) / 3
    assert float(pair_difference_loss(torch.tensor([0.1, 0.5, 0.0, 0.0]), t, triple)) == pytest.approx(want, abs=1e-6)
    q = torch.tensor([0.9, 0.1, 0.5, 0.5], requires_grad=True)
    alone = pair_difference_loss(q, t, torch.arange(4))
    alone.backward()
    assert float(alone) == 0.0 and q.grad is not None
    task = IQATask("mse+plcc+pairdiff", slice(1, 3))
    batch = {"2d": {"content": c[:3]}, "3d": {"content": c[3:]}}
    task.outputs = lambda *a: (swapped, t, None, 4)  # type: ignore[method-assign]  # outputs() stubbed
    want = float(torch.nn.functional.mse_loss(swapped, t) + plcc_loss(swapped, t) + pair_difference_loss(swapped, t, c))
    assert float(task.loss(None, batch, torch.device("cpu"), False)[0]) == pytest.approx(want, abs=1e-6)
    with pytest.raises(ConfigError, match="batches siblings together"):
        TrainConfig(loss="mse+pairdiff", batch_group="modality")


def test_content_batch_sampler_keeps_siblings_together() -> None:
    """Every index once per epoch, a fixed number of batches of near-equal size, a content's
    studies never split across batches, the order drawn from the generator (reproducible, changes
    between epochs)."""
    import torch

    from training.data.torchdata import ContentBatchSampler

    content = [0, 1, 1, 2, 3, 3, 3, 4, 5, 5, 6, 7, 8, 8, 9]
    sampler = ContentBatchSampler(content, 4, torch.Generator().manual_seed(0))
    epochs = [list(sampler) for _ in range(3)]
    for batches in epochs:
        assert len(batches) == len(sampler)
        assert sorted(i for b in batches for i in b) == list(range(len(content)))
        assert all(3 <= len(b) <= 5 for b in batches)     # 15 over 4 batches; a triple may make 5
        where = {i: k for k, b in enumerate(batches) for i in b}
        for c in set(content):
            assert len({where[i] for i, x in enumerate(content) if x == c}) == 1
    assert epochs[0] != epochs[1]
    again = ContentBatchSampler(content, 4, torch.Generator().manual_seed(0))
    assert list(again) == epochs[0]
    with pytest.raises(ValueError):
        ContentBatchSampler(content, 0)


def test_finetune_with_the_pair_difference_loss_sees_siblings(corpus: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """``loss: mse+plcc+pairdiff`` end to end on a manifest whose content column pairs training
    studies (as ``mediqa synth --train-siblings`` writes it): the pairs reach the loss in the
    same batch, the loss is finite and the run writes its artifact."""
    import torch

    import training.loop as loop_mod

    rows = list(csv.DictReader(corpus.open()))
    train = [r for r in rows if r["split"] == "train"]
    by_kind: dict[str, list[dict[str, str]]] = {}
    for r in train:
        by_kind.setdefault(r["path"].split("_")[0].split("/")[0], []).append(r)
    for group in by_kind.values():      # ct2d_0 / ct2d_1, the two fundus photos, ct3d_0 / ct3d_3
        for r in group[1:]:
            r["content"] = group[0]["path"]
    manifest = corpus.parent / "siblings.csv"
    with manifest.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]) + ["content"])
        w.writeheader()
        w.writerows(rows)
    seen: list[int] = []
    real = loop_mod.pair_difference_loss

    def spy(pred: torch.Tensor, target: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
        seen.append(int(torch.triu(content[:, None] == content[None, :], diagonal=1).sum()))
        return real(pred, target, content)

    monkeypatch.setattr(loop_mod, "pair_difference_loss", spy)
    cfg = TrainConfig(task="finetune", epochs=2, out=str(tmp_path), loss="mse+plcc+pairdiff", **FAST)
    out = run_finetune(manifest, cfg)
    n_pairs = sum(len(g) - 1 for g in by_kind.values())
    assert n_pairs >= 2 and sum(seen) == 2 * n_pairs          # every pair met in one batch, each epoch
    log = [json.loads(line) for line in (tmp_path / LOG_NAME).read_text().splitlines()]
    assert log and all(np.isfinite(r["train_loss"]) for r in log)
    assert load_card(out.artifact).training["loss"] == "mse+plcc+pairdiff"


def test_finetune_with_the_per_modality_plcc_loss(corpus: Path, tmp_path: Path) -> None:
    """``loss: mse+plcc-modality`` trains end to end: the IQA task gets the modality columns of the
    prompt vocabulary, the loss is finite and the run writes its artifact."""
    from engines.prompts import DEFAULT_VOCAB, Prompt, encode_prompt
    from training.loop import IQATask

    cols = DEFAULT_VOCAB.columns("modality")
    assert cols.stop - cols.start == len(DEFAULT_VOCAB.modality)
    assert DEFAULT_VOCAB.modality[int(encode_prompt(Prompt("2d", "fundus"))[cols].argmax())] == "fundus"
    assert IQATask("mse+plcc-modality", cols).modality_columns == cols
    cfg = TrainConfig(task="finetune", epochs=1, out=str(tmp_path), loss="mse+plcc-modality", **FAST)
    out = run_finetune(corpus, cfg)
    log = [json.loads(line) for line in (tmp_path / LOG_NAME).read_text().splitlines()]
    assert log and all(np.isfinite(r["train_loss"]) for r in log)
    assert Path(out.artifact).is_file() and load_card(out.artifact).training["loss"] == "mse+plcc-modality"


def test_recipe_regenerates_corpus_when_sources_change(tmp_path: Path, monkeypatch) -> None:
    import subprocess

    from training import recipe
    from training.synth.sources import sources_fingerprint

    calls: list[list[str]] = []

    def fake_run(cmd, check=False):  # noqa: ANN001 - subprocess.run's signature
        calls.append(list(cmd))
        (tmp_path / "manifest.csv").write_text("path,score\n")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(recipe.subprocess, "run", fake_run)
    (tmp_path / "manifest.csv").write_text("path,score\n")
    stamp = tmp_path / ".recipe-synth.json"
    stamp.write_text(json.dumps({"size": "tiny", "seed": 1, "sources": sources_fingerprint()}))
    recipe.ensure_corpus(tmp_path, "tiny", 1, progress=False)
    assert calls == []                                   # same size, seed and sources: reused
    stamp.write_text(json.dumps({"size": "tiny", "seed": 1}))   # made before the fingerprint
    recipe.ensure_corpus(tmp_path, "tiny", 1, progress=False)
    assert len(calls) == 1 and "--force" in calls[0]
    assert json.loads(stamp.read_text())["sources"] == sources_fingerprint()
    assert "--train-windows" not in calls[0] and "train_windows" not in json.loads(stamp.read_text())
    # the generator option is part of the identity: on → regenerate with it, then reuse
    recipe.ensure_corpus(tmp_path, "tiny", 1, progress=False, train_windows=True)
    assert len(calls) == 2 and "--train-windows" in calls[1]
    assert json.loads(stamp.read_text())["train_windows"] is True
    recipe.ensure_corpus(tmp_path, "tiny", 1, progress=False, train_windows=True)
    assert len(calls) == 2
    recipe.ensure_corpus(tmp_path, "tiny", 1, progress=False)           # off again: regenerate
    assert len(calls) == 3 and "--train-windows" not in calls[2]
    # dose_label likewise: part of the identity when not "mas", passed to synth, left out of the
    # pretrain stage's key (it changes scores only, never the images or their tags)
    recipe.ensure_corpus(tmp_path, "tiny", 1, progress=False, dose_label="noise")
    assert len(calls) == 4 and calls[3][-3:] == ["--dose-label", "noise", "--force"]
    ident = json.loads(stamp.read_text())
    assert ident["dose_label"] == "noise"
    assert "dose_label" not in recipe.stage_corpus(ident, "pretrain")
    assert recipe.stage_corpus(ident, "finetune") == ident
    assert "dose_label" not in recipe.corpus_identity("tiny", 1)
    # train_warp: part of the identity when on and of every stage's key (it changes CT / MR images)
    recipe.ensure_corpus(tmp_path, "tiny", 1, progress=False, train_warp=True)
    assert len(calls) == 5 and "--train-warp" in calls[4]
    ident = json.loads(stamp.read_text())
    assert ident["train_warp"] is True and recipe.stage_corpus(ident, "pretrain")["train_warp"] is True
    assert "train_warp" not in recipe.corpus_identity("tiny", 1)
    # train_warp_2d: identity and synth flag when on; X-ray / fundus only, so not in pretrain's key
    recipe.ensure_corpus(tmp_path, "tiny", 1, progress=False, train_warp=True, train_warp_2d=True)
    assert len(calls) == 6 and calls[5][-3:] == ["--train-warp", "--train-warp-2d", "--force"]
    ident = json.loads(stamp.read_text())
    assert ident["train_warp_2d"] is True and "train_warp_2d" not in recipe.stage_corpus(ident, "pretrain")
    assert recipe.stage_corpus(ident, "pretrain")["train_warp"] is True
    with pytest.raises(TypeError, match="train_wrap"):
        recipe.corpus_identity("tiny", 1, train_wrap=True)
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: mediqa-test\nsynth:\n  dose_label: hu\n")
    with pytest.raises(ConfigError, match="dose_label"):
        recipe.load_recipe(bad)
    bad.write_text("preset: mediqa-test\nsynth:\n  train_warp_2d: 1\n")
    with pytest.raises(ConfigError, match="synth.train_warp_2d must be true or false"):
        recipe.load_recipe(bad)
    bad.write_text("preset: mediqa-test\nsynth:\n  train_warp2d: true\n")
    with pytest.raises(ConfigError, match="train_warp_2d"):    # unknown key, with the suggestion
        recipe.load_recipe(bad)


def _fake_stage(calls: list[TrainConfig]):
    """A recipe stage that records its configuration and writes a distinct artifact per run."""
    from training.tasks import TrainOutcome

    def fake_stage(manifest: Path, cfg: TrainConfig) -> TrainOutcome:
        calls.append(cfg)
        art = Path(cfg.out) / "model.safetensors"
        art.parent.mkdir(parents=True, exist_ok=True)
        art.write_bytes(f"weights of run {len(calls)}".encode())
        return TrainOutcome(artifact=art, metrics={"val": {"srcc": 0.5}}, data_summary={"n": 3},
                            images_per_s=2.0, members=[art])

    return fake_stage


def test_recipe_updates_a_corpus_whose_generator_options_changed(tmp_path: Path, monkeypatch) -> None:
    """A corpus of the same size, seed and sources made with other generator options is updated in
    place (only the changed studies rendered, no `mediqa synth` run), equal to a fresh corpus; its
    stamp is replaced, not rewritten, so a hard-linked copy's stamp keeps its identity."""
    import os
    import shutil

    from training import recipe
    from training.synth.corpus import generate_corpus, plan_corpus

    def no_synth(cmd, check=False):  # noqa: ANN001 - subprocess.run's signature
        raise AssertionError(f"regenerated instead of updating: {cmd}")

    corpus, other, fresh = tmp_path / "corpus", tmp_path / "other", tmp_path / "fresh"
    generate_corpus(corpus, seed=4, size="tiny")
    (corpus / recipe.CORPUS_STAMP).write_text(json.dumps(recipe.corpus_identity("tiny", 4)))
    shutil.copytree(corpus, other, copy_function=os.link)
    before = (other / "manifest.csv").read_bytes(), (other / recipe.CORPUS_STAMP).read_text()
    monkeypatch.setattr(recipe.subprocess, "run", no_synth)
    changed = sum(a != b for a, b in zip(plan_corpus(4, "tiny"), plan_corpus(4, "tiny", train_mr_fields=True)))
    assert changed == 2
    recipe.ensure_corpus(corpus, "tiny", 4, progress=False, workers=1, train_mr_fields=True)
    assert json.loads((corpus / recipe.CORPUS_STAMP).read_text()) == \
        recipe.corpus_identity("tiny", 4, train_mr_fields=True)
    assert ((other / "manifest.csv").read_bytes(), (other / recipe.CORPUS_STAMP).read_text()) == before
    generate_corpus(fresh, seed=4, size="tiny", train_mr_fields=True)
    assert (corpus / "manifest.csv").read_bytes() == (fresh / "manifest.csv").read_bytes()
    assert (corpus / "manifest.csv").read_bytes() != before[0]
    # a corpus that does not pair up with the plan (here: its manifest lists other studies) is
    # rendered anew by `mediqa synth`
    (corpus / "manifest.csv").write_text("path,score\n")
    with pytest.raises(AssertionError, match="regenerated instead of updating"):
        recipe.ensure_corpus(corpus, "tiny", 4, progress=False, workers=1)


def test_recipe_stage_reused_only_when_config_corpus_and_inputs_match(tmp_path: Path) -> None:
    from training import recipe
    calls: list[TrainConfig] = []
    fake_stage = _fake_stage(calls)

    inp = tmp_path / "pre.safetensors"
    inp.write_bytes(b"pretrained")
    cfg = TrainConfig(task="classifier", epochs=2, out=str(tmp_path / "stage"))
    corpus = {"size": "tiny", "seed": 0, "sources": "abc"}
    first = recipe._run_stage(fake_stage, tmp_path / "m.csv", cfg, corpus, [inp])
    again = recipe._run_stage(fake_stage, tmp_path / "m.csv", cfg.replace(progress=False), corpus, [inp])
    assert len(calls) == 1 and again.artifact == first.artifact and again.metrics == first.metrics
    recipe._run_stage(fake_stage, tmp_path / "m.csv", cfg.replace(time_budget_s=9.0), corpus, [inp])
    assert len(calls) == 2                                        # another configuration
    recipe._run_stage(fake_stage, tmp_path / "m.csv", cfg.replace(time_budget_s=9.0), corpus, [inp])
    assert len(calls) == 2
    inp.write_bytes(b"pretrained again")                          # another input artifact
    recipe._run_stage(fake_stage, tmp_path / "m.csv", cfg.replace(time_budget_s=9.0), corpus, [inp])
    assert len(calls) == 3
    (tmp_path / "stage" / "model.safetensors").write_bytes(b"edited by hand")   # output changed
    recipe._run_stage(fake_stage, tmp_path / "m.csv", cfg.replace(time_budget_s=9.0), corpus, [inp])
    assert len(calls) == 4
    recipe._run_stage(fake_stage, tmp_path / "m.csv", cfg.replace(time_budget_s=9.0),
                      dict(corpus, seed=1), [inp])                 # another corpus
    assert len(calls) == 5


def test_train_windows_leave_the_pretrain_stage_reusable(tmp_path: Path) -> None:
    """train_windows changes only X-ray / fundus training studies (no physical target): a finished
    pretrain stage is reused, a fine-tune stage is trained again."""
    from training import recipe
    calls: list[TrainConfig] = []
    fake_stage = _fake_stage(calls)

    plain = {"size": "tiny", "seed": 0, "sources": "abc"}
    windowed = dict(plain, train_windows=True)
    assert recipe.stage_corpus(windowed, "pretrain") == plain
    assert recipe.stage_corpus(windowed, "finetune") == windowed
    for stage, expected in (("pretrain", 1), ("finetune", 2)):
        n0 = len(calls)
        cfg = TrainConfig(task=stage, epochs=2, out=str(tmp_path / stage))
        recipe._run_stage(fake_stage, tmp_path / "m.csv", cfg, recipe.stage_corpus(plain, stage), [])
        recipe._run_stage(fake_stage, tmp_path / "m.csv", cfg, recipe.stage_corpus(windowed, stage), [])
        assert len(calls) - n0 == expected, stage


def test_recipe_stage_key_ignores_options_at_their_default(tmp_path: Path) -> None:
    """A stage finished before an option existed (its stored key lacks it) is reused while the
    option keeps its default, and trained again once the option is set."""
    import json

    from training import recipe
    calls: list[TrainConfig] = []
    fake_stage = _fake_stage(calls)

    cfg = TrainConfig(task="finetune", epochs=2, out=str(tmp_path / "stage"))
    corpus = {"size": "tiny", "seed": 0, "sources": "abc"}
    recipe._run_stage(fake_stage, tmp_path / "m.csv", cfg, corpus, [])
    done = tmp_path / "stage" / recipe.STAGE_DONE
    rec = json.loads(done.read_text())
    del rec["key"]["config"]["gamma_augment"]          # as written before the option existed
    done.write_text(json.dumps(rec))
    recipe._run_stage(fake_stage, tmp_path / "m.csv", cfg, corpus, [])
    assert len(calls) == 1
    recipe._run_stage(fake_stage, tmp_path / "m.csv", cfg.replace(gamma_augment=0.3), corpus, [])
    assert len(calls) == 2
    recipe._run_stage(fake_stage, tmp_path / "m.csv", cfg.replace(gamma_augment=0.0), corpus, [])
    assert len(calls) == 3                              # back to the default: that is another run again


def test_gamma_augment_is_one_monotone_curve_per_study() -> None:
    import torch

    from engines.preprocess import PreprocessConfig
    from training.data.torchdata import Item, StudyDataset

    class Cache:
        cfg = PreprocessConfig()

        def __init__(self, images: np.ndarray) -> None:
            self.images = images

        def get(self, key: str) -> "Cache":
            return self

    rng = np.random.default_rng(0)
    unit = rng.random((7, 1, 16, 16)).astype(np.float32)
    unit[3] = unit[0]                                   # two slices with the same pixels
    images = (np.repeat(unit, 3, axis=1) - 0.5) / 0.5   # the cache's normalisation
    item = Item(key="k", kind="3d", prompt=np.zeros(4, np.float32), target=0.5, sample=None)  # type: ignore[arg-type]
    torch.manual_seed(0)
    plain = StudyDataset([item], Cache(images))[0]["x"].numpy()
    assert np.array_equal(plain, images)                # off by default (evaluation)
    ds = StudyDataset([item], Cache(images), gamma=0.5)
    exps = []
    for _ in range(6):
        out = ds[0]["x"].numpy()
        u = out * 0.5 + 0.5
        assert out.shape == images.shape and u.min() >= 0.0 and u.max() <= 1.0 + 1e-6
        assert np.array_equal(out[3], out[0])          # one curve for every slice of the study
        assert np.allclose(out[:, 0], out[:, 2])        # and for every channel
        flat_in, flat_out = unit.ravel(), u[:, 0].ravel()
        order = np.argsort(flat_in, kind="stable")
        assert np.all(np.diff(flat_out[order]) >= -1e-6)   # monotone: the anatomy's order is kept
        mask = (flat_in > 0.05) & (flat_in < 0.95)
        e = np.log(flat_out[mask]) / np.log(flat_in[mask])
        assert np.allclose(e, e[0], atol=1e-3)          # a power curve u ** exp(t) ...
        exps.append(float(e[0]))
    assert all(np.exp(-0.5) - 1e-3 <= g <= np.exp(0.5) + 1e-3 for g in exps)
    assert max(exps) - min(exps) > 0.05                 # ... drawn anew per sample


# ------------------------------------------------------------------------------ recipe end to end

RECIPE = """\
preset: mediqa-test
device: cpu
output: {out}
work_dir: {work}
synth: {{size: tiny, seed: 24}}   # 4 train (2 CT / MR), 2 val, 3 test studies
common: {{batch_size: 4, seed: 0, amp: false, workers: 0, patience: 0, warmup_epochs: 0.5}}
pretrain: {{epochs: 1, lr: 2.0e-3}}
finetune: {{epochs: {ft_epochs}, lr: 2.0e-3, loss: mse+plcc}}
classifier: {{epochs: 1, lr: 2.0e-3}}
"""


def test_recipe_end_to_end_then_finish_records_the_same_metrics(tmp_path: Path) -> None:
    """The whole recipe on a tiny corpus; then its last step alone (``--finish``) on the packed
    artifact with the metrics stripped, as when a lent GPU is given back during the test evaluation."""
    import dataclasses

    from engines.artifact import save_artifact
    from training import recipe

    work, out = tmp_path / "work", tmp_path / "model.safetensors"
    y = tmp_path / "recipe.yaml"
    y.write_text(RECIPE.format(out=out, work=work, ft_epochs=2))
    res = recipe.run_recipe(y, progress=False)
    groups, card = load_tensors(out)
    assert set(groups) == {"iqa", "classifier"} and card.training["recipe_sha256"] == recipe.load_recipe(y)[1]
    assert card.metrics["test"]["overall"]["n"] >= 2 and card.metrics["val"]["n"] >= 2
    assert set(card.metrics["images_per_s"]) == {"pretrain", "finetune", "classifier"}
    assert json.loads((work / "recipe_summary.json").read_text())["metrics"]["test"] == card.metrics["test"]
    assert res["metrics"]["test"]["overall"]["srcc"] == card.metrics["test"]["overall"]["srcc"]

    cut = tmp_path / "cut.safetensors"
    save_artifact(cut, groups, dataclasses.replace(card, metrics={}), dtype="fp16")
    recipe.finish_recipe(y, cut, progress=False)
    groups2, card2 = load_tensors(cut)
    assert card2.metrics == card.metrics and card2.training == card.training
    assert all(torch.equal(groups2[m][k], groups[m][k]) for m in groups for k in groups[m])

    other = tmp_path / "other.yaml"      # another recipe did not pack it
    other.write_text(RECIPE.format(out=out, work=work, ft_epochs=3))
    with pytest.raises(ConfigError, match="not packed by other.yaml"):
        recipe.finish_recipe(other, cut, progress=False)
    rec = work / "runs" / "classifier" / recipe.STAGE_DONE   # stage records of another run
    saved = rec.read_text()
    r = json.loads(saved)
    r["outcome"]["data_summary"]["used"] = -1
    rec.write_text(json.dumps(r))
    with pytest.raises(ConfigError, match="other training data"):
        recipe.finish_recipe(y, cut, progress=False)
    rec.unlink()
    with pytest.raises(ConfigError, match="no record of the classifier stage"):
        recipe.finish_recipe(y, cut, progress=False)


def _count_evaluations(mp: pytest.MonkeyPatch) -> list[str]:
    """Wrap ``training.evaluate.evaluate_modes`` so each pass is recorded as ``split:mode,mode``
    (in call order) in the returned list."""
    from training import evaluate as ev

    calls: list[str] = []
    real = ev.evaluate_modes

    def counting(*a: Any, **k: Any) -> dict[str, Any]:
        calls.append(f"{k.get('split')}:{','.join(k['modes'])}")
        return real(*a, **k)

    mp.setattr(ev, "evaluate_modes", counting)
    return calls


def test_recipe_tta_policy_step_chooses_on_held_out_data_and_finish_reuses_it(tmp_path: Path,
                                                                             monkeypatch) -> None:
    """``tta_policy`` in a recipe: after the test record, the packed model's per-modality TTA is
    chosen on the named held-out split and written into its card (tensors unchanged); the step's
    evaluations are kept, and ``--finish`` reaches the same policy from its one test pass; bad
    sections are refused before any work."""
    import dataclasses

    from engines.artifact import save_artifact
    from engines.pipeline import file_sha256
    from training import recipe
    from training import tta_policy as tp

    for section, msg in (("{split: train}", "held-out"), ("{modes: [none]}", "tta_policy.modes"),
                         ("{modes: [d8]}", "tta_policy.modes"), ("{min_studies: many}", "min_studies"),
                         ("{splits: val}", "unknown tta_policy key")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(RECIPE.format(out=tmp_path / "x", work=tmp_path / "w", ft_epochs=1)
                       + f"tta_policy: {section}\n")
        with pytest.raises(ConfigError, match=msg):
            recipe.load_recipe(bad)
    for section, msg in (("{choose_split: train}", "held out"), ("{fit_split: val}", "two splits"),
                         ("{penalty: 0}", "penalty must be > 0"), ("{min_sources: two}", "integers"),
                         ("{alpha: 1}", "unknown feature_head key")):
        bad.write_text(RECIPE.format(out=tmp_path / "x", work=tmp_path / "w", ft_epochs=1)
                       + f"feature_head: {section}\n")
        with pytest.raises(ConfigError, match=msg):
            recipe.load_recipe(bad)

    calls = _count_evaluations(monkeypatch)
    packed_sha: list[str] = []
    real_write = tp.write_policy

    def recording_write(model_path: Any, *a: Any, **k: Any) -> Any:
        packed_sha.append(file_sha256(model_path))
        return real_write(model_path, *a, **k)

    monkeypatch.setattr(tp, "write_policy", recording_write)
    work, out = tmp_path / "work", tmp_path / "model.safetensors"
    y = tmp_path / "recipe.yaml"
    y.write_text(RECIPE.format(out=out, work=work, ft_epochs=1)
                 + "tta_policy: {split: test, modes: flip, min_studies: 1}\n"
                 + "feature_head: {choose_split: test, min_studies: 1, min_sources: 1}\n")
    res = recipe.run_recipe(y, progress=False)
    # the record and the TTA choice share one pass of the test split; the feature head reuses it
    assert calls == ["test:none,flip"]
    groups, card = load_tensors(out)
    pol = card.tta_policy
    sel = pol["selection"]
    assert sel["split"] == "test" and sel["min_studies"] == 1 and sel["modalities"]
    # every test study measured (the tiny corpus' groups are too small for a correlation: recorded so)
    assert sum(row["n"] for row in sel["modalities"].values()) == card.metrics["test"]["overall"]["n"]
    assert all(set(row["srcc"]) == {"none", "flip"} or row["note"] == "fewer than 3 studies"
               for row in sel["modalities"].values())
    assert res["tta_policy"] == pol
    assert json.loads((work / "recipe_summary.json").read_text())["tta_policy"] == pol
    assert card.metrics["test"]["overall"]["n"] >= 2           # the plain network's record stays
    # the policy was measured on the packed artifact as it was just before the card got it
    assert len(packed_sha) == 1 and sel["model_sha256"] == packed_sha[0] != file_sha256(out)
    assert sorted(p.name for p in (work / "tta-policy").iterdir()) == ["tta-flip.json", "tta-none.json"]
    # step 7: a ridge for each modality of the training studies, its choice recorded in card and summary
    fh = card.feature_head
    import csv
    import collections

    train_mods = collections.Counter(r["modality"] for r in csv.DictReader((work / "corpus" / "manifest.csv").open())
                                     if r["split"] == "train")
    assert {m: h["n_train"] for m, h in fh["heads"].items()} == dict(train_mods)
    assert fh["selection"]["fit_split"] == "train" and fh["selection"]["choose_split"] == "test"
    assert res["feature_head"] == fh and json.loads((work / "recipe_summary.json").read_text())["feature_head"] == fh

    calls.clear()                                            # --finish: the choice is made again
    cut = tmp_path / "cut.safetensors"                       # from its one pass, to the same policy
    save_artifact(cut, groups, dataclasses.replace(card, metrics={}, tta_policy={}, feature_head={}), dtype="fp16")
    recipe.finish_recipe(y, cut, progress=False)
    assert calls == ["test:none,flip"]
    groups2, card2 = load_tensors(cut)
    assert card2.tta_policy == pol and card2.metrics == card.metrics
    assert card2.feature_head["heads"] == fh["heads"]
    assert all(torch.equal(groups2[m][k], groups[m][k]) for m in groups for k in groups[m])


CONTINUE = """\
preset: mediqa-test
device: cpu
output: {out}
work_dir: {work}
base: {{artifact: {base}, sha256: {sha}}}
synth: {{size: tiny, seed: 24}}
common: {{batch_size: 4, seed: 1, amp: false, workers: 0, patience: 0, warmup_epochs: 0.5}}
finetune: {{epochs: 1, lr: 1.0e-3, loss: mse+plcc, reinit: []}}
"""


def test_continuation_recipe_fine_tunes_the_base_and_keeps_its_classifier(tmp_path: Path) -> None:
    """A recipe with ``base``: sha256 checked, no pretrain / classifier stage, the base's score head
    and classifier carried over (classifier unchanged), provenance in the card, ``--finish`` works;
    the base can come out of git."""
    import dataclasses
    import subprocess

    from engines.artifact import save_artifact
    from engines.pipeline import file_sha256
    from training import recipe

    base = tmp_path / "base.safetensors"
    y0 = tmp_path / "recipe.yaml"
    y0.write_text(RECIPE.format(out=base, work=tmp_path / "work0", ft_epochs=1))
    recipe.run_recipe(y0, progress=False)
    sha = file_sha256(base)
    b_groups, b_card = load_tensors(base)

    y = tmp_path / "continue.yaml"
    out, work = tmp_path / "cont.safetensors", tmp_path / "work"
    y.write_text(CONTINUE.format(out=out, work=work, base=base, sha="0" * 64))
    with pytest.raises(ConfigError, match="sha256"):
        recipe.run_recipe(y, progress=False)
    assert not work.exists()                                # refused before any work
    bad = tmp_path / "bad.yaml"
    bad.write_text(CONTINUE.format(out=out, work=work, base=base, sha=sha) + "pretrain: {epochs: 1}\n")
    with pytest.raises(ConfigError, match="remove \\['pretrain'\\]"):
        recipe.load_recipe(bad)

    y.write_text(CONTINUE.format(out=out, work=work, base=base, sha=sha))
    recipe.run_recipe(y, progress=False)
    groups, card = load_tensors(out)
    assert all(torch.equal(groups["classifier"][k], b_groups["classifier"][k]) for k in b_groups["classifier"])
    assert any(not torch.equal(groups["iqa"][k], b_groups["iqa"][k]) for k in b_groups["iqa"])
    assert card.training["base"]["sha256"] == sha
    assert card.training["base"]["recipe_sha256"] == b_card.training["recipe_sha256"]
    assert card.training["finetune"]["from_checkpoint"] == str(base)
    assert card.data_summary["base"] == b_card.data_summary and card.classifier_preset == b_card.classifier_preset
    assert set(card.metrics["images_per_s"]) == {"finetune"} and card.metrics["test"]["overall"]["n"] >= 2
    assert not (work / "runs" / "pretrain").exists() and not (work / "runs" / "classifier").exists()
    handover = card.data_summary["finetune"]["handover"]
    assert handover["reinitialised"] == 0 and handover["loaded"] > 0   # the score head came along

    cut = tmp_path / "cut.safetensors"
    save_artifact(cut, groups, dataclasses.replace(card, metrics={}), dtype="fp16")
    recipe.finish_recipe(y, cut, progress=False)
    assert load_tensors(cut)[1].metrics == card.metrics

    repo = tmp_path / "repo"                                  # base.git: extracted with git show
    repo.mkdir()
    (repo / "m.safetensors").write_bytes(base.read_bytes())
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "PATH": os.environ.get("PATH", "")}
    for cmd in (["init", "-q"], ["add", "m.safetensors"], ["commit", "-q", "-m", "base"]):
        subprocess.run(["git", "-C", str(repo), *cmd], check=True, env=env)
    (repo / "m.safetensors").unlink()
    got = recipe.ensure_base(repo / "r.yaml", {"artifact": str(tmp_path / "x" / "got.safetensors"),
                                               "sha256": sha, "git": "HEAD:m.safetensors"})
    assert file_sha256(got) == sha
    with pytest.raises(ConfigError, match="git show"):
        recipe.ensure_base(repo / "r.yaml", {"artifact": str(tmp_path / "none.safetensors"), "sha256": sha,
                                             "git": "HEAD:missing.safetensors"})


SOUP = """\
preset: mediqa-test
device: cpu
output: {out}
work_dir: {work}
soup:
  members:
{members}
synth: {{size: tiny, seed: 24}}
common: {{batch_size: 4, workers: 0}}
"""


def test_soup_recipe_averages_sibling_networks_and_refuses_what_cannot_share_a_card(tmp_path: Path) -> None:
    """A ``soup`` recipe: members checked by sha256, the IQA network the mean of the members'
    (fp16 of the float32 mean), their common classifier kept bit for bit, provenance of each
    member and a validation metric in the card that re-evaluating the artifact reproduces; a
    member with another classifier, fewer than two members, or training sections are refused."""
    from engines.pipeline import file_sha256
    from training import recipe
    from training.evaluate import evaluate_model

    base = tmp_path / "base.safetensors"
    y0 = tmp_path / "recipe.yaml"
    y0.write_text(RECIPE.format(out=base, work=tmp_path / "work0", ft_epochs=1))
    recipe.run_recipe(y0, progress=False)
    kids = []
    for seed in (1, 2):                                   # two siblings of one base (another shuffle)
        y = tmp_path / f"kid{seed}.yaml"
        kid = tmp_path / f"kid{seed}.safetensors"
        y.write_text(CONTINUE.format(out=kid, work=tmp_path / f"w{seed}", base=base, sha=file_sha256(base))
                     .replace("seed: 1,", f"seed: {seed},"))
        recipe.run_recipe(y, progress=False)
        kids.append(kid)
    (a, ca), (b, cb) = load_tensors(kids[0]), load_tensors(kids[1])
    assert any(not torch.equal(a["iqa"][k], b["iqa"][k]) for k in a["iqa"])   # the seeds did differ

    def members(paths: list[Path]) -> str:
        return "\n".join(f"  - {{artifact: {p}, sha256: {file_sha256(p)}}}" for p in paths)

    out, work = tmp_path / "soup.safetensors", tmp_path / "wsoup"
    y = tmp_path / "soup.yaml"
    y.write_text(SOUP.format(out=out, work=work, members=members(kids))
                 + "tta_policy: {split: val, modes: flip, min_studies: 1}\n")
    with pytest.MonkeyPatch.context() as mp:
        calls = _count_evaluations(mp)
        recipe.run_recipe(y, progress=False)
    # validation read once, for the card's plain metric and the TTA choice; test once, plain
    assert calls == ["val:none,flip", "test:none"]
    groups, card = load_tensors(out)
    assert card.tta_policy["selection"]["split"] == "val"
    assert sorted(p.name for p in (work / "tta-policy").iterdir()) == ["tta-flip.json", "tta-none.json"]
    for k, t in groups["iqa"].items():
        if t.is_floating_point():
            mean = ((a["iqa"][k].float() + b["iqa"][k].float()) / 2).half()
            assert torch.equal(t, mean), k
    assert all(torch.equal(groups["classifier"][k], a["classifier"][k]) for k in a["classifier"])
    assert [m["sha256"] for m in card.training["soup"]] == [file_sha256(p) for p in kids]
    assert card.training["soup"][0]["base"]["sha256"] == file_sha256(base)
    assert card.data_summary["members"] == [ca.data_summary, cb.data_summary]
    val = evaluate_model(out, work / "corpus" / "manifest.csv", split="val", tta="none", progress=False)
    assert card.metrics["val"]["srcc"] == pytest.approx(val["overall"]["srcc"])
    assert card.metrics["test"]["overall"]["n"] >= 2
    with pytest.raises(ConfigError, match="soup recipe"):
        recipe.finish_recipe(y, out, progress=False)

    other = tmp_path / "other.safetensors"
    y1 = tmp_path / "other.yaml"
    y1.write_text(RECIPE.format(out=other, work=tmp_path / "work1", ft_epochs=1).replace("seed: 0,", "seed: 5,"))
    recipe.run_recipe(y1, progress=False)
    y.write_text(SOUP.format(out=out, work=work, members=members([kids[0], other])))
    with pytest.raises(ConfigError, match="different classifier weights"):
        recipe.run_recipe(y, progress=False)
    y.write_text(SOUP.format(out=out, work=work, members=members([kids[0]])))
    with pytest.raises(ConfigError, match="at least two"):
        recipe.load_recipe(y)
    y.write_text(SOUP.format(out=out, work=work, members=members(kids)) + "finetune: {epochs: 1}\n")
    with pytest.raises(ConfigError, match="trains nothing"):
        recipe.load_recipe(y)


# ------------------------------------------------------------------------------ loader workers

def test_loader_workers_every_study_once_augmented_and_reproducible(corpus: Path, tmp_path: Path) -> None:
    """With DataLoader worker processes (``loader_workers``) every study still comes once per
    epoch, augmented, and a run is reproducible for its seed (workers draw their augmentations
    from seeds the loader's generator hands out)."""
    from engines.prompts import DEFAULT_VOCAB
    from training.data.datasets import read_manifest
    from training.tasks import _cache, _loader, build_items

    assert TrainConfig().loader_workers == 0
    with pytest.raises(ConfigError, match="loader_workers"):
        TrainConfig(loader_workers=-1)

    samples, report = read_manifest(corpus)
    base = TrainConfig(task="finetune", out=str(tmp_path), rot90_augment=True, **FAST)
    from engines.models.presets import get_preset
    cache = _cache(base, get_preset("mediqa-test").preprocess_config())
    items = build_items([s for s in samples if s.split == "train"], base, cache, DEFAULT_VOCAB, report,
                        lambda s: s.target)

    def epoch(nw: int) -> list[tuple[int, torch.Tensor]]:
        out = []
        for b in _loader(items, cache, base.replace(loader_workers=nw), train=True):
            for kind, name in (("2d", "images"), ("3d", "volumes")):
                if b[kind] is not None:
                    out += list(zip(b[kind]["index"].tolist(), b[kind][name]))
        return out

    e0, e2, again = epoch(0), epoch(2), epoch(2)
    assert sorted(i for i, _ in e2) == sorted(i for i, _ in e0) == list(range(len(items)))
    assert [i for i, _ in e2] == [i for i, _ in again] and all(torch.equal(a, b) for (_, a), (_, b) in zip(e2, again))
    # each input is one of the 8 flips / rotations of its cached image, and not all are the identity
    changed = 0
    for i, x in e2:
        ref = torch.from_numpy(cache.get(items[i].key).images)
        views = [torch.rot90(r, k, dims=(-2, -1)) for r in (ref, ref.flip(-1)) for k in range(4)]
        assert any(torch.equal(x, v) for v in views)
        changed += not torch.equal(x, ref)
    assert changed > 0


def test_grouped_batch_sampler_homogeneous_complete_and_reproducible() -> None:
    """Every index once per epoch, each batch from one group, no batch of one where avoidable,
    the same batches for the same seed and other ones for another seed."""
    from training.data.torchdata import GroupedBatchSampler

    groups = ["ct"] * 17 + ["mr"] * 5 + ["fundus"] * 33 + ["xray"]

    def epoch(seed: int) -> list[list[int]]:
        return list(GroupedBatchSampler(groups, 8, torch.Generator().manual_seed(seed)))

    a, b, c = epoch(1), epoch(1), epoch(2)
    assert sorted(i for batch in a for i in batch) == list(range(len(groups)))
    assert all(len({groups[i] for i in batch}) == 1 for batch in a)
    assert len(a) == len(GroupedBatchSampler(groups, 8)) == 3 + 1 + 5 + 1
    assert sorted(len(x) for x in a if groups[x[0]] == "ct") == [5, 6, 6]   # 17 → 6 + 6 + 5, not 8 + 8 + 1
    assert max(len(x) for x in a) <= 8
    assert a == b and a != c
    # batches of the different groups are interleaved, not one group after the other
    order = [groups[x[0]] for x in a]
    assert order != sorted(order, key=order.index)
    with pytest.raises(ValueError):
        GroupedBatchSampler(groups, 0)


def test_batch_group_modality_gives_single_modality_training_batches(corpus: Path, tmp_path: Path) -> None:
    """``batch_group: modality``: the training loader's batches hold one modality each (the test
    corpus mixes CT and fundus, so shuffled batches of 4 would mix them); validation loaders keep
    the plain order; unknown values are refused."""
    from engines.models.presets import get_preset
    from engines.prompts import DEFAULT_VOCAB
    from training.data.datasets import read_manifest
    from training.tasks import _cache, _loader, build_items

    with pytest.raises(ConfigError, match="batch_group"):
        TrainConfig(batch_group="region-ish")
    assert TrainConfig().batch_group is None
    samples, report = read_manifest(corpus)
    cfg = TrainConfig(task="finetune", out=str(tmp_path), **FAST)
    cache = _cache(cfg, get_preset("mediqa-test").preprocess_config())
    items = build_items(samples, cfg, cache, DEFAULT_VOCAB, report, lambda s: s.target)
    mods = [it.prompt_values["modality"] for it in items]
    assert len(set(mods)) >= 2

    def batches(c: TrainConfig, train: bool) -> list[list[int]]:
        out = []
        for b in _loader(items, cache, c, train=train):
            out.append([i for kind in ("2d", "3d") if b[kind] is not None for i in b[kind]["index"].tolist()])
        return out

    grouped = batches(cfg.replace(batch_group="modality"), True)
    assert sorted(i for x in grouped for i in x) == list(range(len(items)))
    assert all(len({mods[i] for i in x}) == 1 for x in grouped)
    mixed = [batches(cfg.replace(seed=s), True) for s in range(5)]
    assert any(len({mods[i] for i in x}) > 1 for run in mixed for x in run)
    assert batches(cfg.replace(batch_group="modality"), False) == batches(cfg, False)


def test_shipped_recipes_validate_and_the_bundled_card_names_them_byte_for_byte() -> None:
    """Every recipe in training/recipes parses (keys, values, base section), and the bundled
    model's card names a recipe there whose bytes still hash to the card's sha256 (and so do its
    base's recipe, or its soup members' recipes and their bases'): editing a shipped recipe breaks `mediqa train recipe --finish` and the model's
    provenance, and this test says so."""
    import hashlib

    from engines.artifact import bundled_model_path
    from training.recipe import _corpus_summary, load_recipe

    recipes = Path(__file__).resolve().parents[1] / "training" / "recipes"
    paths = sorted(recipes.glob("*.yaml"))
    assert len(paths) >= 3
    for p in paths:
        d, sha = load_recipe(p)
        assert sha == hashlib.sha256(p.read_bytes()).hexdigest()
        assert d.get("preset")
    training = load_card(bundled_model_path()).training
    chain = [training] + ([training["base"]] if isinstance(training.get("base"), dict) else [])
    for member in training.get("soup") or []:   # a soup: each member's recipe and that recipe's base
        chain += [member] + ([member["base"]] if isinstance(member.get("base"), dict) else [])
    for link in chain:
        p = recipes / link["recipe"]
        assert p.is_file(), f"the bundled card names {link['recipe']}, not in training/recipes"
        assert hashlib.sha256(p.read_bytes()).hexdigest() == link["recipe_sha256"], f"{p.name} was edited"
    d, _ = load_recipe(recipes / training["recipe"])
    # the card's corpus summary is what its recipe gives today (the generator options' table
    # keeps the summaries of models made before an option existed)
    assert _corpus_summary(d) == load_card(bundled_model_path()).data_summary["corpus"]
    if "base" in training:   # a continuation: its recipe's base is the base the card records
        assert d["base"]["sha256"] == training["base"]["sha256"]
    if "soup" in training:   # a soup: its recipe's members are the members the card records
        assert [m["sha256"] for m in d["soup"]["members"]] == [m["sha256"] for m in training["soup"]]


def test_soup_maps_a_member_with_another_label_range_onto_the_first_only_when_asked(tmp_path: Path) -> None:
    """``align_label_scale``: a member whose labels were scaled to another [min, max] has the last
    Linear of its score head mapped so that its label-unit outputs are unchanged, then averaged;
    without it, or with another label name, it is refused; the map is in the returned card."""
    import dataclasses

    from engines.artifact import save_artifact
    from training.soup import average_iqa, map_label_scale

    torch.manual_seed(0)
    card = ModelCard(task="iqa", preset="mediqa-test", prompt_vocab={}, preprocess={},
                     label_scale={"min": 0.0, "max": 1.0, "name": "score"})
    wide = dataclasses.replace(card, label_scale={"min": -1.0, "max": 1.0, "name": "score"})
    cls = {"w": torch.ones(2)}

    def head() -> dict[str, torch.Tensor]:
        return {"score_head.0.weight": torch.randn(4, 3), "score_head.0.bias": torch.randn(4),
                "score_head.3.weight": torch.randn(1, 4), "score_head.3.bias": torch.tensor([20.0]),   # above the floor
                "weight_head.3.weight": torch.randn(1, 4), "weight_head.3.bias": torch.randn(1)}

    ha, hb = head(), head()
    a = save_artifact(tmp_path / "a.safetensors", {"iqa": ha, "classifier": cls}, card)
    b = save_artifact(tmp_path / "b.safetensors", {"iqa": hb, "classifier": cls}, wide)
    with pytest.raises(ConfigError, match="label_scale"):
        average_iqa([a, b])
    modules, cards = average_iqa([a, b], align_label_scale=True)
    assert cards[1].training["label_scale_map"] == {"a": 2.0, "b": -1.0, "from": dict(wide.label_scale)}
    mapped = {k: (2 * modules["iqa"][k] - ha[k]) for k in ha}             # b's mapped tensors, back out of the mean
    assert torch.allclose(mapped["score_head.3.weight"], 2 * hb["score_head.3.weight"], atol=1e-5)
    assert torch.allclose(mapped["score_head.3.bias"], 2 * hb["score_head.3.bias"] - 1, atol=1e-5)
    for k in ("score_head.0.weight", "weight_head.3.weight", "weight_head.3.bias"):   # the rest: as stored
        assert torch.allclose(mapped[k], hb[k], atol=1e-5)
    # in label units: a weighted mean of ReLU(last Linear) token scores maps exactly above the floor
    x = torch.relu(torch.randn(16, 4)) + 1.0
    w = torch.rand(16) + 0.1
    def label(h: dict[str, torch.Tensor], lo: float, hi: float) -> torch.Tensor:
        s = torch.relu(x @ h["score_head.3.weight"].T + h["score_head.3.bias"]).squeeze(-1)
        return lo + (w * s).sum() / w.sum() * (hi - lo)
    m, _, _ = map_label_scale(hb, wide, card)
    assert label(m, 0.0, 1.0) == pytest.approx(float(label(hb, -1.0, 1.0)), abs=1e-5)
    other = dataclasses.replace(card, label_scale={"min": 0.0, "max": 2.0, "name": "mAs"})
    c = save_artifact(tmp_path / "c.safetensors", {"iqa": head(), "classifier": cls}, other)
    with pytest.raises(ConfigError, match="different things"):
        average_iqa([a, c], align_label_scale=True)
    with pytest.raises(ConfigError, match="no score head"):
        map_label_scale({"w": torch.ones(1)}, wide, card)


def test_soup_average_of_tensors_counters_and_fixed_indices(tmp_path: Path) -> None:
    """``average_iqa`` on hand-made members: floating tensors (fp16 stored) are averaged in float32,
    a batch-norm counter takes the largest value, any other integer tensor must agree, and card
    fields that one card cannot hold twice are refused by name."""
    import dataclasses

    from engines.artifact import save_artifact
    from training.soup import average_iqa

    card = ModelCard(task="iqa", preset="mediqa-test", prompt_vocab={}, preprocess={}, label_scale={})
    cls = {"w": torch.ones(2)}

    def member(name: str, w: list[float], count: int, index: list[int], c: ModelCard = card) -> Path:
        iqa = {"w": torch.tensor(w), "bn.num_batches_tracked": torch.tensor(count), "rel_index": torch.tensor(index)}
        return save_artifact(tmp_path / f"{name}.safetensors", {"iqa": iqa, "classifier": cls}, c, dtype="fp16")

    a, b = member("a", [1.0, 3.0], 10, [0, 1]), member("b", [2.0, 0.5], 30, [0, 1])
    modules, cards = average_iqa([a, b])
    assert modules["iqa"]["w"].dtype == torch.float32
    assert torch.allclose(modules["iqa"]["w"], torch.tensor([1.5, 1.75]))
    assert int(modules["iqa"]["bn.num_batches_tracked"]) == 30
    assert torch.equal(modules["iqa"]["rel_index"], torch.tensor([0, 1])) and len(cards) == 2
    with pytest.raises(ConfigError, match="rel_index differs"):
        average_iqa([a, member("c", [0.0, 0.0], 1, [1, 0])])
    with pytest.raises(ConfigError, match="label_scale"):
        average_iqa([a, member("d", [0.0, 0.0], 1, [0, 1], dataclasses.replace(card, label_scale={"max": 5}))])
    with pytest.raises(ConfigError, match="at least two"):
        average_iqa([a])
    cls = {"w": torch.ones(2), "b": torch.zeros(1)}                   # a classifier with another layout
    with pytest.raises(ConfigError, match="different classifier tensors"):
        average_iqa([a, member("e", [0.0, 0.0], 1, [0, 1])])


def test_modality_repeat_draws_a_modality_several_times_per_epoch(corpus: Path, tmp_path: Path) -> None:
    """``modality_repeat: {fundus: 3}``: each fundus training study appears three times per epoch,
    every other study once, in an order that mixes modalities; the loader's length (the schedule's
    steps) counts the copies; validation loaders are untouched; bad values and a modality no
    training study has are refused; YAML's mapping round-trips through the card's dict."""
    from engines.models.presets import get_preset
    from engines.prompts import DEFAULT_VOCAB
    from training.config import merge_config
    from training.data.datasets import read_manifest
    from training.data.torchdata import RepeatSampler
    from training.tasks import _cache, _loader, build_items

    for bad in ({"mr": 0}, {"mr": 1.5}, {"mr": True}, ["mr"]):
        with pytest.raises(ConfigError, match="modality_repeat"):
            merge_config(TrainConfig(), {"modality_repeat": bad})
    with pytest.raises(ConfigError, match="modality_repeat"):
        TrainConfig(modality_repeat=(("mr", 2),), batch_group="modality")
    with pytest.raises(ConfigError, match="modality_repeat"):
        TrainConfig(modality_repeat=(("mr", 2),), loss="mse+pairdiff")
    c = merge_config(TrainConfig(), {"modality_repeat": {"MR": 3, "ct": 2}})
    assert c.modality_repeat == (("ct", 2), ("mr", 3))
    assert c.to_dict()["modality_repeat"] == {"ct": 2, "mr": 3}
    assert merge_config(TrainConfig(), {"modality_repeat": c.to_dict()["modality_repeat"]}) == c
    with pytest.raises(ValueError):
        RepeatSampler([1, 0, 2])

    samples, report = read_manifest(corpus)
    cfg = TrainConfig(task="finetune", out=str(tmp_path), **FAST)
    cache = _cache(cfg, get_preset("mediqa-test").preprocess_config())
    items = build_items(samples, cfg, cache, DEFAULT_VOCAB, report, lambda s: s.target)
    mods = [it.prompt_values["modality"] for it in items]
    assert "fundus" in mods and len(set(mods)) >= 2

    def batches(c: TrainConfig, train: bool) -> list[list[int]]:
        loader = _loader(items, cache, c, train=train)
        out = [[i for kind in ("2d", "3d") if b[kind] is not None for i in b[kind]["index"].tolist()]
               for b in loader]
        assert len(loader) == len(out)
        return out

    rep = cfg.replace(modality_repeat={"fundus": 3})
    drawn = batches(rep, True)
    flat = sorted(i for x in drawn for i in x)
    want = sorted(i for i, m in enumerate(mods) for _ in range(3 if m == "fundus" else 1))
    assert flat == want
    assert len(drawn) == -(-len(want) // cfg.batch_size)
    assert any(len({mods[i] for i in x}) > 1 for x in drawn)
    assert batches(rep, True) == drawn                      # one seed, one order
    assert batches(rep.replace(seed=cfg.seed + 1), True) != drawn
    assert batches(rep, False) == batches(cfg, False)
    with pytest.raises(ConfigError, match="no training study"):
        batches(cfg.replace(modality_repeat={"mri": 2}), True)


def test_within_modality_srcc_is_the_mean_over_modalities_not_the_pooled_order() -> None:
    """Two modalities each ranked perfectly but offset against each other, and one reversed: the
    pooled SRCC says little, ``srcc_within`` is the mean of the per-modality SRCCs; too small
    groups and studies without a modality are left out."""
    from training.evaluate import MIN_GROUP
    from training.loop import within_modality_srcc

    n = max(MIN_GROUP, 5)
    t = np.linspace(0.0, 1.0, n)
    pred = np.concatenate([t + 5.0, t, -t, [0.3] * (MIN_GROUP - 1), [9.0]])
    target = np.concatenate([t, t, t, np.linspace(0, 1, MIN_GROUP - 1), [0.5]])
    modality = ["ct"] * n + ["mr"] * n + ["xr"] * n + ["fundus"] * (MIN_GROUP - 1) + [None]
    out = within_modality_srcc(pred, target, modality)
    assert set(out) == {"srcc.ct", "srcc.mr", "srcc.xr", "srcc_within"}
    assert out["srcc.ct"] == pytest.approx(1.0) and out["srcc.xr"] == pytest.approx(-1.0)
    assert out["srcc_within"] == pytest.approx(1.0 / 3.0)
    assert within_modality_srcc(pred[:2], target[:2], [None, None]) == {}


@pytest.mark.parametrize("select, expected", [("primary", 2), ("srcc_within", 1)])
def test_select_picks_the_kept_epoch_by_the_within_modality_mean(corpus: Path, tmp_path: Path, monkeypatch,
                                                                   select: str, expected: int) -> None:
    """``select: srcc_within`` keeps the epoch with the best mean within-modality validation SRCC
    (epoch 1 here), ``primary`` the best pooled one (epoch 2); a validation without modalities
    falls back to the pooled SRCC. Validation is scripted (the tiny corpus's split holds 2)."""
    import training.loop as loop

    script = iter([{"srcc": 0.5, "srcc_within": 0.8}, {"srcc": 0.7, "srcc_within": 0.6},
                   {"srcc": 0.6, "srcc_within": 0.7}])
    monkeypatch.setattr(loop, "validate", lambda *a, **k: dict(next(script)))
    cfg = TrainConfig(task="finetune", epochs=3, out=str(tmp_path), select=select, **FAST)
    out = run_finetune(corpus, cfg)
    card = load_card(out.artifact)
    assert card.metrics["best_epoch"] == [expected]
    assert card.metrics["val"]["srcc_within"] == {1: 0.8, 2: 0.6}[expected]
    with pytest.raises(ConfigError, match="select"):
        TrainConfig(task="finetune", select="plcc")
    with pytest.raises(ConfigError, match="srcc_within"):
        TrainConfig(task="classifier", select="srcc_within")


def test_select_srcc_within_without_modalities_falls_back_to_the_pooled_srcc(corpus: Path, tmp_path: Path,
                                                                              monkeypatch, caplog) -> None:
    import training.loop as loop

    script = iter([{"srcc": 0.5}, {"srcc": 0.7}])
    monkeypatch.setattr(loop, "validate", lambda *a, **k: dict(next(script)))
    cfg = TrainConfig(task="finetune", epochs=2, out=str(tmp_path), select="srcc_within", **FAST)
    with caplog.at_level(logging.WARNING, logger="training.loop"):
        out = run_finetune(corpus, cfg)
    assert load_card(out.artifact).metrics["best_epoch"] == [2]
    assert "no srcc_within" in caplog.text


def test_a_validation_without_the_primary_metric_is_named_as_such(corpus: Path, tmp_path: Path, monkeypatch,
                                                                   caplog) -> None:
    """A validation that returns no pooled SRCC (nothing scored) is reported as that, not as a
    missing prompt modality, and such an epoch is never kept over one that was judged."""
    import training.loop as loop

    script = iter([{"srcc": 0.4}, {}])
    monkeypatch.setattr(loop, "validate", lambda *a, **k: dict(next(script)))
    cfg = TrainConfig(task="finetune", epochs=2, out=str(tmp_path), **FAST)
    with caplog.at_level(logging.WARNING, logger="training.loop"):
        out = run_finetune(corpus, cfg)
    assert load_card(out.artifact).metrics["best_epoch"] == [1]
    assert "gave no srcc" in caplog.text and "modalities" not in caplog.text
