#!/usr/bin/env bash
# Evaluate a model, or compute a statistic of it (the config's `method`): scripts/predict.sh CONFIG.json
# (e.g. scripts/evaluate_minilm_sst2.json, scripts/fisher_minilm_sst2.json).
set -euo pipefail
source "$(dirname "$0")/env.sh"
exec "$PYTHON" "$CODE_DIR/predict.py" "$1"
