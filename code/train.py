"""Fine-tune a sequence classifier: `python code/train.py CONFIG.json` (keys: docs/programs.md, modelmerge.training.TrainConfig)."""
import sys

from modelmerge.config import run_program
from modelmerge.training import TrainConfig, train

if __name__ == "__main__":
    sys.exit(run_program(TrainConfig, train, description=__doc__))
