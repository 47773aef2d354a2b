"""How the task-vector family (task arithmetic, TIES, DARE, breadcrumbs) combines task vectors τ_t = θ_t − θ_0.

Each of those methods first sparsifies its task vectors its own way, then calls `combine`, which follows
mergekit's generalized task arithmetic so that the same YAML gives the same result:

    d_t = w_t · τ'_t                                   (τ'_t: the sparsified task vector)
    with a sign consensus (TIES): m_t = [sign(d_t) = s], s the elected sign
    θ = θ_0 + λ · Σ_t m_t d_t / Σ_t m_t w_t            (the division only with `normalize`)

The arithmetic runs in the group's dtype, as mergekit's does.
"""
import torch

from .base import Parameter, TensorGroup
from .common import per_model

CONSENSUS_METHODS = ("sum", "count")


def combine_parameters(normalize: bool) -> dict[str, Parameter]:
    """The parameters every method of the family takes; `normalize` defaults differ between methods."""
    return {
        "weight": Parameter(1.0, per_model=True, aliases=("weights",), help="weight w_t of each task vector"),
        "merge_lambda": Parameter(1.0, aliases=("lambda", "scaling_factor"), help="λ, scales the merged task vector"),
        "normalize": Parameter(normalize, type=bool, help="divide by the (selected) weights' sum"),
        "int8_mask": Parameter(False, type=bool, help="accepted for mergekit configs; a memory option there, no effect here"),
    }


CONSENSUS_PARAMETERS = {
    "consensus_method": Parameter("sum", type=str, help="sign election: 'sum' of the task vectors (TIES) or 'count' of their signs"),
    "global_majority_sign": Parameter(
        None, type=int, help="+1/-1: the sign where the election ties (default: the tensor's majority sign)"
    ),
}


def task_vector(group: TensorGroup, index: int) -> torch.Tensor:
    return group.tensors[index] - group.base


def combine(group: TensorGroup, deltas, weight, *, merge_lambda, normalize, consensus_method=None,
            global_majority_sign=None) -> torch.Tensor:
    """θ_0 + λ · (the weighted, optionally sign-elected and normalised sum of `deltas`); see the module doc."""
    weights = per_model(weight, group, "weight")
    base = group.base
    stacked = torch.stack([d.to(base.dtype) for d in deltas])
    w = torch.tensor(weights, dtype=base.dtype, device=base.device).view(-1, *([1] * base.dim()))
    stacked.mul_(w)
    if consensus_method is None:
        mixed = stacked.sum(dim=0)
        divisor = w.sum()
        if divisor.abs() < 1e-8:  # mergekit's guard: weights that cancel are not divided by
            divisor = torch.ones_like(divisor)
    else:
        mask = agreeing_signs(stacked, consensus_method, global_majority_sign, group.name)
        mixed = (stacked * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    if normalize:
        mixed = mixed / divisor
    if merge_lambda != 1:
        mixed = mixed * merge_lambda
    return base + mixed


def agreeing_signs(deltas: torch.Tensor, consensus_method: str, global_majority_sign, name: str) -> torch.Tensor:
    """TIES' elect step: a boolean mask [T, ...] of the entries whose sign equals the elected sign.

    The elected sign is that of Σ_t d_t ('sum') or of Σ_t sign(d_t) ('count'). Where that is 0 the
    majority sign decides: `global_majority_sign` when given (TIES takes it over the whole model), else
    the sign of the sum of the elected signs of this tensor (+1 on a tie). Zero entries never agree.
    """
    if consensus_method not in CONSENSUS_METHODS:
        raise ValueError(f"consensus_method must be one of {CONSENSUS_METHODS}, got {consensus_method!r}")
    signs = deltas.sign()
    elected = (deltas.sum(dim=0) if consensus_method == "sum" else signs.sum(dim=0)).sign()
    if global_majority_sign is not None:
        if global_majority_sign not in (1, -1):
            raise ValueError(f"global_majority_sign must be 1 or -1, got {global_majority_sign!r} (tensor {name})")
        majority = float(global_majority_sign)
    else:
        majority = 1.0 if (elected > 0).sum() >= (elected < 0).sum() else -1.0
    elected[elected == 0] = majority
    return signs == elected
