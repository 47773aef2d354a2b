"""Gram matrices of linear layers against XᵀX and GᵀG taken directly from one example at a time."""
import json
import os

import datasets
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from modelmerge.statistics import compute_gram, save_gram
from tiny import SHARED_DATA, make_tiny_bert, read_jsonl

NUM_EXAMPLES = 12


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return make_tiny_bert(str(tmp_path_factory.mktemp("tiny_bert")), seed=4)


@pytest.fixture(scope="module")
def rows():
    return read_jsonl(os.path.join(SHARED_DATA, "sst2", "validation.jsonl"), NUM_EXAMPLES)


@pytest.fixture(scope="module")
def tokenizer(tiny_path):
    return AutoTokenizer.from_pretrained(tiny_path)


def lora_model(path):
    model = get_peft_model(
        AutoModelForSequenceClassification.from_pretrained(path),
        LoraConfig(task_type="SEQ_CLS", r=3, lora_alpha=6, target_modules=["query", "value", "intermediate.dense"]),
    )
    with torch.no_grad():  # LoRA's B starts at zero, which would make lora_A's output gradients zero
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    return model


def direct_grams(model, tokenizer, rows, empirical, seed=0):
    """XᵀX of each trainable linear layer's inputs and GᵀG of the gradients at its outputs, from hooks of this
    test, running the examples one at a time without padding (so every row is a real token)."""
    uniforms = torch.rand(len(rows), generator=torch.Generator().manual_seed(seed), dtype=torch.float64).tolist()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.weight.requires_grad}
    inputs = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in layers.items()}
    outputs = {n: torch.zeros(m.out_features, m.out_features, dtype=torch.float64) for n, m in layers.items()}
    rows_seen = dict.fromkeys(layers, 0)

    def hook(name, module, args, output):
        x = args[0].detach().reshape(-1, module.in_features).double()
        inputs[name] += x.T @ x
        rows_seen[name] += len(x)

        def gradient_hook(grad):
            g = grad.reshape(-1, module.out_features).double()
            outputs[name] += g.T @ g

        output.register_hook(gradient_hook)

    handles = [m.register_forward_hook(lambda m, a, o, n=n: hook(n, m, a, o)) for n, m in layers.items()]
    try:
        for row, uniform in zip(rows, uniforms):
            logits = model(**tokenizer(row["text"], return_tensors="pt")).logits[0]
            probabilities = torch.softmax(logits.detach().double(), -1)
            label = row["label"] if empirical else int((probabilities.cumsum(0) < uniform).sum())
            torch.log_softmax(logits, -1)[label].backward()
    finally:
        for handle in handles:
            handle.remove()
    key = {n: f"{n}.weight" for n in layers}
    return tuple({key[n]: value for n, value in found.items()} for found in (inputs, outputs, rows_seen))


def assert_same_grams(batched, expected):
    assert set(batched) == set(expected)
    for name, value in expected.items():
        assert batched[name].dtype == torch.float64
        atol = 1e-12 * float(value.abs().max())
        torch.testing.assert_close(batched[name], value, rtol=1e-6, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("empirical", [False, True])
def test_gram_matrices_equal_those_of_directly_captured_activations(tiny_path, tokenizer, rows, empirical):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_path).double().eval()  # float64: exact comparison
    result = compute_gram(model, tokenizer, datasets.Dataset.from_list(rows), empirical=empirical, batch_size=5, seed=3)
    inputs, outputs, rows_seen = direct_grams(model, tokenizer, rows, empirical, seed=3)
    assert_same_grams(result.input_gram, inputs)
    assert_same_grams(result.output_grad_gram, outputs)
    assert result.rows == rows_seen
    num_tokens = sum(len(tokenizer(row["text"])["input_ids"]) for row in rows)
    assert result.num_tokens == num_tokens == result.rows["bert.encoder.layer.0.attention.self.query.weight"]
    assert result.rows["classifier.weight"] == result.num_examples == NUM_EXAMPLES


def test_lora_gram_matrices_cover_the_adapter_layers_and_save_under_adapter_names(tiny_path, tokenizer, rows, tmp_path):
    model = lora_model(tiny_path).double().eval()
    result = compute_gram(model, tokenizer, datasets.Dataset.from_list(rows), batch_size=4)
    inputs, outputs, _ = direct_grams(model, tokenizer, rows, empirical=False)
    assert any("lora_A" in name for name in inputs) and not any(".query.base_layer" in name for name in inputs)
    assert_same_grams(result.input_gram, inputs)
    assert_same_grams(result.output_grad_gram, outputs)

    save_gram(result, model, str(tmp_path / "out"))
    model.save_pretrained(str(tmp_path / "adapter"))
    adapter = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    gram = load_file(str(tmp_path / "out" / "gram.safetensors"))
    output_gram = load_file(str(tmp_path / "out" / "output_grad_gram.safetensors"))
    assert set(gram) == set(output_gram) == {name for name in adapter if name.endswith(".weight")}
    for name, weight in adapter.items():
        if name in gram:
            out_features, in_features = weight.shape
            assert gram[name].shape == (in_features, in_features)
            assert output_gram[name].shape == (out_features, out_features)


def test_save_gram_writes_float64_matrices_under_the_checkpoint_names_and_stats(tiny_path, tokenizer, rows, tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_path)
    result = compute_gram(model, tokenizer, datasets.Dataset.from_list(rows), num_examples=5, empirical=True)
    save_gram(result, model, str(tmp_path / "out"))
    checkpoint = load_file(os.path.join(tiny_path, "model.safetensors"))
    gram = load_file(str(tmp_path / "out" / "gram.safetensors"))
    output_gram = load_file(str(tmp_path / "out" / "output_grad_gram.safetensors"))
    linear_weights = {n for n, t in checkpoint.items() if t.dim() == 2 and "embeddings" not in n}
    assert set(gram) == set(output_gram) == linear_weights
    for name in linear_weights:
        assert torch.equal(gram[name], result.input_gram[name]) and gram[name].dtype == torch.float64
        assert torch.equal(output_gram[name], result.output_grad_gram[name])
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["num_examples"] == 5 and stats["variant"] == "empirical" and stats["num_tokens"] == result.num_tokens
    assert stats["rows"]["classifier.weight"] == 5
    assert sorted(os.listdir(tmp_path / "out")) == ["gram.safetensors", "output_grad_gram.safetensors", "stats.json"]
