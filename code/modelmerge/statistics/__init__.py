"""Statistics of a trained model of any family (`task_type`, modelmerge.families) that merge methods use.

- `fisher`: the squared-gradient diagonal Fisher (`compute_fisher`, `save_fisher`);
- `gram`: Gram matrices of every linear layer's inputs and output gradients (`compute_gram`, `save_gram`);
- `gradient_magnitude`: the mean absolute per-example gradient (TATR's; `compute_gradient_magnitude`,
  `save_gradient_magnitude`).
All run batched, with per-example gradients assembled layer by layer (`per_example`, `capture`), over
length-sorted batches with seeded label sampling (`batches`). They cover a model's trainable parameters,
or a PEFT model's adapter, and are saved under the checkpoint's tensor names (`parameters`).
"""
from modelmerge.statistics.fisher import FisherResult, compute_fisher, save_fisher
from modelmerge.statistics.gradient_magnitude import (GradientMagnitudeResult, compute_gradient_magnitude,
                                                      save_gradient_magnitude)
from modelmerge.statistics.gram import GramResult, compute_gram, save_gram

__all__ = ["FisherResult", "GradientMagnitudeResult", "GramResult", "compute_fisher", "compute_gradient_magnitude",
           "compute_gram", "save_fisher", "save_gradient_magnitude", "save_gram"]
