"""The paper authors' three JSON configs (UKPLab/iclr2024-model-merging, scripts/*.json), with only their paths
filled in, run through train.py and predict.py on a tiny model and write what their keys say."""
import json
import math
import os

import pytest

from modelmerge.config import from_dict, run_program
from modelmerge.prediction.config import PredictConfig
from modelmerge.prediction.program import run
from modelmerge.training import TrainConfig, train
from tiny import make_tiny_bert, read_jsonl, tiny_data_dir

# The files as the authors published them; `TODO()` (cache_dir) and the /path/to/ prefixes are filled in below.
FINETUNE = """{
    "model_name_or_path": "roberta-base",
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "cache_dir": TODO(),
    "max_input_length": 384,
    "max_output_length": 128,
    "optimizer_name": "AdamW",
    "warmup_steps": 100,
    "min_lr": 0.0,
    "dropout": 0.0,
    "max_grad_norm": 1.0,
    "method": "sequence_classification",
    "learning_rate": 1e-05,
    "output_dir": "roberta-base-imdb",
    "num_train_epochs": 1,
    "logging_strategy": "steps",
    "logging_steps": 128,
    "save_strategy": "epoch",
    "overwrite_output_dir": true,
    "evaluation_strategy": "epoch",
    "dataset_name": "/path/to/iclr2024-model-merging/code/merging/datasets/imdb.py",
    "dataset_config_name": "classification",
    "dataset_train_split": "train",
    "dataset_val_split": "validation"
}"""
EVALUATE = """{
    "model_name_or_path": "/path/to/model",
    "per_device_eval_batch_size": 32,
    "cache_dir": TODO(),
    "max_input_length": 384,
    "max_output_length": 128,
    "method": "sequence_classification",
    "metric_output_file": "roberta_base_imdb.metrics.json",
    "prediction_output_file": "roberta_base_imdb.search_output.json",
    "dataset_name": "/path/to/iclr2024-model-merging/code/merging/datasets/imdb.py",
    "dataset_config_name": "classification",
    "dataset_test_split": "test"
}"""
FISHER = """{
    "model_name_or_path": "/path/to/roberta-base-imdb/",
    "method": "sequence_classification_squared_gradients",
    "per_device_eval_batch_size": 1,
    "track_fim": true,
    "max_input_length": 384,
    "output_dir": "roberta-base-imdb-fisher",
    "dataset_name": "/path/to/iclr2024-model-merging/code/merging/datasets/imdb.py",
    "dataset_config_name": "classification",
    "dataset_test_split": "train"
}"""
SIZES = {"train": 12, "validation": 6, "test": 7}


@pytest.fixture
def workdir(tmp_path_factory, tmp_path, monkeypatch):
    """A tiny model with RoBERTa's 512 positions, an imdb data folder, and the configs filled in, in the cwd."""
    assets = tmp_path_factory.mktemp("assets")
    model = make_tiny_bert(assets / "roberta-base", max_position_embeddings=512)
    monkeypatch.setenv("MERGE_DATA_DIR", tiny_data_dir(assets / "data", tasks=("imdb",), sizes=SIZES))
    monkeypatch.chdir(tmp_path)
    substitutions = {"TODO()": json.dumps(str(assets / "cache")), '"roberta-base"': json.dumps(model),
                     "/path/to/model": "roberta-base-imdb/best", "/path/to/roberta-base-imdb/": "roberta-base-imdb/best/",
                     "/path/to/iclr2024-model-merging": str(assets / "iclr2024-model-merging")}
    for name, text in (("finetune", FINETUNE), ("evaluate", EVALUATE), ("fisher", FISHER)):
        for old, new in substitutions.items():
            text = text.replace(old, new)
        (tmp_path / f"{name}_roberta_imdb.json").write_text(text)
    return tmp_path


def test_the_three_paper_configs_run_and_write_what_their_keys_say(workdir):
    assert run_program(TrainConfig, train, "train", ["finetune_roberta_imdb.json"]) == 0
    resolved = json.loads((workdir / "roberta-base-imdb" / "train_config.json").read_text())
    assert {key: resolved[key] for key in ("max_length", "per_device_eval_batch_size", "train_split", "validation_split",
                                           "overwrite", "adam_beta1", "min_lr", "logging_strategy", "logging_steps")} == {
        "max_length": 384, "per_device_eval_batch_size": 8, "train_split": "train", "validation_split": "validation",
        "overwrite": True, "adam_beta1": 0.9, "min_lr": 0.0, "logging_strategy": "steps", "logging_steps": 128}
    state = json.loads((workdir / "roberta-base-imdb" / "trainer_state.json").read_text())
    assert state["global_step"] == 1  # 12 imdb examples in one batch of 16, one epoch
    assert [entry["epoch"] for entry in state["log_history"] if "eval_accuracy" in entry] == [1]

    assert run_program(PredictConfig, run, "predict", ["evaluate_roberta_imdb.json"]) == 0
    metrics = json.loads((workdir / "roberta_base_imdb.metrics.json").read_text())
    predictions = read_jsonl(workdir / "roberta_base_imdb.search_output.json")
    gold = read_jsonl(os.path.join(os.environ["MERGE_DATA_DIR"], "imdb", "test.jsonl"))
    assert [p["label"] for p in predictions] == [g["label"] for g in gold]  # the test split, in order
    assert metrics["num_examples"] == SIZES["test"]
    assert metrics["accuracy"] == pytest.approx(sum(p["label"] == p["prediction"] for p in predictions) / SIZES["test"])

    assert run_program(PredictConfig, run, "predict", ["fisher_roberta_imdb.json"]) == 0
    fisher = workdir / "roberta-base-imdb-fisher"
    assert sorted(os.listdir(fisher)) == [".written-by", "fisher.safetensors", "hessian", "stats.json"]
    assert json.loads((fisher / "stats.json").read_text())["num_examples"] == SIZES["train"]

    assert sorted(os.listdir(workdir)) == sorted([
        "evaluate_roberta_imdb.json", "finetune_roberta_imdb.json", "fisher_roberta_imdb.json", "roberta-base-imdb",
        "roberta-base-imdb-fisher", "roberta_base_imdb.metrics.json", "roberta_base_imdb.search_output.json"])


