"""Uncertainty-based gradient matching: task arithmetic preconditioned by the models' Hessian estimates.

Daheim, Möllenhoff, Ponti, Gurevych & Khan, "Model Merging by Uncertainty-Based Gradient Matching",
ICLR 2024 (https://arxiv.org/abs/2310.12808).
"""
import torch

from .base import SCALING_FACTORS, MergeMethod, Parameter, Sweep, TensorGroup
from .common import base_tensor, per_model, stat, upcast_dtype


class UncertaintyBasedGradientMatching(MergeMethod):
    """Exactly the authors' released script, with diagonal Hessians H_0 (ancestor) and H_t (statistic 'fisher'):

        P = 1 / (Σ_t α c_t H_t + c_0 H_0 + δ_0)
        θ = θ_0 + α Σ_t P ⊙ (c_t H_t + δ_0 + c_0 H_0) ⊙ (θ_t − θ_0)

    α multiplies c_t H_t inside P but not in the per-task factor. With every H = 0 and δ_0 > 0 this is
    task arithmetic with λ = α. A zero in P's denominator is an error naming the tensor.
    """

    name = "uncertainty_based_gradient_matching"
    paper = ('Daheim, Möllenhoff, Ponti, Gurevych & Khan, "Model Merging by Uncertainty-Based Gradient Matching", '
             "ICLR 2024 (https://arxiv.org/abs/2310.12808)")
    sweeps = (Sweep("gradient matching", "scaling_factor", SCALING_FACTORS, {"delta_0": 1e-12}),)
    dataset_sizes = {"scaling_factor_pt": "ancestor", "scaling_factors_ft": "models"}  # c_0 and c_t: the data set sizes
    aliases = ("ubgm", "uncertainty-based-gradient-matching", "gradient_matching")
    needs_base = True
    elementwise = True
    stats = ("fisher",)
    base_stats = ("fisher",)
    parameters = {
        "scaling_factor": Parameter(1.0, aliases=("alpha", "merge_lambda"), help="α"),
        "scaling_factor_pt": Parameter(1.0, range="[0, inf)", help="c_0, e.g. the pretraining data size"),
        "scaling_factors_ft": Parameter(1.0, per_model=True, range="[0, inf)", help="c_t of each model, e.g. its data size"),
        "delta_0": Parameter(1e-12, range="[0, inf)", help="δ_0, the prior precision"),
    }

    def merge(self, group: TensorGroup, *, scaling_factor, scaling_factor_pt, scaling_factors_ft, delta_0):
        alpha = scaling_factor
        scales = per_model(scaling_factors_ft, group, "scaling_factors_ft")
        base = base_tensor(group)
        dtype = upcast_dtype(base.dtype)
        if "fisher" not in group.ancestor_statistics:
            raise ValueError(f"the ancestor's Hessian (statistic 'fisher') is missing for tensor {group.name}")
        # The released script's operations in its order, so float32 results agree bit for bit, but in place.
        # Its Python sums start from 0, so these do too (0 + x turns -0.0 into +0.0).
        hessians = [stat(group, t, "fisher").to(dtype) for t in range(len(group.tensors))]
        prior = scaling_factor_pt * group.ancestor_statistics["fisher"].to(dtype)  # c_0 H_0
        term = torch.empty_like(prior)

        denominator = torch.zeros_like(prior)  # Σ_t (α c_t) H_t + c_0 H_0 + δ_0
        for c, h in zip(scales, hessians):
            denominator += torch.mul(h, alpha * c, out=term)
        denominator.add_(prior).add_(delta_0)
        if denominator.numel() and denominator.abs().min() == 0:
            raise ValueError(f"zero denominator Σ α c_t H_t + c_0 H_0 + δ_0 in tensor {group.name} "
                             f"({int((denominator == 0).sum())} entries); use delta_0 > 0")
        preconditioner = denominator.reciprocal_()  # the script's 1.0 / denominator

        theta_0 = base.to(dtype)
        difference = torch.empty_like(prior)
        summed = torch.zeros_like(prior)  # Σ_t (P ⊙ (c_t H_t + δ_0 + c_0 H_0)) ⊙ (θ_t − θ_0)
        for theta, c, h in zip(group.tensors, scales, hessians):
            torch.mul(h, c, out=term).add_(delta_0).add_(prior).mul_(preconditioner)
            summed += term.mul_(torch.sub(theta.to(dtype), theta_0, out=difference))
        return summed.mul_(alpha).add_(theta_0).to(base.dtype)
