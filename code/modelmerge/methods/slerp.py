"""Spherical linear interpolation between two models, tensor by tensor.

Shoemake, "Animating Rotation with Quaternion Curves", SIGGRAPH 1985; applied to model weights as in mergekit.
"""
import torch

from .base import MergeMethod, Mergekit, Parameter, TensorGroup
from .common import upcast_dtype

NORM_EPS = 1e-8


class Slerp(MergeMethod):
    """Interpolate from the first model (t = 0, mergekit's base model) to the second (t = 1) along the arc
    between their directions, each tensor flattened to one vector. As mergekit: norms at most 1e-8 count
    as 1, and when |cos| of the angle exceeds `dot_threshold` the two are treated as colinear and
    interpolated linearly. The result combines the un-normalised tensors, computed in float32 (float64
    inputs stay float64).
    """

    name = "slerp"
    mergekit = Mergekit("first")
    paper = 'Shoemake, "Animating Rotation with Quaternion Curves", SIGGRAPH 1985'
    min_models = 2
    max_models = 2
    parameters = {
        "t": Parameter(0.5, range="[0, 1]", help="interpolation factor: 0 gives the first model, 1 the second"),
        "dot_threshold": Parameter(0.9995, range="[0, 1]", help="|cos θ| above which the interpolation is linear"),
    }

    def merge(self, group: TensorGroup, *, t, dot_threshold) -> torch.Tensor:
        if len(group.tensors) != 2:
            raise ValueError(f"slerp merges exactly 2 models, got {len(group.tensors)} (tensor {group.name}); "
                             "use mlerp for more")
        first, second = group.tensors
        dtype = upcast_dtype(first.dtype)
        a, b = first.to(dtype), second.to(dtype)
        norm_a, norm_b = (torch.linalg.vector_norm(x).item() for x in (a, b))
        norm_a = norm_a if norm_a > NORM_EPS else 1.0
        norm_b = norm_b if norm_b > NORM_EPS else 1.0
        cos = max(-1.0, min(1.0, torch.sum((a / norm_a) * (b / norm_b)).item()))
        if abs(cos) > dot_threshold:
            coef_a, coef_b = 1 - t, t
        else:
            angle = torch.arccos(torch.tensor(cos, dtype=torch.float64))
            coef_a = (torch.sin((1 - t) * angle) / torch.sin(angle)).item()
            coef_b = (torch.sin(t * angle) / torch.sin(angle)).item()
        return (coef_a * a + coef_b * b).to(first.dtype)
