"""Passthrough: the tensor of the one selected model, unchanged (mergekit's `passthrough`).

Assembling a model from layer ranges of other models (mergekit `slices`) is the driver's job; for each
output tensor it selects one source, and this method returns that source's tensor.
"""
import torch

from .base import MergeMethod, Mergekit, Parameter, TensorGroup
from .common import per_model


class Passthrough(MergeMethod):
    name = "passthrough"
    mergekit = Mergekit("input")
    paper = 'Goddard et al., "Arcee\'s MergeKit", 2024 (https://arxiv.org/abs/2403.13257)'
    aliases = ("slices",)
    max_models = 1
    elementwise = True
    parameters = {
        "scale": Parameter(1.0, per_model=True, help="multiplies the tensor (mergekit's passthrough `scale`)"),
    }

    def merge(self, group: TensorGroup, *, scale) -> torch.Tensor:
        if len(group.tensors) != 1:
            raise ValueError(f"passthrough takes exactly 1 model, got {len(group.tensors)} (tensor {group.name})")
        tensor, (factor,) = group.tensors[0], per_model(scale, group, "scale")
        return tensor if factor == 1 else (tensor * factor).to(tensor.dtype)
