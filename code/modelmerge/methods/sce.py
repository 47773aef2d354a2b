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


def normalised(energy: torch.Tensor) -> torch.Tensor:
    """w_t = mean(τ_t²) / Σ_s mean(τ_s²) from the energies mean(τ_t²); uniform when the sum is below 1e-6."""
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
        count = len(group.tensors)
        mask = None
        if select_topk < 1:  # the variance needs every task vector at once; only it is kept
            mask = select_top_variance(torch.stack([task_vector(group, t).to(dtype) for t in range(count)]), select_topk)

        def selected(t):  # τ'_t, recomputed when needed so that one task vector is held at a time
            delta = task_vector(group, t).to(dtype)
            return delta if mask is None else delta.mul_(mask)

        energy = torch.stack([selected(t).square().mean() for t in range(count)])
        weights = normalised(energy)
        elected = accumulate(selected(t) for t in range(count)).ge_(0).to(dtype).mul_(2).sub_(1)
        numerator, denominator = torch.zeros_like(elected), torch.zeros_like(elected)
        for t in range(count):
            delta = selected(t)
            weight = (delta.sign() == elected).to(dtype).mul_(weights[t])
            numerator.add_(delta.mul_(weight))
            denominator.add_(weight)
        return (base.to(dtype) + numerator.div_(denominator.clamp_(min=1e-6))).to(base.dtype)


def accumulate(tensors) -> torch.Tensor:
    result = None
    for tensor in tensors:
        result = tensor if result is None else result.add_(tensor)
    return result
