"""The batched squared-gradient Fisher against the authors' one-example-at-a-time loop, and its files."""
import json
import os

import datasets
import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from modelmerge.statistics import compute_fisher, save_fisher
from modelmerge.statistics.capture import output_gradients
from modelmerge.statistics import per_example
from modelmerge.statistics.per_example import OuterProductGradients, SquaredGradientSums, nonzero_positions
from tiny import SHARED_DATA, make_tiny_bert, read_jsonl

NUM_EXAMPLES = 20


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return make_tiny_bert(str(tmp_path_factory.mktemp("tiny_bert")), seed=3)


@pytest.fixture(scope="module")
def rows():
    return read_jsonl(os.path.join(SHARED_DATA, "sst2", "train.jsonl"), NUM_EXAMPLES)


@pytest.fixture(scope="module")
def dataset(rows):
    return datasets.Dataset.from_list(rows)


@pytest.fixture(scope="module")
def tokenizer(tiny_path):
    return AutoTokenizer.from_pretrained(tiny_path)


def load_model(path, peft=None):
    model = AutoModelForSequenceClassification.from_pretrained(path)
    if peft == "lora":
        config = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])
        model = get_peft_model(model, config)
    elif peft == "ia3":
        modules = ["key", "value", "output.dense"]
        config = IA3Config(task_type="SEQ_CLS", target_modules=modules, feedforward_modules=["output.dense"])
        model = get_peft_model(model, config)
    if peft is not None:  # adapters start as the identity (LoRA B = 0, IA3 = 1): move them so gradients are generic
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model.double().eval()  # float64: the comparison then shows the method, not float32 rounding


def sampled_label(logits, uniform):
    """The documented sampling rule, written out: the first class whose cumulative probability reaches u."""
    cumulative = 0.0
    for label, probability in enumerate(torch.softmax(logits.double(), -1).tolist()):
        cumulative += probability
        if cumulative >= uniform:
            return label
    return len(logits) - 1


def loop_fisher(model, tokenizer, rows, empirical, seed=0):
    """The authors' implementation: one example at a time, backward, square the gradients, accumulate."""
    uniforms = torch.rand(len(rows), generator=torch.Generator().manual_seed(seed), dtype=torch.float64).tolist()
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    sums = {name: torch.zeros_like(p) for name, p in parameters.items()}
    labels = []
    for row, uniform in zip(rows, uniforms):
        model.zero_grad()
        logits = model(**tokenizer(row["text"], return_tensors="pt")).logits[0]
        label = row["label"] if empirical else sampled_label(logits.detach(), uniform)
        labels.append(label)
        torch.log_softmax(logits, -1)[label].backward()
        for name, p in parameters.items():
            if p.grad is not None:
                sums[name] += p.grad**2
    return {name: s / len(rows) for name, s in sums.items()}, labels


def assert_same_fisher(batched, expected):
    assert set(batched) == set(expected)
    # Attention key biases have an exactly zero gradient (softmax ignores a shift shared by all scores): their
    # "Fisher" is rounding noise (~1e-40) in both, which the absolute tolerance far below every real value ignores.
    atol = 1e-15 * max(float(f.max()) for f in expected.values())
    for name, value in expected.items():
        torch.testing.assert_close(batched[name], value, rtol=1e-6, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("empirical, batch_size", [(False, 6), (True, 8), (False, 1)])
def test_batched_fisher_equals_the_per_example_loop(tiny_path, tokenizer, rows, dataset, empirical, batch_size):
    model = load_model(tiny_path)
    result = compute_fisher(model, tokenizer, dataset, empirical=empirical, batch_size=batch_size, seed=5)
    expected, labels = loop_fisher(model, tokenizer, rows, empirical, seed=5)
    assert result.labels.tolist() == labels
    assert result.num_examples == NUM_EXAMPLES and result.variant == ("empirical" if empirical else "sampled")
    assert_same_fisher(result.fisher, expected)
    assert all(value.dtype == torch.float64 for value in result.fisher.values())


def test_batched_fisher_of_a_roberta_model_equals_the_loop(tokenizer, rows, dataset):
    """RoBERTa derives position ids from the input ids (padding positions get the padding index) and classifies
    with a two-layer head on the first token: other code paths than BERT's."""
    config = RobertaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=130, pad_token_id=tokenizer.pad_token_id, num_labels=3,
    )
    torch.manual_seed(0)
    model = RobertaForSequenceClassification(config).double().eval()
    result = compute_fisher(model, tokenizer, dataset, batch_size=6)
    expected, labels = loop_fisher(model, tokenizer, rows, empirical=False)
    assert result.labels.tolist() == labels
    assert_same_fisher(result.fisher, expected)


@pytest.mark.parametrize("peft", ["lora", "ia3"])
def test_peft_fisher_equals_the_loop_for_the_trainable_adapter_parameters(tiny_path, tokenizer, rows, dataset, peft):
    model = load_model(tiny_path, peft)
    result = compute_fisher(model, tokenizer, dataset, batch_size=7)
    expected, _ = loop_fisher(model, tokenizer, rows, empirical=False)
    assert any(f"{peft}_" in name for name in expected) and not any("word_embeddings" in name for name in expected)
    assert_same_fisher(result.fisher, expected)


