"""code/predict.py: metrics against a hand count, predictions against one-example forward passes, the statistic
modes' wiring to modelmerge.statistics, adapter folders, and every bad-config case."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from modelmerge.config import ConfigError, from_dict, run_program
from modelmerge.prediction.config import PredictConfig
from modelmerge.prediction.metrics import classification_metrics
from modelmerge.prediction.program import run
from tiny import dtype_copy, make_tiny_bert, read_jsonl, tiny_data_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    return {"model": make_tiny_bert(root / "tiny", seed=1), "data": tiny_data_dir(root / "data")}


def predict_program(tmp_path, **keys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(keys))
    return run_program(PredictConfig, run, "predict", [str(path)])


def base_keys(setup, output_dir, **overrides):
    keys = dict(model_name_or_path=setup["model"], output_dir=str(output_dir), dataset_name="sst2",
                split="validation", data_dir=setup["data"], batch_size=5, max_length=32, num_threads=1)
    keys.update(overrides)
    return keys


def test_classification_metrics_known_values():
    metrics = classification_metrics([0, 0, 1, 1], [0, 1, 1, 1])
    # class 0: tp 1, fp 0, fn 1 -> F1 2/3; class 1: tp 2, fp 1, fn 0 -> F1 4/5
    assert metrics == {"accuracy": 0.75, "macro_f1": pytest.approx((2 / 3 + 4 / 5) / 2), "num_examples": 4}
    assert classification_metrics([1, 1], [1, 1])["macro_f1"] == 1.0  # only class 1 present


def test_metrics_match_a_hand_count_and_predictions_match_single_forward_passes(setup, tmp_path):
    out = tmp_path / "out"
    assert predict_program(tmp_path, **base_keys(setup, out)) == 0
    assert sorted(os.listdir(out)) == [".written-by", "metrics.json", "predictions.jsonl"]
    predictions = read_jsonl(out / "predictions.jsonl")
    gold = read_jsonl(os.path.join(setup["data"], "sst2", "validation.jsonl"))
    assert [p["index"] for p in predictions] == list(range(len(gold)))
    assert [p["label"] for p in predictions] == [g["label"] for g in gold]

    model = AutoModelForSequenceClassification.from_pretrained(setup["model"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(setup["model"])
    for row, prediction in zip(gold, predictions):
        with torch.no_grad():
            logits = model(**tokenizer(row["text"], return_tensors="pt", truncation=True, max_length=32)).logits[0]
        expected = torch.softmax(logits, -1)
        assert prediction["prediction"] == int(expected.argmax())
        assert prediction["probabilities"] == pytest.approx(expected.tolist(), abs=1e-5)

    correct = sum(p["label"] == p["prediction"] for p in predictions)
    f1 = []
    for cls in (0, 1):
        tp = sum(p["label"] == cls and p["prediction"] == cls for p in predictions)
        fp = sum(p["label"] != cls and p["prediction"] == cls for p in predictions)
        fn = sum(p["label"] == cls and p["prediction"] != cls for p in predictions)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_examples"] == len(gold) == 16
    assert metrics["accuracy"] == pytest.approx(correct / len(gold))
    assert metrics["macro_f1"] == pytest.approx(sum(f1) / 2)


def test_num_examples_limits_the_split(setup, tmp_path):
    out = tmp_path / "out"
    assert predict_program(tmp_path, **base_keys(setup, out, split="test[4:]", num_examples=3)) == 0
    gold = read_jsonl(os.path.join(setup["data"], "sst2", "test.jsonl"))[4:7]
    assert [p["label"] for p in read_jsonl(out / "predictions.jsonl")] == [g["label"] for g in gold]


def test_adapter_folder(setup, tmp_path):
    from peft import LoraConfig, TaskType, get_peft_model

    base = AutoModelForSequenceClassification.from_pretrained(setup["model"])
    model = get_peft_model(base, LoraConfig(task_type=TaskType.SEQ_CLS, r=2, target_modules=["query"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "out"
    assert predict_program(tmp_path, **base_keys(setup, out, model_name_or_path=str(tmp_path / "adapter"))) == 0
    tokenizer = AutoTokenizer.from_pretrained(setup["model"])
    text = read_jsonl(os.path.join(setup["data"], "sst2", "validation.jsonl"))[0]["text"]
    with torch.no_grad():
        expected = torch.softmax(model.eval()(**tokenizer(text, return_tensors="pt")).logits[0], -1)
    assert read_jsonl(out / "predictions.jsonl")[0]["probabilities"] == pytest.approx(expected.tolist(), abs=1e-5)


def test_fisher_mode_writes_the_statistics_library_result(setup, tmp_path):
    from modelmerge.data import load_split
    from modelmerge.statistics.fisher import compute_fisher

    out = tmp_path / "out"
    # The paper authors' search job names a metrics and a predictions file in every mode.
    keys = base_keys(setup, out, mode="squared_gradients", num_examples=6, seed=4,
                     metric_output_file=str(tmp_path / "metrics.json"),
                     prediction_output_file=str(tmp_path / "search_output.json"))
    assert predict_program(tmp_path, **keys) == 0
    assert sorted(os.listdir(out)) == [".written-by", "fisher.safetensors", "hessian", "stats.json"]
    model = AutoModelForSequenceClassification.from_pretrained(setup["model"])
    dataset = load_split("sst2", "validation[:6]", setup["data"])
    direct = compute_fisher(model, AutoTokenizer.from_pretrained(setup["model"]), dataset, batch_size=5, max_length=32, seed=4)
    written = load_file(out / "fisher.safetensors")
    assert written.keys() == direct.fisher.keys() == {n for n, _ in model.named_parameters()}
    for name, value in direct.fisher.items():
        torch.testing.assert_close(written[name], value)
    assert json.loads((out / "stats.json").read_text())["num_examples"] == 6
    assert load_file(out / "hessian" / "model.safetensors").keys() >= written.keys()
    assert json.loads((tmp_path / "metrics.json").read_text()) == json.loads((out / "stats.json").read_text())
    rows = read_jsonl(tmp_path / "search_output.json")
    assert rows == [{"index": i, "prediction": label, "variant": "sampled"} for i, label in enumerate(direct.labels.tolist())]


def test_gram_mode_writes_every_linear_layer(setup, tmp_path):
    out = tmp_path / "out"
    assert predict_program(tmp_path, **base_keys(setup, out, mode="gram", num_examples=4)) == 0
    gram, output_gram = load_file(out / "gram.safetensors"), load_file(out / "output_grad_gram.safetensors")
    model = AutoModelForSequenceClassification.from_pretrained(setup["model"])
    linear = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert gram.keys() == output_gram.keys() == linear.keys()
    for name, module in linear.items():
        assert gram[name].shape == (module.in_features, module.in_features) and gram[name].dtype == torch.float64
        assert output_gram[name].shape == (module.out_features, module.out_features)
    assert json.loads((out / "stats.json").read_text())["num_examples"] == 4


def test_statistics_of_a_float16_model_are_the_float32_computation_of_its_weights(setup, tmp_path):
    """Issue 21: an fp16 model's Fisher was accumulated and stored in fp16 (89.7 % zeros against 26.7 %)."""
    from modelmerge.data import load_split
    from modelmerge.statistics.fisher import compute_fisher
    from modelmerge.statistics.gram import compute_gram

    half = dtype_copy(setup["model"], tmp_path / "fp16", torch.float16)
    upcast = AutoModelForSequenceClassification.from_pretrained(half, dtype=torch.float32)  # exact: fp16 ⊂ fp32
    tokenizer, dataset = AutoTokenizer.from_pretrained(half), load_split("sst2", "validation[:6]", setup["data"])
    options = dict(batch_size=5, max_length=32, seed=4)
    fisher = compute_fisher(upcast, tokenizer, dataset, **options).fisher
    gram = compute_gram(upcast, tokenizer, dataset, **options)
    for mode in ("squared_gradients", "gram"):
        keys = base_keys(setup, tmp_path / mode, model_name_or_path=half, mode=mode, num_examples=6, seed=4)
        assert predict_program(tmp_path, **keys) == 0
    written = load_file(tmp_path / "squared_gradients" / "fisher.safetensors")
    assert written.keys() == fisher.keys()
    for name, value in fisher.items():
        assert written[name].dtype == torch.float32
        torch.testing.assert_close(written[name], value, rtol=1e-5, atol=0)
        assert torch.equal(written[name] == 0, value == 0), name
    zeros = sum(int((v == 0).sum()) for v in fisher.values())
    assert sum(int((v.half() == 0).sum()) for v in fisher.values()) > zeros + 1000  # what fp16 storage would lose
    for filename, expected in (("gram", gram.input_gram), ("output_grad_gram", gram.output_grad_gram)):
        written = load_file(tmp_path / "gram" / f"{filename}.safetensors")
        for name, value in expected.items():
            torch.testing.assert_close(written[name], value, rtol=1e-9, atol=0)


