"""Weighted averaging of the models' parameters.

Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves accuracy without
increasing inference time", ICML 2022 (https://arxiv.org/abs/2203.05482).
"""
import torch

from .base import MergeMethod, Mergekit, Parameter, Sweep, TensorGroup
from .common import per_model, upcast_dtype, weighted_mean


class Linear(MergeMethod):
    """Σ w_t θ_t / Σ w_t, or Σ w_t θ_t with `normalize=false` (mergekit's `linear`)."""

    name = "linear"
    mergekit = Mergekit("input")
    paper = 'Wortsman et al., "Model soups", ICML 2022 (https://arxiv.org/abs/2203.05482)'
    sweeps = (Sweep("average"),)
    aliases = ("average", "avg", "variadic-average")
    elementwise = True
    parameters = {
        "weight": Parameter(1.0, per_model=True, aliases=("weights",), help="weight w_t of each model"),
        "normalize": Parameter(True, type=bool, help="divide by Σ w_t"),
    }

    def merge(self, group: TensorGroup, *, weight, normalize) -> torch.Tensor:
        weights = per_model(weight, group, "weight")
        dtype = upcast_dtype(group.tensors[0].dtype)
        if normalize:
            merged = weighted_mean(group.tensors, weights, dtype, group)
        else:
            merged = torch.zeros(group.tensors[0].shape, dtype=dtype, device=group.tensors[0].device)
            for x, w in zip(group.tensors, weights):
                merged.add_(x.to(dtype), alpha=w)
        return merged.to(group.tensors[0].dtype)
