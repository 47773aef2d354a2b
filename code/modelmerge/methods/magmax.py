"""MagMax: each entry takes the task-vector value of largest magnitude.

Marczak, Twardowski, Trzciński & Cygert, "MagMax: Leveraging Model Merging for Seamless Continual
Learning", ECCV 2024 (https://arxiv.org/abs/2407.06322).
"""
import torch

from .base import MergeMethod, TensorGroup
from .common import base_tensor, upcast_dtype
from .task_space import PARAMETERS


class MagMax(MergeMethod):
    """θ = θ_0 + λ · τ_{t*}, t* = argmax_t |τ_t| entry by entry (on ties the later task), every tensor."""

    name = "magmax"
    needs_base = True
    elementwise = True
    parameters = {"merge_lambda": PARAMETERS["merge_lambda"]}

    def merge(self, group: TensorGroup, *, merge_lambda) -> torch.Tensor:
        base = base_tensor(group)
        dtype = upcast_dtype(base.dtype)
        chosen = torch.zeros(base.shape, dtype=dtype, device=base.device)
        for theta in group.tensors:
            tau = theta.to(dtype) - base.to(dtype)
            chosen = torch.where(tau.abs() >= chosen.abs(), tau, chosen)
        return (base.to(dtype) + merge_lambda * chosen).to(base.dtype)