@pytest.mark.parametrize("change, message", [
    ({"spilt": "test"}, "unknown key(s) spilt"),
    ({"split": None}, "missing required key(s) split"),
    ({"model_name_or_path": None}, "missing required key(s) model_name_or_path"),
    ({"output_dir": None}, "missing required key(s) output_dir (an evaluation may give metric_output_file"),
    ({"batch_size": "8"}, "batch_size must be an integer, got '8'"),
    ({"empirical": 1}, "empirical must be true or false"),
    ({"num_examples": 0}, "num_examples must be at least 1"),
    ({"mode": "fisher"}, "mode must be one of"),
    ({"model_name_or_path": "/nonexistent/model"}, "model_name_or_path: /nonexistent/model"),
    ({"model_name_or_path": "DATA"}, "holds neither config.json nor adapter_config.json"),
    ({"dataset_name": "nosuch"}, "dataset 'nosuch'"),
    ({"split": "dev"}, "no split 'dev'"),
])
def test_bad_configs_exit_with_a_message_and_leave_no_output(setup, tmp_path, caplog, change, message):
    keys = base_keys(setup, tmp_path / "out")
    keys.update({k: setup["data"] if v == "DATA" else v for k, v in change.items()})
    keys = {k: v for k, v in keys.items() if v is not None}
    assert predict_program(tmp_path, **keys) == 2
    assert message in caplog.text
    assert os.listdir(tmp_path) == ["config.json"]


