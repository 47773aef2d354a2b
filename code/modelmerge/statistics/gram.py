"""Gram matrices of every linear layer: of its inputs, and of the gradients at its outputs.

For a linear layer with inputs X (one row per token) and output gradients G:
- XᵀX, [in, in]: RegMean's statistic (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language
  Models", ICLR 2023), and the input factor of MaTS's blockwise Fisher (Tam et al., "Merging by Matching
  Models in Task Parameter Subspaces", TMLR 2024);
- GᵀG, [out, out]: the output-gradient factor of that blockwise (K-FAC style) Fisher, F ≈ XᵀX ⊗ GᵀG.
The gradients are those of log p(y|x) with y sampled from the model's predictive distribution (seeded, as
for the Fisher), or the gold label when `empirical`. Rows are the non-padding tokens when a layer's input is
[batch, tokens, features] (the attention mask's shape); otherwise (the classifier on the pooled [batch,
features] vector) one row per example. Both are sums over the rows, accumulated in float64 over batches;
the row counts are recorded so that a consumer may turn them into means.

Layers: every `nn.Linear` whose weight is trainable (of a PEFT model: part of the adapter), keyed by its
weight's checkpoint name. For a LoRA model these are `lora_A` and `lora_B` of each adapted layer (and the
linear modules to save, e.g. the classifier): `...lora_A.weight` has the Gram of the adapted layer's
inputs (also the input Gram of ΔW = scaling·B·A), `...lora_B.weight` has the Gram of the gradients at
lora_B's output, which is scaling × the gradient at the adapted layer's output (divide by scaling² for
ΔW's output-gradient Gram). GPT-2's `Conv1D` layers count as linear; their weights are stored [in, out],
not [out, in], and the files' metadata lists them (modelmerge.io.formats.IN_OUT_WEIGHTS_KEY).

    result = compute_gram(model, tokenizer, dataset)
    save_gram(result, model, "out/")   # gram.safetensors, output_grad_gram.safetensors, stats.json
"""
import json
import logging
import os
from dataclasses import dataclass

import torch
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from modelmerge.atomic import atomic_file, write_json
from modelmerge.io.formats import IN_OUT_WEIGHTS_KEY
from modelmerge.statistics.batches import check_examples, labelled_batches, limit_examples
from modelmerge.statistics.capture import ModuleCapture, batch_first, output_gradients
from modelmerge.statistics.parameters import gradients_for_statistic_parameters, statistic_parameters

logger = logging.getLogger(__name__)


@dataclass
class GramResult:
    input_gram: dict  # "<layer>.weight" (named_parameters name) → Σ xᵀx, [in, in], float64
    output_grad_gram: dict  # "<layer>.weight" → Σ gᵀg, [out, out], float64
    rows: dict  # "<layer>.weight" → number of rows (tokens or examples) summed
    num_examples: int
    num_tokens: int  # non-padding tokens of all examples
    empirical: bool
    seed: int
    stored_in_out: frozenset = frozenset()  # "<layer>.weight" of the layers whose weight is [in, out] (Conv1D)

    @property
    def variant(self):
        return "empirical" if self.empirical else "sampled"


