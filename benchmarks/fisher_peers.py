"""The squared-gradient Fisher by the per-example-gradient libraries a user would otherwise pick, and by the authors'
one-example loop: the peers of `compute_fisher` in benchmarks/fisher_bench.py (`--peers`).

Each peer computes F = 1/N Σ_i (∇_θ log p(y_i | x_i))² with the gold labels (the empirical Fisher, so that every side
uses the same labels) over the same length-sorted, right-padded batches as `compute_fisher`
(`modelmerge.statistics.batches.length_sorted_batches`), the model in eval mode (no dropout), and returns
{named_parameters() name: Fisher} for the tensors it covers:
- BackPACK 1.7.1, `SumGradSquared`: only the layers it has an extension for (`extend` of each such leaf module:
  extending the whole model fails, its hook stores `module.output`, which is a child module in BERT's layers and
  T5's attention); its Embedding extension refuses a `padding_idx`, so such embeddings are left out;
- Opacus 1.6.0, `GradSampleModule(loss_reduction="sum")`: its forward hooks record only modules in training mode,
  so the modules holding parameters are put in training mode (they have no dropout of their own) and the rest of
  the model stays in eval mode;
- torch.func: `vmap(grad(...))` of `functional_call` on one example at a time, `--func-chunk` examples per vmap
  (each of them holds a gradient the size of the model). transformers' masks branch on their values, which vmap
  refuses, so a padding mask is passed as the 4-D additive mask it returns as-is (a causal LM, right-padded, gets
  none: causal attention never reaches the padding after a real token);
- the authors' loop: batch of one (no padding), backward, square every gradient, accumulate (fisher_bench's
  MiniLM comparison also runs it with labels sampled from the model, `uniforms`).

As a program, a peer runs as `python code/predict.py fisher.json` does: it loads the model and data of the config,
computes the Fisher and writes it in predict.py's format (`save_fisher`; tensors a peer does not cover are zeros):

    python benchmarks/fisher_peers.py opacus fisher.json
"""
import argparse
import os
import sys
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "code"))
from modelmerge import families  # noqa: E402
from modelmerge.statistics.batches import length_sorted_batches, sample_labels  # noqa: E402

# The layers of these models that BackPACK's SumGradSquared has an extension for (its `module_exts`).
BACKPACK_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


def log_likelihoods(logits, labels, task_type):
    """log p(y|x) per example ([batch]) of the gold labels: a class, or the scored tokens of a sequence."""
    if families.is_sequence(task_type):
        return families.scored_log_likelihood(*families.token_logits(logits, labels, task_type))
    return logits.log_softmax(-1).gather(-1, labels[:, None])[:, 0]


def batches(processor, dataset, task_type, batch_size, max_length):
    """(model inputs, labels) of `compute_fisher`'s batches; sequence models keep `labels` among their inputs (T5
    builds its decoder inputs from them)."""
    encoded = families.encode(dataset, processor, task_type, max_length)
    for _, inputs in length_sorted_batches(encoded, processor, batch_size, task_type):
        labels = inputs["labels"] if families.is_sequence(task_type) else inputs.pop("labels")
        yield inputs, labels


def trainable(model):
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def loop_fisher(model, processor, dataset, task_type, batch_size, max_length, uniforms=None):
    """The authors' loop: one example at a time, unpadded. With `uniforms` (a classifier's; one per example, in
    dataset order) the label of example i is drawn from the model by `sample_labels` with uniforms[i], as
    `compute_fisher` draws it, instead of the gold label."""
    encoded = families.encode(dataset, processor, task_type, max_length)
    collate = families.collator(processor, task_type)
    parameters = trainable(model)
    sums = {name: torch.zeros_like(p) for name, p in parameters.items()}
    for i, example in enumerate(encoded):
        inputs = collate([example])
        labels = inputs["labels"] if families.is_sequence(task_type) else inputs.pop("labels")
        model.zero_grad(set_to_none=True)
        logits = model(**inputs).logits
        if uniforms is not None:
            labels = sample_labels(logits, uniforms[i : i + 1])
        log_likelihoods(logits, labels, task_type).sum().backward()
        for name, p in parameters.items():
            if p.grad is not None:
                sums[name] += p.grad**2
    return {name: s / len(encoded) for name, s in sums.items()}


