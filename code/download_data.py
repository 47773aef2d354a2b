"""Materialise dataset splits to a folder: `python code/download_data.py CONFIG.json`.

Keys (modelmerge.data.DownloadConfig): `dataset_name`, `splits` (list), `output_dir`, `data_dir`.
Writes `output_dir/<split>.jsonl` (one `{"text", "label"}` per line), a folder later steps use as a dataset name.
"""
import sys

from modelmerge.config import run_program
from modelmerge.data import DownloadConfig, download

if __name__ == "__main__":
    sys.exit(run_program(DownloadConfig, download, description=__doc__))
