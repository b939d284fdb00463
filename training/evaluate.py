"""Evaluate a model artifact on a labelled dataset: SRCC / PLCC / KROCC / RMSE overall, per
prompt group (dimension, modality, region, type) and per degradation type when the manifest
has a ``degradation`` column; plus the prompt classifier's accuracy per group when the artifact
carries one.

Studies go through the scoring path (``training.data.cache.prepare_inputs`` →
``engines.pipeline.prepare_study``). The prompt follows scoring's precedence — tags, then the
artifact's classifier, then the manifest label, then ``other`` — so the numbers describe what
``mediqa score`` would produce. Predictions are mapped to the dataset's units with the card's
``label_scale`` (``lo + q · (hi − lo)``); RMSE is in those units.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from engines.errors import DatasetError, MediqaError, UnsupportedArtifact

logger = logging.getLogger(__name__)

GROUP_KEYS = ("dimension", "modality", "region", "type")
MIN_GROUP = 3   # correlations of fewer studies are not reported (NaN)


def metric_table(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """{"n", "srcc", "plcc", "krocc", "rmse"}; NaN where undefined."""
    from training.loop import _safe_metrics  # noqa: PLC0415

    return _safe_metrics(np.asarray(pred, np.float64), np.asarray(target, np.float64))


def grouped_metrics(pred: np.ndarray, target: np.ndarray, labels: dict[str, Sequence[str | None]]
                    ) -> dict[str, dict[str, dict[str, float]]]:
    """Per column of ``labels`` (name → one value per study) and per value: metric_table.

    Groups with fewer than ``MIN_GROUP`` studies get only ``n`` and ``rmse``.
    """
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, values in labels.items():
        idx: dict[str, list[int]] = defaultdict(list)
        for i, v in enumerate(values):
            if v:
                idx[str(v)].append(i)
        if not idx:
            continue
        out[name] = {}
        for v, ii in sorted(idx.items()):
            m = metric_table(pred[ii], target[ii])
            if len(ii) < MIN_GROUP:
                m = {"n": len(ii), "srcc": math.nan, "plcc": math.nan, "krocc": math.nan, "rmse": m["rmse"]}
            out[name][v] = m
    return out


def _classifier_fill(classifier: Any, images: np.ndarray, vocab: Any, device: Any) -> dict[str, str]:
    """Argmax per group of the classifier's logits averaged over a study's slices."""
    import torch  # noqa: PLC0415

    x = torch.from_numpy(images.reshape(-1, *images.shape[-3:])).to(device)
    with torch.no_grad():
        logits = classifier(x)
    out = {}
    for g, lg in zip(("modality", "region", "type"), logits):
        out[g] = vocab.labels(g)[int(lg.float().mean(dim=0).argmax())]
    return out


def evaluate_model(model_path: str | Path, data: str | Path, *, split: str = "all", device: str = "cpu",
                   batch_size: int = 8, workers: int = 0, amp: bool = False,
                   progress: bool = True, tta: str = "auto", features: bool = True) -> dict[str, Any]:
    """Metrics of the artifact at ``model_path`` on ``data`` (manifest CSV / folder / LDCTIQA).

    ``split``: "all", or "train" / "val" / "test" (the manifest's split column, else the
    grouped hash split with the ratios recorded in the card). Returns a JSON-able report with
    ``overall``, ``groups``, ``classifier`` (accuracy per group, when present), ``dataset`` and
    ``predictions`` (path, target, prediction per study). ``tta``: test-time augmentation of the
    score (``engines.tta``: none / flip / d4, or auto = the card's per-modality policy), as
    ``mediqa score --tta``; the report's ``tta_policy`` says which mode each modality got.
    ``features``: apply the card's feature head (``engines.features``), as ``mediqa score``.
    """
    return evaluate_modes(model_path, data, modes=(tta,), split=split, device=device, batch_size=batch_size,
                          workers=workers, amp=amp, progress=progress, features=features)[tta]


def _split_samples(data: str | Path, split: str, card: Any) -> tuple[list[Any], Any]:
    """The scored studies of ``data`` in ``split`` (manifest column, else the card's hash split)."""
    from training.data.datasets import load_scored  # noqa: PLC0415
    from training.data.splits import assign_splits  # noqa: PLC0415

    samples, report = load_scored(data)
    if split != "all":
        tr = card.training or {}
        parts = assign_splits(samples, tr.get("split_ratios", (0.8, 0.1, 0.1)),
                              tr.get("split_salt", "mediqa-split-v1"))
        if split not in parts:
            raise DatasetError(f"unknown split {split!r}; use all, train, val or test")
        samples = parts[split]
        if not samples:
            raise DatasetError(f"the {split} split of {data} is empty")
    return samples, report


def _prepared_items(samples: Sequence[Any], card: Any, loaded: Any, vocab: Any, pcfg: Any, report: Any, *,
                    workers: int, progress: bool, device: Any) -> tuple[list[Any], Any, dict | None]:
    """Each study prepared once through the scoring path (cached, float32) with its prompt:
    (items, cache, the prompt classifier's metrics against the manifest labels or None).
    Studies that cannot be prepared are recorded in ``report`` and left out."""
    from engines.prompts import Prompt, encode_prompt  # noqa: PLC0415
    from training.data.cache import InputCache, PrepJob  # noqa: PLC0415
    from training.data.datasets import classifier_labels, resolve_prompt  # noqa: PLC0415
    from training.data.torchdata import IGNORE, Item  # noqa: PLC0415
    from training.loop import _progress  # noqa: PLC0415

    cache = InputCache(pcfg, dtype=np.float32)
    jobs = [PrepJob(s.ref, card.n_slices, s.labels.get("type")) for s in samples]
    with _progress(progress) as prog:
        tid = prog.add_task("preparing", total=len(jobs), loss="-", val="") if prog else None
        keys, errors = cache.prepare(jobs, workers=workers,
                                     on_done=(lambda: prog.update(tid, advance=1)) if prog else None)
    items: list[Item] = []
    cls_true: list[tuple[int, int, int]] = []
    cls_pred: list[tuple[int, int, int]] = []
    for s, key, err in zip(samples, keys, errors):
        if key is None:
            report.skip(s.path, err or "internal")
            continue
        info = cache.info(key)
        tags = info["tag_prompts"]
        fill = None
        if loaded is not None and loaded.classifier is not None:
            fill = _classifier_fill(loaded.classifier, cache.get(key).images, vocab, device)
            truth = classifier_labels(s, {})   # the manifest's labels, not the tags the model saw
            cls_true.append(tuple(vocab.labels(g).index(truth[g]) if truth[g] in vocab.labels(g) else IGNORE
                                  for g in ("modality", "region", "type")))
            cls_pred.append(tuple(vocab.labels(g).index(fill[g]) for g in ("modality", "region", "type")))
        values, sources = resolve_prompt(s, tags, fill)
        items.append(Item(key=key, kind=s.dimension, prompt=encode_prompt(Prompt(**values), vocab),
                          target=float(s.target), sample=s, prompt_values=values, prompt_sources=sources))
    classifier = None
    if cls_true:
        from training.loop import ClassifierTask  # noqa: PLC0415

        classifier = ClassifierTask().metrics(np.array(cls_pred), np.array(cls_true))
    return items, cache, classifier


def item_statistics(item: Any, cache: Any, pcfg: Any) -> np.ndarray | None:
    """``engines.features.input_statistics`` of a prepared study: over its distinct salient
    slices (a short series is padded to K with repeats for batching; scoring sees each once)."""
    from engines.features import statistics_or_none  # noqa: PLC0415

    prep = cache.get(item.key)
    images = np.asarray(prep.images)
    if images.ndim == 4:
        first: dict[int, int] = {}
        for j, idx in enumerate(prep.indices):
            first.setdefault(int(idx), j)
        images = images[sorted(first.values())]
    return statistics_or_none(images, pcfg.mean, pcfg.std)


def evaluate_modes(model_path: str | Path, data: str | Path, *, modes: Sequence[str], split: str = "all",
                   device: str = "cpu", batch_size: int = 8, workers: int = 0, amp: bool = False,
                   progress: bool = True, features: bool = True,
                   statistics: bool = False) -> dict[str, dict[str, Any]]:
    """``evaluate_model``'s report for each TTA mode of ``modes`` (mode → report), from one pass:
    the studies are read, prepared and classified once, and with more than one mode each image
    transform runs once (``engines.models.maniqa.MultiTTANet``; fixed modes only, not ``auto``).
    Each report equals the one ``evaluate_model(..., tta=mode)`` gives.

    features: apply the card's feature head (``engines.features``) as scoring does; statistics:
    add each study's input statistics and source (``source_id``) to its prediction row (used
    to fit a head)."""
    import torch  # noqa: PLC0415
    from torch.utils.data import DataLoader  # noqa: PLC0415

    from engines.models.loading import load_artifact  # noqa: PLC0415
    from engines.preprocess import PreprocessConfig  # noqa: PLC0415
    from engines.prompts import PromptVocab  # noqa: PLC0415
    from training.data.torchdata import StudyDataset, collate_studies  # noqa: PLC0415
    from training.loop import IQATask, predict_all, resolve_device  # noqa: PLC0415

    dev = resolve_device(device)
    loaded = load_artifact(model_path, device=dev)
    card = loaded.card
    if loaded.iqa is None:
        raise UnsupportedArtifact(f"{Path(model_path).name} holds only a prompt classifier; evaluate needs an IQA model")
    iqa = loaded.iqa
    from engines.tta import AUTO, card_vocab, resolve_policy  # noqa: PLC0415

    modes = tuple(dict.fromkeys(modes))
    try:
        policies = {mode: resolve_policy(mode, card) for mode in modes}
    except ValueError as exc:
        raise MediqaError(str(exc), code="config") from None
    if len(modes) > 1:
        if AUTO in modes:
            raise MediqaError("evaluate several TTA modes in one pass: fixed modes only, not auto", code="config")
        from engines.models.maniqa import MultiTTANet  # noqa: PLC0415

        iqa = MultiTTANet(iqa, modes).eval()
    elif not policies[modes[0]].is_plain:
        from engines.models.maniqa import TTANet  # noqa: PLC0415

        iqa = TTANet(iqa, policies[modes[0]], card_vocab(card)).eval()
    samples, report = _split_samples(data, split, card)
    vocab = PromptVocab.from_dict(card.prompt_vocab)
    pcfg = PreprocessConfig.from_dict(card.preprocess)
    items, cache, classifier = _prepared_items(samples, card, loaded, vocab, pcfg, report,
                                               workers=workers, progress=progress, device=dev)
    if not items:
        raise DatasetError(f"no study of {data} could be prepared: {report.summary()}")
    n_split = len(samples)
    loader = DataLoader(StudyDataset(items, cache), batch_size=batch_size, shuffle=False,
                        collate_fn=collate_studies)
    q, target, index = predict_all(iqa, IQATask(), loader, dev, amp)
    q = q.reshape(len(q), -1)                 # one column per mode
    lo, hi = card.label_range()
    ordered = [items[i] for i in index]
    labels: dict[str, list[str | None]] = {g: [it.prompt_values.get(g) for it in ordered] for g in GROUP_KEYS}
    if any("degradation" in it.sample.extra for it in ordered):
        labels["degradation"] = [it.sample.extra.get("degradation") for it in ordered]
    from engines.features import card_feature_head  # noqa: PLC0415

    head = card_feature_head(card, features)
    mods = [it.prompt_values.get("modality") for it in ordered]
    stats: list[np.ndarray | None] = [
        item_statistics(it, cache, pcfg) if statistics or (head is not None and head.blend_for(m) > 0) else None
        for it, m in zip(ordered, mods)]
    reports: dict[str, dict[str, Any]] = {}
    for col, mode in enumerate(modes):
        qc = q[:, col].astype(np.float64)
        if head is not None:
            # a study without statistics keeps the network's score, as in scoring
            qc = np.array([head.apply(float(v), st, m) if st is not None else float(v)
                           for v, st, m in zip(qc, stats, mods)])
        pred = lo + qc * (hi - lo)
        policy = policies[mode]
        out: dict[str, Any] = {
            "model": str(model_path), "data": str(data), "split": split, "tta": mode,
            "tta_policy": {"modes": dict(policy.modes), "fallback": policy.fallback},
            "feature_head": head.blends if head is not None else None,
            "label_scale": card.label_scale,
            # dataset: the whole manifest / folder as read; in_split / evaluated: the studies of
            # ``split`` and those of them that could be prepared (the metrics' n)
            "dataset": {**report.to_dict(), "in_split": n_split, "evaluated": len(items)},
            "overall": metric_table(pred, target),
            "groups": grouped_metrics(pred, target, labels),
            "predictions": [{"path": it.sample.path, "target": float(t), "prediction": float(p),
                             **{g: it.prompt_values.get(g) for g in GROUP_KEYS},
                             "prompt_source": it.prompt_sources, "degradation": it.sample.extra.get("degradation"),
                             **({"statistics": None if st is None else [float(v) for v in st],
                                 "source": it.sample.extra.get("source_id")}
                                if statistics else {})}
                            for it, t, p, st in zip(ordered, target, pred, stats)],
        }
        if classifier is not None:
            out["classifier"] = classifier
        reports[mode] = out
        logger.info("evaluated %s on %d studies%s: SRCC %.4f", model_path, len(items),
                    f" (TTA {mode})" if len(modes) > 1 else "", out["overall"]["srcc"])
    return reports
