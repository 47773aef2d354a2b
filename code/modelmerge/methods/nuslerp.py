"""NuSLERP: spherical interpolation of two models (or of their task vectors), whole tensors or row by row.

Spherical linear interpolation (Shoemake, SIGGRAPH 1985) as mergekit 0.1.5's `nuslerp` applies it:
weights instead of t, optionally about a base model, optionally per row.
"""
import torch

from .base import MergeMethod, Mergekit, Parameter, TensorGroup
from .common import per_model, upcast_dtype


def spherical_interpolation(t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool, flatten: bool,
                            eps: float = 1e-8) -> torch.Tensor:
    """slerp(v0, v1; t) of the flattened tensors, or along each column (row_wise) or each row: linear where
    the two are colinear (1 − cos² ≤ eps²)."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    unit0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    unit1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = torch.sum(unit0 * unit1, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps ** 2
    theta = torch.acos(torch.where(colinear, 0, cos))
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


class NuSlerp(MergeMethod):
    """slerp with t = w_2 / (w_1 + w_2) (0.5 when the weights cancel) between the two models, or between
    their task vectors added to θ_0 when an ancestor is given."""

    name = "nuslerp"
    mergekit = Mergekit("ancestor")  # base_model optional: then the task vectors are interpolated
    paper = 'Shoemake, "Animating Rotation with Quaternion Curves", SIGGRAPH 1985, as mergekit 0.1.5\'s `nuslerp`'
    min_models = 2
    max_models = 2
    parameters = {
        "weight": Parameter(1.0, per_model=True, aliases=("weights",), help="relative weight of each of the two models"),
        "nuslerp_row_wise": Parameter(False, type=bool, help="interpolate each row (dimension 0) separately"),
        "nuslerp_flatten": Parameter(True, type=bool, help="interpolate the whole tensor as one vector"),
    }

    def merge(self, group: TensorGroup, *, weight, nuslerp_row_wise, nuslerp_flatten) -> torch.Tensor:
        if len(group.tensors) != 2:
            raise ValueError(f"nuslerp merges exactly 2 models, got {len(group.tensors)}")
        w = per_model(weight, group, "weight")
        t = 0.5 if abs(sum(w)) < 1e-6 else w[1] / sum(w)
        out_dtype = group.tensors[0].dtype
        dtype = upcast_dtype(out_dtype)
        first, second = (x.to(dtype) for x in group.tensors)
        if group.ancestor is None:
            return spherical_interpolation(t, first, second, nuslerp_row_wise, nuslerp_flatten).to(out_dtype)
        base = group.ancestor.to(dtype)
        moved = spherical_interpolation(t, first - base, second - base, nuslerp_row_wise, nuslerp_flatten)
        return (base + moved).to(out_dtype)
