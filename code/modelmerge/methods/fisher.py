"""Fisher merging: average weighted by each model's diagonal Fisher information.

Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022
(https://arxiv.org/abs/2111.09832).
"""
import torch

from .base import MergeMethod, Parameter, TensorGroup
from .common import per_model, stat, upcast_dtype


class Fisher(MergeMethod):
    """Σ_t λ_t F_t ⊙ θ_t / Σ_t λ_t F_t, dividing by 1 where the sum is 0 (as git-theta's `fisher`).

    `fisher_floor` is added to every Fisher first (the paper's code uses 1e-6), so entries without any
    Fisher mass get the λ-weighted average instead of 0.
    """

    name = "fisher"
    stats = ("fisher",)
    elementwise = True
    parameters = {
        "weight": Parameter(1.0, per_model=True, aliases=("weights", "lambdas"), help="λ_t of each model"),
        "fisher_floor": Parameter(0.0, help="added to every Fisher entry"),
    }

    def merge(self, group: TensorGroup, *, weight, fisher_floor) -> torch.Tensor:
        weights = per_model(weight, group, "weight")
        dtype = upcast_dtype(group.tensors[0].dtype)
        numerator = torch.zeros(group.tensors[0].shape, dtype=dtype, device=group.tensors[0].device)
        denominator = torch.zeros_like(numerator)
        for t, (theta, w) in enumerate(zip(group.tensors, weights)):
            scaled_fisher = (stat(group, t, "fisher").to(dtype) + fisher_floor) * w
            numerator.addcmul_(scaled_fisher, theta.to(dtype))
            denominator.add_(scaled_fisher)
        denominator[denominator == 0] = 1
        return (numerator / denominator).to(group.tensors[0].dtype)
