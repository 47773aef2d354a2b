"""Configs written against the paper authors' Job signatures (`ukp.huggingface.*`) build their graph here, and
the project's configs import only through IMPORT_PATHS (`recipe/` on sys.path, no setup folder), as under
upstream Sisyphus."""
import json
import os
import subprocess
import sys

import pytest

import sisyphus.global_settings as gs
from sisyphus.hash import short_hash
from ukp.huggingface.search import HuggingfaceSearchJob
from ukp.huggingface.task_arithmetic import TaskArithmeticJob, UncertaintyBasedGradientMatchingJob
from ukp.huggingface.training import HuggingfaceTrainingJob
from sis_util import REPO

# A config in the style of the authors' released example (their call signatures and key names), two tasks.
AUTHORS_CONFIG = '''
import os

from sisyphus import gs, tk
from ukp.huggingface.search import HuggingfaceSearchJob
from ukp.huggingface.training import HuggingfaceTrainingJob
from ukp.huggingface.task_arithmetic import TaskArithmeticJob, UncertaintyBasedGradientMatchingJob

code_root = gs.CODE_ROOT


def fisher(model, dataset, split):
    config = {"model_name_or_path": model, "method": "sequence_classification_squared_gradients",
              "per_device_eval_batch_size": 1, "track_fim": True, "max_input_length": 128}
    data = {"dataset_name": dataset, "dataset_config_name": "classification", "dataset_test_split": split}
    job = HuggingfaceSearchJob(code_root=code_root, model_path=model, config=config, search_data_config=data,
                               mem_rqmt=24, time_rqmt=2, gpumem=16)
    return job.out_checkpoints_dir


async def py():
    tasks = {"rotten_tomatoes": {"train_split": "train", "test_split": "test", "dataset_size": 8530},
             "imdb": {"train_split": "train", "test_split": "test", "dataset_size": 691}}
    config = {"model_name_or_path": "roberta-base", "method": "sequence_classification", "learning_rate": 1e-5,
              "per_device_train_batch_size": 16, "per_device_eval_batch_size": 8, "max_input_length": 128,
              "optimizer_name": "AdamW", "beta1": 0.9, "beta2": 0.999, "warmup_steps": 100, "min_lr": 0.0}
    pretrain = HuggingfaceTrainingJob(
        code_root=code_root, config=config,
        train_data_config={"dataset_name": "sst2", "dataset_config_name": "classification",
                           "dataset_train_split": "train", "dataset_val_split": "validation"},
        num_epochs=1, mem_rqmt=24, time_rqmt=4, gpumem=16)
    pretrain.add_alias("pretrained_model")
    pretrained_fisher = fisher(pretrain.out_best_model, "sst2", "train")

    config["learning_rate"] = 5e-6
    config["model_name_or_path"] = pretrain.out_best_model
    models, fishers = [], []
    for task, spec in tasks.items():
        job = HuggingfaceTrainingJob(
            code_root=code_root, config=config,
            train_data_config={"dataset_name": task, "dataset_config_name": "classification",
                               "dataset_train_split": spec["train_split"], "dataset_val_split": spec["test_split"]},
            num_epochs=1, mem_rqmt=24, time_rqmt=4, gpumem=16)
        models.append(job.out_best_model)
        fishers.append(fisher(job.out_best_model, task, "train"))

    ta = TaskArithmeticJob(code_root, pretrain.out_best_model, models, 1.0)
    ours = UncertaintyBasedGradientMatchingJob(
        code_root, pretrain.out_best_model, models, pretrained_fisher, fishers, 1e-12, scaling_factor=1.0,
        scaling_factor_pretrained=4000, scaling_factors_finetuned=[t["dataset_size"] for t in tasks.values()])
    for task in ["sst2", *tasks]:
        for name, model in (("task_arithmetic", ta.out_model_path), ("gradient_matching", ours.out_model_path)):
            search = HuggingfaceSearchJob(
                code_root=code_root, model_path=model, config=config,
                search_data_config={"dataset_name": task, "dataset_config_name": "classification",
                                    "dataset_test_split": "test"},
                mem_rqmt=8, time_rqmt=3, gpumem=11)
            tk.register_output(f"example/{task}_{name}.metrics.json", search.out_metric_file)
'''

