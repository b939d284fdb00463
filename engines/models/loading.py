"""Rebuild models from artifacts, and load user-supplied timm weights into an encoder.

``load_artifact`` reads a ``.safetensors`` checkpoint (never pickle), builds the modules its card
names (``MedIQANet``, or ``EnsembleNet`` when ``ensemble_size > 1``, plus the optional
``PromptClassifier``), loads the tensors with ``strict=True`` and returns them in eval mode.
A checkpoint whose tensors do not fit the card's preset raises ``UnsupportedArtifact`` naming
the first mismatches.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from engines.artifact import ModelCard, load_tensors
from engines.errors import ConfigError, UnsupportedArtifact

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """``iqa`` is None for a classifier-only artifact; ``classifier`` None when the card has none."""

    iqa: nn.Module | None
    classifier: nn.Module | None
    card: ModelCard


def read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """A local state-dict file: ``.safetensors`` (preferred) or ``.pth/.pt/.bin`` via
    ``torch.load(weights_only=True)`` (tensors only, no arbitrary unpickling). Nested
    ``{"state_dict": …}`` / ``{"model": …}`` wrappers are unwrapped."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"weights file not found: {p}")
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        sd: object = load_file(str(p), device="cpu")
    elif suffix in (".pth", ".pt", ".bin"):
        try:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError for anything but plain tensors
            raise UnsupportedArtifact(f"{p.name}: not a plain tensor state dict ({exc})") from None
    else:
        raise UnsupportedArtifact(f"{p.name}: weights must be .safetensors or .pth/.pt/.bin")
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UnsupportedArtifact(f"{p.name}: expected a mapping of parameter names to tensors")
    return sd


def load_encoder_weights(vit: nn.Module, path: Path) -> None:
    """Load timm ViT weights from a local file into ``vit`` (before pruning).

    timm's ViT checkpoint filter adapts the position embedding to the model's grid. The ImageNet
    head and other keys the model lacks are reported (info) and ignored; missing keys are a
    warning; a file matching none of the ViT's parameters or with wrong shapes is refused.
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    sd = read_weight_file(path)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    try:
        sd = checkpoint_filter_fn(sd, vit)
    except Exception as exc:  # timm raises plain errors on odd layouts
        raise UnsupportedArtifact(f"{Path(path).name}: cannot adapt to {type(vit).__name__}: {exc}") from None
    own = vit.state_dict()
    bad = [k for k, v in sd.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        k = bad[0]
        raise UnsupportedArtifact(
            f"{Path(path).name}: {len(bad)} tensors have the wrong shape for this ViT, e.g. {k} "
            f"{tuple(sd[k].shape)} vs {tuple(own[k].shape)}; are these weights for another architecture?")
    if not any(k in own for k in sd):
        raise UnsupportedArtifact(f"{Path(path).name}: no tensor matches the ViT's parameters")
    result = vit.load_state_dict(sd, strict=False)
    if result.missing_keys:
        log.warning("encoder weights %s: %d missing keys (left at init), e.g. %s",
                    path, len(result.missing_keys), result.missing_keys[:5])
    if result.unexpected_keys:
        log.info("encoder weights %s: %d unused keys ignored, e.g. %s",
                 path, len(result.unexpected_keys), result.unexpected_keys[:5])
    log.info("loaded encoder weights from %s (%d tensors)", path, len(sd) - len(result.unexpected_keys))


def load_state_strict(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` with a readable ``UnsupportedArtifact`` on any mismatch."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shape mismatches (e.g. {k}: file {tuple(state[k].shape)}, "
                         f"model {tuple(own[k].shape)})")
        if missing:
            parts.append(f"{len(missing)} missing tensors (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
        raise UnsupportedArtifact(f"{what}: checkpoint does not fit the card's preset: " + "; ".join(parts))
    module.load_state_dict(dict(state), strict=True)


def load_artifact(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the model(s) of a ``.safetensors`` artifact on ``device``, in eval mode."""
    from engines.models.maniqa import EnsembleNet
    from engines.models.presets import get_preset
    from engines.models.registry import create_classifier, create_model
    from engines.prompts import PromptVocab

    p = Path(path)
    if p.suffix.lower() != ".safetensors":
        raise UnsupportedArtifact(f"{p.name}: the torch backend loads .safetensors checkpoints; "
                                  "use the onnxruntime / tensorrt backend for exported models")
    groups, card = load_tensors(p)
    try:
        vocab = PromptVocab.from_dict(card.prompt_vocab)
    except (KeyError, TypeError) as exc:
        raise UnsupportedArtifact(f"{p.name}: malformed prompt vocabulary in the card ({exc})") from None
    try:
        size = int(card.preprocess.get("image_size", -1))
        for pname in {card.preset, card.classifier_preset} - {None}:
            expected = get_preset(pname).image_size
            if size != expected:
                raise UnsupportedArtifact(f"{p.name}: card preprocessing image_size {size} does not match "
                                          f"preset {pname} ({expected})")
        iqa: nn.Module | None = None
        if card.task in ("iqa", "pretrain"):
            if card.ensemble_size > 1:
                members = []
                for i in range(card.ensemble_size):
                    name = f"iqa.{i}"
                    if name not in groups:
                        raise UnsupportedArtifact(f"{p.name}: ensemble of {card.ensemble_size} lacks module {name!r}")
                    m = create_model(card.preset, vocab.size)
                    load_state_strict(m, groups[name], f"{p.name} [{name}, preset {card.preset}]")
                    members.append(m)
                iqa = EnsembleNet(members)
            else:
                if "iqa" not in groups:
                    raise UnsupportedArtifact(f"{p.name}: card task {card.task!r} but no 'iqa' tensors")
                iqa = create_model(card.preset, vocab.size)
                load_state_strict(iqa, groups["iqa"], f"{p.name} [iqa, preset {card.preset}]")
            iqa = iqa.to(device).eval()
        classifier: nn.Module | None = None
        if card.classifier_preset is not None or card.task == "classifier":
            if "classifier" not in groups:
                raise UnsupportedArtifact(f"{p.name}: card names a classifier but the file has none")
            cpreset = card.classifier_preset or card.preset
            classifier = create_classifier(cpreset, vocab)
            load_state_strict(classifier, groups["classifier"], f"{p.name} [classifier, preset {cpreset}]")
            classifier = classifier.to(device).eval()
    except ConfigError as exc:  # unknown preset name in the card
        raise UnsupportedArtifact(f"{p.name}: {exc.message}") from None
    log.info("loaded %s: task %s, preset %s, ensemble %d, classifier %s",
             p.name, card.task, card.preset, card.ensemble_size, card.classifier_preset)
    return LoadedModel(iqa=iqa, classifier=classifier, card=card)
