"""The statistics of every family (seq2seq T5, causal LM GPT-2, image classifiers ViT and CLIP's zero-shot
head), each against an independent computation written out here from families.md: the batched Fisher against a
one-example loop, Gram matrices against XᵀX of the test's own hooks."""
import datasets
import pytest
import torch
from torch import nn

from modelmerge.statistics import compute_fisher, compute_gram
from test_fisher import assert_same_fisher, sampled_label
from tiny import FAMILY_TASKS, example_inputs, load_family_model


def rows_of(name, text_rows, image_rows):
    return image_rows if FAMILY_TASKS[name] == "image_classification" else text_rows


# --- the definitions of families.md, written out one example at a time ------------------------------------------


def loop_fisher(name, model, processor, rows, empirical, seed=0):
    """Batch of one, log-likelihood summed over the scored tokens, backward, square, accumulate."""
    examples = [example_inputs(name, processor, row) for row in rows]
    if examples[0][2] is None:
        uniforms = torch.rand(len(rows), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)[:, None]
    else:
        most = max(len(tokens) for _, _, tokens in examples)
        uniforms = torch.rand(len(rows), most, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    parameters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    sums = {n: torch.zeros_like(p) for n, p in parameters.items()}
    labels = []
    for i, ((inputs, positions, tokens), row) in enumerate(zip(examples, rows)):
        model.zero_grad()
        logits = model(**inputs).logits[0]
        if tokens is None:
            label = row["label"] if empirical else sampled_label(logits.detach(), uniforms[i, 0])
            log_likelihood = logits.log_softmax(-1)[label]
            labels.append(label)
        else:
            chosen = [t if empirical else sampled_label(logits[p].detach(), uniforms[i, j])
                      for j, (p, t) in enumerate(zip(positions, tokens))]
            log_likelihood = sum(logits[p].log_softmax(-1)[t] for p, t in zip(positions, chosen))
            labels.append(chosen)
        log_likelihood.backward()
        for n, p in parameters.items():
            if p.grad is not None:
                sums[n] += p.grad**2
    return {n: s / len(rows) for n, s in sums.items()}, labels


@pytest.mark.parametrize("name, empirical, peft", [
    ("seq2seq", False, None), ("seq2seq", True, None), ("seq2seq", False, "lora"),
    ("causal_lm", False, None), ("causal_lm", True, None), ("causal_lm", False, "lora"),
    ("vit", False, None), ("vit", True, "lora"), ("clip", False, None), ("clip", False, "lora"),
])
def test_batched_fisher_equals_the_one_example_loop(family_paths, text_rows, image_rows, name, empirical, peft):
    rows = rows_of(name, text_rows, image_rows)
    model, processor = load_family_model(family_paths, name, peft)
    result = compute_fisher(model, processor, datasets.Dataset.from_list(rows), empirical=empirical, batch_size=4,
                            seed=3, task_type=FAMILY_TASKS[name])
    expected, labels = loop_fisher(name, model, processor, rows, empirical, seed=3)
    labels_found = result.labels.tolist() if torch.is_tensor(result.labels) else result.labels
    assert labels_found == labels
    if name == "clip":  # the text tower and the logit scale are frozen: the Fisher covers the vision side
        assert expected and all(n.startswith(("vision_model", "visual_projection", "base_model.model.vision_model"))
                                for n in expected)
    if peft:
        assert any("lora_" in n for n in expected)
    assert_same_fisher(result.fisher, expected)


def test_t5_relative_position_bias_gets_its_per_example_share(family_paths, text_rows):
    """The bias embedding is shared by the batch; its Fisher is a sum of per-example squares, not the square of
    the batch's sum (which a shared [1, heads, q, k] bias would give)."""
    model, processor = load_family_model(family_paths, "seq2seq")
    dataset = datasets.Dataset.from_list(text_rows)
    fisher = compute_fisher(model, processor, dataset, batch_size=5, task_type="seq2seq").fisher
    name = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    expected, _ = loop_fisher("seq2seq", model, processor, text_rows, empirical=False)
    torch.testing.assert_close(fisher[name], expected[name], rtol=1e-6, atol=0)
    assert fisher[name].abs().sum() > 0


@pytest.mark.parametrize("name", ["seq2seq", "causal_lm", "vit"])
def test_gram_equals_x_transpose_x_over_the_non_padding_positions(family_paths, text_rows, image_rows, name):
    rows = rows_of(name, text_rows, image_rows)
    model, processor = load_family_model(family_paths, name)
    result = compute_gram(model, processor, datasets.Dataset.from_list(rows), batch_size=4, task_type=FAMILY_TASKS[name],
                          empirical=True)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}
    # a tied output layer's Gram is saved under its weight's parameter name (T5's lm_head under shared.weight)
    weight_names = {id(p): n for n, p in model.named_parameters()}
    key = {n: weight_names[id(m.weight)] for n, m in layers.items()}
    expected = {key[n]: 0 for n in layers}
    seen = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: seen.setdefault(n, []).append(a[0].detach()))
             for n, m in layers.items()]
    for row in rows:  # one example at a time: no padding at all
        seen.clear()
        inputs, _, _ = example_inputs(name, processor, row)
        with torch.no_grad():
            model(**inputs)
        for n, xs in seen.items():
            for x in xs:
                x = x.reshape(-1, x.shape[-1]).double()
                expected[key[n]] = expected[key[n]] + x.T @ x
    for hook in hooks:
        hook.remove()
    assert set(result.input_gram) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(result.input_gram[key], value, rtol=1e-9, atol=1e-9, msg=key)
