"""The contract the paper authors' recipes (UKPLab/iclr2024-model-merging, recipe/ukp/huggingface) hold
code/ to, run end to end by `sis m -r` on a tiny model: the keys their Jobs add to every config, the
post-processing of the training output folder their HuggingfaceTrainingJob does (`models/epoch-best` ->
`output_dir/checkpoint-<step of the best eval_loss>`, read from `output_dir/trainer_state.json`), and the files
their HuggingfaceSearchJob reads back, for evaluation and for the Fisher alike. The Jobs are the project's
`ukp.huggingface` ones (the authors' signatures), with the authors' additions written here in `authors_style`."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from sis_util import REPO, make_setup
from tiny import make_tiny_bert, read_jsonl, tiny_data_dir

TASKS = ("sst2", "rotten_tomatoes")
SIZES = {"train": 24, "validation": 8, "test": 12}

# What the authors' Jobs add to the project's: the fixed keys of every config, their output files, the cleanup.
AUTHORS_STYLE = '''
import json
import os

from sisyphus import Task
from ukp.huggingface.search import HuggingfaceSearchJob
from ukp.huggingface.training import HuggingfaceTrainingJob


class AuthorsTraining(HuggingfaceTrainingJob):
    def __init__(self, code_root, config, train_data_config, *, num_epochs=1):
        super().__init__(code_root, config, train_data_config, num_epochs=num_epochs)
        self.out_models_dir = self.output_path("models", directory=True)
        self.out_epoch_links = {k: self.output_path(f"models/epoch-{k:03}") for k in range(1, num_epochs + 1)}
        self.out_best_model = self.output_path("models/epoch-best")

    def config(self):
        return {**super().config(), "logging_strategy": "steps", "logging_steps": 128, "save_strategy": "epoch",
                "overwrite_output_dir": True, "evaluation_strategy": "epoch"}

    def tasks(self):
        yield from super().tasks()
        yield Task("link_checkpoints", mini_task=True)

    def link_checkpoints(self):
        """Each epoch's Trainer checkpoint, and the one of the smallest eval_loss, by their steps in trainer_state.json."""
        output_dir = self.out_dir.get_path()
        with open(os.path.join(output_dir, "trainer_state.json")) as f:
            history = json.load(f)["log_history"][:-1]  # the last entry sums up the run
        evaluations = [entry for entry in history if "eval_loss" in entry and float(entry["epoch"]).is_integer()]
        for entry in evaluations:
            os.symlink(os.path.join(output_dir, f"checkpoint-{entry['step']}"),
                       self.out_epoch_links[int(entry["epoch"])].get_path())
        best = min(evaluations, key=lambda entry: entry["eval_loss"])
        os.symlink(os.path.join(output_dir, f"checkpoint-{best['step']}"), self.out_best_model.get_path())


class AuthorsSearch(HuggingfaceSearchJob):
    def __init__(self, code_root, model_path, config, search_data_config):
        super().__init__(code_root, model_path, config, search_data_config)
        self.out_metric_file = self.output_path("metrics.json")
        self.out_search_file = self.output_path("search_output.json")
        self.out_checkpoints_dir = self.output_path("checkpoints", directory=True)

    def config(self):
        return {**self.search_config, "metric_output_file": self.out_metric_file,
                "prediction_output_file": self.out_search_file, "output_dir": self.out_checkpoints_dir,
                "model_name_or_path": self.model_path, "config_name": None, "tokenizer_name": None}
'''

CONFIG = '''
import os

from sisyphus import gs, tk
from authors_style import AuthorsSearch, AuthorsTraining
from ukp.huggingface.task_arithmetic import TaskArithmeticJob, UncertaintyBasedGradientMatchingJob

code_root = gs.CODE_ROOT


def dataset(task):
    return os.path.join(code_root, f"merging/datasets/{task}.py")


def fisher(model, task, name):
    config = {"model_name_or_path": model, "method": "sequence_classification_squared_gradients",
              "per_device_eval_batch_size": 1, "track_fim": True, "max_input_length": 32}
    job = AuthorsSearch(code_root, model, config, {"dataset_name": dataset(task), "dataset_config_name": "classification",
                                                   "dataset_test_split": "train[:6]"})
    tk.register_output(f"fisher/{name}", job.out_checkpoints_dir)
    tk.register_output(f"fisher/{name}.metrics.json", job.out_metric_file)
    tk.register_output(f"fisher/{name}.search_output.json", job.out_search_file)
    return job.out_checkpoints_dir


def train(config, task, epochs):
    return AuthorsTraining(code_root, config, {"dataset_name": dataset(task), "dataset_config_name": "classification",
                                               "dataset_train_split": "train", "dataset_val_split": "validation"},
                           num_epochs=epochs)


