#!/usr/bin/env bash
# Fine-tune a model: scripts/train.sh CONFIG.json (e.g. scripts/finetune_minilm_sst2.json).
set -euo pipefail
source "$(dirname "$0")/env.sh"
exec "$PYTHON" "$CODE_DIR/train.py" "$1"
