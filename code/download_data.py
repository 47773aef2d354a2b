"""Materialise dataset splits to a folder: `python code/download_data.py CONFIG.json`.

Keys (modelmerge.download.DownloadConfig): `dataset_name`, `splits` (list), `output_dir`, `data_dir`, `task_type`,
`columns`, `input_template` and `class_words` (text-to-text rows from a classification data set), `overwrite`.
Writes `output_dir/<split>.jsonl` (one row of the task type's columns per line; images copied to `images/<split>/`,
class names to `class_names.json`), a folder later steps use as a dataset name.
"""
import sys

from modelmerge.config import run_program
from modelmerge.download import DownloadConfig, download

if __name__ == "__main__":
    sys.exit(run_program(DownloadConfig, download, description=__doc__))
