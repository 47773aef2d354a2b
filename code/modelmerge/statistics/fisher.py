"""The squared-gradient diagonal Fisher of a model of any family (`task_type`, modelmerge.families).

    F = 1/N Σ_i (∇_θ log p(y_i | x_i))²

for every trainable parameter θ (of a PEFT model: its adapter's), with y_i sampled from the model's
predictive distribution p(·|x_i) (seeded; the Fisher proper) or, in the empirical variant, the gold
label. For a sequence model (seq2seq, causal LM) log p(y_i | x_i) is the sum over the labelled tokens, each
sampled from the teacher-forced distribution at its position (families.sequence_log_likelihood). This is the
Hessian estimate of uncertainty-based gradient matching (Daheim et al., "Model Merging by Uncertainty-Based
Gradient Matching", ICLR 2024) and of Fisher merging (Matena & Raffel, NeurIPS 2022). The authors compute it
one example at a time (batch size 1: backward, square, accumulate); here one batched backward pass gives every
example's gradient layer by layer (`per_example.py`), with the same values.

    result = compute_fisher(model, tokenizer, dataset)   # dataset: a datasets.Dataset of the task type's columns
    save_fisher(result, model, "out/")                   # fisher.safetensors, hessian/, stats.json
"""
import logging
import os
import time
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from modelmerge.atomic import atomic_dir, atomic_file, write_json
from modelmerge.statistics.batches import check_examples, labelled_batches, limit_examples, release
from modelmerge.statistics.parameters import (checkpoint_names, gradients_for_statistic_parameters, is_peft_model,
                                              statistic_parameters)
from modelmerge.statistics.per_example import SquaredGradientSums

logger = logging.getLogger(__name__)


@dataclass
class FisherResult:
    fisher: dict  # named_parameters() name → Fisher, the parameter's shape, float32 (float64 for float64 parameters)
    num_examples: int
    empirical: bool
    seed: int
    labels: torch.Tensor | list  # the label y_i of each example, in dataset order (sequences: lists of tokens)

    @property
    def variant(self):
        return "empirical" if self.empirical else "sampled"


def compute_fisher(
    model, tokenizer, dataset, *, empirical=False, batch_size=16, max_length=None, num_examples=None, seed=0,
    task_type="sequence_classification", examples=None,
):
    """The diagonal Fisher of `model` (of `task_type`, plain transformers or PEFT) over `dataset`.

    `dataset`: a `datasets.Dataset` with the columns of `task_type` (`text`/`label` by default; `tokenizer`
    is the model's processor: tokenizer, image processor or CLIP's processor); its first `num_examples`
    examples are used (all when None), of those the `examples` (a range of positions, one shard's; None: all,
    their labels drawn as in the whole run: `combine_fisher` of the shards is the Fisher of the whole). Texts
    are truncated to `max_length` tokens (the tokenizer's limit when None). `seed` fixes the sampled labels (the
    same labels whatever the batch size). The model is run in eval mode (no dropout) and restored to its mode
    afterwards. Returns a `FisherResult`.
    """
    means, labels, count = per_example_means(
        SquaredGradientSums, model, tokenizer, dataset, empirical=empirical, batch_size=batch_size,
        max_length=max_length, num_examples=num_examples, seed=seed, task_type=task_type, examples=examples,
        desc="Fisher",
    )
    return FisherResult(means, count, empirical, seed, labels)


def per_example_means(sums_class, model, tokenizer, dataset, *, empirical, batch_size, max_length, num_examples, seed,
                      task_type, examples, desc):
    """(name → the mean over the examples that `sums_class` (SquaredGradientSums, AbsoluteGradientSums) sums, the
    labels y_i as a tensor or lists, the number of examples): the loop of `compute_fisher`, with its arguments."""
    dataset = limit_examples(dataset, num_examples)
    examples = check_examples(examples, dataset)
    was_training = model.training
    model.eval()
    try:
        with gradients_for_statistic_parameters(model), sums_class(model) as sums:
            logger.info(
                "%s (%s labels) over %d examples, batch size %d: %s",
                desc, "gold" if empirical else "sampled", len(examples), batch_size, sums.describe(),
            )
            labels = [None] * len(examples)
            batches = labelled_batches(
                model, tokenizer, dataset, sums.capture, empirical=empirical, batch_size=batch_size,
                max_length=max_length, seed=seed, desc=desc, task_type=task_type, examples=examples,
            )
            start = time.perf_counter()
            for batch in batches:
                sums.add(batch.loss, batch.sites, len(batch.indices))
                for index, label in zip(batch.indices.tolist(), batch.labels):
                    labels[index - examples.start] = label
                release(batch)
            seconds = time.perf_counter() - start
            rate = len(examples) / seconds
            logger.info("%s of %d examples in %.1f s (%.1f examples/s)", desc, len(examples), seconds, rate)
            # kept in the sums' precision (at least float32): in float16, squared gradients below 6e-8 are zeros
            means = {name: total.div_(len(examples)) for name, total in sums.named_sums().items()}
    finally:
        model.train(was_training)
    return means, as_tensor_if_classes(labels), len(examples)


