"""scripts/: the configs the offline experiment script runs are valid program configs, and the paper-style
merge wrappers pass their arguments through."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from modelmerge.config import load_config
from modelmerge.prediction import PredictConfig
from modelmerge.training import TrainConfig
from tiny import SHARED_DATA, make_tiny_bert, perturbed_copy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")


def test_shell_scripts_parse():
    for name in os.listdir(SCRIPTS):
        if name.endswith(".sh"):
            subprocess.run(["bash", "-n", os.path.join(SCRIPTS, name)], check=True)


def test_offline_configs_are_valid_program_configs(tmp_path):
    env = dict(os.environ, MERGE_PRESET="offline", MERGE_DATA_DIR=SHARED_DATA)
    subprocess.run([sys.executable, os.path.join(SCRIPTS, "offline_configs.py"), str(tmp_path)], check=True, env=env)
    configs = tmp_path / "configs"
    tasks = (configs / "tasks.txt").read_text().split()
    assert tasks == ["rotten_tomatoes", "imdb", "yelp", "amazon"]
    c0, ct = (configs / "sizes.txt").read_text().split()
    assert int(c0) == 4000 and len(ct.split(",")) == len(tasks)
    for task in ["pretrained", "multitask", *tasks]:
        config = load_config(TrainConfig, str(configs / f"train_{task}.json"))
        assert config.output_dir == str(tmp_path / "models" / task)
    multitask = load_config(TrainConfig, str(configs / "train_multitask.json"))
    assert multitask.dataset_name == ";".join(tasks) and multitask.model_name_or_path.endswith("pretrained/best")
    for task in ["pretrained", *tasks]:
        assert load_config(PredictConfig, str(configs / f"fisher_{task}.json")).method == \
            "sequence_classification_squared_gradients"
    for task in ["sst2", *tasks]:
        assert load_config(PredictConfig, str(configs / f"evaluate_{task}.json")).split == "test"
    for example in ("finetune_minilm_sst2.json",):
        load_config(TrainConfig, os.path.join(SCRIPTS, example))
    for example in ("fisher_minilm_sst2.json", "evaluate_minilm_sst2.json"):
        load_config(PredictConfig, os.path.join(SCRIPTS, example))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("scripts")
    base = make_tiny_bert(str(root / "base"))
    return root, base, [perturbed_copy(base, str(root / f"ft{i}"), seed=i) for i in (1, 2)]


def test_task_arithmetic_script(models):
    root, base, finetuned = models
    out = root / "ta"
    subprocess.run(["bash", os.path.join(SCRIPTS, "task_arithmetic.sh"), base, ",".join(finetuned), str(out), "0.5"],
                   check=True, capture_output=True)
    merged = load_file(out / "model.safetensors")
    theta = [load_file(os.path.join(p, "model.safetensors")) for p in [base, *finetuned]]
    name = "bert.encoder.layer.0.attention.self.query.weight"
    expected = theta[0][name] + 0.5 * ((theta[1][name] - theta[0][name]) + (theta[2][name] - theta[0][name]))
    torch.testing.assert_close(merged[name], expected)
    assert json.loads((out / "config.json").read_text())["model_type"] == "bert"
