"""Evaluate a model folder on a split, or compute a statistic of it: `python code/predict.py CONFIG.json`.

For every model family (`task_type`, modelmerge.families). `mode`: `evaluate` (metrics.json,
predictions.jsonl), `squared_gradients` (the diagonal Fisher: fisher.safetensors, hessian/, stats.json), `gram`
(gram.safetensors, output_grad_gram.safetensors, stats.json), `gradient_magnitude` (TATR's mean absolute gradient,
gold labels by default: gradient_magnitude.safetensors, stats.json); the authors' configs may say `method`
`sequence_classification` / `sequence_classification_squared_gradients` instead (docs/programs.md); `shard` / `join`
split the examples over processes (modelmerge.shards).
Keys, among them `num_threads`: docs/programs.md, modelmerge.prediction.config.PredictConfig.
"""
import sys

from modelmerge.config import run_program
from modelmerge.prediction.config import PredictConfig
from modelmerge.prediction.program import run

if __name__ == "__main__":
    sys.exit(run_program(PredictConfig, run, description=__doc__))
