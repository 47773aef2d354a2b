"""How the task-vector family (task arithmetic, TIES, DARE, breadcrumbs) combines task vectors τ_t = θ_t − θ_0.

Each of those methods first sparsifies its task vectors its own way, then calls `combine`, which follows
mergekit's generalized task arithmetic so that the same YAML gives the same result:

    d_t = w_t · τ'_t                                   (τ'_t: the sparsified task vector)
    with a sign consensus (TIES): m_t = [sign(d_t) = s], s the elected sign
    θ = θ_0 + λ · Σ_t m_t d_t / Σ_t m_t w_t            (the division only with `normalize`)

The arithmetic runs in the group's dtype, as mergekit's does (with float32 accumulators). Everything is
entry by entry except the tensor's majority sign (the election's tie-break, see `tie_break`), so a
method that gives it as `global_majority_sign` can combine any block of rows on its own.
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
    "consensus_method": Parameter("sum", type=str, choices=CONSENSUS_METHODS,
                                  help="sign election: 'sum' of the task vectors (TIES) or 'count' of their signs"),
    "global_majority_sign": Parameter(None, type=int, choices=(1, -1),
                                      help="the sign where the election ties (default: the tensor's majority sign)"),
}


def task_vector(group: TensorGroup, index: int) -> torch.Tensor:
    return group.tensors[index] - group.ancestor


def restore_l1_norm(kept: torch.Tensor, original: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """`kept` (a sparsified `original`) scaled back to the L1 norm of `original`, as mergekit's `rescale`
    does; unchanged where either norm is below `eps`."""
    factor = l1_rescale_factor(kept, original, eps)
    return kept if factor is None else kept * factor


def l1_rescale_factor(kept: torch.Tensor, original: torch.Tensor, eps: float = 1e-7) -> torch.Tensor | None:
    """‖original‖₁ / ‖kept‖₁ (a 0-dim tensor), or None where either norm is below `eps`."""
    before, after = original.abs().sum(), kept.abs().sum()
    if before < eps or after < eps:
        return None
    return before / after


def weighted_deltas(group: TensorGroup, deltas, weight) -> list[torch.Tensor]:
    """d_t = w_t · τ'_t in the group's dtype, w_t rounded to that dtype first, as mergekit's weight tensor is."""
    dtype = group.ancestor.dtype
    weights = per_model(weight, group, "weight")
    w = torch.tensor(weights, dtype=dtype, device=group.ancestor.device)
    return [d.to(dtype) if weights[t] == 1 else d.to(dtype) * w[t] for t, d in enumerate(deltas)]


def combine(group: TensorGroup, deltas, weight, *, merge_lambda, normalize, consensus_method=None,
            global_majority_sign=None) -> torch.Tensor:
    """θ_0 + λ · (the weighted, optionally sign-elected and normalised sum of `deltas`); see the module doc.

    Sums over models accumulate in float32 (at least) and are rounded to the working dtype once, as
    mergekit's reductions are; the models are visited one at a time rather than stacked.
    `global_majority_sign` may be a function returning it: it is called only where the election ties
    between non-zero values (elsewhere the tie-break changes nothing), as computing it may be costly.
    """
    base = group.ancestor
    dtype, accumulate = base.dtype, upcast_dtype(base.dtype)
    weights = per_model(weight, group, "weight")
    weighted = weighted_deltas(group, deltas, weights)
    if consensus_method is None:
        mixed = _sum(weighted, accumulate).to(dtype)
        divisor = torch.tensor(weights, dtype=dtype, device=base.device).sum()
        if divisor.abs() < 1e-8:  # mergekit's guard: weights that cancel are not divided by
            divisor = torch.ones_like(divisor)
    else:
        raw = election(weighted, consensus_method, accumulate)
        majority = tie_break(raw, global_majority_sign, group.name)
        elected = fill_ties(raw, majority or 1.0, dtype)
        magnitude, divisor = _agreeing_sums(weighted, elected, weights, accumulate, normalize)
        if majority is None and _contested_ties(raw, elected, magnitude) and global_majority_sign() < 0:
            elected = fill_ties(raw, -1.0, dtype)
            magnitude, divisor = _agreeing_sums(weighted, elected, weights, accumulate, normalize)
        # The agreeing entries all have the elected sign; +0.0 turns the −0.0 of entries without any into +0.0.
        mixed = magnitude.mul_(elected).add_(0.0).to(dtype)
        if normalize:
            divisor = _nonzero(divisor.to(dtype), weights)
    if normalize:
        mixed.div_(divisor)
    if merge_lambda != 1:
        mixed.mul_(merge_lambda)
    return mixed.add_(base)


