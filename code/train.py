"""Fine-tune a model of any family (`task_type`: sequence classifier, seq2seq, causal LM, image classifier;
full, LoRA or IA3; AdamW or IVON): `python code/train.py CONFIG.json` (keys, among them `num_threads`:
docs/programs.md, modelmerge.training.TrainConfig)."""
import sys

from modelmerge.config import run_program
from modelmerge.training import TrainConfig, train

if __name__ == "__main__":
    sys.exit(run_program(TrainConfig, train, description=__doc__))
