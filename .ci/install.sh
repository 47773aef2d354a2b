#!/usr/bin/env bash
# Installs the project and its pinned dependencies into the current Python environment.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet torch==2.13.0          # CPU build from local disk on the project's machines
python3 -m pip install --quiet -r requirements-dev.txt
python3 -m pip install --quiet --no-deps -e .
# BackPACK and Opacus for the Fisher's peer benchmark, without their dependencies (see .ci/fisher_peers.txt).
python3 -m pip install --quiet --no-deps -r .ci/fisher_peers.txt
# FusionBench for the parity tests, in a folder of its own (see .ci/fusion_bench.txt).
python3 -m pip install --quiet --no-deps --target "${FUSION_BENCH_DIR:-$HOME/.cache/modelmerge/fusion_bench-0.2.33}" \
    -r .ci/fusion_bench.txt
