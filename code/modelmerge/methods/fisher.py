"""Fisher merging: average weighted by each model's diagonal Fisher information.

Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022
(https://arxiv.org/abs/2111.09832).
"""
import logging

import torch

from .base import MergeMethod, Parameter, Sweep, TensorBlocks, TensorGroup
from .common import per_model, stat, upcast_dtype, weighted_mean

logger = logging.getLogger(__name__)


class Fisher(MergeMethod):
    """Σ_t λ_t F_t ⊙ θ_t / Σ_t λ_t F_t, dividing by 1 where the sum is 0 (as git-theta's `fisher`).

    `fisher_floor` is added to every Fisher first (the paper's code uses 1e-6), so entries without any
    Fisher mass get the λ-weighted average instead of 0. A tensor without any Fisher mass at all (every
    model's Fisher zero there) gets that λ-weighted average whatever the floor, with a warning: it is what
    the paper's floor gives, and a model of zeros is never meant.
    """

    name = "fisher"
    paper = 'Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022 (https://arxiv.org/abs/2111.09832)'
    sweeps = (Sweep("fisher"),)
    stats = ("fisher",)
    elementwise = True
    parameters = {
        "weight": Parameter(1.0, per_model=True, aliases=("weights", "lambdas"), range="[0, inf)", help="λ_t of each model"),
        "fisher_floor": Parameter(0.0, range="[0, inf)", help="added to every Fisher entry"),
    }

    def prepare(self, blocks: TensorBlocks, *, weight, fisher_floor) -> bool:
        """Whether the tensor has no Fisher mass (Σ_t λ_t (F_t + floor) = 0 everywhere); the first block
        with mass ends the pass."""
        without_mass = not any(bool(_mass(group, weight, fisher_floor).any()) for group in blocks)
        if without_mass:
            logger.warning("statistic 'fisher' of tensor %s is zero for every model: merged as the λ-weighted "
                           "average (as Matena & Raffel's Fisher floor gives)", blocks.name)
        return without_mass

    def merge(self, group: TensorGroup, *, weight, fisher_floor) -> torch.Tensor:
        without_mass = group.prepared
        if without_mass is None:
            without_mass = self.prepare(TensorBlocks.of(group), weight=weight, fisher_floor=fisher_floor)
        weights = per_model(weight, group, "weight")
        dtype = upcast_dtype(group.tensors[0].dtype)
        if without_mass:
            return weighted_mean(group.tensors, weights, dtype, group).to(group.tensors[0].dtype)
        numerator = torch.zeros(group.tensors[0].shape, dtype=dtype, device=group.tensors[0].device)
        denominator = torch.zeros_like(numerator)
        for t, (theta, w) in enumerate(zip(group.tensors, weights)):
            scaled_fisher = (stat(group, t, "fisher").to(dtype) + fisher_floor) * w
            numerator.addcmul_(scaled_fisher, theta.to(dtype))
            denominator.add_(scaled_fisher)
        denominator[denominator == 0] = 1
        return (numerator / denominator).to(group.tensors[0].dtype)


def _mass(group: TensorGroup, weight, fisher_floor) -> torch.Tensor:
    """Σ_t λ_t (F_t + floor) of `group`."""
    weights = per_model(weight, group, "weight")
    return sum((stat(group, t, "fisher") + fisher_floor) * w for t, w in enumerate(weights))