def backpack_fisher(model, processor, dataset, task_type, batch_size, max_length):
    from backpack import backpack, extend
    from backpack.extensions import SumGradSquared

    for module in model.modules():
        if type(module) in BACKPACK_LAYERS and getattr(module, "padding_idx", None) is None:
            extend(module)
    from backpack.context import CTX

    parameters = trainable(model)
    sums = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no extension for Module LayerNorm although the module has parameters"
        try:
            for inputs, labels in batches(processor, dataset, task_type, batch_size, max_length):
                with backpack(SumGradSquared()):
                    log_likelihoods(model(**inputs).logits, labels, task_type).sum().backward()
                for name, p in parameters.items():
                    if hasattr(p, "sum_grad_squared"):
                        sums[name] = sums.get(name, 0) + p.sum_grad_squared
                        del p.sum_grad_squared
                    p.grad = None
        finally:
            CTX.remove_hooks()
    return {name: s / len(dataset) for name, s in sums.items()}


def opacus_fisher(model, processor, dataset, task_type, batch_size, max_length):
    from opacus import GradSampleModule

    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    for module in model.modules():
        if any(True for _ in module.parameters(recurse=False)):
            module.train()
    parameters = trainable(model)
    sums = {}
    try:
        for inputs, labels in batches(processor, dataset, task_type, batch_size, max_length):
            log_likelihoods(wrapped(**inputs).logits, labels, task_type).sum().backward()
            for name, p in parameters.items():
                if getattr(p, "grad_sample", None) is not None:
                    sums[name] = sums.get(name, 0) + p.grad_sample.square().sum(0)
            wrapped.zero_grad(set_to_none=True)
    finally:
        wrapped._close()
        model.eval()
    return {name: s / len(dataset) for name, s in sums.items()}


def func_fisher(model, processor, dataset, task_type, batch_size, max_length, chunk=8):
    from torch.func import functional_call, grad, vmap

    parameters = {name: p.detach() for name, p in trainable(model).items()}

    def log_likelihood(parameters, inputs, labels):
        inputs = {key: value[None] for key, value in inputs.items()}
        logits = functional_call(model, parameters, (), inputs).logits
        return log_likelihoods(logits, labels[None], task_type)[0]

    per_example = vmap(grad(log_likelihood), in_dims=(None, 0, 0))
    sums = {name: torch.zeros_like(p) for name, p in parameters.items()}
    for inputs, labels in batches(processor, dataset, task_type, batch_size, max_length):
        inputs = _vmappable_masks(inputs, task_type, next(model.parameters()).dtype)
        for start in range(0, len(labels), chunk):
            part = {key: value[start : start + chunk] for key, value in inputs.items()}
            for name, g in per_example(parameters, part, labels[start : start + chunk]).items():
                sums[name] += g.square().sum(0)
    return {name: s / len(dataset) for name, s in sums.items()}


def _vmappable_masks(inputs, task_type, dtype):
    """A 2-D padding mask as the [batch, 1, 1, keys] additive mask that transformers passes through unchanged."""
    if "attention_mask" not in inputs:
        return inputs
    mask = inputs.pop("attention_mask")
    if task_type != "causal_lm":
        inputs["attention_mask"] = ((1 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min)
    return inputs


def load(config):
    """(model in eval mode, processor, dataset) of a predict.py config, loaded as predict.py loads them."""
    from modelmerge.data import class_names, load_split
    from modelmerge.prediction.loading import load_for_task

    dataset = load_split(config.dataset_name, config.split, config.data_dir, config.task_type, config.columns())
    model, processor = load_for_task(config.model_name_or_path, config.task_type,
                                     class_names=config.class_names or class_names(dataset))
    return model.eval(), processor, dataset


PEERS = {"authors' loop": loop_fisher, "BackPACK": backpack_fisher, "Opacus": opacus_fisher, "torch.func": func_fisher}
PROGRAM_NAMES = {"loop": "authors' loop", "backpack": "BackPACK", "opacus": "Opacus", "torch.func": "torch.func"}


def main():
    from modelmerge.config import load_config
    from modelmerge.prediction.config import PredictConfig
    from modelmerge.statistics.fisher import FisherResult, save_fisher
    from modelmerge.threads import set_torch_threads

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("peer", choices=list(PROGRAM_NAMES))
    parser.add_argument("config", help="predict.py's Fisher config (empirical: true)")
    args = parser.parse_args()
    config = load_config(PredictConfig, args.config)
    if not config.empirical:
        parser.error("the peers compute the empirical Fisher: give empirical: true")
    set_torch_threads(config.num_threads)
    model, processor, dataset = load(config)
    fisher = PEERS[PROGRAM_NAMES[args.peer]](model, processor, dataset, config.task_type, config.batch_size,
                                             config.max_length)
    result = FisherResult(fisher, len(dataset), True, config.seed, [])
    save_fisher(result, model, config.output_dir, {"peer": PROGRAM_NAMES[args.peer]})


if __name__ == "__main__":
    main()
