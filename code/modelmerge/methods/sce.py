"""SCE: select the entries where the task vectors vary most, weight each task vector by its energy,
erase entries against the elected sign.

Wan et al., "FuseChat: Knowledge Fusion of Chat Models", 2024 (https://arxiv.org/abs/2408.07990);
computed as mergekit 0.1.5's `sce`.
"""
import torch

from .base import MergeMethod, Parameter, TensorGroup
from .common import base_tensor, upcast_dtype
from .task_vectors import task_vector


def select_top_variance(deltas: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mask of the ⌊fraction · (entries of non-zero variance)⌋ entries whose variance over the models is
    largest (all entries with fraction ≥ 1, none with fraction ≤ 0)."""
    if fraction >= 1:
        return torch.ones_like(deltas[0])
    mask = torch.zeros_like(deltas[0])
    if fraction <= 0:
        return mask
    variance = torch.var(deltas, dim=0, unbiased=False).view(-1)
    k = int(torch.count_nonzero(variance) * fraction)
    if k > 0:
        mask.view(-1)[largest(variance.abs(), k)] = 1
    return mask


def largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of k largest entries of a 1-D tensor (ties at the k-th value: the first ones): what
    torch.topk selects, from a k-th value selection, which is several times faster for large k."""
    threshold = torch.kthvalue(values, values.numel() - k + 1).values
    above = (values > threshold).nonzero().flatten()
    tied = (values == threshold).nonzero().flatten()[: k - above.numel()]
    return torch.cat([above, tied])


def energy_weights(deltas: torch.Tensor) -> torch.Tensor:
    """w_t = mean(τ_t²) / Σ_s mean(τ_s²); uniform when the sum is below 1e-6."""
    energy = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)
    total = energy.sum().item()
    if abs(total) < 1e-6:
        return torch.ones_like(energy) / energy.shape[0]
    return energy / total


class Sce(MergeMethod):
    """τ'_t = τ_t ⊙ (top-variance mask); s = sign of Σ_t τ'_t (+ where it is 0); m_t = [sign(τ'_t) = s];
    θ = θ_0 + Σ_t w_t m_t τ'_t / max(Σ_t w_t m_t, 1e-6), w_t the energy weights of the τ'_t."""

    name = "sce"
    needs_base = True
    parameters = {
        "select_topk": Parameter(1.0, range="[0, 1]", help="fraction of entries kept, those of largest variance across models, in [0, 1]"),
        "int8_mask": Parameter(False, type=bool, help="accepted for mergekit configs; a memory option there, no effect here"),
    }

    def merge(self, group: TensorGroup, *, select_topk, int8_mask) -> torch.Tensor:
        base = base_tensor(group)
        dtype = upcast_dtype(base.dtype)
        deltas = torch.stack([task_vector(group, t).to(dtype) for t in range(len(group.tensors))])
        if select_topk < 1:
            deltas = deltas * select_top_variance(deltas, select_topk).unsqueeze(0)
        elected = (deltas.sum(dim=0) >= 0).to(dtype) * 2 - 1
        agree = (deltas.sign() == elected).to(dtype)
        weights = energy_weights(deltas).view(-1, *([1] * (deltas.dim() - 1))) * agree
        merged = (deltas * weights).sum(dim=0) / weights.sum(dim=0).clamp(min=1e-6)
        return (base.to(dtype) + merged).to(base.dtype)
