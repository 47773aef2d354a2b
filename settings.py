"""Sisyphus settings of the model-merging pipeline.

Read by `sis` from the current directory; every global is reachable as `gs.NAME` in configs and recipes.
The engine is local by default; `SIS_ENGINE=slurm` (or `ENGINE = 'slurm'` below) selects SLURM.
"""
import os
import sys

_ROOT = os.path.dirname(os.path.abspath(__file__))

WORK_DIR = "work"
IMPORT_PATHS = ["config", "recipe/"]

# Interpreter and program folder the jobs run (`gs.PYTHON_EXE code/train.py ...`).
PYTHON_EXE = sys.executable
CODE_ROOT = os.path.join(_ROOT, "code")

# The experiment's preset (recipe/model_merging/presets.py): 'offline' (packaged model, data/sentiment),
# 'paper' (roberta-base, Hub datasets, a GPU) or a JSON file of overrides. The environment variable
# MERGE_PRESET, when set, takes precedence.
MERGE_PRESET = "offline"

# Offline data: a folder of <task>/{train,validation,test}.jsonl, by default the one shipped in data/sentiment.
DATA_DIR = os.environ.get("MERGE_DATA_DIR", os.path.join(_ROOT, "data", "sentiment"))

# Resources of this machine for the local engine.
LOCAL_CPU = int(os.environ.get("SIS_LOCAL_CPU", os.cpu_count() or 1))
LOCAL_MEM = int(os.environ.get("SIS_LOCAL_MEM", 16))  # GB
LOCAL_GPU = int(os.environ.get("SIS_LOCAL_GPU", 0))

ENGINE = os.environ.get("SIS_ENGINE", "local")  # 'local' or 'slurm'
SLURM_PARTITION = os.environ.get("SIS_SLURM_PARTITION", "")

WAIT_PERIOD_JOB_FS_SYNC = 1
WAIT_PERIOD_BETWEEN_CHECKS = 1
# Tasks keep the environment of the manager (offline flags, data folders), and finished job folders stay as they
# are; the reference Sisyphus defaults are True for both.
CLEANUP_ENVIRONMENT = False
JOB_AUTO_CLEANUP = False


def engine():
    from sisyphus.engine import EngineSelector
    from sisyphus.localengine import LocalEngine

    short = LocalEngine(cpu=1, gpu=0, mem=2)
    if ENGINE == "slurm":
        from sisyphus.simple_linux_utility_for_resource_management_engine import (
            SimpleLinuxUtilityForResourceManagementEngine,
        )

        default_rqmt = {"cpu": 1, "mem": 2, "time": 1}
        if SLURM_PARTITION:
            default_rqmt["sbatch_args"] = ["-p", SLURM_PARTITION]
        long = SimpleLinuxUtilityForResourceManagementEngine(default_rqmt=default_rqmt)
    elif ENGINE == "local":
        long = LocalEngine(cpu=LOCAL_CPU, gpu=LOCAL_GPU, mem=LOCAL_MEM)
    else:
        raise ValueError(f"settings.py: ENGINE must be 'local' or 'slurm', not {ENGINE!r}")
    return EngineSelector(engines={"short": short, "long": long}, default_engine="long")