SETTINGS = 'IMPORT_PATHS = ["config", "recipe/"]\nCODE_ROOT = {code!r}\n'

# Loads configs with the project's `sis` loader; prints each job's id, class, inputs and command/config.
DESCRIBE = """
import json, os, sys
import sisyphus.global_settings as gs
import sisyphus.toolkit as tk
from sisyphus.loader import ConfigLoader
gs.load_settings(os.getcwd())
from model_merging.util import instantiate
loader = ConfigLoader()
loader.load(sys.argv[1])
jobs = {}
for job in tk.sis_graph.jobs():
    jobs[job.job_id()] = {"class": type(job).__name__, "command": instantiate(job.command()),
                          "config": instantiate(job.config()) if hasattr(job, "config") else None,
                          "inputs": sorted({p.creator_id() for p in job._sis_inputs} - {None}),
                          "gpu": job.rqmt["gpu"]}
print(json.dumps(jobs))
"""


def describe(setup, config):
    env = dict(os.environ, PYTHONPATH=REPO)
    run = subprocess.run([sys.executable, "-c", DESCRIBE, config], cwd=setup, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


def make_setup(root, code_root):
    root.mkdir()
    (root / "settings.py").write_text(SETTINGS.format(code=code_root))
    (root / "config").mkdir()
    (root / "config" / "__init__.py").write_text("")
    (root / "config" / "authors.py").write_text(AUTHORS_CONFIG)
    os.symlink(os.path.join(REPO, "recipe"), root / "recipe")
    return str(root)


def test_authors_style_config_builds_its_graph(tmp_path):
    jobs = describe(make_setup(tmp_path / "a", "/opt/code"), "config/authors.py")
    by_class = {}
    for job_id, job in jobs.items():
        by_class.setdefault(job["class"], []).append(job_id)
    assert {k: len(v) for k, v in by_class.items()} == {
        "HuggingfaceTrainingJob": 3, "HuggingfaceSearchJob": 3 + 6, "TaskArithmeticJob": 1,
        "UncertaintyBasedGradientMatchingJob": 1}
    assert all(i.startswith("ukp/huggingface/") for i in jobs)

    # The pretraining job: one train.py config made of config and train_data_config, from code_root.
    pretrain_id = next(i for i in by_class["HuggingfaceTrainingJob"] if jobs[i]["config"]["dataset_name"] == "sst2")
    pretrain = jobs[pretrain_id]
    assert pretrain["command"][1] == "/opt/code/train.py"
    out = pretrain["config"]["output_dir"]
    assert pretrain["config"] == {
        "model_name_or_path": "roberta-base", "method": "sequence_classification", "learning_rate": 1e-5,
        "per_device_train_batch_size": 16, "per_device_eval_batch_size": 8, "max_input_length": 128,
        "optimizer_name": "AdamW", "beta1": 0.9, "beta2": 0.999, "warmup_steps": 100, "min_lr": 0.0,
        "dataset_name": "sst2", "dataset_config_name": "classification", "dataset_train_split": "train",
        "dataset_val_split": "validation", "output_dir": out, "num_train_epochs": 1}
    assert pretrain["gpu"] == 1 and pretrain["inputs"] == []

    # Gradient matching reads the Fisher folders the Fisher search jobs write, in the order given.
    ours = jobs[by_class["UncertaintyBasedGradientMatchingJob"][0]]
    fisher_ids = [i for i in by_class["HuggingfaceSearchJob"]
                  if jobs[i]["config"]["method"] == "sequence_classification_squared_gradients"]
    assert len(fisher_ids) == 3 and set(fisher_ids) <= set(ours["inputs"])
    command = ours["command"]
    assert command[1] == "/opt/code/uncertainty_based_gradient_matching.py"
    pretrained_fisher = command[command.index("--pretrained_hessian_path") + 1]
    assert pretrained_fisher in {jobs[i]["config"]["output_dir"] for i in fisher_ids}
    assert command[command.index("--scaling_factors_ft") + 1] == "8530,691"
    assert command[command.index("--delta_0") + 1] == "1e-12"


def test_code_root_does_not_change_ids(tmp_path):
    first = describe(make_setup(tmp_path / "a", "/opt/code"), "config/authors.py")
    second = describe(make_setup(tmp_path / "b", "/elsewhere/code"), "config/authors.py")
    assert sorted(first) == sorted(second)
    assert {job["command"][1] for job in second.values()} >= {"/elsewhere/code/train.py", "/elsewhere/code/predict.py"}


@pytest.fixture
def setup_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(gs, "BASE_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)


def test_ids_hash_the_arguments_except_location_and_resources(setup_dir):
    job = TaskArithmeticJob("/code", "/m0", ["/m1", "/m2"], 0.5, gpumem=11, time_rqmt=3)
    expected = {"pretrained_model": "/m0", "finetuned_models": ["/m1", "/m2"], "scaling_factor": 0.5,
                "task_type": "SEQ_CLS"}
    assert job.job_id() == f"ukp/huggingface/task_arithmetic/TaskArithmeticJob.{short_hash(expected)}"
    rerun = TaskArithmeticJob("/code", "/m0", ["/m1", "/m2"], 0.5, dummy="rerun")
    assert rerun.job_id() == \
        f"ukp/huggingface/task_arithmetic/TaskArithmeticJob.{short_hash({**expected, 'dummy': 'rerun'})}"

    train = HuggingfaceTrainingJob("/code", {"learning_rate": 1e-5}, {"dataset_name": "imdb"}, num_epochs=2)
    expected = {"config": {"learning_rate": 1e-5}, "train_data_config": {"dataset_name": "imdb"}, "num_epochs": 2}
    assert train.job_id() == f"ukp/huggingface/training/HuggingfaceTrainingJob.{short_hash(expected)}"
    assert train.rqmt["gpu"] == 0 and HuggingfaceSearchJob("/c", "/m", {}, {}, gpumem=8).rqmt["gpu"] == 1
    merge = UncertaintyBasedGradientMatchingJob("/code", "/m0", ["/m1"], "/f0", ["/f1"], 1e-12)
    assert merge.job_id().startswith("ukp/huggingface/task_arithmetic/UncertaintyBasedGradientMatchingJob.")


# Imports each config file the way upstream's `sis` can: sys.path holds the sisyphus package and `recipe/`
# only (not the setup folder), so `recipe.x` or `config.x` imports would fail; builds example.py's graph.
UPSTREAM_IMPORTS = """
import asyncio, importlib.util, inspect, os, sys
sys.path = [p for p in sys.path if p not in ("", os.getcwd())]
sys.path.insert(0, sys.argv[1])  # a folder holding only the sisyphus package
sys.path.append(os.path.join(os.getcwd(), "recipe"))
import sisyphus.toolkit as tk
for name in sys.argv[2:]:
    spec = importlib.util.spec_from_file_location(os.path.basename(name)[:-3], name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not inspect.iscoroutinefunction(module.py):
        module.py()
print(len(tk.sis_graph.jobs()))
"""


def test_configs_import_through_import_paths_only(tmp_path):
    only_sisyphus = tmp_path / "sis"
    only_sisyphus.mkdir()
    os.symlink(os.path.join(REPO, "sisyphus"), only_sisyphus / "sisyphus")
    env = dict(os.environ, MERGE_DATA_DIR=os.path.join(REPO, "data", "sentiment"))
    env.pop("PYTHONPATH", None)
    env.pop("MERGE_PRESET", None)
    run = subprocess.run([sys.executable, "-c", UPSTREAM_IMPORTS, str(only_sisyphus), "config/example.py",
                          "config/merging_methods.py"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert int(run.stdout.split()[-1]) == 31
