#!/usr/bin/env bash
# A config's whole graph (default config/example.py, Table 1 with the preset of settings.py) without
# Sisyphus, step by step:   scripts/run_offline_experiment.sh [OUT [CONFIG.py]]   (default OUT: offline_experiment/)
# scripts/offline_configs.py writes each job's folder (its config and run.sh, as `sis` would) under OUT/work/;
# each step runs its run.sh and is marked `finished`, so an interrupted run continues where it stopped.
# The registered outputs are linked under OUT/output/ (Table 1: OUT/output/example/report/results.md).
set -euo pipefail
source "$(dirname "$0")/env.sh"
OUT="$(realpath -m "${1:-offline_experiment}")"
"$PYTHON" "$SCRIPTS_DIR/offline_configs.py" "$OUT" "${2:-config/example.py}"

while read -r job; do
    if [ -e "$job/finished" ]; then echo "== done already: $job"; continue; fi
    echo "== $job"
    (cd "$job/work" && ./run.sh)
    touch "$job/finished"
done < "$OUT/steps.txt"

while IFS=$'\t' read -r name path; do
    mkdir -p "$(dirname "$OUT/output/$name")"
    ln -sfn "$path" "$OUT/output/$name"
    echo "output/$name -> $path"
done < "$OUT/outputs.txt"
if [ -f "$OUT/output/example/report/results.md" ]; then cat "$OUT/output/example/report/results.md"; fi
