#!/usr/bin/env bash
# Any merge method of the library, with git-theta-style arguments, e.g.
#   scripts/merge.sh --merge ties --models m1 m2 --ancestor m0 --x:density 0.2 --output merged
# or a mergekit YAML file: scripts/merge.sh --config merge.yml OUT
set -euo pipefail
source "$(dirname "$0")/env.sh"
exec "$PYTHON" "$CODE_DIR/merge.py" "$@"