async def py():
    config = {"model_name_or_path": TINY_MODEL, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8,
              "gradient_accumulation_steps": 1, "max_input_length": 32, "max_output_length": 128,
              "optimizer_name": "AdamW", "warmup_steps": 0, "min_lr": 0.0, "beta1": 0.9, "beta2": 0.999,
              "dropout": 0.0, "max_grad_norm": 1.0, "method": "sequence_classification", "learning_rate": 1e-3}
    pretrain = train(config, "sst2", 2)
    tk.register_output("pretrained_model", pretrain.out_best_model)
    pretrained_fisher = fisher(pretrain.out_best_model, "sst2", "sst2")
    config = {**config, "model_name_or_path": pretrain.out_best_model, "learning_rate": 5e-4}
    models = [train(config, task, 1).out_best_model for task in TASKS[1:]]
    fishers = [fisher(model, task, task) for model, task in zip(models, TASKS[1:])]
    merges = {"task_arithmetic": TaskArithmeticJob(code_root, pretrain.out_best_model, models, 1.0),
              "gradient_matching": UncertaintyBasedGradientMatchingJob(
                  code_root, pretrain.out_best_model, models, pretrained_fisher, fishers, 1e-12, scaling_factor=1.0,
                  scaling_factor_pretrained=24, scaling_factors_finetuned=[24])}
    for name, job in merges.items():
        tk.register_output(f"models/{name}", job.out_model_path)
        for task in TASKS:
            search = AuthorsSearch(code_root, job.out_model_path, config,
                                   {"dataset_name": dataset(task), "dataset_config_name": "classification",
                                    "dataset_test_split": "test"})
            tk.register_output(f"example/{task}_{name}.metrics.json", search.out_metric_file)
            tk.register_output(f"example/{task}_{name}.search_output.json", search.out_search_file)
'''.replace("TASKS", repr(TASKS))

def write_setup(root):
    model = make_tiny_bert(str(root / "tiny-model"))
    data = tiny_data_dir(root / "data", tasks=TASKS, sizes=SIZES)
    setup = root / "setup"
    # tasks keep the caller's environment (MERGE_DATA_DIR)
    make_setup(setup, recipes={"authors_style": AUTHORS_STYLE},
               configs={"authors": CONFIG.replace("TINY_MODEL", repr(model))}, cpu=2, mem=8, project_recipes=True)
    return setup, data


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def same_weights(a, b):
    a, b = weights(a), weights(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_authors_contract_runs_end_to_end(tmp_path):
    setup, data = write_setup(tmp_path)
    env = dict(os.environ, PYTHONPATH=REPO, MERGE_DATA_DIR=str(data), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.pop("MERGE_PRESET", None)
    run = subprocess.run([sys.executable, "-m", "sisyphus", "--config", "config/authors.py", "m", "-r"], cwd=setup,
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    output = setup / "output"

    # The training folder has Hugging Face's layout: the best epoch's checkpoint-<step>, found from trainer_state.json,
    # is a model folder equal to train.py's own export of that epoch.
    pretrained = os.path.realpath(output / "pretrained_model")
    training = os.path.dirname(pretrained)
    state = json.load(open(os.path.join(training, "trainer_state.json")))
    evaluations = {int(e["epoch"]): e for e in state["log_history"] if "eval_loss" in e}
    assert sorted(evaluations) == [1, 2] and state["global_step"] == 2 * 24 // 8
    best_epoch = min(evaluations, key=lambda k: evaluations[k]["eval_loss"])
    assert pretrained == os.path.join(training, f"checkpoint-{evaluations[best_epoch]['step']}")
    assert same_weights(pretrained, os.path.join(training, f"epoch-{best_epoch}"))
    for epoch in (1, 2):
        link = os.path.realpath(os.path.join(os.path.dirname(os.readlink(output / "pretrained_model")), f"epoch-{epoch:03}"))
        assert link == os.path.join(training, f"checkpoint-{3 * epoch}")
    assert os.path.isfile(os.path.join(pretrained, "tokenizer.json"))

    # The Fisher search writes its statistics folder to output_dir, its stats to metric_output_file and the labels
    # it took each example's gradient at (sampled from the model) to prediction_output_file.
    for task in TASKS:
        folder = output / "fisher" / task
        assert os.path.isfile(folder / "fisher.safetensors") and os.path.isfile(folder / "hessian" / "config.json")
        assert json.load(open(output / "fisher" / f"{task}.metrics.json")) == json.load(open(folder / "stats.json"))
        rows = read_jsonl(output / "fisher" / f"{task}.search_output.json")
        assert [row["index"] for row in rows] == list(range(6))
        assert all(row["prediction"] in (0, 1) and row["variant"] == "sampled" for row in rows)

    # Both merges are model folders; every evaluation's metrics agree with its own per-example rows.
    for name in ("task_arithmetic", "gradient_matching"):
        assert os.path.isfile(output / "models" / name / "config.json")
        for task in TASKS:
            metrics = json.load(open(output / "example" / f"{task}_{name}.metrics.json"))
            rows = read_jsonl(output / "example" / f"{task}_{name}.search_output.json")
            labels = [row["label"] for row in read_jsonl(os.path.join(data, task, "test.jsonl"))]
            assert [row["label"] for row in rows] == labels and metrics["num_examples"] == SIZES["test"]
            assert metrics["accuracy"] == sum(row["prediction"] == row["label"] for row in rows) / len(rows)
