#!/usr/bin/env bash
# Task arithmetic (Ilharco et al., 2023) as the paper's script calls it:
#   scripts/task_arithmetic.sh PRETRAINED FT1,FT2,... OUT [LAMBDA]
set -euo pipefail
source "$(dirname "$0")/env.sh"
"$PYTHON" "$CODE_DIR/task_arithmetic.py" \
  --pretrained_model_name_or_path "$1" \
  --ft_model_name_or_paths "$2" \
  --out_model_path "$3" \
  --scaling_factor "${4:-1.0}" \
  --task_type SEQ_CLS
