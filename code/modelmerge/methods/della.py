"""DELLA: drop task-vector entries with a probability that falls with their magnitude rank, then TIES
(`della`) or task arithmetic (`della_linear`).

Deep, Bhardwaj, Majumder & Poria, "DELLA-Merging: Reducing Interference in Model Merging through
Magnitude-Based Sampling", 2024 (https://arxiv.org/abs/2406.11617); computed as mergekit 0.1.5's
`della` / `della_linear`, with its random draws seeded per tensor name and model as DARE's are here.
"""
import torch

from .base import MergeMethod, Parameter, TensorGroup
from .common import base_tensor, per_model, upcast_dtype
from .sparsify import tensor_generator
from .task_vectors import CONSENSUS_PARAMETERS, combine, combine_parameters, restore_l1_norm, task_vector


def keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """p = density − ε + 2ε · (rank − 1) / (n − 1), rank of |δ| within its row (ascending; a 1-D tensor is
    one row): the smallest entries are kept with probability density − ε, the largest with density + ε."""
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)  # a conv kernel: per filter
    order = rows.abs().argsort(dim=1, stable=True)
    n = rows.shape[1]
    position = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=order.device).expand_as(order))
    spread = position.to(upcast_dtype(delta.dtype)) / max(n - 1, 1)  # (rank − 1) / (n − 1), one sort only
    return ((density - epsilon) + spread * 2 * epsilon).reshape(delta.shape)


def draw(probabilities: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """1 with probability p, else 0; uniform draws from `generator` on the CPU, so a seed gives the same mask
    on every device."""
    uniform = torch.rand(probabilities.shape, generator=generator, dtype=probabilities.dtype)
    return (uniform.to(probabilities.device) < probabilities).to(probabilities.dtype)


def magnitude_prune(delta: torch.Tensor, density: float, epsilon: float, generator: torch.Generator,
                    rescale: bool) -> torch.Tensor:
    """DELLA's MagPrune of one task vector, rescaled to its L1 norm with `rescale` (mergekit's choice; the
    paper divides each kept entry by its probability, equal in expectation)."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    if not (0 < density - epsilon and density + epsilon < 1):
        raise ValueError(f"epsilon must leave density ± epsilon inside (0, 1), got density {density}, epsilon {epsilon}")
    dtype = upcast_dtype(delta.dtype)
    work = delta.to(dtype)
    mask = draw(keep_probabilities(work, density, epsilon), generator)
    kept = (work.unsqueeze(0) if work.dim() < 2 else work) * mask
    if rescale:
        kept = restore_l1_norm(kept, work)
    return kept.reshape(delta.shape).to(delta.dtype)


class DellaLinear(MergeMethod):
    """MagPrune each task vector, then task arithmetic (mergekit's `della_linear`)."""

    name = "della_linear"
    needs_base = True
    parameters = {
        **combine_parameters(normalize=False),
        "density": Parameter(1.0, per_model=True, range="(0, 1]", help="mean probability of keeping a task-vector entry, in (0, 1]"),
        "epsilon": Parameter(0.15, per_model=True, range="[0, 1)", help="spread of the keep probabilities: density ± epsilon"),
        "rescale": Parameter(True, type=bool, help="rescale each pruned task vector to its original L1 norm"),
        "seed": Parameter(0, type=int, help="seed of the drop masks (combined with the tensor name and model)"),
    }

    def merge(self, group: TensorGroup, *, weight, density, epsilon, rescale, seed, merge_lambda, normalize,
              int8_mask, consensus_method=None, global_majority_sign=None) -> torch.Tensor:
        base_tensor(group)
        densities, epsilons = per_model(density, group, "density"), per_model(epsilon, group, "epsilon")
        deltas = [magnitude_prune(task_vector(group, t), d, e, tensor_generator(seed, group.name, t), rescale)
                  for t, (d, e) in enumerate(zip(densities, epsilons))]
        return combine(group, deltas, weight, merge_lambda=merge_lambda, normalize=normalize,
                       consensus_method=consensus_method, global_majority_sign=global_majority_sign)


class Della(DellaLinear):
    """MagPrune then TIES' sign election and disjoint mean (mergekit's `della`): the sign is + where the
    election ties, as in mergekit."""

    name = "della"
    parameters = {
        **DellaLinear.parameters, **combine_parameters(normalize=True), **CONSENSUS_PARAMETERS,
        "global_majority_sign": Parameter(1, type=int, help="+1/-1: the sign where the election ties"),
    }
