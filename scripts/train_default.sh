#!/usr/bin/env bash
# Train the bundled default model with its recipe (training/recipes/default.yaml):
# mediqa synth -> pretrain (DICOM-tag physical targets) -> finetune -> classifier -> test -> fp16 artifact.
# Usage: scripts/train_default.sh [cpu|cuda] [OUTPUT]   (default: cpu, engines/weights/default.safetensors)
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${1:-cpu}
OUTPUT=${2:-engines/weights/default.safetensors}
BIN=${BIN:-.venv/bin}
"$BIN/mediqa" train recipe training/recipes/default.yaml --device "$DEVICE" --output "$OUTPUT"
"$BIN/mediqa" evaluate "$OUTPUT" runs/default/corpus/manifest.csv --split test --worst 5
