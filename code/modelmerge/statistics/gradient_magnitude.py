"""The mean absolute per-example gradient of a model: TATR's measure of how much a task's loss reacts to each
parameter.

    G = 1/N Σ_i |∇_θ log p(y_i | x_i)|

for every trainable parameter θ (of a PEFT model: its adapter's), with y_i the gold label by default (sampled
from the model with `empirical=False`), as the Fisher (`fisher.py`) but with |·| for (·)². Task arithmetic in
the trust region (Sun et al., "Task Arithmetic in Trust Region: A Training-Free Model Merging Approach to
Navigate Knowledge Conflicts", ICLR 2025) computes it at the pre-trained θ_0 on a few exemplars of each task
(FusionBench 0.2.33's `compute_avg_abs_grads`: 128 examples, cross-entropy with the gold label, whose
gradient is that of −log p(y|x)); methods/trust_region.py's `tatr_gradient` reads it. For sequences log p(y|x)
is the sum over the scored tokens. The model runs in eval mode (FusionBench's runs CLIP in train mode, which
has no dropout there).

    result = compute_gradient_magnitude(theta_0, processor, task_data)
    save_gradient_magnitude(result, theta_0, "out/")   # gradient_magnitude.safetensors, stats.json
"""
import logging
import os
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

from modelmerge.atomic import atomic_file, write_json
from modelmerge.statistics.fisher import as_tensor_if_classes, frozen_zeros, per_example_means, weighted_means
from modelmerge.statistics.parameters import statistic_parameters
from modelmerge.statistics.per_example import AbsoluteGradientSums

logger = logging.getLogger(__name__)
FILE = "gradient_magnitude.safetensors"  # checkpoint.STATISTIC_FILES' "gradient_magnitude"


@dataclass
class GradientMagnitudeResult:
    magnitude: dict  # named_parameters() name → mean |∇|, the parameter's shape, float32 (float64 for float64 ones)
    num_examples: int
    empirical: bool
    seed: int
    labels: torch.Tensor | list  # the label y_i of each example, in dataset order (sequences: lists of tokens)

    @property
    def variant(self):
        return "empirical" if self.empirical else "sampled"


def compute_gradient_magnitude(
    model, tokenizer, dataset, *, empirical=True, batch_size=16, max_length=None, num_examples=None, seed=0,
    task_type="sequence_classification", examples=None,
):
    """The mean absolute per-example gradient of `model` over `dataset`; arguments as for `compute_fisher` (but
    gold labels by default). Returns a `GradientMagnitudeResult`."""
    means, labels, count = per_example_means(
        AbsoluteGradientSums, model, tokenizer, dataset, empirical=empirical, batch_size=batch_size,
        max_length=max_length, num_examples=num_examples, seed=seed, task_type=task_type, examples=examples,
        desc="gradient magnitude",
    )
    return GradientMagnitudeResult(means, count, empirical, seed, labels)


def combine_gradient_magnitude(parts):
    """The statistic over the union of the examples of `parts` (results of consecutive slices of one run's
    examples, in order): their means weighted by their example counts; labels concatenated."""
    labels = [label for part in parts for label in
              (part.labels.tolist() if isinstance(part.labels, torch.Tensor) else part.labels)]
    return GradientMagnitudeResult(
        weighted_means([part.magnitude for part in parts], [part.num_examples for part in parts]),
        sum(part.num_examples for part in parts), parts[0].empirical, parts[0].seed, as_tensor_if_classes(labels),
    )


def save_gradient_magnitude(result, model, output_dir, provenance=None):
    """Write `gradient_magnitude.safetensors` (under the checkpoint's names; zeros for the frozen parameters of a
    full model, which a merge then keeps at θ_0) and `stats.json`, each atomically, stats.json last; return what
    stats.json holds. The metadata records `provenance`, the variant, seed and number of examples."""
    names = statistic_parameters(model)
    metadata = {"format": "pt", **(provenance or {}), "variant": result.variant, "seed": str(result.seed),
                "num_examples": str(result.num_examples)}
    os.makedirs(output_dir, exist_ok=True)
    with atomic_file(os.path.join(output_dir, FILE)) as tmp:
        tensors = {names[name]: value.contiguous() for name, value in result.magnitude.items()}
        tensors.update(frozen_zeros(model, result.magnitude))
        save_file(tensors, tmp, metadata=metadata)
    stats = {"num_examples": result.num_examples, "variant": result.variant, "seed": result.seed}
    write_json(os.path.join(output_dir, "stats.json"), stats)
    logger.info("wrote the gradient magnitudes of %d tensors over %d examples to %s", len(names), result.num_examples,
                output_dir)
    return stats
