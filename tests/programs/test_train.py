"""code/train.py on a tiny random BERT and 48 sst2 sentences: loss, folders, best-epoch choice, resume, PEFT, bad configs."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

from modelmerge.config import from_dict, run_program
from modelmerge.prediction.loading import load_classifier
from modelmerge.training import TrainConfig, train
from sis_util import REPO
from tiny import dtype_copy, make_tiny_bert, read_jsonl, tiny_data_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return {"model": make_tiny_bert(root / "tiny"), "data": tiny_data_dir(root / "data")}


def make_config(setup, output_dir, **overrides):
    keys = dict(model_name_or_path=setup["model"], output_dir=str(output_dir), dataset_name="sst2", data_dir=setup["data"],
                learning_rate=1e-3, warmup_steps=0, lr_scheduler_type="linear", num_train_epochs=2,
                per_device_train_batch_size=8, max_length=32, logging_steps=1, num_threads=1, seed=3)
    keys.update(overrides)
    return keys


def mean_loss(model, tokenizer, rows):
    """Cross-entropy over `rows`, one example at a time (no padding), computed directly."""
    model.eval()
    losses = []
    with torch.no_grad():
        for row in rows:
            logits = model(**tokenizer(row["text"], return_tensors="pt", truncation=True, max_length=32)).logits
            losses.append(torch.nn.functional.cross_entropy(logits, torch.tensor([row["label"]])))
    return float(torch.stack(losses).mean())


def read_state(output_dir):
    with open(os.path.join(output_dir, "trainer_state.json")) as f:
        return json.load(f)


def test_full_fine_tuning_lowers_loss_and_writes_loadable_folders(setup, tmp_path):
    out = tmp_path / "out"
    train(from_dict(TrainConfig, make_config(setup, out, num_train_epochs=3)))
    rows = read_jsonl(os.path.join(setup["data"], "sst2", "train.jsonl"))
    tokenizer = AutoTokenizer.from_pretrained(out / "best")
    before = mean_loss(AutoModelForSequenceClassification.from_pretrained(setup["model"]), tokenizer, rows)
    after = mean_loss(AutoModelForSequenceClassification.from_pretrained(out / "epoch-3"), tokenizer, rows)
    assert after < before - 0.05

    # Hugging Face's layout: the Trainer's checkpoints and trainer_state.json in output_dir, the exports beside them
    assert sorted(os.listdir(out)) == ["best", "checkpoint-12", "checkpoint-18", "checkpoint-6", "epoch-1", "epoch-2",
                                       "epoch-3", "train_config.json", "train_results.txt", "trainer_state.json"]
    state = read_state(out)
    assert state["global_step"] == 3 * 6  # 48 examples / batch 8, three epochs
    evals = [entry for entry in state["log_history"] if "eval_accuracy" in entry]
    assert [e["epoch"] for e in evals] == [1, 2, 3]
    best_epoch = max(evals, key=lambda e: e["eval_accuracy"])["epoch"]  # first of equals, as the Trainer keeps
    best = load_file(out / "best" / "model.safetensors")
    chosen = load_file(out / f"epoch-{int(best_epoch)}" / "model.safetensors")
    assert best.keys() == chosen.keys() and all(torch.equal(best[k], chosen[k]) for k in best)
    assert json.loads((out / "train_config.json").read_text())["learning_rate"] == 1e-3


class StopAfterFirstSave(TrainerCallback):
    """Simulates a job killed right after the first epoch's checkpoint."""

    def on_save(self, args, state, control, **kwargs):
        raise KeyboardInterrupt