def _sum(tensors, dtype) -> torch.Tensor:
    total = torch.zeros(tensors[0].shape, dtype=dtype, device=tensors[0].device)
    for tensor in tensors:
        total += tensor
    return total


def _agreeing_sums(weighted, elected, weights, accumulate, with_divisor):
    """(Σ_t |d_t| over the d_t whose sign is the elected one, Σ_t of their w_t or None), in `accumulate`.

    The agreeing entries of d_t have magnitude relu(s·d_t) (s = ±1 the elected sign), the others give 0,
    and their signed sum is s times the sum of their magnitudes, exactly (rounding is symmetric). Products
    and relu are several times faster on the CPU than comparing signs: torch's boolean tensors are slow there.
    """
    magnitude = torch.zeros(elected.shape, dtype=accumulate, device=elected.device)
    divisor = torch.zeros_like(magnitude) if with_divisor else None
    agreeing = torch.empty_like(elected)
    for t, d in enumerate(weighted):
        magnitude += torch.mul(d, elected, out=agreeing).relu_()
        if with_divisor:
            agrees = agreeing.sign_()  # 1 where d_t agrees, else 0
            divisor += agrees if weights[t] == 1 else agrees.mul_(torch.tensor(weights[t], dtype=d.dtype))
    return magnitude, divisor


def _nonzero(divisor: torch.Tensor, weights) -> torch.Tensor:
    """`divisor` with every zero replaced by 1 (as mergekit does). With positive weights a zero divisor
    means that no model agrees, so the sum there is +0 and any positive divisor gives the same +0: the
    smallest weight is one, and a clamp to it changes no other entry. Otherwise 1 − |sign(x)| is 1
    exactly where x is 0."""
    if all(w > 0 for w in weights):
        return divisor.clamp_(min=torch.tensor(min(weights), dtype=divisor.dtype))
    return divisor.add_(divisor.sign().abs_().neg_().add_(1))


def election(deltas, consensus_method: str, dtype) -> torch.Tensor:
    """sign(Σ_t d_t) ('sum') or sign(Σ_t sign(d_t)) ('count'), summed in `dtype`: ±1, or 0 where it ties."""
    if consensus_method not in CONSENSUS_METHODS:
        raise ValueError(f"consensus_method must be one of {CONSENSUS_METHODS}, got {consensus_method!r}")
    return _sum(deltas if consensus_method == "sum" else [d.sign() for d in deltas], dtype).sign_()


def sign_balance(elected: torch.Tensor) -> float:
    """(entries elected +1) − (entries elected −1), counted exactly: the tensor's majority sign is that of
    the balance over all its entries (+1 when it is 0)."""
    return float(elected.sum(dtype=torch.float64))


def tie_break(elected: torch.Tensor, global_majority_sign, name: str) -> float | None:
    """The sign where the election ties: `global_majority_sign` when given (TIES takes it over the whole
    model), else the sign most entries of this tensor elected (+1 on a tie); None when
    `global_majority_sign` is a function, to be called only if a tie is contested (see `combine`)."""
    if global_majority_sign is None:
        return 1.0 if sign_balance(elected) >= 0 else -1.0
    if callable(global_majority_sign):
        return None
    return checked_majority_sign(global_majority_sign, name)


def checked_majority_sign(value, name: str) -> float:
    if value not in (1, -1):
        raise ValueError(f"global_majority_sign must be 1 or -1, got {value!r} (tensor {name})")
    return float(value)


def fill_ties(elected: torch.Tensor, majority: float, dtype) -> torch.Tensor:
    """The elected signs with `majority` where the election tied, in `dtype`: sign(2e + m) is e where
    e = ±1 and m where e = 0."""
    return (elected * 2).add_(majority).sign_().to(dtype)


def _contested_ties(raw, elected, magnitude) -> bool:
    """Whether the tie-break matters anywhere: some entry tied between non-zero values. `elected` broke
    the ties (raw 0) to +1, so elected − raw is 1 exactly at the tied entries, and `magnitude` (of the
    values agreeing with +1 there) is positive exactly at those tied between non-zero values."""
    tied = (elected - raw).to(magnitude.dtype)
    return bool(torch.dot(tied.flatten(), magnitude.flatten()) > 0)
