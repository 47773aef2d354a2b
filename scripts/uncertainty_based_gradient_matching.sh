#!/usr/bin/env bash
# Uncertainty-based gradient matching (Daheim et al., ICLR 2024), as the paper's script calls it:
#   scripts/uncertainty_based_gradient_matching.sh PRETRAINED PRETRAINED_FISHER FT1,FT2,... FISHER1,FISHER2,... C_0 C_1,C_2,... OUT [ALPHA]
set -euo pipefail
source "$(dirname "$0")/env.sh"
"$PYTHON" "$CODE_DIR/uncertainty_based_gradient_matching.py" \
  --pretrained_model_name_or_path "$1" \
  --pretrained_hessian_path "$2" \
  --ft_model_name_or_paths "$3" \
  --ft_hessian_paths "$4" \
  --scaling_factor_pt "$5" \
  --scaling_factors_ft "$6" \
  --out_model_path "$7" \
  --scaling_factor "${8:-1.0}" \
  --delta_0 1e-12 \
  --task_type SEQ_CLS