class CountSteps(TrainerCallback):
    steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def test_resume_continues_from_the_last_checkpoint(setup, tmp_path):
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    with pytest.raises(KeyboardInterrupt):
        train(from_dict(TrainConfig, make_config(setup, interrupted)), callbacks=[StopAfterFirstSave()])
    assert sorted(os.listdir(interrupted)) == ["checkpoint-6", "train_config.json"]  # nothing that looks finished

    counter = CountSteps()
    train(from_dict(TrainConfig, make_config(setup, interrupted)), callbacks=[counter])
    assert counter.steps == 6  # only the second epoch ran
    assert read_state(interrupted)["global_step"] == 12
    assert {"checkpoint-12", "checkpoint-6"} <= set(os.listdir(interrupted))

    train(from_dict(TrainConfig, make_config(setup, straight)))
    resumed = load_file(interrupted / "epoch-2" / "model.safetensors")
    uninterrupted = load_file(straight / "epoch-2" / "model.safetensors")
    for name in uninterrupted:
        torch.testing.assert_close(resumed[name], uninterrupted[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_model_trains_in_float32_and_is_saved_in_its_dtype(setup, tmp_path, dtype):
    """Issue 21: pure fp16 AdamW (lr 1e-3) took a tiny BERT's word embeddings from max |w| 0.074 to 203, exit 0."""
    half = dtype_copy(setup["model"], tmp_path / "half", dtype)
    reference = dtype_copy(half, tmp_path / "upcast", torch.float32)  # the same weights in float32, exactly
    for model, out in ((half, tmp_path / "out_half"), (reference, tmp_path / "out_reference")):
        train(from_dict(TrainConfig, make_config(setup, out, model_name_or_path=model)))
    name = "bert.embeddings.word_embeddings.weight"
    start = load_file(os.path.join(half, "model.safetensors"))[name].float().abs().max()
    for folder in ("epoch-1", "epoch-2", "best"):
        trained = load_file(tmp_path / "out_half" / folder / "model.safetensors")
        expected = load_file(tmp_path / "out_reference" / folder / "model.safetensors")
        assert trained.keys() == expected.keys()
        for key, value in expected.items():
            assert trained[key].dtype == (dtype if value.is_floating_point() else value.dtype), key
            assert torch.equal(trained[key], value.to(trained[key].dtype)), key  # the fp32 run, rounded once
        assert json.loads((tmp_path / "out_half" / folder / "config.json").read_text())["dtype"] == str(dtype)[6:]
        assert float(trained[name].float().abs().max()) < float(start) + 12 * 1e-3  # Adam moves ≤ lr per step
    assert load_file(tmp_path / "out_half" / "checkpoint-12" / "model.safetensors")[name].dtype == torch.float32
    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "out_half" / "best").dtype == dtype


def test_interrupted_run_of_the_old_layout_resumes(setup, tmp_path):
    """Checkpoints lay in output_dir/checkpoints/ before output_dir took Hugging Face's layout."""
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        train(from_dict(TrainConfig, make_config(setup, out)), callbacks=[StopAfterFirstSave()])
    (out / "checkpoints").mkdir()
    for name in ("checkpoint-6", "train_config.json"):
        os.rename(out / name, out / "checkpoints" / name)
    counter = CountSteps()
    train(from_dict(TrainConfig, make_config(setup, out)), callbacks=[counter])
    assert counter.steps == 6  # only the second epoch ran
    assert not os.path.exists(out / "checkpoints") and {"checkpoint-6", "checkpoint-12"} <= set(os.listdir(out))


def test_rerun_with_a_different_config_is_refused(setup, tmp_path, caplog):
    out = tmp_path / "out"
    config_path = tmp_path / "c.json"
    config_path.write_text(json.dumps(make_config(setup, out, num_train_epochs=1)))
    assert run_program(TrainConfig, train, "train", [str(config_path)]) == 0
    config_path.write_text(json.dumps(make_config(setup, out, num_train_epochs=1, learning_rate=2e-3)))
    assert run_program(TrainConfig, train, "train", [str(config_path)]) == 2
    assert "different config (keys learning_rate differ)" in caplog.text


@pytest.mark.parametrize("peft, adapted", [
    ({"type": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]}, "lora_B"),
    ({"type": "ia3"}, "ia3_l"),
])
def test_peft_training_writes_adapter_folders(setup, tmp_path, peft, adapted):
    out = tmp_path / "out"
    train(from_dict(TrainConfig, make_config(setup, out, peft=peft, num_train_epochs=1, learning_rate=1e-2)))
    assert os.path.isfile(out / "best" / "adapter_config.json")
    weights = load_file(out / "best" / "adapter_model.safetensors")
    assert any(adapted in name for name in weights) and any("classifier" in name for name in weights)
    model, tokenizer = load_classifier(str(out / "best"))
    base = AutoModelForSequenceClassification.from_pretrained(setup["model"])
    trained = dict(model.named_parameters())
    wrapped = {n.removeprefix("base_model.model.").replace(".base_layer", ""): p for n, p in trained.items()}
    for name, parameter in base.bert.named_parameters():  # the encoder itself is frozen
        torch.testing.assert_close(wrapped[f"bert.{name}"], parameter, rtol=0, atol=0)
    changed = [n for n, p in trained.items() if adapted in n and not torch.allclose(p, torch.zeros_like(p)) and not torch.allclose(p, torch.ones_like(p))]
    assert changed, "the adapter weights did not move from their initial values"
    assert tokenizer("a fine film")["input_ids"]


