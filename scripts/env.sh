# Sourced by the scripts: where the programs and the offline data are, and no Hub access at run time.
SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(dirname "$SCRIPTS_DIR")"
CODE_DIR="$REPO_DIR/code"
PYTHON="${PYTHON:-python3}"
export MERGE_DATA_DIR="${MERGE_DATA_DIR:-$REPO_DIR/data/sentiment}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM=false
