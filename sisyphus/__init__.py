"""A Sisyphus-compatible workflow manager: jobs hashed by their inputs, run once, scheduled when their inputs exist.

`from sisyphus import *` gives what configs and recipes use: Job, Task, tk (sisyphus.toolkit),
gs (sisyphus.global_settings), Path, Variable and setup_path.
"""
import sisyphus.global_settings as gs
import sisyphus.toolkit as tk
from sisyphus.job import Job
from sisyphus.job_path import Path, Variable
from sisyphus.task import Task
from sisyphus.toolkit import setup_path

__all__ = ["Job", "Task", "tk", "gs", "Path", "Variable", "setup_path"]