def as_tensor_if_classes(labels):
    """Class labels as a long tensor; sequences' token lists stay lists."""
    return torch.tensor(labels, dtype=torch.long) if all(isinstance(label, int) for label in labels) else labels


def combine_fisher(parts):
    """The Fisher over the union of the examples of `parts` (FisherResults of consecutive slices, in order, of one
    run's examples): their means weighted by their example counts, summed in float64; labels concatenated."""
    labels = [label for part in parts for label in
              (part.labels.tolist() if isinstance(part.labels, torch.Tensor) else part.labels)]
    return FisherResult(weighted_means([part.fisher for part in parts], [part.num_examples for part in parts]),
                        sum(part.num_examples for part in parts), parts[0].empirical, parts[0].seed,
                        as_tensor_if_classes(labels))


def weighted_means(means, counts):
    """The mean over the union of the examples of parts with the means `means` (name → tensor) over `counts`
    examples: weighted by the counts, summed in float64, in the first part's dtype."""
    total = sum(counts)
    combined = {}
    for name, value in means[0].items():
        weighted = torch.zeros(value.shape, dtype=torch.float64)
        for part, count in zip(means, counts):
            weighted.add_(part[name], alpha=count)
        combined[name] = weighted.div_(total).to(value.dtype)
    return combined


def save_fisher(result, model, output_dir, provenance=None):
    """Write `fisher.safetensors`, `hessian/` and `stats.json` into `output_dir`, each atomically, stats.json last;
    return what stats.json holds.

    The safetensors files' metadata records `provenance` (modelmerge.merging.provenance: the model, the data) and the
    variant, seed and number of examples.

    fisher.safetensors holds the Fisher of every parameter under its checkpoint name (zeros for the frozen ones
    of a full model, such as CLIP's text tower). hessian/ is
    `model.save_pretrained` with the Fisher in place of the weights (zeros for frozen parameters, buffers
    unchanged), so it loads like the model; for a PEFT model it is an adapter folder.
    """
    names = statistic_parameters(model)
    metadata = {**(provenance or {}), "variant": result.variant, "seed": str(result.seed),
                "num_examples": str(result.num_examples)}
    os.makedirs(output_dir, exist_ok=True)
    with atomic_file(os.path.join(output_dir, "fisher.safetensors")) as tmp:
        tensors = {names[name]: fisher.contiguous() for name, fisher in result.fisher.items()}
        tensors.update(frozen_zeros(model, result.fisher))
        save_file(tensors, tmp, metadata={"format": "pt", **metadata})
    with atomic_dir(os.path.join(output_dir, "hessian")) as tmp:
        model.save_pretrained(tmp, state_dict=_hessian_state_dict(model, result.fisher), **_save_options(model))
        _add_metadata(tmp, metadata)
    stats = {"num_examples": result.num_examples, "variant": result.variant, "seed": result.seed}
    write_json(os.path.join(output_dir, "stats.json"), stats)
    logger.info("wrote the Fisher of %d tensors over %d examples to %s", len(names), result.num_examples, output_dir)
    return stats


def _add_metadata(folder, metadata):
    """Add `metadata` to the safetensors files of `folder` (save_pretrained takes none of its own)."""
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            path = os.path.join(folder, name)
            with safe_open(path, framework="pt") as f:
                existing = f.metadata() or {}
            save_file(load_file(path), path + ".tmp", metadata={**existing, **metadata})  # beside the mapped file
            os.replace(path + ".tmp", path)


def frozen_zeros(model, fisher):
    """Zeros for the frozen parameters of a full model (CLIP's text tower), so that the file covers the checkpoint
    as merges expect; a PEFT adapter's statistics cover the adapter only."""
    if is_peft_model(model):
        return {}
    frozen = [name for name, _ in model.named_parameters() if name not in fisher]
    parameters = dict(model.named_parameters())
    return {saved: torch.zeros(parameters[name].shape, dtype=torch.promote_types(parameters[name].dtype, torch.float32))
            for name, saved in checkpoint_names(model, frozen).items()}


def _hessian_state_dict(model, fisher):
    parameters = dict(model.named_parameters(remove_duplicate=False))
    by_parameter = {id(parameters[name]): value for name, value in fisher.items()}
    state = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name not in parameters:
            state[name] = tensor.detach()  # a buffer
        else:
            value = by_parameter.get(id(tensor))
            state[name] = torch.zeros_like(tensor, requires_grad=False) if value is None else value
    return state


def _save_options(model):
    return {"save_embedding_layers": False} if is_peft_model(model) else {}
