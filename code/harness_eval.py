"""Run EleutherAI's lm-evaluation-harness on a causal language model: `python code/harness_eval.py CONFIG.json`.

Keys: `model_name_or_path`, `tasks` (harness task names or local task YAML files), `output_dir`, `num_fewshot`,
`limit`, `batch_size`, `offline`, `log_samples`, `seed`, `num_threads` (torch threads), `device`, `overwrite`
(docs/programs.md, modelmerge.harness.HarnessConfig). Writes the harness's results file and metrics.json.
"""
import sys

from modelmerge.config import run_program
from modelmerge.harness import HarnessConfig, run

if __name__ == "__main__":
    sys.exit(run_program(HarnessConfig, run, description=__doc__))
