"""PCB-merging (parameter competition balancing): weight every entry of every task vector by how much it
matters within its task (intra-balancing) and how it agrees with the other tasks (inter-balancing), drop
all but the highest-weighted entries of each task, and average the rest with those weights.

Du, Lee, Li, Jiang, Guo, Yu, Liu, Goh, Tang, He & Zhang, "Parameter Competition Balancing for Model
Merging", NeurIPS 2024 (https://arxiv.org/abs/2410.02396); the definitions and defaults follow the
authors' reference implementation (github.com/duguodong7/pcb-merging, pcb-merging.py), applied to each
tensor rather than to the whole flattened model, so that models are merged tensor by tensor:

    τ̃_t      = sign(τ_t) · clamp(|τ_t|, q_c, q_(1−c))        quantiles of |τ_t| over the tensor, c = clamp_ratio
    intra_t  = exp(T · norm(|τ̃_t|)²)                          norm: min-max over the tensor, T the number of tasks
    inter_t  = tanh(τ_t ⊙ Σ_s τ_s)
    β_t      = intra_t ⊙ inter_t
    m_t      = norm(max(β_t, q_(1−r)(β_t)))                    r = pcb_ratio: only the top r of each task stays > 0
    θ        = θ_0 + λ · Σ_t m_t ⊙ τ̃_t / max(Σ_t m_t, 1e-12)

Quantiles are the authors' order statistics: q_p(x) is the ⌊p·d⌋-th smallest of the d entries (counted from
0), q_(1−c) the (⌊(1−c)·d⌋ − 1)-th. Where the min-max normalisation has nothing to spread (every entry
equal) it gives 0, so a tensor in which no entry of a task rises above its drop threshold keeps nothing of
that task (the reference divides 0 by 0 there).
"""
import torch

from .base import MergeMethod, Parameter, Sweep, TensorGroup
from .common import base_tensor, order_statistic, upcast_dtype
from .task_space import PARAMETERS


def min_max(values: torch.Tensor) -> torch.Tensor:
    """(values − min) / (max − min), 0 everywhere when all entries are equal."""
    low, high = values.min(), values.max()
    if high == low:
        return torch.zeros_like(values)
    return (values - low) / (high - low)


def balanced_weights(tau: torch.Tensor, total: torch.Tensor, tasks: int, ratio: float, clamp_ratio: float):
    """(τ̃_t, m_t) of one task vector; `total` is Σ_s τ_s."""
    d = tau.numel()
    magnitude = tau.abs()
    clamped = magnitude.clamp(order_statistic(magnitude, int(d * clamp_ratio)),
                              order_statistic(magnitude, int(d * (1 - clamp_ratio)) - 1))
    intra = min_max(clamped).square_().mul_(tasks).exp_()
    balance = intra.mul_(torch.tanh(tau * total))
    floor = order_statistic(balance, min(int(d * (1 - ratio)), d - 1))
    return clamped.mul_(tau.sign()), min_max(balance.clamp_(min=floor))


class Pcb(MergeMethod):
    """PCB-merging on every floating-point tensor; θ_0 + λ·(the balanced average of the clamped task vectors)."""

    name = "pcb"
    paper = 'Du et al., "Parameter Competition Balancing for Model Merging", NeurIPS 2024 (https://arxiv.org/abs/2410.02396)'
    sweeps = (Sweep("pcb", "pcb_ratio", (0.05, 0.1, 0.2, 0.3), {"merge_lambda": 1.2}),)
    aliases = ("pcb_merging", "pcb-merging")
    needs_base = True
    parameters = {
        "merge_lambda": PARAMETERS["merge_lambda"],
        "pcb_ratio": Parameter(0.1, aliases=("ratio",), range="(0, 1]",
                               help="r: share of each task vector's entries kept (highest balancing weights)"),
        "clamp_ratio": Parameter(0.0001, range="[0, 0.5)",
                                 help="c: share of each task vector's smallest and largest magnitudes clamped"),
    }

    def merge(self, group: TensorGroup, *, merge_lambda, pcb_ratio, clamp_ratio) -> torch.Tensor:
        base = base_tensor(group)
        dtype = upcast_dtype(base.dtype)
        taus = [x.to(dtype) - base.to(dtype) for x in group.tensors]
        total = sum(taus)
        weighted, weights = torch.zeros_like(total), torch.zeros_like(total)
        for tau in taus:
            clamped, weight = balanced_weights(tau, total, len(taus), pcb_ratio, clamp_ratio)
            weighted.add_(clamped.mul_(weight))
            weights.add_(weight)
        merged = weighted.div_(weights.clamp_(min=1e-12))
        return merged.mul_(merge_lambda).add_(base.to(dtype)).to(base.dtype)