def test_sampled_labels_follow_the_seed_not_the_batching(tiny_path, tokenizer, dataset):
    model = load_model(tiny_path)
    first = compute_fisher(model, tokenizer, dataset, batch_size=4, seed=11).labels
    assert torch.equal(compute_fisher(model, tokenizer, dataset, batch_size=9, seed=11).labels, first)
    assert not torch.equal(compute_fisher(model, tokenizer, dataset, batch_size=4, seed=12).labels, first)


class ToyClassifier(nn.Module):
    """Exercises what BERT does not: a layer called twice, a weight tied between two modules, and a parameter
    of a custom module (no layer-wise rule: the torch.func route)."""

    class Scale(nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.scale = nn.Parameter(torch.linspace(0.5, 1.5, dim))

        def forward(self, x):
            return torch.tanh(x) * self.scale

    def __init__(self, vocab=11, dim=6):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.mix = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.scale = self.Scale(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.out = nn.Linear(vocab, 3)

    def forward(self, ids, mask):
        h = self.mix(torch.relu(self.mix(self.embed(ids))))  # `mix` is called twice
        h = self.scale(self.norm(h))
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return self.out(self.head(pooled))


def test_reused_tied_and_custom_parameters_equal_the_loop():
    torch.manual_seed(0)
    model = ToyClassifier().double()
    lengths = [5, 3, 4, 1, 5, 2]
    ids = torch.zeros(len(lengths), 5, dtype=torch.long)
    mask = torch.zeros(len(lengths), 5, dtype=torch.double)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, 11, (n,))
        mask[i, :n] = 1
    ids[0, 1] = 0  # the padding id inside a real sentence: nn.Embedding gives its row no gradient
    labels = torch.tensor([0, 2, 1, 1, 0, 2])
    with SquaredGradientSums(model) as sums:
        with sums.capture.recording(len(lengths)) as sites:
            logits = model(ids, mask)
        sums.add(logits.log_softmax(-1).gather(1, labels[:, None]).sum(), sites, len(lengths))
        batched = sums.named_sums()
    assert len(sums.functional_modules) == 1
    expected = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for i, n in enumerate(lengths):
        model.zero_grad()
        model(ids[i : i + 1, :n], mask[i : i + 1, :n]).log_softmax(-1)[0, labels[i]].backward()
        for name, p in model.named_parameters():
            expected[name] += p.grad**2
    assert_same_fisher(batched, expected)


def outer_product_case(live_counts, dtype=torch.float64, scale=1.0):
    """g [batch, tokens, 24], x [batch, tokens, 16] whose g is zero off each example's live positions (scattered,
    not a prefix: the positions a layer's output does not reach the loss from), and Σ_b (g_bᵀ x_b)² summed directly."""
    generator = torch.Generator().manual_seed(len(live_counts))
    g = torch.randn(len(live_counts), 7, 24, generator=generator, dtype=torch.float64)
    x = torch.randn(len(live_counts), 7, 16, generator=generator, dtype=torch.float64)
    for b, count in enumerate(live_counts):
        dead = torch.randperm(7, generator=generator)[count:]
        g[b, dead] = 0
    g = g * scale
    expected = torch.zeros(24, 16, dtype=torch.float64)
    for b in range(len(live_counts)):
        expected = expected + (g[b].T @ x[b]) ** 2
    return g.to(dtype), x.to(dtype), expected


@pytest.mark.parametrize("route", ["paired", "per_example", "batch_tiles"])
def test_squared_outer_products_equal_the_direct_sum_on_every_route(monkeypatch, route):
    """Each way of forming Σ_b (g_bᵀ x_b)² (per_example.OuterProductGradients) against the per-example products
    squared and summed directly, in tiles of a few rows and with scattered zero-gradient positions."""
    live_counts = [3, 1, 0, 4, 2] if route == "paired" else [7, 5, 1, 0, 6]
    g, x, expected = outer_product_case(live_counts)
    monkeypatch.setattr(per_example, "PER_EXAMPLE_BYTES", 0 if route == "per_example" else 1 << 40)
    monkeypatch.setattr(per_example, "TILE_BYTES", 5 * 16 * 8)  # 5 rows of 16 float64: tiles of 5, 5, 5, 5, 4 rows
    monkeypatch.setattr(per_example, "BATCH_TILE_BYTES", {"cpu": 5 * 5 * 16 * 8})
    calls = []
    for name in ("_add_paired_squares", "_add_squares_per_example", "_add_squares_in_batch_tiles"):
        original = getattr(per_example, name)
        monkeypatch.setattr(per_example, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    total = torch.zeros(24, 16, dtype=torch.float64)
    OuterProductGradients(g, x, nonzero_positions(g)).add_squares_to(total)
    assert calls == [{"paired": "_add_paired_squares", "per_example": "_add_squares_per_example",
                      "batch_tiles": "_add_squares_in_batch_tiles"}[route]]
    torch.testing.assert_close(total, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("scale", [1e-15, 1e15])
def test_paired_squares_undo_their_power_of_two_scaling(scale):
    """The paired route scales the gradients to a largest value near 1 (products of small gradients would be
    subnormal numbers, slow to multiply) and must scale the sum back: float32 sums of ~1e-30 and ~1e30."""
    g, x, expected = outer_product_case([2, 3, 1], dtype=torch.float32, scale=scale)
    total = torch.zeros(24, 16)
    OuterProductGradients(g, x, nonzero_positions(g)).add_squares_to(total)
    torch.testing.assert_close(total.double(), expected, rtol=1e-5, atol=1e-6 * float(expected.max()))


def test_output_gradients_are_at_the_output_as_the_layer_produced_it():
    """An output changed in place after its layer ran (an in-place activation): the gradient is the one at the
    layer's own output, d(Σ 2y)/dy = 2, not at the changed tensor (1), and the layer's Fisher follows from it."""
    layer = nn.Linear(3, 3)
    x = torch.randn(2, 3)
    with SquaredGradientSums(nn.Sequential(layer)) as sums:
        with sums.capture.recording(2) as sites:
            y = layer(x)
        y.mul_(2)
        (grad,), = output_gradients(y.sum(), sites)
        assert torch.equal(grad, torch.full((2, 3), 2.0))
        with sums.capture.recording(2) as sites:
            y = layer(x)
        y.relu_()
        sums.add(y.sum(), sites, 2)
    expected = sum(torch.outer((layer(x[b]) > 0).float(), x[b]).detach() ** 2 for b in range(2))
    torch.testing.assert_close(sums.named_sums()["0.weight"], expected)


def test_save_fisher_writes_checkpoint_names_a_loadable_hessian_and_stats(tiny_path, tokenizer, dataset, tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_path)
    result = compute_fisher(model, tokenizer, dataset, num_examples=6, batch_size=4)
    assert result.num_examples == 6 and len(result.labels) == 6
    save_fisher(result, model, str(tmp_path / "out"))

    fisher = load_file(str(tmp_path / "out" / "fisher.safetensors"))
    checkpoint = load_file(os.path.join(tiny_path, "model.safetensors"))
    assert set(fisher) == set(checkpoint)
    for name, value in fisher.items():
        assert value.shape == checkpoint[name].shape and value.dtype == torch.float32
        assert torch.equal(value, result.fisher[name])
    hessian = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "out" / "hessian"))
    for name, parameter in hessian.named_parameters():
        assert torch.equal(parameter.detach(), fisher[name]), name
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats == {"num_examples": 6, "variant": "sampled", "seed": 0}
    assert sorted(os.listdir(tmp_path / "out")) == ["fisher.safetensors", "hessian", "stats.json"]  # no temporaries


def test_fisher_of_an_adapter_loaded_for_inference_uses_the_adapter_names(tiny_path, tokenizer, dataset, tmp_path):
    trained = load_model(tiny_path, "lora").float()
    trained.save_pretrained(str(tmp_path / "adapter"))
    expected = compute_fisher(trained, tokenizer, dataset, num_examples=4, empirical=True)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_path)
    model = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))  # the adapter is frozen: inference mode
    result = compute_fisher(model, tokenizer, dataset, num_examples=4, empirical=True)
    assert not any(parameter.requires_grad for parameter in model.parameters())  # restored
    assert result.fisher.keys() == expected.fisher.keys()
    for name, value in expected.fisher.items():
        torch.testing.assert_close(result.fisher[name], value, rtol=1e-6, atol=0)

    save_fisher(result, model, str(tmp_path / "out"))
    fisher = load_file(str(tmp_path / "out" / "fisher.safetensors"))
    adapter = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert set(fisher) == set(adapter) and any(name.endswith("lora_B.weight") for name in fisher)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_path)
    hessian = PeftModel.from_pretrained(base, str(tmp_path / "out" / "hessian"))
    hessian_parameters = dict(hessian.named_parameters())
    for name, value in result.fisher.items():
        assert torch.equal(hessian_parameters[name].detach(), value), name


def test_bad_inputs_are_refused_with_a_clear_message(tiny_path, tokenizer, rows, tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_path)
    bad_label = datasets.Dataset.from_list([rows[0], {"text": rows[1]["text"], "label": 7}])
    with pytest.raises(ValueError, match="example 1 has label 7"):
        compute_fisher(model, tokenizer, bad_label, empirical=True)
    left = AutoTokenizer.from_pretrained(tiny_path, padding_side="left")
    with pytest.raises(ValueError, match="right padding"):
        compute_fisher(model, left, datasets.Dataset.from_list(rows[:2]))
    with pytest.raises(ValueError, match="no examples"):
        compute_fisher(model, tokenizer, datasets.Dataset.from_list(rows[:2]).select([]))
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        compute_fisher(model, tokenizer, datasets.Dataset.from_list(rows[:2]))
