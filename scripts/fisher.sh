#!/usr/bin/env bash
# Squared-gradient Fisher of a model (a predict.py config with method sequence_classification_squared_gradients):
# scripts/fisher.sh CONFIG.json (e.g. scripts/fisher_minilm_sst2.json).
set -euo pipefail
source "$(dirname "$0")/env.sh"
exec "$PYTHON" "$CODE_DIR/predict.py" "$1"
