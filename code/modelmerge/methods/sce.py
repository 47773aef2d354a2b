"""SCE: select the entries where the task vectors vary most, weight each task vector by its energy,
erase entries against the elected sign.

Wan et al., "FuseChat: Knowledge Fusion of Chat Models", 2024 (https://arxiv.org/abs/2408.07990);
computed as mergekit 0.1.5's `sce`.
"""
from dataclasses import dataclass

import torch

from ..selection import kth_largest
from .base import MergeMethod, Mergekit, Parameter, Sweep, TensorBlocks, TensorGroup
from .common import as_numbers, base_tensor, upcast_dtype
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
    dtype = upcast_dtype(group.ancestor.dtype)
    taus = [task_vector(group, t).to(dtype) for t in range(len(group.tensors))]  # new tensors
    mean = sum_of(taus).div_(len(taus))
    spread = taus[0].sub_(mean).square_()
    for tau in taus[1:]:
        spread.add_(tau.sub_(mean).square_())
    return spread.div_(len(taus))


def top_variance_mask(blocks: TensorBlocks, fraction: float) -> torch.Tensor | None:
    """Flat mask of the k = ⌊fraction · (entries of non-zero variance)⌋ entries of largest variance over
    the models (ties at the k-th value: the first ones in flat order; None: all entries with fraction ≥ 1,
    none with fraction ≤ 0). The variances of the whole tensor are computed once, block by block, and the
    k-th largest found by an exact selection (modelmerge.selection)."""
    if fraction >= 1:
        return None
    values, nonzero = None, 0
    for group in blocks:
        block = variance(group).flatten()
        if values is None:
            values, start = block.new_empty(blocks.numel), 0
        values[start: start + block.numel()] = block
        nonzero += int(torch.count_nonzero(block))  # while the block is in the caches
        start += block.numel()
    k = int(torch.tensor(nonzero) * fraction) if fraction > 0 else 0  # in float32, as mergekit
    if k == 0:
        return torch.zeros_like(values, dtype=torch.bool)
    threshold = kth_largest(values, k)
    mask = values >= threshold
    extra = int(torch.count_nonzero(mask)) - k
    if extra > 0:  # more entries tie at the k-th value than fit: the last ones in flat order are left out
        tied = (values == threshold).nonzero().flatten()
        mask[tied[len(tied) - extra:]] = False
    return mask


def selected_task_vectors(group: TensorGroup, mask: torch.Tensor | None):
    """τ'_t = τ_t ⊙ mask, one at a time, in the working dtype."""
    dtype = upcast_dtype(group.ancestor.dtype)
    for t in range(len(group.tensors)):
        delta = task_vector(group, t).to(dtype)
        yield delta if mask is None else delta.mul_(mask)


def block_mask(group: TensorGroup, plan_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The part of the flat mask that covers this block of rows, shaped as the block, in its dtype."""
    if plan_mask is None:
        return None
    return as_numbers(group.part_of(plan_mask), upcast_dtype(group.ancestor.dtype))


def row_energies(group: TensorGroup, mask: torch.Tensor | None) -> torch.Tensor:
    """[T, rows]: Σ over each row of τ'_t² in float64. Summed row by row, then over the rows of the whole
    tensor, the energies are the same however the tensor is cut into blocks of rows."""
    wide = torch.empty(group.ancestor.shape, dtype=torch.float64, device=group.ancestor.device)  # one buffer for all
    rows = group.ancestor.shape[0] if group.ancestor.dim() else 1
    return torch.stack([wide.copy_(delta).square_().reshape(rows, -1).sum(1) for delta in selected_task_vectors(group, mask)])


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
    mergekit = Mergekit("ancestor")
    paper = 'Wan et al., "FuseChat: Knowledge Fusion of Chat Models", 2024 (https://arxiv.org/abs/2408.07990)'
    sweeps = (Sweep("sce", "select_topk", (0.1, 0.3, 0.5, 1.0)),)
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
            dtype = upcast_dtype(group.ancestor.dtype)
        mean_square = torch.cat(energies, dim=1).sum(1) / max(blocks.numel, 1)
        return ScePlan(mask, normalised(mean_square.to(dtype)))

    def merge(self, group: TensorGroup, *, select_topk, int8_mask) -> torch.Tensor:
        base = base_tensor(group)
        plan = group.prepared
        if plan is None:
            plan = self.prepare(TensorBlocks.of(group), select_topk=select_topk)
        selected = list(selected_task_vectors(group, block_mask(group, plan.mask)))
        elected = sum_of(selected).ge_(0).mul_(2).sub_(1)  # ±1, + where the sum is 0
        return (base.to(elected.dtype) + agreeing_mean(selected, plan.weights, elected)).to(base.dtype)


def agreeing_mean(deltas, weights, elected: torch.Tensor) -> torch.Tensor:
    """Σ_t w_t m_t δ_t / max(Σ_t w_t m_t, 1e-6), m_t = [sign(δ_t) = elected]. Where δ_t agrees, relu(δ_t ·
    elected) is |δ_t| exactly, else 0: the sum of the agreeing w_t |δ_t| times the elected sign is the
    signed sum exactly (rounding is symmetric), and several times faster on the CPU than comparing signs
    (torch's boolean tensors are slow there)."""
    magnitude, denominator = torch.zeros_like(elected), torch.zeros_like(elected)
    agreeing, agrees = torch.empty_like(elected), torch.empty_like(elected)
    for delta, weight in zip(deltas, weights):
        torch.mul(delta, elected, out=agreeing).relu_()
        denominator.add_(torch.sign(agreeing, out=agrees), alpha=weight.item())  # w_t · 1 or 0: exact, fused or not
        magnitude.add_(agreeing.mul_(weight))
    # +0.0 turns the −0.0 of entries where none agrees into the +0.0 a signed sum of zeros gives.
    return magnitude.mul_(elected).add_(0.0).div_(denominator.clamp_(min=1e-6))


def sum_of(tensors) -> torch.Tensor:
    """Σ of `tensors` in their order, into a new tensor."""
    total = tensors[0].clone() if len(tensors) == 1 else tensors[0] + tensors[1]
    for tensor in tensors[2:]:
        total.add_(tensor)
    return total