def test_config_file_errors(tmp_path, caplog):
    assert run_program(PredictConfig, run, "predict", [str(tmp_path / "missing.json")]) == 2
    (tmp_path / "broken.json").write_text("{not json")
    assert run_program(PredictConfig, run, "predict", [str(tmp_path / "broken.json")]) == 2
    (tmp_path / "list.json").write_text("[]")
    assert run_program(PredictConfig, run, "predict", [str(tmp_path / "list.json")]) == 2
    assert "missing.json does not exist" in caplog.text
    assert "broken.json: not valid JSON" in caplog.text
    assert "expected a JSON object, found list" in caplog.text


def test_several_evaluations_in_one_run_equal_separate_runs(setup, tmp_path):
    evaluations = {"sst2": {"dataset_name": "sst2", "split": "validation"},
                   "rt": {"dataset_name": "rotten_tomatoes", "split": "test[:7]"}}
    keys = base_keys(setup, tmp_path / "both", evaluations=evaluations)
    del keys["dataset_name"], keys["split"]
    assert predict_program(tmp_path, **keys) == 0
    assert sorted(os.listdir(tmp_path / "both")) == [".written-by", "rt", "sst2"]
    for name, spec in evaluations.items():
        single = tmp_path / f"single-{name}"
        assert predict_program(tmp_path, **base_keys(setup, single, **spec)) == 0
        for file in ("metrics.json", "predictions.jsonl"):
            assert (tmp_path / "both" / name / file).read_text() == (single / file).read_text()
    assert json.loads((tmp_path / "both" / "rt" / "metrics.json").read_text())["num_examples"] == 7


@pytest.mark.parametrize("change, message", [
    ({"evaluations": {"a": {"dataset_name": "sst2", "split": "test"}}}, "either dataset_name and split, or evaluations"),
    ({"dataset_name": None, "split": None, "evaluations": {"a": {"dataset_name": "sst2"}}}, "evaluations.a must be"),
    ({"dataset_name": None, "split": None, "evaluations": {"../a": {"dataset_name": "sst2", "split": "test"}}},
     "not usable as a folder name"),
    ({"dataset_name": None, "split": None, "mode": "gram",
      "evaluations": {"a": {"dataset_name": "sst2", "split": "test"}}}, "only for mode evaluate"),
    ({"dataset_name": None}, "missing required key(s) dataset_name"),
])
def test_bad_evaluations(setup, tmp_path, caplog, change, message):
    keys = {k: v for k, v in {**base_keys(setup, tmp_path / "out"), **change}.items() if v is not None}
    assert predict_program(tmp_path, **keys) == 2
    assert message in caplog.text
    assert not (tmp_path / "out").exists()


MODE_KEYS = {"model_name_or_path": "/m", "dataset_name": "sst2", "split": "test", "output_dir": "/out"}


@pytest.mark.parametrize("authors, mode", [("sequence_classification", "evaluate"),
                                           ("sequence_classification_squared_gradients", "squared_gradients")])
def test_the_authors_method_key_names_a_mode(authors, mode):
    assert from_dict(PredictConfig, {**MODE_KEYS, "method": authors}).mode == mode
    assert from_dict(PredictConfig, {**MODE_KEYS, "method": authors, "mode": mode}).mode == mode


@pytest.mark.parametrize("change, message", [
    ({"mode": "sequence_classification"}, "config.mode must be one of 'evaluate', 'squared_gradients', 'gram', "
                                          "'gradient_magnitude', got 'sequence_classification'"),
    ({"method": "gram"}, "config.method (the authors' name for mode) must be one of 'sequence_classification', "
                         "'sequence_classification_squared_gradients', got 'gram'"),
    ({"method": ["evaluate"]}, "config.method (the authors' name for mode) must be one of"),
    ({"method": "sequence_classification", "mode": "gram"},
     "method ('sequence_classification') and mode ('gram') name the same"),
])
def test_an_unknown_mode_is_refused_in_one_line(change, message):
    with pytest.raises(ConfigError) as refused:
        from_dict(PredictConfig, {**MODE_KEYS, **change})
    assert message in str(refused.value) and "\n" not in str(refused.value)
