"""LiNeS (layer-increasing network scaling): scale the merged task vector of every layer by a factor that
grows linearly with the layer's depth, so shallow layers stay close to θ_0 (their general features) and
deep layers take the task-specific changes. An option of any merge with an ancestor (task arithmetic, TIES,
consensus, ...), as the paper applies it to each of them, given as the method parameters `lines_alpha`
and `lines_beta` (`--x:lines_beta 0.5`), which the merge driver takes out before the method sees them.

Wang, Dimitriadis, Favero, Ortiz-Jiménez, Fleuret & Frossard, "LiNeS: Post-training Layer Scaling
Prevents Forgetting and Enhances Model Merging", ICLR 2025 (https://arxiv.org/abs/2410.17146); as the
authors' code (github.com/wang-kee/LiNeS, src/eval/eval.py) computes it: with τ the method's merged task
vector (θ − θ_0), layer ℓ = 0..L−1 of a stack of L layers gets

    θ_0 + (α + β · ℓ / (L − 1)) · τ,         every tensor outside the layers θ_0 + α · τ,

and for multi-task merging α = ‖Σ_t τ_t‖₁ / (T · ‖τ‖₁), the norms over the whole model (1/T for task
arithmetic): the default, which takes one more pass over the models. A layer is a tensor named
`<prefix><ℓ>.<rest>` where the tensors with that prefix number exactly 0..L−1; each such stack (an encoder
and a decoder, a vision and a text tower) counts its own depth.
"""
import re

import torch

from .base import MethodDeclaration, Parameter, Sweep
from .common import upcast_dtype

PARAMETERS = {
    "lines_alpha": Parameter(None, range="[0, inf)",
                             help="LiNeS α, the scale of the first layer and of tensors outside the layers "
                                  "(default: the paper's ‖Σ_t τ_t‖₁ / (T·‖τ‖₁), one more pass)"),
    "lines_beta": Parameter(None, range="[0, inf)",
                            help="LiNeS β: the last layer's task vector is scaled by α + β (any method with θ_0)"),
}
_LAYER = re.compile(r"^(.*?\.)(\d+)\.")
# Why a merge with the paper's α cannot be split into parts that merge tensors on their own (merging/shards.py).
GLOBAL_ALPHA = ("LiNeS without lines_alpha takes the paper's α = ‖Σ_t τ_t‖₁ / (T·‖τ‖₁) from every tensor of the model "
                "(give lines_alpha to shard it)")
LINES_BETAS = (0.2, 0.4, 0.6, 1.0)


class Lines(MethodDeclaration):
    """LiNeS (Wang et al., ICLR 2025), with any method given θ_0: task vectors scaled by layer depth.

    The catalogue's entry for LiNeS: its parameters, and the merges the paper applies it to."""

    name = "lines"
    kind = "modifier"
    paper = 'Wang et al., "LiNeS: Post-training Layer Scaling Prevents Forgetting", ICLR 2025 (https://arxiv.org/abs/2410.17146)'
    parameters = PARAMETERS
    sweeps = (Sweep("task arithmetic + lines", "lines_beta", LINES_BETAS, method="task_arithmetic"),
              Sweep("ties + lines", "lines_beta", LINES_BETAS, {"density": 0.2, "merge_lambda": 1.0}, method="ties"),
              Sweep("consensus + lines", "lines_beta", LINES_BETAS, {"k": 2, "tall_mask_lambda": 0.6}, method="consensus"))


def layer_depths(names) -> dict[str, float]:
    """ℓ / (L − 1) (0 for a single layer) of every tensor name in a stack of layers; others are left out."""
    found = {}
    for name in names:
        match = _LAYER.match(name)
        if match:
            found.setdefault(match.group(1), {})[name] = int(match.group(2))
    depths = {}
    for layers in found.values():
        count = len(set(layers.values()))
        if set(layers.values()) == set(range(count)):
            depths.update({name: index / max(1, count - 1) for name, index in layers.items()})
    return depths


def layer_scales(names, alpha: float, beta: float) -> dict[str, float]:
    """α + β · depth of every name (α outside the layers)."""
    depths = layer_depths(names)
    return {name: alpha + beta * depths.get(name, 0.0) for name in names}


def scaled_task_vector(base: torch.Tensor, merged: torch.Tensor, scale: float) -> torch.Tensor:
    """θ_0 + scale · (θ − θ_0), computed in float32 or better, in θ's dtype."""
    dtype = upcast_dtype(merged.dtype)
    base = base.to(dtype)
    return (merged.to(dtype) - base).mul_(scale).add_(base).to(merged.dtype)

