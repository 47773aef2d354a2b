"""TATR (task arithmetic in the trust region): task arithmetic restricted to the entries where the task
vectors conflict least, i.e. where moving along one task's vector changes the others' losses least.

Sun, Yang, Shen, Guo, Liu & Shen, "Task Arithmetic in Trust Region: A Training-Free Model Merging Approach
to Navigate Knowledge Conflicts", ICLR 2025 (https://openreview.net/forum?id=q3ztjJRQuJ); as FusionBench
0.2.33 computes it (fusion_bench.method.trust_region, its data-free `zero_shot` form, which estimates each
task's gradient magnitude by |τ_i|), per tensor rather than over the flattened model:

    Ω = Σ_i Σ_(j≠i) |τ_i| ⊙ |τ_j|,     m = [Ω < Ω_(⌊q·n⌋)]  (the ⌊q·n⌋-th smallest of the n entries, from 0)
    θ = θ_0 + λ · Σ_t m ⊙ τ_t

with q = `threshold_quantile` (0.99) and λ = `merge_lambda` (0.3), FusionBench's defaults.

The gradient form (`tatr_gradient`; FusionBench's default, `zero_shot: false`) measures each task's gradient
instead: G_i, the mean absolute per-example gradient of task i's loss at θ_0 over its exemplars (FusionBench: 128,
cross-entropy with the gold labels; statistics/gradient_magnitude.py, predict's mode `gradient_magnitude` computed on
θ_0 with task i's data, given as model i's statistics), so that Ω estimates how far each task vector moves the
other tasks' losses to first order, Σ_i Σ_(j≠i) |∇L_i(θ_0)| ⊙ |τ_j|:

    Ω = Σ_i Σ_(j≠i) G_i ⊙ |τ_j|,     m and θ as above.

As 0.2.33 ships it, FusionBench stores those means under the last parameter's name rather than the task's
(`all_avg_abs_grads[name] = grad` in `compute_avg_abs_grads`), so one entry remains, Ω ≡ 0, nothing is kept and its
merge is θ_0 whatever the inputs; keyed by task, as the paper defines Ω, its merge is this one
(tests/methods/test_tatr_gradient.py).
"""
import torch

from .base import SCALING_FACTORS, MergeMethod, Parameter, Sweep, TensorGroup
from .common import base_tensor, order_statistic, stat, upcast_dtype


def conflict(taus: list[torch.Tensor], magnitudes: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Ω = Σ_i Σ_(j≠i) G_i ⊙ |τ_j|, G_i = `magnitudes[i]` (None: |τ_i|), summed in this order (as FusionBench does)."""
    absolute = [tau.abs() for tau in taus]
    omega = torch.zeros_like(taus[0])
    for i, first in enumerate(absolute if magnitudes is None else magnitudes):
        for j, second in enumerate(absolute):
            if i != j:
                omega += first * second
    return omega


def trust_region_merge(base, taus, magnitudes, merge_lambda, threshold_quantile):
    """θ_0 + λ · Σ_t m ⊙ τ_t, m = [Ω < its ⌊q·n⌋-th smallest entry], in the dtype of `taus`."""
    omega = conflict(taus, magnitudes)
    n = omega.numel()
    keep = omega < order_statistic(omega, max(0, min(int(n * threshold_quantile), n - 1)))
    merged = sum(tau * keep for tau in taus)
    return merged.mul_(merge_lambda).add_(base)


PARAMETERS = {
    "merge_lambda": Parameter(0.3, aliases=("lambda", "scaling_factor"), help="λ, scales the masked sum of task vectors"),
    "threshold_quantile": Parameter(0.99, range="[0, 1]", help="q: entries whose conflict is below its q-quantile are kept"),
}


def task_vectors(group: TensorGroup):
    """(θ_0, [τ_t]) in the working dtype."""
    base = base_tensor(group)
    dtype = upcast_dtype(base.dtype)
    return base.to(dtype), [x.to(dtype) - base.to(dtype) for x in group.tensors]


class TrustRegion(MergeMethod):
    """θ_0 + λ · Σ_t τ_t on the entries outside the top 1 − q of the conflict Ω (G_i = |τ_i|), on every tensor."""

    name = "tatr"
    paper = 'Sun et al., "Task Arithmetic in Trust Region", ICLR 2025 (https://openreview.net/forum?id=q3ztjJRQuJ)'
    sweeps = (Sweep("tatr", "merge_lambda", SCALING_FACTORS, {"threshold_quantile": 0.99}),)
    aliases = ("trust_region", "task_arithmetic_trust_region")
    needs_base = True
    parameters = PARAMETERS

    def merge(self, group: TensorGroup, *, merge_lambda, threshold_quantile) -> torch.Tensor:
        base, taus = task_vectors(group)
        return trust_region_merge(base, taus, None, merge_lambda, threshold_quantile).to(group.ancestor.dtype)


class GradientTrustRegion(MergeMethod):
    """TATR with each task's mean absolute gradient at θ_0 (statistic 'gradient_magnitude' of model t) as G_t."""

    name = "tatr_gradient"
    paper = TrustRegion.paper
    # each task model's statistic is computed at θ_0 on that task's data (GradientMagnitudeJob in the graphs)
    sweeps = (Sweep("tatr_gradient", "merge_lambda", SCALING_FACTORS, {"threshold_quantile": 0.99}),)
    aliases = ("trust_region_gradient", "tatr_gradients")
    needs_base = True
    stats = ("gradient_magnitude",)
    parameters = PARAMETERS

    def merge(self, group: TensorGroup, *, merge_lambda, threshold_quantile) -> torch.Tensor:
        base, taus = task_vectors(group)
        magnitudes = [stat(group, t, "gradient_magnitude").to(base.dtype) for t in range(len(taus))]
        return trust_region_merge(base, taus, magnitudes, merge_lambda, threshold_quantile).to(group.ancestor.dtype)
