"""TATR (task arithmetic in the trust region): task arithmetic restricted to the entries where the task
vectors conflict least, i.e. where moving along one task's vector changes the others' losses least.

Sun, Yang, Shen, Guo, Liu & Shen, "Task Arithmetic in Trust Region: A Training-Free Model Merging Approach
to Navigate Knowledge Conflicts", ICLR 2025 (https://openreview.net/forum?id=q3ztjJRQuJ); as FusionBench
0.2.33 computes it (fusion_bench.method.trust_region, its data-free `zero_shot` form, which estimates each
task's gradient magnitude by |τ_i|), per tensor rather than over the flattened model:

    Ω = Σ_i Σ_(j≠i) |τ_i| ⊙ |τ_j|,     m = [Ω < Ω_(⌊q·n⌋)]  (the ⌊q·n⌋-th smallest of the n entries, from 0)
    θ = θ_0 + λ · Σ_t m ⊙ τ_t

with q = `threshold_quantile` (0.99) and λ = `merge_lambda` (0.3), FusionBench's defaults.

FusionBench's default configuration (`zero_shot: false`) estimates the gradients instead from exemplars: Ω from
each task's mean |∇_θ L| of per-example cross-entropy at θ_0 (128 per task) times the other tasks' |τ_j|. As
0.2.33 ships it, those means are stored under the last parameter's name rather than the task's, so one entry
remains, Ω ≡ 0, nothing is kept and the merge is θ_0 whatever the inputs (run on a linear classifier with
three tasks). That form is not reproduced here: it would need a statistic the project does not compute (the
mean absolute per-example gradient at θ_0; the Fisher is the mean square at θ_t).
"""
import torch

from .base import SCALING_FACTORS, MergeMethod, Parameter, Sweep, TensorGroup
from .common import base_tensor, order_statistic, upcast_dtype


def conflict(taus: list[torch.Tensor]) -> torch.Tensor:
    """Ω = Σ_i Σ_(j≠i) |τ_i| ⊙ |τ_j|, summed in this order (as FusionBench does)."""
    magnitudes = [tau.abs() for tau in taus]
    omega = torch.zeros_like(taus[0])
    for i, first in enumerate(magnitudes):
        for j, second in enumerate(magnitudes):
            if i != j:
                omega += first * second
    return omega


class TrustRegion(MergeMethod):
    """θ_0 + λ · Σ_t τ_t on the entries outside the top 1 − q of the conflict Ω, on every tensor."""

    name = "tatr"
    paper = 'Sun et al., "Task Arithmetic in Trust Region", ICLR 2025 (https://openreview.net/forum?id=q3ztjJRQuJ)'
    sweeps = (Sweep("tatr", "merge_lambda", SCALING_FACTORS, {"threshold_quantile": 0.99}),)
    aliases = ("trust_region", "task_arithmetic_trust_region")
    needs_base = True
    parameters = {
        "merge_lambda": Parameter(0.3, aliases=("lambda", "scaling_factor"), help="λ, scales the masked sum of task vectors"),
        "threshold_quantile": Parameter(0.99, range="[0, 1]", help="q: entries whose conflict is below its q-quantile are kept"),
    }

    def merge(self, group: TensorGroup, *, merge_lambda, threshold_quantile) -> torch.Tensor:
        base = base_tensor(group)
        dtype = upcast_dtype(base.dtype)
        taus = [x.to(dtype) - base.to(dtype) for x in group.tensors]
        omega = conflict(taus)
        n = omega.numel()
        keep = omega < order_statistic(omega, max(0, min(int(n * threshold_quantile), n - 1)))
        merged = sum(tau * keep for tau in taus)
        return merged.mul_(merge_lambda).add_(base.to(dtype)).to(base.dtype)
