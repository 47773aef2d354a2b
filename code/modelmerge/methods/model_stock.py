"""Model Stock: interpolate between the ancestor and the fine-tuned models' average by their angle.

Jang, Yun & Han, "Model Stock: All we need is just a few fine-tuned models", ECCV 2024
(https://arxiv.org/abs/2403.19522); computed as mergekit 0.1.5's `model_stock`.
"""
import torch

from .base import MergeMethod, Parameter, TensorGroup
from .common import base_tensor, upcast_dtype

SINGULAR = 1e-6


class ModelStock(MergeMethod):
    """θ = t · mean_t θ_t + (1 − t) · θ_0 with t = T cos / (1 + (T − 1) cos), cos the mean pairwise cosine
    of the task vectors (of the whole tensor, or of each row with `filter_wise`). Where 1 + (T − 1) cos
    vanishes there is no finite estimate and θ_0 is kept, as in mergekit."""

    name = "model_stock"
    needs_base = True
    min_models = 2
    parameters = {
        "filter_wise": Parameter(False, type=bool, help="one angle per row (output filter) instead of per tensor"),
    }

    def merge(self, group: TensorGroup, *, filter_wise) -> torch.Tensor:
        base = base_tensor(group)
        dtype = upcast_dtype(base.dtype)
        w0 = base.to(dtype)
        ws = [x.to(dtype) for x in group.tensors]
        if filter_wise:
            w0, ws = (w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]) if w0.dim() == 1 else (w0, ws)
        else:
            w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
        offsets = [w - w0 for w in ws]
        cosines = []
        for i, a in enumerate(offsets):
            for b in offsets[i + 1:]:
                norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
                cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=SINGULAR)).clamp(-1, 1))
        cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
        count = len(ws)
        denominator = 1 + (count - 1) * cos
        singular = denominator.abs() < SINGULAR
        t = torch.where(singular, torch.zeros_like(cos),
                        count * cos / torch.where(singular, torch.ones_like(denominator), denominator))
        average = sum(ws) / count
        return (t * average + (1 - t) * w0).reshape(base.shape).to(base.dtype)
