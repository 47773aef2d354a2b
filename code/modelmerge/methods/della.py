"""DELLA: drop task-vector entries with a probability that falls with their magnitude rank, then TIES
(`della`) or task arithmetic (`della_linear`).

Deep, Bhardwaj, Majumder & Poria, "DELLA-Merging: Reducing Interference in Model Merging through
Magnitude-Based Sampling", 2024 (https://arxiv.org/abs/2406.11617); computed as mergekit 0.1.5's
`della` / `della_linear`, with its random draws seeded per tensor name and model as DARE's are here.
"""
from dataclasses import dataclass

import torch

from .base import MergeMethod, Mergekit, Parameter, Sweep, TensorBlocks, TensorGroup
from .common import as_numbers, base_tensor, per_model, upcast_dtype
from .sparsify import tensor_generator
from .task_vectors import CONSENSUS_PARAMETERS, combine, combine_parameters, task_vector


@dataclass(frozen=True)
class DellaPlan:
    """What DELLA takes from the whole tensor, per model: which entries MagPrune keeps (a flat boolean
    mask of the whole tensor; None keeps all) and the L1 rescale factor (None: none)."""

    masks: list[torch.Tensor | None]
    factors: list[torch.Tensor | None]


_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def row_order(magnitudes: torch.Tensor) -> torch.Tensor:
    """Per row of the 2-D non-negative `magnitudes`, the columns in ascending order of magnitude, ties in
    column order (a stable sort). Non-negative floats are ordered as their bit patterns. On the CPU a float32
    row is sorted as int64 keys (bits, then the column in the low bits): the keys are distinct, so any sort
    gives the stable order, and NumPy's vectorised sort of values is 6x faster than torch's row-wise
    argsort. Elsewhere: torch's stable argsort of the bit patterns."""
    n = magnitudes.shape[1]
    if magnitudes.device.type == "cpu" and magnitudes.dtype == torch.float32 and n <= 1 << 32:
        column_bits = max(1, (n - 1).bit_length())
        keys = magnitudes.view(torch.int32).to(torch.int64).bitwise_left_shift_(column_bits)
        keys.bitwise_or_(torch.arange(n))
        keys.numpy().sort(axis=1)  # in place
        return keys.bitwise_and_((1 << column_bits) - 1)
    return magnitudes.view(_BITS[magnitudes.dtype]).argsort(dim=1, stable=True)


def keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """p = density − ε + 2ε · (rank − 1) / (n − 1), rank of |δ| within its row (ascending; a 1-D tensor is
    one row): the smallest entries are kept with probability density − ε, the largest with density + ε."""
    return magnitude_keep_probabilities(delta.abs(), density, epsilon)


