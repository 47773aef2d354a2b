"""How the task-vector family (task arithmetic, TIES, DARE, breadcrumbs) combines task vectors τ_t = θ_t − θ_0.

Each of those methods first sparsifies its task vectors its own way, then calls `combine`, which follows
mergekit's generalized task arithmetic so that the same YAML gives the same result:

    d_t = w_t · τ'_t                                   (τ'_t: the sparsified task vector)
    with a sign consensus (TIES): m_t = [sign(d_t) = s], s the elected sign
    θ = θ_0 + λ · Σ_t m_t d_t / Σ_t m_t w_t            (the division only with `normalize`)

The arithmetic runs in the group's dtype, as mergekit's does (with float32 accumulators).
"""
import torch

from .base import Parameter, TensorGroup
from .common import per_model, upcast_dtype

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


def restore_l1_norm(kept: torch.Tensor, original: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """`kept` (a sparsified `original`) scaled back to the L1 norm of `original`, as mergekit's `rescale`
    does; unchanged where either norm is below `eps`."""
    before, after = original.abs().sum(), kept.abs().sum()
    if before < eps or after < eps:
        return kept
    return kept * (before / after)


def combine(group: TensorGroup, deltas, weight, *, merge_lambda, normalize, consensus_method=None,
            global_majority_sign=None) -> torch.Tensor:
    """θ_0 + λ · (the weighted, optionally sign-elected and normalised sum of `deltas`); see the module doc.

    Sums over models accumulate in float32 (at least) and are rounded to the working dtype once, as
    mergekit's reductions are; the models are visited one at a time rather than stacked.
    """
    base = group.base
    dtype, accumulate = base.dtype, upcast_dtype(base.dtype)
    # Rounded to the working dtype first, as mergekit's weight tensor is.
    weights = per_model(weight, group, "weight")
    w = torch.tensor(weights, dtype=dtype, device=base.device)
    weighted = [d.to(dtype) if weights[t] == 1 else d.to(dtype) * w[t] for t, d in enumerate(deltas)]
    if consensus_method is None:
        mixed = _sum(weighted, accumulate).to(dtype)
        divisor = w.sum()
        if divisor.abs() < 1e-8:  # mergekit's guard: weights that cancel are not divided by
            divisor = torch.ones_like(divisor)
    else:
        elected = elect_signs(weighted, consensus_method, global_majority_sign, group.name, accumulate)
        mixed = torch.zeros(base.shape, dtype=accumulate, device=base.device)
        divisor = torch.zeros_like(mixed)
        for t, d in enumerate(weighted):
            agree = d.sign() == elected  # zero entries never agree
            mixed += torch.where(agree, d, 0)
            divisor += agree if weights[t] == 1 else agree * w[t]
        mixed, divisor = mixed.to(dtype), divisor.to(dtype)
        divisor[divisor == 0] = 1
    if normalize:
        mixed = mixed / divisor
    if merge_lambda != 1:
        mixed = mixed * merge_lambda
    return base + mixed


def _sum(tensors, dtype) -> torch.Tensor:
    total = torch.zeros(tensors[0].shape, dtype=dtype, device=tensors[0].device)
    for tensor in tensors:
        total += tensor
    return total


def elect_signs(deltas, consensus_method: str, global_majority_sign, name: str, dtype) -> torch.Tensor:
    """TIES' elect step: the sign (±1) each entry's merged value must have.

    The elected sign is that of Σ_t d_t ('sum') or of Σ_t sign(d_t) ('count'). Where that is 0 the
    majority sign decides: `global_majority_sign` when given (TIES takes it over the whole model), else
    the sign most entries of this tensor elected (+1 on a tie).
    """
    if consensus_method not in CONSENSUS_METHODS:
        raise ValueError(f"consensus_method must be one of {CONSENSUS_METHODS}, got {consensus_method!r}")
    elected = _sum(deltas if consensus_method == "sum" else [d.sign() for d in deltas], dtype).sign()
    if global_majority_sign is not None:
        if global_majority_sign not in (1, -1):
            raise ValueError(f"global_majority_sign must be 1 or -1, got {global_majority_sign!r} (tensor {name})")
        majority = float(global_majority_sign)
    else:
        majority = 1.0 if (elected > 0).sum() >= (elected < 0).sum() else -1.0
    elected[elected == 0] = majority
    return elected.to(deltas[0].dtype)
