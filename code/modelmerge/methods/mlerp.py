"""MLERP: linear interpolation of several models, rescaled to keep the inputs' norm.

Kim, Gao, Hsu, Shen & Jin, "Token Fusion: Bridging the Gap Between Token Pruning and Token Merging",
WACV 2024 (https://arxiv.org/abs/2312.01026), where MLERP merges tokens; applied here to model tensors.
"""
import torch

from .base import MergeMethod, Parameter, Sweep, TensorGroup
from .common import per_model, upcast_dtype, weighted_mean


class Mlerp(MergeMethod):
    """θ = lerp · (Σ_t w_t ‖θ_t‖ / Σ_t w_t) / ‖lerp‖ with lerp = Σ_t w_t θ_t / Σ_t w_t (norms of the whole
    tensor): the direction of the weighted average with the weighted mean of the inputs' norms."""

    name = "mlerp"
    paper = 'Kim, Gao, Hsu, Shen & Jin, "Token Fusion", WACV 2024 (https://arxiv.org/abs/2312.01026)'
    sweeps = (Sweep("mlerp"),)
    min_models = 2
    parameters = {
        "weight": Parameter(1.0, per_model=True, aliases=("weights",), range="[0, inf)", help="weight w_t of each model"),
    }

    def merge(self, group: TensorGroup, *, weight) -> torch.Tensor:
        weights = per_model(weight, group, "weight")
        dtype = upcast_dtype(group.tensors[0].dtype, torch.float64)
        lerp = weighted_mean(group.tensors, weights, dtype, group)
        target_norm = sum(w * torch.linalg.vector_norm(x.to(dtype)).item() for x, w in zip(group.tensors, weights))
        target_norm /= sum(weights)
        lerp_norm = torch.linalg.vector_norm(lerp).item()
        if lerp_norm == 0:
            if target_norm != 0:
                raise ValueError(f"the models' weighted average of tensor {group.name} is zero, "
                                 "so it has no direction to rescale")
            return lerp.to(group.tensors[0].dtype)
        return (lerp * (target_norm / lerp_norm)).to(group.tensors[0].dtype)
