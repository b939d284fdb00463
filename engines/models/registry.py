"""Create models by preset name (the one entry point training, export and loading use)."""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from engines.models.classifier import PromptClassifier
from engines.models.maniqa import EnsembleNet, MedIQANet
from engines.models.presets import get_preset
from engines.prompts import DEFAULT_VOCAB, PromptVocab

log = logging.getLogger(__name__)


def create_model(preset_name: str, prompt_dim: int = DEFAULT_VOCAB.size,
                 init_weights: Path | None = None) -> MedIQANet:
    """A freshly initialised ``MedIQANet``; ``init_weights`` = local timm ViT weights for the encoder."""
    return MedIQANet(get_preset(preset_name), prompt_dim, init_weights=init_weights)


def create_classifier(preset_name: str, vocab: PromptVocab = DEFAULT_VOCAB,
                      init_weights: Path | None = None) -> PromptClassifier:
    """A freshly initialised ``PromptClassifier`` with the preset's classifier ViT."""
    return PromptClassifier(get_preset(preset_name), vocab, init_weights=init_weights)


def create_ensemble(preset_names: list[str], prompt_dim: int = DEFAULT_VOCAB.size) -> nn.Module:
    """One ``MedIQANet`` per name (repeat a name for seeds); a single name gives the plain model."""
    members = [create_model(n, prompt_dim) for n in preset_names]
    return members[0] if len(members) == 1 else EnsembleNet(members)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in module.parameters())
