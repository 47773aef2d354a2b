"""TATR's statistic, the mean absolute per-example gradient 1/N Σ_i |∇ log p(y_i|x_i)|, against a loop over the
examples (batch of one, backward, |·|, accumulate) on tiny models of every family; its files and predict.py's
mode `gradient_magnitude`."""
import json
import os

import datasets
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from modelmerge.prediction.config import PredictConfig
from modelmerge.prediction.program import run
from modelmerge.statistics import compute_gradient_magnitude, save_gradient_magnitude
from modelmerge.statistics import per_example
from modelmerge.statistics.per_example import AbsoluteGradientSums, OuterProductGradients, nonzero_positions
from test_fisher import ToyClassifier, load_model, outer_product_case
from tiny import FAMILY_TASKS, SHARED_DATA, example_inputs, load_family_model, make_tiny_bert, read_jsonl


def assert_same(batched, expected):
    assert set(batched) == set(expected)
    atol = 1e-12 * max(float(value.max()) for value in expected.values())
    for name, value in expected.items():
        torch.testing.assert_close(batched[name], value, rtol=1e-9, atol=atol, msg=lambda m: f"{name}: {m}")


def loop_magnitude(model, examples):
    """`examples`: (inputs, log-likelihood of the model's output) pairs; the mean of |∇| over them."""
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    sums = {name: torch.zeros_like(p) for name, p in parameters.items()}
    for inputs, log_likelihood in examples:
        model.zero_grad()
        log_likelihood(model(**inputs).logits[0]).backward()
        for name, p in parameters.items():
            if p.grad is not None:
                sums[name] += p.grad.abs()
    return {name: total / len(examples) for name, total in sums.items()}


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    path = make_tiny_bert(str(tmp_path_factory.mktemp("tiny_bert")), seed=3)
    return path, AutoTokenizer.from_pretrained(path), read_jsonl(os.path.join(SHARED_DATA, "sst2", "train.jsonl"), 12)


@pytest.mark.parametrize("batch_size", [5, 1])
def test_classifier_gradient_magnitude_with_gold_labels_equals_the_loop(bert, batch_size):
    path, tokenizer, rows = bert
    model = load_model(path)
    result = compute_gradient_magnitude(model, tokenizer, datasets.Dataset.from_list(rows), batch_size=batch_size)
    assert result.empirical and result.labels.tolist() == [row["label"] for row in rows]
    expected = loop_magnitude(model, [(tokenizer(row["text"], return_tensors="pt"),
                                       lambda logits, y=row["label"]: logits.log_softmax(-1)[y]) for row in rows])
    assert_same(result.magnitude, expected)


def test_sampled_labels_are_the_fishers(bert):
    from modelmerge.statistics import compute_fisher

    path, tokenizer, rows = bert
    model = load_model(path)
    dataset = datasets.Dataset.from_list(rows)
    magnitude = compute_gradient_magnitude(model, tokenizer, dataset, empirical=False, seed=4, batch_size=5)
    fisher = compute_fisher(model, tokenizer, dataset, seed=4, batch_size=3)
    assert magnitude.variant == "sampled" and torch.equal(magnitude.labels, fisher.labels)
    expected = loop_magnitude(model, [(tokenizer(row["text"], return_tensors="pt"),
                                       lambda logits, y=y: logits.log_softmax(-1)[y])
                                      for row, y in zip(rows, fisher.labels.tolist())])
    assert_same(magnitude.magnitude, expected)


@pytest.mark.parametrize("name", ["seq2seq", "causal_lm", "vit", "clip"])
def test_every_familys_gradient_magnitude_equals_the_loop(family_paths, text_rows, image_rows, name):
    """Sequences: log p(y|x) summed over the scored tokens (T5's lm_head is tied to its embedding: the dense and
    sparse gradients of one example are added before |·|); CLIP: the vision side, the text tower frozen."""
    rows = image_rows if FAMILY_TASKS[name] == "image_classification" else text_rows
    model, processor = load_family_model(family_paths, name)
    result = compute_gradient_magnitude(model, processor, datasets.Dataset.from_list(rows), batch_size=4,
                                        task_type=FAMILY_TASKS[name])
    examples = []
    for row in rows:
        inputs, positions, tokens = example_inputs(name, processor, row)
        if tokens is None:
            examples.append((inputs, lambda logits, y=row["label"]: logits.log_softmax(-1)[y]))
        else:
            examples.append((inputs, lambda logits, p=positions, t=tokens: sum(
                logits[i].log_softmax(-1)[j] for i, j in zip(p, t))))
    assert_same(result.magnitude, loop_magnitude(model, examples))


