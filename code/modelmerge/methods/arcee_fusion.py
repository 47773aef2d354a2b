"""Arcee Fusion: take the other model's change only where it is important (a large change in a row
whose output distribution moved), by an outlier threshold on the importance.

Arcee AI (https://arcee.ai), "Arcee Fusion"; computed as mergekit 0.1.5's `arcee_fusion`, with exact
quantiles (mergekit samples one million entries of larger tensors).
"""
import torch
import torch.nn.functional as F

from .base import MergeMethod, Mergekit, TensorGroup
from .common import base_tensor, upcast_dtype


def importance(theta: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|θ − θ_0| times KL(softmax(θ) ‖ softmax(θ_0)) of its row (softmax over the last dimension)."""
    p = F.softmax(theta, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    return (theta - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The entry at sorted position ⌊q (n − 1)⌋ (mergekit's index, computed in float32 as there)."""
    flat = values.reshape(-1)
    index = int((torch.tensor(q, dtype=torch.float32) * (flat.numel() - 1)).long())
    return torch.kthvalue(flat, index + 1).values


class ArceeFusion(MergeMethod):
    """θ = θ_0 + (θ_1 − θ_0) ⊙ [importance ≥ median + 1.5 · (Q3 − Q1)], quantiles of the importance."""

    name = "arcee_fusion"
    mergekit = Mergekit("ancestor")
    paper = 'Arcee AI, "Arcee Fusion" (https://arcee.ai)'
    needs_base = True
    max_models = 1

    def merge(self, group: TensorGroup) -> torch.Tensor:
        base = base_tensor(group)
        if len(group.tensors) != 1:
            raise ValueError(f"arcee_fusion merges exactly 1 model into the ancestor, got {len(group.tensors)}")
        dtype = upcast_dtype(base.dtype)
        theta, theta_0 = group.tensors[0].to(dtype), base.to(dtype)
        scores = importance(theta, theta_0)
        q1, median, q3 = (quantile(scores, q) for q in (0.25, 0.5, 0.75))
        mask = (scores >= median + 1.5 * (q3 - q1)).to(dtype)
        return (theta_0 + (theta - theta_0) * mask).to(base.dtype)
