"""SCE: select the entries where the task vectors vary most, weight each task vector by its energy,
erase entries against the elected sign.

Wan et al., "FuseChat: Knowledge Fusion of Chat Models", 2024 (https://arxiv.org/abs/2408.07990);
computed as mergekit 0.1.5's `sce`.
"""
from dataclasses import dataclass

import torch

from ..selection import kth_largest
from .base import MergeMethod, Parameter, TensorBlocks, TensorGroup
from .common import base_tensor, upcast_dtype
from .task_vectors import task_vector


@dataclass(frozen=True)
class ScePlan:
    """What SCE takes from the whole tensor: the top-variance selection and the energy weights."""

    mask: torch.Tensor | None  # flat, boolean: the selected entries of the whole tensor (None: all)
    weights: torch.Tensor  # w_t, the normalised energies of the selected task vectors


def variance(group: TensorGroup) -> torch.Tensor:
    """Per entry, the variance (biased) of the task vectors τ_t over the models, in the working dtype: the
    mean of the squared deviations from their mean (as torch.var to rounding, and 20 times faster than
    its reduction over the models' dimension)."""
    dtype = upcast_dtype(group.base.dtype)
    taus = [task_vector(group, t).to(dtype) for t in range(len(group.tensors))]
    mean = accumulate(tau.clone() for tau in taus).div_(len(taus))
    spread = torch.zeros_like(mean)
    for tau in taus:
        spread.add_(tau.sub_(mean).square_())
    return spread.div_(len(taus))


def top_variance_mask(blocks: TensorBlocks, fraction: float) -> torch.Tensor | None:
    """Flat mask of the k = ⌊fraction · (entries of non-zero variance)⌋ entries of largest variance over
    the models (ties at the k-th value: the first ones in flat order; None: all entries with fraction ≥ 1,
    none with fraction ≤ 0). The variances of the whole tensor are computed once, block by block, and the
    k-th largest found by an exact selection (modelmerge.selection)."""
    if fraction >= 1:
        return None
    values = None
    for group in blocks:
        block = variance(group).flatten()
        if values is None:
            values, start = block.new_empty(blocks.numel), 0
        values[start: start + block.numel()] = block
        start += block.numel()
    k = int(torch.count_nonzero(values) * fraction) if fraction > 0 else 0  # in float32, as mergekit
    if k == 0:
        return torch.zeros_like(values, dtype=torch.bool)
    threshold = kth_largest(values, k)
    mask = values > threshold
    tied = (values == threshold).nonzero().flatten()
    mask[tied[: k - int(mask.sum())]] = True
    return mask


def selected_task_vectors(group: TensorGroup, mask: torch.Tensor | None):
    """τ'_t = τ_t ⊙ mask, one at a time, in the working dtype."""
    dtype = upcast_dtype(group.base.dtype)
    for t in range(len(group.tensors)):
        delta = task_vector(group, t).to(dtype)
        yield delta if mask is None else delta.mul_(mask)


def block_mask(group: TensorGroup, plan_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The part of the flat mask that covers this block of rows, shaped as the block, in its dtype."""
    if plan_mask is None:
        return None
    start = group.first_row * (group.base[0].numel() if group.base.dim() else 1)
    return plan_mask[start: start + group.base.numel()].view(group.base.shape).to(upcast_dtype(group.base.dtype))


def row_energies(group: TensorGroup, mask: torch.Tensor | None) -> torch.Tensor:
    """[T, rows]: Σ over each row of τ'_t² in float64. Summed row by row, then over the rows of the whole
    tensor, the energies are the same however the tensor is cut into blocks of rows."""
    return torch.stack([delta.to(torch.float64).square().reshape(delta.shape[0] if delta.dim() else 1, -1).sum(1)
                        for delta in selected_task_vectors(group, mask)])


def normalised(energy: torch.Tensor) -> torch.Tensor:
    """w_t = mean(τ_t²) / Σ_s mean(τ_s²) from the energies mean(τ_t²); uniform when the sum is below 1e-6."""
    total = energy.sum().item()
    if abs(total) < 1e-6:
        return torch.ones_like(energy) / energy.shape[0]
    return energy / total


class Sce(MergeMethod):
    """τ'_t = τ_t ⊙ (top-variance mask); s = sign of Σ_t τ'_t (+ where it is 0); m_t = [sign(τ'_t) = s];
    θ = θ_0 + Σ_t w_t m_t τ'_t / max(Σ_t w_t m_t, 1e-6), w_t the energy weights of the τ'_t.

    Elementwise once `prepare` has found the top-variance mask and the energies over the whole tensor
    (reading it block by block twice: for the variances, then for the energies), so the driver merges in
    blocks of rows."""

    name = "sce"
    needs_base = True
    elementwise = True
    parameters = {
        "select_topk": Parameter(1.0, range="[0, 1]", help="fraction of entries kept, those of largest variance across models, in [0, 1]"),
        "int8_mask": Parameter(False, type=bool, help="accepted for mergekit configs; a memory option there, no effect here"),
    }

    def prepare(self, blocks: TensorBlocks, *, select_topk, **unused) -> ScePlan:
        mask = top_variance_mask(blocks, select_topk)
        energies = []
        for group in blocks:
            energies.append(row_energies(group, block_mask(group, mask)))
            dtype = upcast_dtype(group.base.dtype)
        mean_square = torch.cat(energies, dim=1).sum(1) / max(blocks.numel, 1)
        return ScePlan(mask, normalised(mean_square.to(dtype)))

    def merge(self, group: TensorGroup, *, select_topk, int8_mask) -> torch.Tensor:
        base = base_tensor(group)
        plan = group.prepared
        if plan is None:
            plan = self.prepare(TensorBlocks.of(group), select_topk=select_topk)
        dtype = upcast_dtype(base.dtype)
        mask = block_mask(group, plan.mask)
        elected = accumulate(selected_task_vectors(group, mask)).ge_(0).to(dtype).mul_(2).sub_(1)
        numerator, denominator = torch.zeros_like(elected), torch.zeros_like(elected)
        for delta, weight in zip(selected_task_vectors(group, mask), plan.weights):
            agrees = (delta.sign() == elected).to(dtype).mul_(weight)
            numerator.add_(delta.mul_(agrees))
            denominator.add_(agrees)
        return (base.to(dtype) + numerator.div_(denominator.clamp_(min=1e-6))).to(base.dtype)


def accumulate(tensors) -> torch.Tensor:
    result = None
    for tensor in tensors:
        result = tensor if result is None else result.add_(tensor)
    return result
