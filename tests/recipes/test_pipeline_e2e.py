"""The whole Table 1 graph (config/example.py) on a tiny random model and a few dozen examples per task,
run by `sis ... m -r` with the local engine: every registered output is produced, the report holds every
model on every task, and a second run computes nothing."""
import csv
import glob
import json
import os
import subprocess
import sys

import pytest

from sis_util import REPO
from tiny import make_tiny_bert, tiny_data_dir

TASKS = ("sst2", "rotten_tomatoes", "imdb")


def tiny_preset(model, data_dir):
    splits = {task: "test" for task in TASKS}
    return {
        "name": "tiny",
        "model": model,
        "data_dir": data_dir,
        "pretraining": {"task": "sst2", "train_split": "train", "validation_split": "validation",
                        "fisher_split": "train[:16]", "dataset_size": 48, "learning_rate": 1e-3},
        "tasks": {"rotten_tomatoes": {"train_split": "train", "fisher_split": "train[:16]", "dataset_size": 48},
                  "imdb": {"train_split": "train[:32]", "fisher_split": "train[:16]", "dataset_size": 32}},
        "finetuning_learning_rate": 5e-4,
        "test_splits": splits,
        "validation_splits": {task: "validation" for task in TASKS},
        "training": {"per_device_train_batch_size": 8, "per_device_eval_batch_size": 16, "max_length": 32,
                     "warmup_steps": 0},
        "fisher": {"batch_size": 8, "max_length": 32},
        "evaluation": {"batch_size": 16, "max_length": 32},
        "scaling_factors": [0.5, 1.0],
        "rqmt": {kind: {"time_rqmt": 1, "mem_rqmt": 1, "cpu_rqmt": 1, "gpu_rqmt": 0}
                 for kind in ("train", "statistics", "merge", "evaluation")},
    }


SETTINGS = """
import sys
WORK_DIR = "work"
IMPORT_PATHS = ["config", "recipe/"]
PYTHON_EXE = sys.executable
CODE_ROOT = {code!r}
MERGE_PRESET = {preset!r}
WAIT_PERIOD_BETWEEN_CHECKS = 0.5
WAIT_PERIOD_JOB_FS_SYNC = 0
CLEANUP_ENVIRONMENT = False  # tasks keep the caller's environment
JOB_AUTO_CLEANUP = False  # job folders stay unpacked for inspection


def engine():
    from sisyphus.engine import EngineSelector
    from sisyphus.localengine import LocalEngine
    return EngineSelector(engines={{"short": LocalEngine(cpu=1, mem=1), "long": LocalEngine(cpu=2, mem=8)}},
                          default_engine="long")
"""


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("setup")
    model = make_tiny_bert(str(root / "tiny-model"))
    data = tiny_data_dir(root / "data", tasks=TASKS, sizes={"train": 48, "validation": 16, "test": 16})
    preset = root / "tiny_preset.json"
    preset.write_text(json.dumps(tiny_preset(model, data)))
    (root / "settings.py").write_text(SETTINGS.format(code=os.path.join(REPO, "code"), preset=str(preset)))
    for folder in ("config", "recipe"):
        os.symlink(os.path.join(REPO, folder), root / folder)
    return root


def sis(setup_dir, *args, timeout=900):
    env = dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("MERGE_PRESET", None)
    return subprocess.run([sys.executable, "-m", "sisyphus", *args], cwd=setup_dir, env=env, capture_output=True,
                          text=True, timeout=timeout)


def finished_markers(setup_dir):
    return {path: os.stat(path).st_mtime_ns for path in glob.glob(str(setup_dir / "work" / "**" / "finished"), recursive=True)}


@pytest.mark.slow
def test_example_config_end_to_end(setup_dir):
    run = sis(setup_dir, "--config", "config/example.py", "m", "-r")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    models = ["pretrained", "finetuned rotten_tomatoes", "finetuned imdb", "multitask", "task arithmetic",
              "gradient matching", "task arithmetic (without imdb)", "gradient matching (without imdb)"]
    for model in models:
        for task in TASKS:
            metrics = json.load(open(setup_dir / "output" / "example" / "metrics" / model.replace(" ", "_") / f"{task}.json"))
            assert metrics["num_examples"] == 16 and 0 <= metrics["accuracy"] <= 1
    for merged in ("task_arithmetic", "gradient_matching"):
        assert os.path.isfile(setup_dir / "output" / "example" / "models" / merged / "config.json")

    report = setup_dir / "output" / "example" / "report"
    rows = list(csv.reader(open(report / "results.csv")))
    assert rows[0] == ["model", *TASKS, "average", "held_in_average", "held_out_average", "gap_to_multitask",
                       "held_out_tasks"]
    assert [row[0] for row in rows[1:]] == models
    accuracy = {}
    for row in rows[1:]:
        metrics = [json.load(open(setup_dir / "output" / "example" / "metrics" / row[0].replace(" ", "_") / f"{t}.json"))
                   for t in TASKS]
        accuracy[row[0]] = dict(zip(TASKS, [m["accuracy"] for m in metrics]))
        assert [float(v) for v in row[1:4]] == pytest.approx(list(accuracy[row[0]].values()))
    # imdb, the preset's last task, is held out for the merges without its model; sst2 (θ_0's task) held in
    held_out = {row[0]: row[-1] for row in rows[1:]}
    assert held_out["task arithmetic (without imdb)"] == "imdb" and held_out["task arithmetic"] == ""
    normalized = {row["model"]: row for row in csv.DictReader(open(report / "normalized.csv"))}
    merged = accuracy["gradient matching (without imdb)"]
    assert float(normalized["gradient matching (without imdb)"]["imdb"]) == pytest.approx(
        merged["imdb"] / accuracy["finetuned imdb"]["imdb"], abs=1e-6)
    assert float(normalized["gradient matching (without imdb)"]["sst2"]) == pytest.approx(
        merged["sst2"] / accuracy["pretrained"]["sst2"], abs=1e-6)
    for png in ("accuracy.png", "normalized.png", "generalization.png"):
        assert (report / png).stat().st_size > 0

    before = finished_markers(setup_dir)
    assert len(before) >= 30
    again = sis(setup_dir, "--config", "config/example.py", "m", "-r", timeout=120)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert finished_markers(setup_dir) == before  # nothing was computed again