def test_reused_tied_and_custom_parameters_equal_the_loop():
    torch.manual_seed(0)
    model = ToyClassifier().double()
    lengths = [5, 3, 4, 1, 5, 2]
    ids = torch.zeros(len(lengths), 5, dtype=torch.long)
    mask = torch.zeros(len(lengths), 5, dtype=torch.double)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, 11, (n,))
        mask[i, :n] = 1
    labels = torch.tensor([0, 2, 1, 1, 0, 2])
    with AbsoluteGradientSums(model) as sums:
        with sums.capture.recording(len(lengths)) as sites:
            logits = model(ids, mask)
        sums.add(logits.log_softmax(-1).gather(1, labels[:, None]).sum(), sites, len(lengths))
        batched = sums.named_sums()
    expected = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for i, n in enumerate(lengths):
        model.zero_grad()
        model(ids[i : i + 1, :n], mask[i : i + 1, :n]).log_softmax(-1)[0, labels[i]].backward()
        for name, p in model.named_parameters():
            expected[name] += p.grad.abs()
    assert_same(batched, expected)


@pytest.mark.parametrize("route", ["per_example", "batch_tiles"])
def test_absolute_outer_products_equal_the_direct_sum_on_every_route(monkeypatch, route):
    g, x, _ = outer_product_case([7, 5, 1, 0, 6])
    expected = sum((g[b].T @ x[b]).abs() for b in range(len(g)))
    monkeypatch.setattr(per_example, "PER_EXAMPLE_BYTES", 0 if route == "per_example" else 1 << 40)
    monkeypatch.setattr(per_example, "TILE_BYTES", 5 * 16 * 8)  # tiles of 5 rows
    monkeypatch.setattr(per_example, "BATCH_TILE_BYTES", {"cpu": 5 * 5 * 16 * 8})
    total = torch.zeros(24, 16, dtype=torch.float64)
    OuterProductGradients(g, x, nonzero_positions(g)).add_absolutes_to(total)
    torch.testing.assert_close(total, expected, rtol=1e-12, atol=0)


def test_saved_statistic_holds_checkpoint_names_frozen_zeros_and_stats(bert, tmp_path):
    path, tokenizer, rows = bert
    model = AutoModelForSequenceClassification.from_pretrained(path)
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    result = compute_gradient_magnitude(model, tokenizer, datasets.Dataset.from_list(rows), num_examples=6)
    stats = save_gradient_magnitude(result, model, str(tmp_path / "out"), {"dataset": "sst2"})
    assert stats == {"num_examples": 6, "variant": "empirical", "seed": 0}
    assert json.load(open(tmp_path / "out" / "stats.json")) == stats
    saved = load_file(tmp_path / "out" / "gradient_magnitude.safetensors")
    assert set(saved) == {name for name, _ in model.named_parameters()}
    assert not saved["bert.embeddings.word_embeddings.weight"].any()
    assert all((value >= 0).all() for value in saved.values()) and saved["classifier.weight"].any()
    with safe_open(tmp_path / "out" / "gradient_magnitude.safetensors", "pt") as f:
        assert f.metadata()["dataset"] == "sst2" and f.metadata()["variant"] == "empirical"


def test_predict_writes_it_with_gold_labels_by_default(bert, tmp_path):
    path, _, _ = bert
    config = dict(model_name_or_path=path, dataset_name="sst2", split="train", mode="gradient_magnitude",
                  output_dir=str(tmp_path / "g"), num_examples=4, batch_size=2, num_threads=1, max_length=32)
    run(PredictConfig(**config, data_dir=SHARED_DATA))
    assert sorted(os.listdir(tmp_path / "g")) == [".written-by", "gradient_magnitude.safetensors", "stats.json"]
    assert json.load(open(tmp_path / "g" / "stats.json"))["variant"] == "empirical"
    assert PredictConfig(**{**config, "mode": "squared_gradients"}, data_dir=SHARED_DATA).empirical is False