@pytest.mark.parametrize("change, message", [
    ({"learning_rat": 1e-3}, "unknown key(s) learning_rat"),
    ({"dataset_name": None}, "missing required key(s) dataset_name"),
    ({"num_train_epochs": "two"}, "num_train_epochs must be a number, got 'two'"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"lr_scheduler_type": "cosinus"}, "lr_scheduler_type 'cosinus'"),
    ({"model_name_or_path": "/nonexistent/model"}, "model_name_or_path: /nonexistent/model"),
    ({"dataset_name": "nosuch"}, "dataset 'nosuch'"),
    ({"train_split": "train[:5];train"}, "needs one split per dataset"),
    ({"validation_split": "dev"}, "no split 'dev'"),
    ({"peft": {"type": "lora", "rank": 4}}, "peft: unknown key(s) rank"),
    ({"peft": {"type": "prefix"}}, "peft.type must be one of"),
    ({"peft": {"type": "lora", "target_modules": ["nosuchlayer"]}}, "peft:"),
    ({"ivon": {"hess_init": 0.1}}, "ivon: IVON's keys given with optimizer_name AdamW"),
    ({"optimizer_name": "IVON", "ivon": {"hess_int": 0.1}}, "ivon: unknown key(s) hess_int"),
    ({"optimizer_name": "IVON", "ivon": {"hess_init": 0}}, "ivon.hess_init must be positive, got 0"),
    ({"optimizer_name": "IVON", "ivon": {"beta2": 1.0}}, "ivon.beta2 must be in [0, 1), got 1.0"),
    ({"optimizer_name": "IVON", "adam_beta2": 0.99}, "adam_beta2 is AdamW's, not used with optimizer_name IVON"),
    ({"optimizer_name": "IVON", "gradient_accumulation_steps": 2}, "gradient_accumulation_steps must be 1 with"),
    ({"optimizer_name": "IVON", "task_type": "seq2seq", "ivon": {"eval_samples": 2}}, "ivon.eval_samples averages"),
])
def test_bad_configs_exit_with_a_message_and_leave_no_output(setup, tmp_path, caplog, change, message):
    config = make_config(setup, tmp_path / "out")
    config.update(change)
    config = {k: v for k, v in config.items() if v is not None}
    (tmp_path / "c.json").write_text(json.dumps(config))
    assert run_program(TrainConfig, train, "train", [str(tmp_path / "c.json")]) == 2
    assert message in caplog.text
    assert os.listdir(tmp_path) == ["c.json"]


def test_program_exit_status(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"output_dir": str(tmp_path / "out")}))
    result = subprocess.run([sys.executable, os.path.join(REPO, "code", "train.py"), str(tmp_path / "c.json")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "missing required key(s) dataset_name" in result.stderr
    assert not os.path.exists(tmp_path / "out")
