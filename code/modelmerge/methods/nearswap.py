"""NearSwap: take the other model's value where it is near the base model's, keep the base elsewhere.

alchemonaut, "QuartetAnemoi-70B-t0.0001" (https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001),
computed as mergekit 0.1.5's `nearswap`.
"""
import torch

from .base import MergeMethod, Mergekit, Parameter, TensorGroup
from .common import base_tensor, upcast_dtype


class NearSwap(MergeMethod):
    """θ = w θ_1 + (1 − w) θ_0 with w = clamp(t / max(|θ_0 − θ_1|, 1e-6), 0, 1), entry by entry: entries
    closer than t are swapped for the other model's, farther ones move towards it by t / distance."""

    name = "nearswap"
    mergekit = Mergekit("ancestor")
    paper = 'alchemonaut, "QuartetAnemoi-70B-t0.0001" (https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001)'
    needs_base = True
    elementwise = True
    max_models = 1
    parameters = {"t": Parameter(required=True, range="[0, inf)", help="distance below which the other model's value is taken")}

    def merge(self, group: TensorGroup, *, t) -> torch.Tensor:
        base = base_tensor(group)
        if len(group.tensors) != 1:
            raise ValueError(f"nearswap merges exactly 1 model into the ancestor, got {len(group.tensors)}")
        dtype = upcast_dtype(base.dtype)
        a, b = base.to(dtype), group.tensors[0].to(dtype)
        weight = (t / (a - b).abs().clamp(min=1e-6)).clamp(min=0, max=1)
        return (weight * b + (1 - weight) * a).to(base.dtype)
