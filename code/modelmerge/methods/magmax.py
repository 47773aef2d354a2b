"""MagMax: each entry takes the task-vector value of largest magnitude.

Marczak, Twardowski, Trzciński & Cygert, "MagMax: Leveraging Model Merging for Seamless Continual
Learning", ECCV 2024 (https://arxiv.org/abs/2407.06322).
"""
import torch

from .base import SCALING_FACTORS, MergeMethod, Sweep, TensorGroup
from .task_space import PARAMETERS, result, task_vectors


class MagMax(MergeMethod):
    """θ = θ_0 + λ · τ_{t*}, t* = argmax_t |τ_t| entry by entry (on ties the later task), every tensor."""

    name = "magmax"
    paper = 'Marczak, Twardowski, Trzciński & Cygert, "MagMax", ECCV 2024 (https://arxiv.org/abs/2407.06322)'
    sweeps = (Sweep("magmax", "merge_lambda", SCALING_FACTORS),)
    needs_base = True
    elementwise = True
    parameters = {"merge_lambda": PARAMETERS["merge_lambda"]}

    def merge(self, group: TensorGroup, *, merge_lambda) -> torch.Tensor:
        chosen = None
        for tau in task_vectors(group):  # one task vector at a time
            chosen = tau if chosen is None else torch.where(tau.abs() >= chosen.abs(), tau, chosen)
        return result(group, chosen, merge_lambda)
