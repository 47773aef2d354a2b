"""Multi-SLERP: barycentric interpolation of several models on the hypersphere.

C. Goddard, "Multi-SLERP" (https://goddard.blog/posts/multislerp-wow-what-a-cool-idea); computed as
mergekit 0.1.5's `multislerp`.
"""
import torch

from .base import MergeMethod, Mergekit, Parameter, Sweep, TensorGroup
from .common import per_model, upcast_dtype


class MultiSlerp(MergeMethod):
    """Project the unit directions of the models (of their task vectors, about θ_0 when given) onto the
    tangent space at their weighted mean direction, average there, map back with the exponential map and
    scale to the weighted mean norm. Two exactly opposite inputs fall back to the weighted sum."""

    name = "multislerp"
    mergekit = Mergekit("ancestor")
    paper = 'C. Goddard, "Multi-SLERP" (https://goddard.blog/posts/multislerp-wow-what-a-cool-idea)'
    sweeps = (Sweep("multislerp"),)
    parameters = {
        "weight": Parameter(1.0, per_model=True, aliases=("weights",), help="weight of each model"),
        "normalize_weights": Parameter(True, type=bool, help="divide the weights by their sum"),
        "eps": Parameter(1e-8, range="(0, inf)", help="guard against zero norms"),
    }

    def merge(self, group: TensorGroup, *, weight, normalize_weights, eps) -> torch.Tensor:
        out_dtype = group.tensors[0].dtype
        if len(group.tensors) == 1:
            return group.tensors[0]
        dtype = upcast_dtype(out_dtype)
        base = None if group.ancestor is None else group.ancestor.to(dtype)
        vectors = torch.stack([x.to(dtype) - base if base is not None else x.to(dtype) for x in group.tensors])
        flat = vectors.reshape(vectors.shape[0], -1)
        weights = torch.tensor(per_model(weight, group, "weight"), dtype=dtype, device=flat.device)
        if normalize_weights:
            weights = weights / weights.sum()
        norms = torch.norm(flat, dim=-1, keepdim=True)
        units = flat / (norms + eps)
        mean = (units * weights.view(-1, 1)).sum(0)
        mean_norm = torch.norm(mean)
        if mean_norm < eps and not flat.any():  # nothing moved (mergekit raises here)
            result = vectors[0]
        elif mean_norm < eps:
            if len(group.tensors) != 2:
                raise ValueError("the weighted mean direction of the models is zero (opposite models whose "
                                 "weights balance out); change the weights")
            result = (vectors[0] * weights[0] + vectors[1] * weights[1])
        else:
            mean = mean / mean_norm
            tangents = units - (units * mean).sum(-1, keepdim=True) * mean
            tangent = (tangents * weights.view(-1, 1)).sum(0)
            length = torch.norm(tangent) + eps
            result = (mean * torch.cos(length) + tangent * (torch.sin(length) / length)) * (norms.squeeze(-1) * weights).sum()
            result = result.view(vectors.shape[1:])
        if base is not None:
            result = result + base
        return result.to(out_dtype)