def trainable_linear_layers(model):
    """name → module of every linear layer (nn.Linear, GPT-2's Conv1D) whose weight is trainable."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and module.weight.requires_grad
    }


def linear_shape(module):
    """(out features, in features) of a linear layer (Conv1D keeps its weight as [in, out])."""
    if isinstance(module, Conv1D):
        return module.weight.shape[1], module.weight.shape[0]
    return module.out_features, module.in_features


def compute_gram(
    model, tokenizer, dataset, *, empirical=False, batch_size=16, max_length=None, num_examples=None, seed=0,
    task_type="sequence_classification", examples=None,
):
    """Input and output-gradient Gram matrices of the trainable linear layers of `model` over `dataset`.

    Arguments as for `compute_fisher`: a `datasets.Dataset` of `task_type`'s columns, its first `num_examples`
    examples (of those the range `examples`, one shard's: `combine_gram` of the shards is the Gram of the whole),
    texts truncated to `max_length` tokens, labels sampled with `seed` unless `empirical`.
    """
    dataset = limit_examples(dataset, num_examples)
    examples = check_examples(examples, dataset)
    was_training = model.training
    model.eval()
    try:
        with gradients_for_statistic_parameters(model):
            layers = trainable_linear_layers(model)
            if not layers:
                raise ValueError("the model has no linear layer with a trainable weight")
            return _accumulate_grams(model, tokenizer, dataset, layers, empirical, batch_size, max_length, seed, task_type,
                                     examples)
    finally:
        model.train(was_training)


def _accumulate_grams(model, tokenizer, dataset, layers, empirical, batch_size, max_length, seed, task_type, examples):
    logger.info("Gram matrices of %d linear layers, %d examples, batch size %d", len(layers), len(examples), batch_size)
    device = next(model.parameters()).device
    inputs = {n: _zeros(linear_shape(m)[1], device) for n, m in layers.items()}
    outputs = {n: _zeros(linear_shape(m)[0], device) for n, m in layers.items()}
    rows = dict.fromkeys(layers, 0)
    num_tokens = 0
    with ModuleCapture(layers) as capture:
        batches = labelled_batches(
            model, tokenizer, dataset, capture, empirical=empirical, batch_size=batch_size,
            max_length=max_length, seed=seed, desc="Gram", task_type=task_type, examples=examples,
        )
        for batch in batches:
            num_tokens += int(sum(mask.sum() for mask in batch.masks))
            grads = output_gradients(batch.loss, batch.sites)
            with torch.no_grad():
                for site, (grad,) in zip(batch.sites, grads):
                    x = _rows(site.first_input(), batch.masks, len(batch.indices), f"the input of {site.name}")
                    g = _rows(grad, batch.masks, len(batch.indices), f"the output of {site.name}")
                    inputs[site.name] += x.T @ x
                    outputs[site.name] += g.T @ g
                    rows[site.name] += len(x)
    # keyed by the weight's named_parameters() name (a tied output layer under its embedding's name)
    parameter_names = {id(parameter): name for name, parameter in model.named_parameters()}
    key = {name: parameter_names[id(module.weight)] for name, module in layers.items()}
    return GramResult(
        {key[n]: g for n, g in inputs.items()}, {key[n]: g for n, g in outputs.items()},
        {key[n]: r for n, r in rows.items()}, len(examples), num_tokens, empirical, seed,
        frozenset(key[n] for n, m in layers.items() if isinstance(m, Conv1D)),
    )


def combine_gram(parts):
    """The Gram matrices over the union of the examples of `parts` (GramResults of slices of one run's examples):
    the sums of their sums and counts."""
    first = parts[0]
    return GramResult(
        {name: sum(part.input_gram[name] for part in parts) for name in first.input_gram},
        {name: sum(part.output_grad_gram[name] for part in parts) for name in first.output_grad_gram},
        {name: sum(part.rows[name] for part in parts) for name in first.rows},
        sum(part.num_examples for part in parts), sum(part.num_tokens for part in parts), first.empirical, first.seed,
        frozenset(first.stored_in_out),
    )


def _zeros(size, device):
    return torch.zeros(size, size, dtype=torch.float64, device=device)


def _rows(tensor, masks, batch_size, what):
    """The float64 rows of a layer's input or output gradient: the non-padding tokens (of the padding mask of the
    same [batch, tokens] shape), every position (no such mask: images), or one per example."""
    tensor = batch_first(tensor, batch_size, what)
    mask = next((m for m in masks if tensor.dim() == 3 and tensor.shape[:2] == m.shape), None)
    if mask is not None:
        tensor = tensor[mask.bool()]
    return tensor.reshape(-1, tensor.shape[-1]).double()


def save_gram(result, model, output_dir, provenance=None):
    """Write `gram.safetensors`, `output_grad_gram.safetensors` and `stats.json` into `output_dir`, each atomically,
    stats.json last (returning what it holds); tensors under the checkpoint names of the layers' weights. The
    safetensors metadata lists the weights stored [in, out] (modelmerge.io.formats.IN_OUT_WEIGHTS_KEY), so that a
    merge knows how to apply the Grams, and records `provenance` (modelmerge.merging.provenance: the model, the
    data), the variant, seed and number of examples."""
    names = statistic_parameters(model)
    os.makedirs(output_dir, exist_ok=True)
    files = {"gram.safetensors": result.input_gram, "output_grad_gram.safetensors": result.output_grad_gram}
    metadata = {"format": "pt", IN_OUT_WEIGHTS_KEY: json.dumps(sorted(names[name] for name in result.stored_in_out)),
                **(provenance or {}), "variant": result.variant, "seed": str(result.seed),
                "num_examples": str(result.num_examples)}
    for filename, grams in files.items():
        with atomic_file(os.path.join(output_dir, filename)) as tmp:
            save_file({names[name]: gram.contiguous() for name, gram in grams.items()}, tmp, metadata=metadata)
    stats = {
        "num_examples": result.num_examples,
        "num_tokens": result.num_tokens,
        "variant": result.variant,
        "seed": result.seed,
        "rows": {names[name]: count for name, count in result.rows.items()},
    }
    write_json(os.path.join(output_dir, "stats.json"), stats)
    logger.info("wrote the Gram matrices of %d layers to %s", len(result.rows), output_dir)
    return stats
