"""Model definitions (``nn.Module``s) and the torch-free preset registry.

Importing this package does not import torch, so the CLI can list presets cheaply
(``from engines.models.presets import list_presets``). The torch-side names below are
resolved lazily on first access: ``MedIQANet``, ``EnsembleNet``, ``PromptClassifier``,
``create_model``, ``create_classifier``, ``load_artifact``, ``LoadedModel``.
"""

from __future__ import annotations

import importlib
from typing import Any

from engines.models.presets import DEFAULT_PRESET, PRESETS, PresetConfig, get_preset, list_presets

_LAZY = {
    "MedIQANet": "engines.models.maniqa",
    "EnsembleNet": "engines.models.maniqa",
    "PromptClassifier": "engines.models.classifier",
    "create_model": "engines.models.registry",
    "create_classifier": "engines.models.registry",
    "create_ensemble": "engines.models.registry",
    "load_artifact": "engines.models.loading",
    "LoadedModel": "engines.models.loading",
}

__all__ = ["DEFAULT_PRESET", "PRESETS", "PresetConfig", "get_preset", "list_presets", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'engines.models' has no attribute {name!r}")
