#!/usr/bin/env bash
# The README's main job on the bundled default model:
#   sample corpus (real anatomy from PyPI packages, physically degraded) -> mediqa score -> scores.csv + report.html
# Usage: scripts/demo.sh [OUT_DIR]   (run through `make demo`, which installs .venv first)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-sample}
BIN=${BIN:-.venv/bin}
mkdir -p "$OUT"
echo "== 1/3 sample corpus -> $OUT/studies"
if [ ! -f "$OUT/studies/manifest.csv" ]; then
  "$BIN/mediqa" synth "$OUT/studies" --size small --seed 0
fi
echo "== 2/3 scoring with the bundled model"
set +e
"$BIN/mediqa" score "$OUT/studies" -o "$OUT/scores.csv" --report "$OUT/report.html" --exclude 'manifest.csv'
rc=$?
set -e
if [ $rc -ne 0 ] && [ $rc -ne 1 ]; then echo "mediqa score failed (exit $rc)"; exit $rc; fi
echo "== 3/3 evaluation against the corpus' known (synthetic) quality"
"$BIN/mediqa" evaluate "$OUT/studies/manifest.csv" --split test || true
echo
echo "Report: $OUT/scores.csv  and  $OUT/report.html"
