"""Evaluate a model folder on a split, or compute a statistic of it: `python code/predict.py CONFIG.json`.

`method`: `sequence_classification` (metrics.json, predictions.jsonl), `sequence_classification_squared_gradients`
(diagonal Fisher: fisher.safetensors, hessian/, stats.json), `sequence_classification_gram` (gram.safetensors,
output_grad_gram.safetensors, stats.json). Keys: docs/programs.md, modelmerge.prediction.PredictConfig.
"""
import sys

from modelmerge.config import run_program
from modelmerge.prediction import PredictConfig, run

if __name__ == "__main__":
    sys.exit(run_program(PredictConfig, run, description=__doc__))
