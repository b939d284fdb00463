"""Prompt classifier (paper §2.2, Fig. 1B): a timm ViT with modality / region / type heads.

The dimension prompt comes from the input itself, so only three groups are predicted. The paper
uses a 12-layer, 12-head ViT-B (MLP width 3072, ~86M parameters); each preset names its own ViT
(``PresetConfig.classifier_vit``) and the classifier reads the same preprocessed (N, 3, S, S)
images as the IQA model.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn
from timm.layers import trunc_normal_

from engines.models.maniqa import create_vit
from engines.models.presets import PresetConfig, get_preset
from engines.prompts import DEFAULT_VOCAB, PromptVocab


class PromptClassifier(nn.Module):
    """``forward(images (N,3,S,S) float32) -> (modality, region, type)`` logits, each (N, n_labels)."""

    def __init__(self, preset: PresetConfig | str, vocab: PromptVocab = DEFAULT_VOCAB, *,
                 init_weights: Path | None = None) -> None:
        super().__init__()
        cfg = get_preset(preset) if isinstance(preset, str) else preset
        self.preset = cfg
        self.vocab = vocab
        # num_classes=0: the ViT returns its pooled (class-token) features, (N, D).
        self.encoder = create_vit(cfg.classifier_vit, cfg.image_size, cfg.classifier_overrides, init_weights,
                                  stem=cfg.stem)
        dim = int(self.encoder.num_features)
        # "*_head": ``nn.Module.type`` is a method and must not be shadowed.
        self.modality_head = nn.Linear(dim, len(vocab.modality))
        self.region_head = nn.Linear(dim, len(vocab.region))
        self.type_head = nn.Linear(dim, len(vocab.type))
        for head in (self.modality_head, self.region_head, self.type_head):
            trunc_normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        feats = self.encoder(images)
        return self.modality_head(feats), self.region_head(feats), self.type_head(feats)
