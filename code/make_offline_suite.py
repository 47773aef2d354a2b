"""Make a small model and its synthetic tasks for the offline presets of config/vit_tasks.py and config/t5_tasks.py:
`python code/make_offline_suite.py CONFIG.json` (keys: modelmerge.offline.SuiteConfig).

Writes `output_dir/model/` (a random CLIP or T5 with its own tokenizer/image processor) and
`output_dir/data/<task>/{train,validation,test}.jsonl` (+ images and class_names.json for image tasks).
"""
import sys

from modelmerge.config import run_program
from modelmerge.offline import SuiteConfig, make_suite

if __name__ == "__main__":
    sys.exit(run_program(SuiteConfig, make_suite, description=__doc__))
