"""SCE: select the entries where the task vectors vary most, weight each task vector by its energy,
erase entries against the elected sign.

Wan et al., "FuseChat: Knowledge Fusion of Chat Models", 2024 (https://arxiv.org/abs/2408.07990);
computed as mergekit 0.1.5's `sce`.
"""
import math
from dataclasses import dataclass

import torch

from ..selection import SAMPLE_SIZE, Selection
from .base import MergeMethod, Parameter, TensorBlocks, TensorGroup
from .common import base_tensor, upcast_dtype
from .task_vectors import task_vector


@dataclass(frozen=True)
class ScePlan:
    """What SCE takes from the whole tensor: the top-variance selection and the energy weights."""

    # Entries whose variance over the models is above `threshold` are selected (None: every entry), and
    # those equal to it up to flat index `tie_end` (exclusive; None: all of them).
    threshold: float | None
    tie_end: int | None
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


def top_variance_selection(blocks: TensorBlocks, fraction: float) -> tuple[float | None, int | None]:
    """(threshold, tie_end) selecting the k = ⌊fraction · (entries of non-zero variance)⌋ entries of largest
    variance (ties at the k-th value: the first ones in flat order), found exactly by a streamed selection
    of the k-th largest variance (modelmerge.selection) over the blocks; all entries with fraction ≥ 1,
    none with fraction ≤ 0."""
    if fraction >= 1:
        return None, None
    nonzero = 0 if fraction <= 0 else sum(int(torch.count_nonzero(variance(group))) for group in blocks)
    k = int(torch.tensor(nonzero) * fraction)  # in float32, as mergekit's count_nonzero(...) * density
    if k == 0:
        return math.inf, None
    selection = Selection(variance(blocks.sample(SAMPLE_SIZE)), k, blocks.numel)
    while selection.answer is None:
        for group in blocks:
            selection.feed(variance(group))
        selection.finish_pass()
    threshold = selection.answer
    above, tied = 0, []
    for group in blocks:
        values = variance(group).flatten()
        above += int((values > threshold).sum())
        tied.append((values == threshold).nonzero().flatten())
    needed = k - above
    if sum(len(t) for t in tied) == needed:
        return threshold, None
    offset = 0
    for group, positions in zip(blocks, tied):  # the first `needed` tied entries in flat order
        if needed <= len(positions):
            return threshold, offset + int(positions[needed - 1]) + 1
        needed -= len(positions)
        offset += group.base.numel()
    raise AssertionError("the tied entries counted do not reach k")


def selection_mask(group: TensorGroup, plan: ScePlan) -> torch.Tensor | None:
    """1 where the block's entries are selected, else 0 (None: all are)."""
    if plan.threshold is None:
        return None
    values = variance(group)
    mask = values > plan.threshold
    if plan.tie_end is None:
        mask |= values == plan.threshold
    else:
        row_size = group.base[0].numel() if group.base.dim() else 1
        flat = torch.arange(values.numel(), device=values.device).view(values.shape) + group.first_row * row_size
        mask |= (values == plan.threshold) & (flat < plan.tie_end)
    return mask.to(values.dtype)


def selected_task_vectors(group: TensorGroup, mask: torch.Tensor | None):
    """τ'_t = τ_t ⊙ mask, one at a time, in the working dtype."""
    dtype = upcast_dtype(group.base.dtype)
    for t in range(len(group.tensors)):
        delta = task_vector(group, t).to(dtype)
        yield delta if mask is None else delta.mul_(mask)


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

    Elementwise once `prepare` has found the top-variance threshold and the energies over the whole
    tensor (reading it block by block: once to count the entries of non-zero variance, usually once to
    select, once for the energies), so the driver merges in blocks of rows."""

    name = "sce"
    needs_base = True
    elementwise = True
    parameters = {
        "select_topk": Parameter(1.0, range="[0, 1]", help="fraction of entries kept, those of largest variance across models, in [0, 1]"),
        "int8_mask": Parameter(False, type=bool, help="accepted for mergekit configs; a memory option there, no effect here"),
    }

    def prepare(self, blocks: TensorBlocks, *, select_topk, **unused) -> ScePlan:
        threshold, tie_end = top_variance_selection(blocks, select_topk)
        plan = ScePlan(threshold, tie_end, None)
        energies = []
        for group in blocks:
            energies.append(row_energies(group, selection_mask(group, plan)))
            dtype = upcast_dtype(group.base.dtype)
        mean_square = torch.cat(energies, dim=1).sum(1) / max(blocks.numel, 1)
        return ScePlan(threshold, tie_end, normalised(mean_square.to(dtype)))

    def merge(self, group: TensorGroup, *, select_topk, int8_mask) -> torch.Tensor:
        base = base_tensor(group)
        plan = group.prepared
        if plan is None:
            plan = self.prepare(TensorBlocks.of(group), select_topk=select_topk)
        dtype = upcast_dtype(base.dtype)
        mask = selection_mask(group, plan)
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
