#!/usr/bin/env bash
# The whole offline experiment (config/example.py's Table 1 graph) without Sisyphus, step by step:
#   scripts/run_offline_experiment.sh [OUT]        (default OUT: offline_experiment/)
# Steps already done (their output folder exists) are skipped, so an interrupted run continues.
# The report lands in OUT/report/ (results.md, results.csv, accuracy.png).
set -euo pipefail
source "$(dirname "$0")/env.sh"
OUT="$(realpath -m "${1:-offline_experiment}")"
"$PYTHON" "$SCRIPTS_DIR/offline_configs.py" "$OUT"
C="$OUT/configs"
mapfile -t TASKS < "$C/tasks.txt"
{ read -r C0; read -r CT; } < "$C/sizes.txt"
PRE_TASK="$(cat "$C/pretraining_task.txt")"

step() {  # step OUTPUT_DIR COMMAND...: run COMMAND unless OUTPUT_DIR exists
    local output="$1"; shift
    if [ -e "$output" ]; then echo "== done already: $output"; else echo "== $*"; "$@"; fi
}

step "$OUT/models/pretrained/best" "$PYTHON" "$CODE_DIR/train.py" "$C/train_pretrained.json"
step "$OUT/fishers/pretrained" "$PYTHON" "$CODE_DIR/predict.py" "$C/fisher_pretrained.json"
FT_MODELS=() FT_FISHERS=()
for task in "${TASKS[@]}"; do
    step "$OUT/models/$task/best" "$PYTHON" "$CODE_DIR/train.py" "$C/train_$task.json"
    step "$OUT/fishers/$task" "$PYTHON" "$CODE_DIR/predict.py" "$C/fisher_$task.json"
    FT_MODELS+=("$OUT/models/$task/best") FT_FISHERS+=("$OUT/fishers/$task")
done
step "$OUT/models/multitask/best" "$PYTHON" "$CODE_DIR/train.py" "$C/train_multitask.json"

join() { local IFS=,; echo "$*"; }
step "$OUT/models/task_arithmetic" "$SCRIPTS_DIR/task_arithmetic.sh" \
    "$OUT/models/pretrained/best" "$(join "${FT_MODELS[@]}")" "$OUT/models/task_arithmetic" 1.0
step "$OUT/models/gradient_matching" "$SCRIPTS_DIR/uncertainty_based_gradient_matching.sh" \
    "$OUT/models/pretrained/best" "$OUT/fishers/pretrained" "$(join "${FT_MODELS[@]}")" "$(join "${FT_FISHERS[@]}")" \
    "$C0" "$CT" "$OUT/models/gradient_matching" 1.0

# Every model on every task's test split, then the report.
declare -A MODELS=([pretrained]="$OUT/models/pretrained/best" [multitask]="$OUT/models/multitask/best"
                   [task_arithmetic]="$OUT/models/task_arithmetic" [gradient_matching]="$OUT/models/gradient_matching")
for task in "${TASKS[@]}"; do MODELS[finetuned_$task]="$OUT/models/$task/best"; done
ORDER=(pretrained $(printf 'finetuned_%s ' "${TASKS[@]}") multitask task_arithmetic gradient_matching)
for model in "${ORDER[@]}"; do
    for task in "$PRE_TASK" "${TASKS[@]}"; do
        config="$OUT/eval/$model/$task.json"
        mkdir -p "$OUT/eval/$model"
        sed -e "s|\"MODEL\"|\"${MODELS[$model]}\"|" -e "s|\"OUTPUT\"|\"$OUT/eval/$model/$task\"|" "$C/evaluate_$task.json" > "$config"
        step "$OUT/eval/$model/$task" "$PYTHON" "$CODE_DIR/predict.py" "$config"
    done
done

"$PYTHON" - "$OUT" "$PRE_TASK" "${ORDER[@]}" -- "${TASKS[@]}" <<'PY'
import json, os, sys
out, pre_task, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
models, tasks = rest[:rest.index("--")], [pre_task] + rest[rest.index("--") + 1:]
results = {m: {t: os.path.join(out, "eval", m, t, "metrics.json") for t in tasks} for m in models}
with open(os.path.join(out, "configs", "report.json"), "w") as f:
    json.dump({"results": results, "output_dir": os.path.join(out, "report"), "title": "Table 1 (offline, scripts)"}, f, indent=2)
PY
"$PYTHON" "$CODE_DIR/report.py" "$C/report.json"
cat "$OUT/report/results.md"
