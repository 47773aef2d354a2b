"""Model Stock: interpolate between the ancestor and the fine-tuned models' average by their angle.

Jang, Yun & Han, "Model Stock: All we need is just a few fine-tuned models", ECCV 2024
(https://arxiv.org/abs/2403.19522); computed as mergekit 0.1.5's `model_stock`.
"""
import torch

from .base import MergeMethod, Mergekit, Parameter, Sweep, TensorBlocks, TensorGroup
from .common import base_tensor, upcast_dtype

SINGULAR = 1e-6


def interpolation_factor(gram: torch.Tensor) -> torch.Tensor:
    """t = T cos / (1 + (T − 1) cos) from the Gram matrices [..., T, T] of the task vectors (of the whole
    tensor, or of each row), cos the mean pairwise cosine; 0 where the denominator vanishes (as mergekit)."""
    count = gram.shape[-1]
    norms = gram.diagonal(dim1=-2, dim2=-1).clamp(min=0).sqrt()
    pairs = torch.triu_indices(count, count, offset=1)
    products = norms[..., pairs[0]] * norms[..., pairs[1]]
    cosines = (gram[..., pairs[0], pairs[1]] / products.clamp(min=SINGULAR)).clamp(-1, 1)
    cos = cosines.mean(dim=-1, keepdim=True)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < SINGULAR
    return torch.where(singular, torch.zeros_like(cos),
                       count * cos / torch.where(singular, torch.ones_like(denominator), denominator))


def offsets(group: TensorGroup) -> torch.Tensor:
    """The task vectors [T, ...] in float64 (the cosines are accumulated exactly enough for any blocking)."""
    base = group.ancestor.to(torch.float64)
    return torch.stack([x.to(torch.float64) - base for x in group.tensors])


class ModelStock(MergeMethod):
    """θ = t · mean_t θ_t + (1 − t) · θ_0 with t = T cos / (1 + (T − 1) cos), cos the mean pairwise cosine
    of the task vectors (of the whole tensor, or of each row with `filter_wise`). Where 1 + (T − 1) cos
    vanishes there is no finite estimate and θ_0 is kept, as in mergekit. The cosines of a whole tensor are
    accumulated over its blocks of rows in `prepare`, so the merge streams like task arithmetic."""

    name = "model_stock"
    mergekit = Mergekit("ancestor")
    paper = 'Jang, Yun & Han, "Model Stock", ECCV 2024 (https://arxiv.org/abs/2403.19522)'
    sweeps = (Sweep("model stock"),)
    needs_base = True
    elementwise = True
    min_models = 2
    parameters = {
        "filter_wise": Parameter(False, type=bool, help="one angle per row (output filter) instead of per tensor"),
    }

    def prepare(self, blocks: TensorBlocks, *, filter_wise) -> torch.Tensor | None:
        if filter_wise and len(blocks.shape) >= 2:
            return None  # one angle per row: each block has what it needs
        gram = 0
        for group in blocks:
            flat = offsets(group).reshape(len(group.tensors), -1)
            gram = gram + flat @ flat.T
        return interpolation_factor(gram)

    def merge(self, group: TensorGroup, *, filter_wise) -> torch.Tensor:
        base = base_tensor(group)
        if filter_wise and base.dim() >= 2:
            rows = offsets(group).reshape(len(group.tensors), base.shape[0], -1).transpose(0, 1)  # [rows, T, n]
            t = interpolation_factor(rows @ rows.transpose(1, 2)).view(-1, *([1] * (base.dim() - 1)))
        else:
            t = group.prepared if group.prepared is not None else self.prepare(TensorBlocks.of(group), filter_wise=filter_wise)
        dtype = upcast_dtype(base.dtype)
        t = t.to(dtype)
        average = sum(x.to(dtype) for x in group.tensors) / len(group.tensors)
        return (t * average + (1 - t) * base.to(dtype)).to(base.dtype)
