"""Task arithmetic: add the (weighted) sum of task vectors to the ancestor.

Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023 (https://arxiv.org/abs/2212.04089).
"""
import torch

from .base import SCALING_FACTORS, MergeMethod, Mergekit, Sweep, TensorGroup
from .common import base_tensor
from .task_vectors import combine, combine_parameters, task_vector


class TaskArithmetic(MergeMethod):
    """θ_0 + λ Σ_t w_t τ_t (divided by Σ_t w_t with `normalize=true`), as mergekit's `task_arithmetic`."""

    name = "task_arithmetic"
    mergekit = Mergekit("ancestor", ignored=("density", "rescale"))  # without sparsification they do nothing
    paper = 'Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023 (https://arxiv.org/abs/2212.04089)'
    sweeps = (Sweep("task arithmetic", "merge_lambda", SCALING_FACTORS),)
    aliases = ("task-arithmetic",)
    needs_base = True
    elementwise = True
    parameters = combine_parameters(normalize=False)

    def merge(self, group: TensorGroup, *, weight, merge_lambda, normalize, int8_mask) -> torch.Tensor:
        base_tensor(group)
        deltas = [task_vector(group, t) for t in range(len(group.tensors))]
        return combine(group, deltas, weight, merge_lambda=merge_lambda, normalize=normalize)
