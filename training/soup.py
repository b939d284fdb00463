"""Uniform weight averages ("model soups", Wortsman et al., ICML 2022) of packed IQA artifacts.

Networks fine-tuned from one base with one recipe but other data or another shuffle seed usually
sit in one basin of the loss, and the mean of their weights often ranks better than each of them
(seed-to-seed spread averages out). ``average_iqa`` builds that mean for a soup recipe
(``training.recipe``, section ``soup``). Only artifacts that can share one card are averaged: the
same task, preset, prompt vocabulary, preprocessing, label scale, slice count and ensemble size,
and bit-identical prompt classifiers (a continuation recipe keeps its base's classifier, so
siblings of one base carry the same one). Anything else is refused with the field that differs,
except, when asked (``align_label_scale``), a label scale that differs only in its range: a member
trained on labels with another min / max (e.g. a corpus option that adds scored defects lowers the
lowest score) has its score head mapped onto the first member's scale before the mean
(``map_label_scale``).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Mapping

from engines.errors import ConfigError

logger = logging.getLogger(__name__)

#: card fields every member must share: one card describes the soup
SHARED_FIELDS = ("task", "preset", "prompt_vocab", "preprocess", "label_scale", "n_slices", "ensemble_size",
                 "classifier_preset")


def map_label_scale(iqa: Mapping[str, Any], src: Any, dst: Any) -> tuple[dict[str, Any], float, float]:
    """``iqa`` (a MANIQA state dict whose labels were min-max scaled as card ``src`` says) with the
    last Linear of every score head mapped so that its outputs are in card ``dst``'s scale (both read
    by ``ModelCard.label_range``), and the map (a, b):
    ``q_dst = a · q_src + b`` with ``a = (hi_src − lo_src) / (hi_dst − lo_dst)`` and
    ``b = (lo_src − lo_dst) / (hi_dst − lo_dst)``, applied to that Linear's weight and bias. The
    image score is a weighted mean of the token scores, so it maps alike; exact wherever the
    token scores stay above the score head's ReLU floor (measured on 24 corpus studies: within
    0.0009, fp16 storage included). ConfigError without a score head or with another label name."""
    names = [(c.label_scale or {}).get("name") for c in (src, dst)]
    if names[0] != names[1]:
        raise ConfigError(f"label scales {names[0]!r} and {names[1]!r} measure different things")
    (lo_s, hi_s), (lo_d, hi_d) = src.label_range(), dst.label_range()
    if hi_d <= lo_d or hi_s <= lo_s:
        raise ConfigError(f"empty label range: {src.label_scale} / {dst.label_scale}")
    a, b = (hi_s - lo_s) / (hi_d - lo_d), (lo_s - lo_d) / (hi_d - lo_d)
    last: dict[str, int] = {}   # prefix → index of the last Linear of that score head
    for key in iqa:
        m = re.fullmatch(r"(.*score_head\.)(\d+)\.weight", key)
        if m:
            last[m.group(1)] = max(last.get(m.group(1), -1), int(m.group(2)))
    if not last:
        raise ConfigError("no score head in this network: its label scale cannot be mapped")
    out = dict(iqa)
    for prefix, i in last.items():
        out[f"{prefix}{i}.weight"] = iqa[f"{prefix}{i}.weight"].float() * a
        out[f"{prefix}{i}.bias"] = iqa[f"{prefix}{i}.bias"].float() * a + b
    return out, a, b


def _grow_members(paths: list[Path], loaded: list[tuple[dict[str, Any], Any]]
                  ) -> list[tuple[dict[str, Any], Any]]:
    """Members of preset P next to members of a preset G that grows from P (``grows_from``): each
    P member becomes the G network that computes exactly what it computes — the added module's
    output projection at 0 (``engines.models.maniqa.TEXTURE_OFF_WHEN_ZERO``), the module's other
    tensors (which then do nothing) equal to the mean of the G members' — and its card names G. So in the soup the added
    module's projection is the G members' mean scaled by (G members / all members), as if every
    member had been grown and only some had trained the module. Members of one preset, or of
    presets that do not grow from each other, are returned unchanged (the card check refuses the
    latter)."""
    import dataclasses

    import torch

    from engines.models.maniqa import TEXTURE_OFF_WHEN_ZERO  # noqa: PLC0415
    from engines.models.presets import get_preset  # noqa: PLC0415

    presets = {card.preset for _, card in loaded}
    if len(presets) != 2:
        return loaded
    a, b = sorted(presets)
    try:
        grown = b if get_preset(b).grows_from == a else a if get_preset(a).grows_from == b else None
    except ConfigError:
        return loaded
    if grown is None:
        return loaded
    donors = [mods["iqa"] for mods, card in loaded if card.preset == grown]
    out = []
    for p, (mods, card) in zip(paths, loaded):
        if card.preset == grown:
            out.append((mods, card))
            continue
        iqa = dict(mods["iqa"])
        added = [k for k in donors[0] if k not in iqa]
        if any(k not in donors[0] for k in iqa):
            raise ConfigError(f"{p.name} holds tensors that preset {grown!r} has not: not grown from it")
        for key in added:
            ref = donors[0][key]
            if key.startswith(TEXTURE_OFF_WHEN_ZERO):
                iqa[key] = torch.zeros_like(ref)
            elif ref.is_floating_point():
                iqa[key] = torch.stack([d[key].float() for d in donors]).mean(0).to(ref.dtype)
            else:
                iqa[key] = ref
        logger.info("%s (preset %s) joins as a %s network with %d added tensors (projection at 0)",
                    p.name, card.preset, grown, len(added))
        out.append(({**mods, "iqa": iqa}, dataclasses.replace(card, preset=grown)))
    return out


def average_iqa(paths: list[Path], align_label_scale: bool = False
                ) -> tuple[dict[str, dict[str, Any]], list[Any]]:
    """({"iqa": mean state dict (float32), "classifier": the members' common classifier}, member
    cards). Floating tensors are averaged in float32 (the members may be fp16); integer tensors
    (e.g. relative-position indices) must be equal and are kept, except batch-norm counters
    (``num_batches_tracked``: the largest). Batch-norm running statistics are averaged like
    weights. ConfigError on members that cannot share one card or one classifier, or fewer than
    two members. ``align_label_scale``: a member whose label scale differs from the first's only
    in min / max is mapped onto the first's (``map_label_scale``) before the mean; the returned
    cards are then the members' own, and each mapped member's (a, b) is logged and set as
    ``card.training["label_scale_map"]`` of the returned card. Members of a preset and of one
    grown from it (``PresetConfig.grows_from``, e.g. the texture branch) are averaged as the
    grown preset (``_grow_members``); the cards of the others then name the grown preset."""
    import torch

    from engines.artifact import load_tensors  # noqa: PLC0415

    if len(paths) < 2:
        raise ConfigError(f"a soup needs at least two members, got {len(paths)}")
    loaded = [load_tensors(p) for p in paths]
    if "iqa" not in loaded[0][0]:
        raise ConfigError(f"{paths[0].name} holds no IQA network (modules {sorted(loaded[0][0])})")
    loaded = _grow_members(paths, loaded)
    first_mods, first_card = loaded[0]
    for p, (mods, card) in zip(paths[1:], loaded[1:]):
        for name in SHARED_FIELDS:
            if name == "label_scale" and align_label_scale:
                continue   # checked (same label name) and mapped below
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
    if align_label_scale:
        import dataclasses

        for i, (mods, card) in enumerate(loaded[1:], start=1):
            if card.label_scale == first_card.label_scale:
                continue
            mapped, a, b = map_label_scale(mods["iqa"], card, first_card)
            logger.info("%s: label scale %s mapped onto %s (a %.6f, b %+.6f)", paths[i].name,
                        card.label_scale, first_card.label_scale, a, b)
            training = {**(card.training or {}), "label_scale_map": {"a": a, "b": b,
                                                                    "from": dict(card.label_scale)}}
            loaded[i] = ({**mods, "iqa": mapped}, dataclasses.replace(card, training=training))
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