def test_the_keys_the_authors_search_job_adds_are_accepted(workdir):
    """HuggingfaceSearchJob adds output_dir, metric/prediction files and null config_name / tokenizer_name."""
    assert run_program(TrainConfig, train, "train", ["finetune_roberta_imdb.json"]) == 0
    config = json.loads((workdir / "evaluate_roberta_imdb.json").read_text())
    config.update(output_dir="checkpoints", metric_output_file="metrics.json", prediction_output_file="search_output.json",
                  config_name=None, tokenizer_name=None)
    (workdir / "search_config.json").write_text(json.dumps(config))
    assert run_program(PredictConfig, run, "predict", ["search_config.json"]) == 0
    assert (workdir / "metrics.json").read_text() == (workdir / "checkpoints" / "metrics.json").read_text()
    assert (workdir / "search_output.json").read_text() == (workdir / "checkpoints" / "predictions.jsonl").read_text()


def test_the_training_config_the_authors_example_passes_to_its_search_jobs_is_accepted(workdir):
    """Their config/example.py evaluates with `{**training config, **search_data_config}`: the training keys are
    accepted without effect and the metrics equal those of the plain evaluation config."""
    assert run_program(TrainConfig, train, "train", ["finetune_roberta_imdb.json"]) == 0
    finetune = json.loads((workdir / "finetune_roberta_imdb.json").read_text())
    search = {key: finetune[key] for key in (
        "model_name_or_path", "per_device_train_batch_size", "per_device_eval_batch_size",
        "gradient_accumulation_steps", "max_input_length", "max_output_length", "optimizer_name", "warmup_steps",
        "min_lr", "dropout", "max_grad_norm", "method", "learning_rate")}
    search.update(beta1=0.9, beta2=0.999, dataset_name=finetune["dataset_name"], dataset_config_name="classification",
                  dataset_test_split="test", model_name_or_path="roberta-base-imdb/best", output_dir="search")
    (workdir / "search_config.json").write_text(json.dumps(search))
    assert run_program(PredictConfig, run, "predict", ["search_config.json"]) == 0
    assert run_program(PredictConfig, run, "predict", ["evaluate_roberta_imdb.json"]) == 0
    searched = json.loads((workdir / "search" / "metrics.json").read_text())
    evaluated = json.loads((workdir / "roberta_base_imdb.metrics.json").read_text())
    assert searched["num_examples"] == SIZES["test"] and searched == evaluated


def test_unknown_keys_are_still_refused(workdir, caplog):
    config = json.loads((workdir / "fisher_roberta_imdb.json").read_text())
    (workdir / "c.json").write_text(json.dumps({**config, "track_fisher": True}))
    assert run_program(PredictConfig, run, "predict", ["c.json"]) == 2
    assert "unknown key(s) track_fisher" in caplog.text and not (workdir / "roberta-base-imdb-fisher").exists()


def test_min_lr_floors_the_cosine_schedule_and_logging_strategy_epoch_logs_per_epoch(workdir):
    config = json.loads((workdir / "finetune_roberta_imdb.json").read_text())
    config.update(max_input_length=64, per_device_train_batch_size=2, num_train_epochs=2, warmup_steps=0,
                  learning_rate=1e-3, min_lr=4e-4, logging_strategy="epoch")
    trainer = train(from_dict(TrainConfig, config))
    steps = SIZES["train"] // 2
    rates = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    assert len(rates) == 2  # one training log per epoch
    # cosine from 1e-3 down to 4e-4 over 12 steps: lr(step) = min + (max - min) * (1 + cos(pi * step / 12)) / 2,
    # logged as the rate of each epoch's last step (steps 5 and 11, counted from 0)
    expected = [4e-4 + 6e-4 * (1 + math.cos(math.pi * step / (2 * steps))) / 2 for step in (steps - 1, 2 * steps - 1)]
    assert rates == pytest.approx(expected, rel=0.02)
