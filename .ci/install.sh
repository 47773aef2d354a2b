#!/usr/bin/env bash
# Installs the project and its pinned dependencies into the current Python environment.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet torch==2.13.0          # CPU build from local disk on the project's machines
python3 -m pip install --quiet -r requirements-dev.txt
python3 -m pip install --quiet --no-deps -e .
