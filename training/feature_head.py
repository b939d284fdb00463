"""Fit a model's feature head (``engines.features``) and record it in the model card.

``fit_feature_head_for(model, data)``: the ridge of each prompt modality is fitted on the input
statistics of the ``train`` split (prepared through the scoring path with the model's own
preprocessing), then the blend weights are chosen on the ``val`` split against the network's
scores with ``--tta auto`` (the model's TTA policy), so the blend is judged on what ``mediqa
score`` would give. ``mediqa train feature-head`` is the command.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from engines.features import FeatureHead, choose_blend, fit_feature_head

logger = logging.getLogger(__name__)


def split_rows(model_path: str | Path, data: str | Path, *, split: str = "train", workers: int = 0,
               progress: bool = True) -> list[dict[str, Any]]:
    """One row per study of ``split`` prepared through the scoring path with the model's
    preprocessing: ``path``, ``statistics`` (``engines.features.FEATURE_NAMES``), ``target`` on
    the model's [0, 1] scale, ``modality`` (the prompt from tags, else the manifest's label) and
    ``source`` (the manifest's ``source_id``). Studies whose statistics cannot be measured are left out."""
    from engines.artifact import load_card  # noqa: PLC0415
    from engines.preprocess import PreprocessConfig  # noqa: PLC0415
    from engines.prompts import PromptVocab  # noqa: PLC0415
    from training.evaluate import _prepared_items, _split_samples, item_statistics  # noqa: PLC0415

    card = load_card(model_path)
    samples, report = _split_samples(data, split, card)
    pcfg = PreprocessConfig.from_dict(card.preprocess)
    items, cache, _ = _prepared_items(samples, card, None, PromptVocab.from_dict(card.prompt_vocab), pcfg,
                                      report, workers=workers, progress=progress, device=None)
    if not items:
        raise ValueError(f"no study of the {split} split of {data} could be prepared: {report.summary()}")
    lo, hi = card.label_range()
    rows = []
    for it in items:
        st = item_statistics(it, cache, pcfg)
        if st is not None:
            rows.append({"path": it.sample.path, "statistics": st, "target": (it.target - lo) / (hi - lo),
                         "modality": it.prompt_values.get("modality"), "source": it.sample.extra.get("source_id")})
    return rows


def fit_feature_head_for(model_path: str | Path, data: str | Path, *, fit_split: str = "train",
                         choose_split: str = "val", penalty: float = 1.0, min_studies: int = 20,
                         min_sources: int = 2, device: str = "cpu", batch_size: int = 8, workers: int = 0,
                         progress: bool = True,
                         network: Mapping[str, tuple[float, str | None]] | None = None) -> FeatureHead:
    """The model's feature head: ridges fitted on ``fit_split``, blend weights chosen on
    ``choose_split`` (see ``engines.features.choose_blend``) against the model's ``--tta auto``
    scores. ``network``: those scores when already measured (study path → (prediction in label
    units, prompt modality), e.g. ``training.tta_policy.auto_predictions`` of the TTA chooser's
    reports); else ``choose_split`` is evaluated here."""
    from engines.artifact import load_card  # noqa: PLC0415
    from training.evaluate import evaluate_modes  # noqa: PLC0415

    if fit_split == choose_split:
        raise ValueError("the ridge and the blend weights need two different splits")
    fit_rows = split_rows(model_path, data, split=fit_split, workers=workers, progress=progress)
    head = fit_feature_head(np.stack([r["statistics"] for r in fit_rows]), np.array([r["target"] for r in fit_rows]),
                            [r["modality"] for r in fit_rows], penalty=penalty, min_studies=min_studies)
    logger.info("feature head: ridges for %s from %d %s studies", sorted(head.heads), len(fit_rows), fit_split)
    lo, hi = load_card(model_path).label_range()
    if network is None:
        rep = evaluate_modes(model_path, data, modes=("auto",), split=choose_split, device=device,
                             batch_size=batch_size, workers=workers, progress=progress, features=False,
                             statistics=True)["auto"]
        rows = [{**r, "target": (r["target"] - lo) / (hi - lo)} for r in rep["predictions"]
                if r["statistics"] is not None]
    else:
        rows = []
        for r in split_rows(model_path, data, split=choose_split, workers=workers, progress=progress):
            if r["path"] not in network:
                raise ValueError(f"no network score for {r['path']} of the {choose_split} split")
            pred, modality = network[r["path"]]
            rows.append({**r, "prediction": pred, "modality": modality})   # the prompt scoring used
    q = (np.array([r["prediction"] for r in rows]) - lo) / (hi - lo)
    head = choose_blend(head, np.array([r["statistics"] for r in rows]), q, np.array([r["target"] for r in rows]),
                        [r.get("modality") for r in rows], [r.get("source") for r in rows],
                        min_studies=min_studies, min_groups=min_sources)
    sel: dict[str, Any] = dict(head.selection)
    sel.update({"fit_split": fit_split, "fit_studies": len(fit_rows), "choose_split": choose_split,
                "data": Path(data).name, "tta": "auto"})
    return dataclasses.replace(head, selection=sel)


def write_feature_head(model_path: str | Path, head: FeatureHead, output: str | Path | None = None) -> Path:
    """Copy of the ``.safetensors`` artifact whose card holds ``head`` (None output: in place)."""
    from engines.artifact import rewrite_card  # noqa: PLC0415

    return rewrite_card(model_path, output, feature_head=head.to_dict())