def magnitude_keep_probabilities(magnitudes: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """keep_probabilities from the magnitudes |δ|: the probability of each rank, computed once for a row,
    put in place of the entries by their order."""
    # a 1-D tensor is one row, a conv kernel one row per filter
    rows = magnitudes.unsqueeze(0) if magnitudes.dim() < 2 else magnitudes.reshape(magnitudes.shape[0], -1)
    n = rows.shape[1]
    dtype = upcast_dtype(magnitudes.dtype)
    by_rank = torch.arange(n, device=rows.device).to(dtype).div_(max(n - 1, 1))  # (rank − 1) / (n − 1)
    by_rank.mul_(2).mul_(epsilon).add_(density - epsilon)
    order = row_order(rows)
    probabilities = torch.empty(rows.shape, dtype=dtype, device=rows.device)
    return probabilities.scatter_(1, order, by_rank.expand_as(order)).reshape(magnitudes.shape)


def draw(probabilities: torch.Tensor, generator: torch.Generator, out: torch.Tensor | None = None) -> torch.Tensor:
    """True with probability p, else False (into the boolean `out` when given); uniform draws from
    `generator` on the CPU, so a seed gives the same mask on every device."""
    uniform = torch.rand(probabilities.shape, generator=generator, dtype=probabilities.dtype)
    return torch.lt(uniform.to(probabilities.device), probabilities, out=out)


def magnitude_prune_plan(blocks: TensorBlocks, densities, epsilons, seed: int, rescale: bool) -> DellaPlan:
    """DELLA's MagPrune of every task vector, read block by block: the keep masks (drawn from each model's
    generator in the order of the entries, so the same as for the whole tensor at once) and, with
    `rescale`, the factors restoring each task vector's L1 norm (mergekit's choice; the paper divides
    each kept entry by its probability, equal in expectation). A 1-D tensor is one row, ranked whole."""
    for density, epsilon in zip(densities, epsilons):
        if 0 < density < 1 and not (0 < density - epsilon and density + epsilon < 1):
            raise ValueError(f"epsilon must leave density ± epsilon inside (0, 1), got density {density}, epsilon {epsilon}")
    pruned = [t for t, density in enumerate(densities) if density < 1]
    generators = {t: tensor_generator(seed, blocks.name, t) for t in pruned}
    # One flat mask and one array of row sums per model, filled block by block (many small arrays kept
    # between the blocks' temporaries would fragment the heap).
    masks, sums = {}, {}  # sums: per row, ‖τ_t‖₁ and ‖τ'_t‖₁
    rows = blocks.shape[0] if len(blocks.shape) >= 2 else 1
    start, row = 0, 0  # where this block begins: entry, row
    for group in (blocks if len(blocks.shape) >= 2 else [blocks.sample(blocks.numel)]):
        block_rows = len(group.ancestor) if group.ancestor.dim() >= 2 else 1
        for t in pruned:
            magnitudes = task_vector(group, t).to(upcast_dtype(group.ancestor.dtype)).abs_()  # a new tensor
            if t not in masks:
                masks[t] = torch.empty(blocks.numel, dtype=torch.bool, device=magnitudes.device)
                sums[t] = torch.empty(2, rows, dtype=torch.float64, device=magnitudes.device) if rescale else None
            mask = masks[t][start: start + magnitudes.numel()].view(magnitudes.shape)  # drawn in place
            if densities[t] <= 0:
                mask.fill_(False)
            else:
                draw(magnitude_keep_probabilities(magnitudes, densities[t], epsilons[t]), generators[t], out=mask)
            if rescale:
                block_sums = sums[t][:, row: row + block_rows]
                wide = magnitudes.to(torch.float64)  # ×1 and ×0 are exact: the kept sum from the same copy
                block_sums[0] = row_sums(wide)
                block_sums[1] = row_sums(wide.mul_(as_numbers(mask, torch.float64)))
        start, row = start + group.ancestor.numel(), row + block_rows
    factors = {t: l1_factor(sums[t].sum(1)) if rescale else None for t in pruned}
    return DellaPlan([masks.get(t) for t in range(len(densities))],
                     [factors.get(t) for t in range(len(densities))])


def row_sums(values: torch.Tensor) -> torch.Tensor:
    """Per row (a 1-D tensor: one row), the sum in float64: summed over the rows of the whole tensor, the
    same however it is cut into blocks of rows."""
    return values.to(torch.float64).reshape(values.shape[0] if values.dim() >= 2 else 1, -1).sum(1)


def l1_factor(norms: torch.Tensor, eps: float = 1e-7) -> torch.Tensor | None:
    """‖τ‖₁ / ‖τ'‖₁ from (‖τ‖₁, ‖τ'‖₁), or None where either is below `eps` (as mergekit's rescale)."""
    before, after = norms.tolist()
    return None if before < eps or after < eps else torch.tensor(before / after)


def pruned_task_vector(group: TensorGroup, t: int, plan: DellaPlan) -> torch.Tensor:
    """τ'_t of this block: τ_t with the plan's mask (the block's part of it) and rescale factor."""
    delta = task_vector(group, t)
    mask = plan.masks[t]
    if mask is None:
        return delta
    dtype = upcast_dtype(delta.dtype)
    kept = delta.to(dtype).mul_(as_numbers(group.part_of(mask), dtype))  # delta is new
    if plan.factors[t] is not None:
        kept.mul_(plan.factors[t].to(kept.dtype))
    return kept.to(delta.dtype)


class DellaLinear(MergeMethod):
    """MagPrune each task vector, then task arithmetic (mergekit's `della_linear`)."""

    name = "della_linear"
    mergekit = Mergekit("ancestor")
    paper = 'Deep, Bhardwaj, Majumder & Poria, "DELLA-Merging", 2024 (https://arxiv.org/abs/2406.11617)'
    sweeps = (Sweep("della linear", "density", (0.3, 0.5, 0.7), {"epsilon": 0.1, "seed": 0}),)
    needs_base = True
    elementwise = True  # once `prepare` has drawn the masks and found the rescale factors
    parameters = {
        **combine_parameters(normalize=False),
        "density": Parameter(1.0, per_model=True, range="(0, 1]", help="mean probability of keeping a task-vector entry, in (0, 1]"),
        "epsilon": Parameter(0.15, per_model=True, range="[0, 1)", help="spread of the keep probabilities: density ± epsilon"),
        "rescale": Parameter(True, type=bool, help="rescale each pruned task vector to its original L1 norm"),
        "seed": Parameter(0, type=int, help="seed of the drop masks (combined with the tensor name and model)"),
    }

    def prepare(self, blocks: TensorBlocks, *, density, epsilon, rescale, seed, **unused) -> DellaPlan:
        row = blocks.sample(1)
        densities, epsilons = per_model(density, row, "density"), per_model(epsilon, row, "epsilon")
        return magnitude_prune_plan(blocks, densities, epsilons, seed, rescale)

    def merge(self, group: TensorGroup, *, weight, density, epsilon, rescale, seed, merge_lambda, normalize,
              int8_mask, consensus_method=None, global_majority_sign=None) -> torch.Tensor:
        base_tensor(group)
        densities, epsilons = per_model(density, group, "density"), per_model(epsilon, group, "epsilon")
        plan = group.prepared
        if plan is None:
            plan = magnitude_prune_plan(TensorBlocks.of(group), densities, epsilons, seed, rescale)
        deltas = [pruned_task_vector(group, t, plan) for t in range(len(group.tensors))]
        return combine(group, deltas, weight, merge_lambda=merge_lambda, normalize=normalize,
                       consensus_method=consensus_method, global_majority_sign=global_majority_sign)


class Della(DellaLinear):
    """MagPrune then TIES' sign election and disjoint mean (mergekit's `della`): the sign is + where the
    election ties, as in mergekit."""

    name = "della"
    mergekit = Mergekit("ancestor")
    sweeps = (Sweep("della", "density", (0.3, 0.5, 0.7), {"epsilon": 0.1, "seed": 0}),)
    parameters = {
        **DellaLinear.parameters, **combine_parameters(normalize=True), **CONSENSUS_PARAMETERS,
        "global_majority_sign": Parameter(1, type=int, help="+1/-1: the sign where the election ties"),
    }
