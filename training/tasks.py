"""Entry points: pretrain (physical targets), fine-tune (quality scores), prompt classifier.

Each function loads its data (``training.data.datasets``), splits it by group
(``training.data.splits``), prepares every study once through the scoring path
(``training.data.cache``), trains with :func:`training.loop.fit`, evaluates the best epoch on
the test split and writes ``<out>/model.safetensors`` — an artifact whose card records the
preset, vocabulary, preprocessing, label scale, data summary, metrics and configuration.

**Pretrain → fine-tune hand-over** (``--from``): every tensor of the pretrained artifact whose
name and shape match the new model is loaded — the ViT encoder, both transposed-attention
stages, the 1×1 reductions, the Swin stages *with their prompt FCs*, the patch-weight head and
the slice-fusion head. Then the modules named in ``TrainConfig.reinit`` (default: the score
head, ``score_head``) are re-initialised: in pretraining that head regressed a normalised
dose / field strength, which is a different quantity from an expert score; everything that
decides *where* to look (patch weights, slice weights) and *what* the features mean carries over.
A ``--from`` artifact of another preset is refused (``UnsupportedArtifact``).

**Ensembles** (paper "Ours-e"): ``seeds = N > 1`` trains N members with seeds ``seed … seed+N-1``
(each in ``<out>/member<i>``) and writes one artifact with modules ``iqa.0 … iqa.{N-1}`` and
``ensemble_size = N``; scoring averages them (``EnsembleNet``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from engines.errors import ConfigError, DatasetError, UnsupportedArtifact
from training.config import TrainConfig
from training.data.datasets import (DatasetReport, Sample, TargetNormaliser, classifier_labels, load_scored,
                                    load_unscored, pretrain_samples, resolve_prompt)
from training.data.splits import assign_splits

logger = logging.getLogger(__name__)

MODEL_NAME = "model.safetensors"
SUMMARY_NAME = "summary.json"


@dataclass
class TrainOutcome:
    """What a task run produced."""

    artifact: Path
    metrics: dict[str, Any]
    data_summary: dict[str, Any]
    images_per_s: float
    members: list[Path]


# --------------------------------------------------------------------------------------------
# Data preparation

def _cache(cfg: TrainConfig, pcfg: Any) -> Any:
    from training.data.cache import InputCache  # noqa: PLC0415

    if cfg.cache_dir == "memory":
        return InputCache(pcfg)
    return InputCache(pcfg, directory=Path(cfg.cache_dir) if cfg.cache_dir else cfg.out_path / "cache")


def build_items(samples: list[Sample], cfg: TrainConfig, cache: Any, vocab: Any, report: DatasetReport,
                target_fn: Callable[[Sample], float | None], *, description: str = "preparing") -> list[Any]:
    """Prepare each study once (cached) and attach its prompt vector, target and class labels.

    Studies that fail to decode are reported, skipped and counted in ``report``; studies whose
    target_fn returns None are skipped likewise.
    """
    from engines.prompts import Prompt, encode_prompt  # noqa: PLC0415
    from training.data.cache import PrepJob  # noqa: PLC0415
    from training.data.torchdata import IGNORE, Item  # noqa: PLC0415
    from training.loop import _progress  # noqa: PLC0415

    jobs = [PrepJob(s.ref, cfg.k_slices, s.labels.get("type")) for s in samples]
    with _progress(cfg.progress) as prog:
        tid = prog.add_task(description, total=len(jobs), loss="-", val="") if prog else None
        keys, errors = cache.prepare(jobs, workers=cfg.workers,
                                     on_done=(lambda: prog.update(tid, advance=1)) if prog else None)
    items = []
    for s, key, err in zip(samples, keys, errors):
        if key is None:
            report.skip(s.path, err or "internal")
            continue
        target = target_fn(s)
        if target is None:
            continue
        tags = cache.info(key)["tag_prompts"]
        values, sources = resolve_prompt(s, tags)
        cl = classifier_labels(s, tags)
        labels = tuple(vocab.index(g, cl[g]) if cl[g] else IGNORE for g in ("modality", "region", "type"))
        items.append(Item(key=key, kind=s.dimension, prompt=encode_prompt(Prompt(**values), vocab),
                          target=float(target), sample=s, labels=labels,  # type: ignore[arg-type]
                          prompt_values=values, prompt_sources=sources))
    return items


def _split(samples: list[Sample], cfg: TrainConfig) -> dict[str, list[Sample]]:
    parts = assign_splits(samples, cfg.split_ratios, cfg.split_salt)
    if cfg.max_items is not None:
        parts["train"] = parts["train"][: cfg.max_items]
        parts["val"] = parts["val"][: max(2, cfg.max_items // 4)]
        parts["test"] = parts["test"][: max(2, cfg.max_items // 4)]
    if not parts["train"]:
        raise DatasetError("the training split is empty; add data or change split_ratios")
    logger.info("split: %s", {k: len(v) for k, v in parts.items()})
    return parts


def _loader(items: list[Any], cache: Any, cfg: TrainConfig, *, train: bool) -> Any:
    import torch  # noqa: PLC0415
    from torch.utils.data import DataLoader  # noqa: PLC0415

    from training.data.torchdata import (ContentBatchSampler, GroupedBatchSampler,  # noqa: PLC0415
                                         RepeatSampler, StudyDataset, collate_studies)

    if not items:
        return None
    gen = torch.Generator().manual_seed(cfg.seed)
    nw = int(cfg.loader_workers)
    # Workers draw their augmentations from seeds the loader's generator hands out, so a run stays
    # reproducible for a given loader_workers (but not across different values).
    batching: dict[str, Any] = {"batch_size": cfg.batch_size, "shuffle": train, "generator": gen if train else None}
    if train and cfg.batch_group is not None:
        groups = [it.prompt_values.get(cfg.batch_group, "other") for it in items]
        batching = {"batch_sampler": GroupedBatchSampler(groups, cfg.batch_size, gen), "generator": gen}
    if train and cfg.modality_repeat is not None:   # config: no batch_group, no pairdiff
        times = dict(cfg.modality_repeat)
        mods = [str(it.prompt_values.get("modality", "other")).lower() for it in items]
        unknown = sorted(set(times) - set(mods))
        if unknown:
            raise ConfigError(f"modality_repeat names {unknown}, which no training study has "
                              f"(training modalities: {sorted(set(mods))})")
        repeats = [times.get(m, 1) for m in mods]
        logger.info("modality_repeat %s: %d training studies drawn as %d per epoch", times, len(items), sum(repeats))
        batching = {"batch_size": cfg.batch_size, "sampler": RepeatSampler(repeats, gen), "generator": gen}
    dataset = StudyDataset(items, cache, flip=train and cfg.flip_augment, rot90=train and cfg.rot90_augment,
                           gamma=cfg.gamma_augment if train else 0.0)
    if train and cfg.loss.endswith("pairdiff"):   # siblings in one batch (config: no batch_group)
        batching = {"batch_sampler": ContentBatchSampler(dataset.content, cfg.batch_size, gen), "generator": gen}
    return DataLoader(dataset, **batching,
                      collate_fn=collate_studies,
                      pin_memory=cfg.device.startswith("cuda"), num_workers=nw,
                      persistent_workers=nw > 0, prefetch_factor=4 if nw > 0 else None)


def _split_summary(report: DatasetReport, items: dict[str, list[Any]]) -> dict[str, Any]:
    d = report.to_dict()
    d["source"] = Path(d["source"]).name   # no absolute paths in a shipped card
    d["splits"] = {k: len(v) for k, v in items.items()}
    by: dict[str, dict[str, int]] = {}
    for its in items.values():
        for it in its:
            for g in ("dimension", "modality"):
                v = it.prompt_values.get(g, "other")
                by.setdefault(g, {})[v] = by.setdefault(g, {}).get(v, 0) + 1
    d["by_group"] = by
    return d


# --------------------------------------------------------------------------------------------
# Models and cards

def check_base_preset(base: str | None, preset: str, name: str) -> None:
    """UnsupportedArtifact unless an artifact of preset ``base`` can start a run of ``preset``:
    the same preset, or the one ``preset`` grows from (``PresetConfig.grows_from``)."""
    from engines.models.presets import get_preset  # noqa: PLC0415

    if base == preset or (base is not None and get_preset(preset).grows_from == base):
        return
    raise UnsupportedArtifact(f"{name} was trained with preset {base!r}; this run uses "
                              f"{preset!r} (pass --preset {base} or another checkpoint)")


def load_pretrained_into(model: Any, path: str | Path, preset: str, reinit: tuple[str, ...]) -> dict[str, int]:
    """Load a pretrained artifact's matching tensors into ``model``; re-initialise ``reinit``.

    Returns counts {"loaded", "skipped", "reinitialised"} (+ "added": the new tensors of a preset
    grown from the artifact's, which keep their initialisation). Raises UnsupportedArtifact for an
    artifact of another preset or one without IQA tensors.
    """
    import torch  # noqa: PLC0415

    from engines.artifact import load_tensors  # noqa: PLC0415

    groups, card = load_tensors(path)
    check_base_preset(card.preset, preset, Path(path).name)
    state = groups.get("iqa") or groups.get("iqa.0")
    if state is None:
        raise UnsupportedArtifact(f"{Path(path).name} holds no IQA model (task {card.task!r})")
    own = model.state_dict()
    ok = {k: v.to(own[k].dtype) for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    model.load_state_dict(ok, strict=False)
    added = [k for k in own if k not in state]
    if card.preset != preset:
        # a grown preset: every tensor of the base must have found its place, the rest are new
        if len(ok) != len(state):
            raise UnsupportedArtifact(f"{Path(path).name}: {len(state) - len(ok)} of its tensors do not fit "
                                      f"preset {preset!r}, which should hold all of {card.preset!r}")
        logger.info("grew %s (preset %s) into %s: %d new tensors keep their initialisation (e.g. %s)",
                    Path(path).name, card.preset, preset, len(added), added[0] if added else "-")
    n_reinit = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if name and any(frag and frag in name.split(".")[0] for frag in reinit):
                if isinstance(module, torch.nn.Linear):   # the model's own init (timm-style)
                    torch.nn.init.trunc_normal_(module.weight, std=0.02)
                    if module.bias is not None:
                        torch.nn.init.zeros_(module.bias)
                    n_reinit += 1
                elif hasattr(module, "reset_parameters") and not list(module.children()):
                    module.reset_parameters()
                    n_reinit += 1
    counts = {"loaded": len(ok), "skipped": len(state) - len(ok), "reinitialised": n_reinit}
    if card.preset != preset:
        counts["added"] = len(added)
    logger.info("hand-over from %s: %s", path, counts)
    return counts


def init_score_bias(model: Any, value: float) -> None:
    """Start a fresh score head at ``value`` (the mean training target in [0, 1]).

    The head ends in Linear → ReLU with small weights, so every patch score starts at about its
    last bias; starting at the data mean keeps the ReLU active (a head whose pre-activations
    all turn negative stops learning: constant predictions) and the first MSE small.
    """
    import torch  # noqa: PLC0415

    head = getattr(model, "score_head", None)
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)] if head is not None else []
    if linears and linears[-1].bias is not None:
        with torch.no_grad():
            linears[-1].bias.fill_(float(value))


def _card(task: str, cfg: TrainConfig, pcfg: Any, vocab: Any, label_scale: dict[str, Any],
          data_summary: dict[str, Any], metrics: dict[str, Any], extra: dict[str, Any] | None = None,
          *, ensemble_size: int = 1, classifier_preset: str | None = None, preset: str | None = None) -> Any:
    from engines.artifact import ModelCard  # noqa: PLC0415

    training = {k: v for k, v in cfg.to_dict().items() if k not in ("out", "cache_dir", "progress")}
    training.update(extra or {})
    return ModelCard(task=task, preset=preset or cfg.preset, prompt_vocab=vocab.to_dict(),
                     preprocess=pcfg.to_dict(), label_scale=label_scale, n_slices=cfg.k_slices,
                     classifier_preset=classifier_preset, ensemble_size=ensemble_size,
                     data_summary=data_summary, metrics=jsonable(metrics), training=jsonable(training))


def jsonable(x: Any) -> Any:
    """NaN / inf → None (and numpy scalars → Python) so cards, summaries and reports are strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return jsonable(x.item())
    return x


def _test_metrics(model: Any, task: Any, items: list[Any], cache: Any, cfg: TrainConfig) -> dict[str, Any]:
    """The task's metrics on ``items``, plus per prompt group / degradation for IQA."""
    from training.evaluate import GROUP_KEYS, grouped_metrics  # noqa: PLC0415
    from training.loop import predict_all, resolve_device  # noqa: PLC0415

    loader = _loader(items, cache, cfg, train=False)
    if loader is None:
        return {}
    pred, target, index = predict_all(model, task, loader, resolve_device(cfg.device), cfg.amp)
    out: dict[str, Any] = task.metrics(pred, target)
    if task.name == "iqa":
        ordered = [items[i] for i in index]
        labels = {g: [it.prompt_values.get(g) for it in ordered] for g in GROUP_KEYS}
        if any("degradation" in it.sample.extra for it in ordered):
            labels["degradation"] = [it.sample.extra.get("degradation") for it in ordered]
        out["groups"] = grouped_metrics(pred, target, labels)
    return out


def _train_members(make_model: Callable[[TrainConfig], Any], task: Any, items: dict[str, list[Any]],
                   cache: Any, cfg: TrainConfig, card_fn: Callable[[dict[str, Any]], Any]) -> tuple[list[Any], list[Any]]:
    """Train ``cfg.seeds`` members; returns (best models, FitResults)."""
    from engines.artifact import load_tensors  # noqa: PLC0415
    from training.loop import fit, seed_everything  # noqa: PLC0415

    models, results = [], []
    for m in range(cfg.seeds):
        mcfg = cfg if cfg.seeds == 1 else dataclasses.replace(cfg, seed=cfg.seed + m,
                                                              out=str(cfg.out_path / f"member{m}"))
        seed_everything(mcfg.seed)
        model = make_model(mcfg)
        res = fit(model, task, _loader(items["train"], cache, mcfg, train=True),
                  _loader(items["val"], cache, mcfg, train=False), mcfg, mcfg.out_path, card_fn,
                  description=f"{cfg.task}" + (f" [{m + 1}/{cfg.seeds}]" if cfg.seeds > 1 else ""))
        groups, _ = load_tensors(res.best_path)
        model.load_state_dict({k: v.float() if v.is_floating_point() else v
                               for k, v in groups[task.module_name].items()})
        models.append(model)
        results.append(res)
    return models, results


def _finish(task_name: str, models: list[Any], results: list[Any], task: Any, items: dict[str, list[Any]],
            cache: Any, cfg: TrainConfig, card_args: dict[str, Any]) -> TrainOutcome:
    """Evaluate the best member(s) on val and test, write ``<out>/model.safetensors``."""
    from engines.artifact import save_artifact  # noqa: PLC0415
    from engines.models.maniqa import EnsembleNet  # noqa: PLC0415

    model = models[0] if len(models) == 1 else EnsembleNet(models)
    val = _test_metrics(model, task, items["val"], cache, cfg) if len(models) > 1 else results[0].best_metrics
    test = _test_metrics(model, task, items["test"], cache, cfg)
    metrics = {"val": val, "test": test, "best_epoch": [r.best_epoch for r in results],
               "epochs_run": [r.epochs_run for r in results]}
    finite = [r.images_per_s for r in results if r.images_per_s == r.images_per_s]
    ips = float(np.mean(finite)) if finite else float("nan")
    extra = {"images_per_s": ips, "members": len(models)}
    card = _card(task_name, cfg, metrics=metrics, extra=extra, ensemble_size=len(models), **card_args)
    if len(models) == 1:
        modules = {task.module_name: models[0]}
    else:
        modules = {f"iqa.{i}": m for i, m in enumerate(models)}
    path = save_artifact(cfg.out_path / MODEL_NAME, modules, card)
    summary = {"artifact": str(path), "metrics": jsonable(metrics), "data": card.data_summary,
               "images_per_s": jsonable(ips)}
    (cfg.out_path / SUMMARY_NAME).write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return TrainOutcome(artifact=path, metrics=metrics, data_summary=card.data_summary, images_per_s=ips,
                        members=[r.best_path for r in results])


def _preset_bits(cfg: TrainConfig) -> tuple[Any, Any]:
    from engines.models.presets import get_preset  # noqa: PLC0415
    from engines.prompts import DEFAULT_VOCAB  # noqa: PLC0415

    pcfg = get_preset(cfg.preset).preprocess_config()
    if cfg.ct_pixel_mm is not None:
        pcfg = dataclasses.replace(pcfg, ct_pixel_mm=float(cfg.ct_pixel_mm))
    if cfg.keep_aspect:
        pcfg = dataclasses.replace(pcfg, keep_aspect=True)
    return pcfg, DEFAULT_VOCAB


# --------------------------------------------------------------------------------------------
# The three tasks

def run_pretrain(data: str | Path, cfg: TrainConfig) -> TrainOutcome:
    """Stage 1: regress normalised physical parameters read from the DICOM tags (MSE)."""
    from engines.models.registry import create_model  # noqa: PLC0415
    from training.loop import IQATask  # noqa: PLC0415

    cfg = dataclasses.replace(cfg, task="pretrain")
    pcfg, vocab = _preset_bits(cfg)
    samples, report = pretrain_samples(data)
    parts = _split(samples, cfg)
    norm = TargetNormaliser.fit((s.modality_key, s.target) for s in parts["train"])  # type: ignore[misc]

    def target(s: Sample) -> float | None:
        if s.modality_key not in norm.ranges:
            report.skip(s.path, f"no_physical_target: no {s.modality_key} study in the training split")
            return None
        return norm(s.modality_key, s.target)  # type: ignore[arg-type]

    cache = _cache(cfg, pcfg)
    items = {k: build_items(v, cfg, cache, vocab, report, target, description=f"preparing {k}")
             for k, v in parts.items()}
    if not items["train"]:
        raise DatasetError(f"no training study could be prepared: {report.summary()}")
    summary = _split_summary(report, items)
    summary["targets"] = norm.to_dict()
    label_scale = {"min": 0.0, "max": 1.0, "name": "physical parameter (log, min-max per modality)",
                   "normaliser": norm.to_dict()}
    card_args = dict(pcfg=pcfg, vocab=vocab, label_scale=label_scale, data_summary=summary)

    mean_target = float(np.mean([it.target for it in items["train"]]))

    def make(c: TrainConfig) -> Any:
        model = create_model(c.preset, vocab.size, Path(c.init_weights) if c.init_weights else None)
        init_score_bias(model, mean_target)
        _restrict_prompts(model, vocab, c)
        return model

    task = IQATask(cfg.loss, vocab.columns("modality"))
    models, results = _train_members(make, task, items, cache, cfg, lambda info: _card(
        "pretrain", cfg, metrics={"val": info["val"], "epoch": info["epoch"]}, **card_args))
    return _finish("pretrain", models, results, task, items, cache, cfg, card_args)


def score_range(samples: list[Sample], report: DatasetReport, cfg: TrainConfig) -> tuple[float, float]:
    """(lo, hi) of the label scale: the config's, LDCTIQA's 0–4, or the data's min / max."""
    from training.data.datasets import LDCTIQA_RANGE  # noqa: PLC0415

    if cfg.label_min is not None and cfg.label_max is not None:
        lo, hi = cfg.label_min, cfg.label_max
    elif report.kind == "ldctiqa":
        lo, hi = LDCTIQA_RANGE
    else:
        vals = [s.target for s in samples if s.target is not None]
        lo, hi = (cfg.label_min if cfg.label_min is not None else min(vals),
                  cfg.label_max if cfg.label_max is not None else max(vals))
    if not hi > lo:
        raise DatasetError(f"every score is {lo}; nothing to learn")
    return float(lo), float(hi)


def run_finetune(data: str | Path, cfg: TrainConfig) -> TrainOutcome:
    """Stage 2: regress quality scores scaled to [0, 1] (MSE), optionally from a pretrained artifact."""
    from engines.models.registry import create_model  # noqa: PLC0415
    from training.loop import IQATask  # noqa: PLC0415

    cfg = dataclasses.replace(cfg, task="finetune")
    pcfg, vocab = _preset_bits(cfg)
    if cfg.from_checkpoint:
        from engines.artifact import load_card  # noqa: PLC0415

        pre = load_card(cfg.from_checkpoint)
        check_base_preset(pre.preset, cfg.preset, Path(cfg.from_checkpoint).name)
        base_pp, this_pp = type(pcfg).from_dict(pre.preprocess).to_dict(), pcfg.to_dict()
        if base_pp != this_pp:
            changed = sorted(k for k in set(base_pp) | set(this_pp) if base_pp.get(k) != this_pp.get(k))
            logger.warning("%s was trained with other preprocessing (%s); this run fine-tunes it on "
                           "inputs prepared with this run's (recorded in the new card)",
                           Path(cfg.from_checkpoint).name, ", ".join(changed))
    samples, report = load_scored(data)
    lo, hi = score_range(samples, report, cfg)
    parts = _split(samples, cfg)
    cache = _cache(cfg, pcfg)
    items = {k: build_items(v, cfg, cache, vocab, report, lambda s: (s.target - lo) / (hi - lo),
                            description=f"preparing {k}") for k, v in parts.items()}
    if not items["train"]:
        raise DatasetError(f"no training study could be prepared: {report.summary()}")
    summary = _split_summary(report, items)
    label_scale = {"min": lo, "max": hi, "name": cfg.label_name}
    card_args = dict(pcfg=pcfg, vocab=vocab, label_scale=label_scale, data_summary=summary)
    handover: dict[str, Any] = {}
    mean_target = float(np.mean([it.target for it in items["train"]]))

    def make(c: TrainConfig) -> Any:
        model = create_model(c.preset, vocab.size, Path(c.init_weights) if c.init_weights else None)
        if c.from_checkpoint:
            handover.update(load_pretrained_into(model, c.from_checkpoint, c.preset, c.reinit))
            handover["from_sha256"] = _sha256(Path(c.from_checkpoint))
        if not c.from_checkpoint or any("score" in r for r in c.reinit):
            init_score_bias(model, mean_target)
        _restrict_prompts(model, vocab, c)
        return model

    task = IQATask(cfg.loss, vocab.columns("modality"))
    models, results = _train_members(make, task, items, cache, cfg, lambda info: _card(
        "iqa", cfg, metrics={"val": info["val"], "epoch": info["epoch"]}, extra={"handover": handover},
        **card_args))
    card_args["data_summary"] = dict(summary, handover=handover)
    return _finish("iqa", models, results, task, items, cache, cfg, card_args)


def _restrict_prompts(model: Any, vocab: Any, cfg: TrainConfig) -> None:
    from training.loop import restrict_prompt_groups  # noqa: PLC0415

    off = restrict_prompt_groups(model, vocab, cfg.prompt_groups)
    if off:
        logger.info("prompt groups %s switched off (their prompt_proj columns zeroed and frozen)", ", ".join(off))


def run_classifier(data: str | Path, cfg: TrainConfig) -> TrainOutcome:
    """The prompt classifier: modality / region / type from tags or manifest labels (CE)."""
    from engines.models.registry import create_classifier  # noqa: PLC0415
    from training.loop import ClassifierTask  # noqa: PLC0415

    cfg = dataclasses.replace(cfg, task="classifier", seeds=1)
    cpreset = cfg.classifier_preset or cfg.preset
    pcfg, vocab = _preset_bits(dataclasses.replace(cfg, preset=cpreset))
    samples, report = load_unscored(data)
    parts = _split(samples, cfg)
    cache = _cache(cfg, pcfg)
    items = {k: build_items(v, cfg, cache, vocab, report, lambda s: float("nan"), description=f"preparing {k}")
             for k, v in parts.items()}
    train = [it for it in items["train"] if any(lab >= 0 for lab in it.labels)]
    if not train:
        raise DatasetError("no training study has a modality, region or type label (tags or manifest)")
    items["train"] = train
    summary = _split_summary(report, items)
    card_args = dict(pcfg=pcfg, vocab=vocab, label_scale={"min": 0.0, "max": 1.0, "name": "none"},
                     data_summary=summary, classifier_preset=cpreset, preset=cpreset)

    def make(c: TrainConfig) -> Any:
        return create_classifier(cpreset, vocab, Path(c.init_weights) if c.init_weights else None)

    task = ClassifierTask()
    models, results = _train_members(make, task, items, cache, cfg, lambda info: _card(
        "classifier", cfg, metrics={"val": info["val"], "epoch": info["epoch"]}, **card_args))
    return _finish("classifier", models, results, task, items, cache, cfg, card_args)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


RUNNERS: dict[str, Callable[[str | Path, TrainConfig], TrainOutcome]] = {
    "pretrain": run_pretrain, "finetune": run_finetune, "classifier": run_classifier,
}
