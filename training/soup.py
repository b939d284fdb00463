"""Uniform weight averages ("model soups", Wortsman et al., ICML 2022) of packed IQA artifacts.

Networks fine-tuned from one base with one recipe but other data or another shuffle seed usually
sit in one basin of the loss, and the mean of their weights often ranks better than each of them
(seed-to-seed spread averages out). ``average_iqa`` builds that mean for a soup recipe
(``training.recipe``, section ``soup``). Only artifacts that can share one card are averaged: the
same task, preset, prompt vocabulary, preprocessing, label scale, slice count and ensemble size,
and bit-identical prompt classifiers (a continuation recipe keeps its base's classifier, so
siblings of one base carry the same one). Anything else is refused with the field that differs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from engines.errors import ConfigError

logger = logging.getLogger(__name__)

#: card fields every member must share: one card describes the soup
SHARED_FIELDS = ("task", "preset", "prompt_vocab", "preprocess", "label_scale", "n_slices", "ensemble_size",
                 "classifier_preset")


def average_iqa(paths: list[Path]) -> tuple[dict[str, dict[str, Any]], list[Any]]:
    """({"iqa": mean state dict (float32), "classifier": the members' common classifier}, member
    cards). Floating tensors are averaged in float32 (the members may be fp16); integer tensors
    (e.g. relative-position indices) must be equal and are kept, except batch-norm counters
    (``num_batches_tracked``: the largest). Batch-norm running statistics are averaged like
    weights. ConfigError on members that cannot share one card or one classifier, or fewer than
    two members."""
    import torch

    from engines.artifact import load_tensors  # noqa: PLC0415

    if len(paths) < 2:
        raise ConfigError(f"a soup needs at least two members, got {len(paths)}")
    loaded = [load_tensors(p) for p in paths]
    first_mods, first_card = loaded[0]
    if "iqa" not in first_mods:
        raise ConfigError(f"{paths[0].name} holds no IQA network (modules {sorted(first_mods)})")
    for p, (mods, card) in zip(paths[1:], loaded[1:]):
        for name in SHARED_FIELDS:
            if getattr(card, name) != getattr(first_card, name):
                raise ConfigError(f"{p.name} and {paths[0].name} differ in their card's {name}: "
                                  "they cannot be averaged into one model")
        if set(mods) != set(first_mods):
            raise ConfigError(f"{p.name} holds modules {sorted(mods)}, {paths[0].name} {sorted(first_mods)}")
        if mods["iqa"].keys() != first_mods["iqa"].keys():
            raise ConfigError(f"{p.name} and {paths[0].name} hold different IQA tensors")
        for other in (m for m in mods if m != "iqa"):
            if mods[other].keys() != first_mods[other].keys():
                raise ConfigError(f"{p.name} and {paths[0].name} hold different {other} tensors: "
                                  "a soup keeps one classifier")
            for key, t in mods[other].items():
                if not torch.equal(t, first_mods[other][key]):
                    raise ConfigError(f"{p.name} and {paths[0].name} carry different {other} weights "
                                      f"({key}): a soup keeps one classifier")
    iqa: dict[str, torch.Tensor] = {}
    for key, t0 in first_mods["iqa"].items():
        if t0.is_floating_point():
            iqa[key] = torch.stack([m["iqa"][key].float() for m, _ in loaded]).mean(0)
        elif key.endswith("num_batches_tracked"):
            # a batch-norm counter (runs of other lengths differ); evaluation never reads it: the largest
            iqa[key] = torch.stack([m["iqa"][key] for m, _ in loaded]).max()
        else:
            if not all(torch.equal(m["iqa"][key], t0) for m, _ in loaded[1:]):
                raise ConfigError(f"the members' integer tensor iqa.{key} differs: not one architecture")
            iqa[key] = t0
    modules = {"iqa": iqa, **{m: first_mods[m] for m in first_mods if m != "iqa"}}
    logger.info("averaged %d IQA networks (%d tensors)", len(paths), len(iqa))
    return modules, [card for _, card in loaded]
