"""TIES: trim each task vector to its largest entries, elect a sign per entry, average the agreeing entries.

Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023
(https://arxiv.org/abs/2306.01708).

Three things depend on the whole tensor: each task vector's trim threshold (its k-th largest magnitude),
the rescale factors (L1 norms) and the majority sign that breaks ties in the election. `Ties.prepare`
computes them, reading the tensor block by block, so the merge itself runs on any block of rows.
"""
import math
from dataclasses import dataclass, replace
from typing import Callable

import torch

from ..selection import SAMPLE_SIZE, Selection
from .base import MERGEKIT_PLUS_ON_TIES, MergeMethod, Mergekit, Parameter, Sweep, TensorBlocks, TensorGroup
from .common import base_tensor, optional_stats, per_model, upcast_dtype
from .task_vectors import (CONSENSUS_PARAMETERS, checked_majority_sign, combine, combine_parameters, election,
                           l1_rescale_factor, sign_balance, task_vector, weighted_deltas)


def _next_float(value: float, towards: float, dtype: torch.dtype) -> float:
    return float(torch.nextafter(torch.tensor(value, dtype=dtype), torch.tensor(towards, dtype=dtype)))


def _magnitude(delta: torch.Tensor, in_place=False) -> torch.Tensor:
    """|delta| as a 1-D tensor (computed in `delta` itself with `in_place`)."""
    return (delta.abs_() if in_place else delta.abs()).flatten()


@dataclass(frozen=True)
class TiesPlan:
    """What TIES takes from the whole tensor."""

    # Per model, the largest magnitude trimmed away: |τ_t| ≤ cutoff becomes 0 (None: nothing is, or the
    # trimmed task vector is given as a statistic; inf: everything is). The k-th largest magnitude itself
    # is kept, so the cutoff is the largest value of the working dtype below it.
    cutoffs: list[float | None]
    factors: list[torch.Tensor | None]  # L1 rescale factor of each trimmed task vector (None: no rescaling)
    # The sign where the election ties: ±1, a function computing it when first needed, or None (no election).
    majority: float | Callable[[], float] | None


class Ties(MergeMethod):
    """TIES as mergekit's `ties` (weights, density, rescale, normalize, λ), plus git-theta's precomputed trimmed
    task vectors (statistic 'trimmed', e.g. from code/trim.py) and its `global_majority_sign`.

    mergekit elects +1 where the sign election ties; `global_majority_sign=1` reproduces that exactly.
    Merging in blocks reads the tensor once more to find the thresholds, once per model with `rescale`,
    and once for the tensor's majority sign where a tie between non-zero values needs it.
    """

    name = "ties"
    mergekit = Mergekit("ancestor", MERGEKIT_PLUS_ON_TIES)
    paper = 'Yadav et al., "TIES-Merging", NeurIPS 2023 (https://arxiv.org/abs/2306.01708)'
    sweeps = (Sweep("ties", "density", (0.1, 0.2, 0.3, 0.5), {"merge_lambda": 1.0}),)
    needs_base = True
    optional_stats = ("trimmed",)
    elementwise = True
    parameters = {
        **combine_parameters(normalize=True),
        "density": Parameter(1.0, per_model=True, range="(0, 1]", help="fraction of each task vector kept (largest magnitudes)"),
        "rescale": Parameter(False, type=bool, help="rescale each trimmed task vector to its untrimmed L1 norm"),
        **CONSENSUS_PARAMETERS,
    }

    def prepare(self, blocks: TensorBlocks, *, weight, density, rescale, consensus_method, global_majority_sign,
                **unused) -> TiesPlan:
        sample = blocks.sample(SAMPLE_SIZE)
        count = len(sample.tensors)
        if optional_stats(sample, "trimmed") is None:
            thresholds = _thresholds(blocks, sample, per_model(density, sample, "density"))
            cutoffs = [_cutoff(threshold, base_tensor(sample).dtype) for threshold in thresholds]
        else:
            cutoffs = [None] * count
        plan = TiesPlan(cutoffs, [None] * count, None)
        if rescale:
            plan = replace(plan, factors=[_rescale_factor(blocks, t, plan) for t in range(count)])
        if consensus_method is None:
            return plan
        if global_majority_sign is None:
            return replace(plan, majority=_TensorMajority(blocks, plan, weight, consensus_method))
        return replace(plan, majority=checked_majority_sign(global_majority_sign, blocks.name))

    def merge(self, group: TensorGroup, *, weight, density, rescale, merge_lambda, normalize, consensus_method,
              global_majority_sign, int8_mask) -> torch.Tensor:
        base_tensor(group)
        plan = group.prepared
        if plan is None:
            plan = self.prepare(TensorBlocks.of(group), weight=weight, density=density, rescale=rescale,
                                consensus_method=consensus_method, global_majority_sign=global_majority_sign)
        return combine(group, _trimmed(group, plan), weight, merge_lambda=merge_lambda, normalize=normalize,
                       consensus_method=consensus_method, global_majority_sign=plan.majority)


def _thresholds(blocks: TensorBlocks, sample: TensorGroup, densities) -> list[float | None]:
    """Each model's trim threshold: the k_t-th largest |τ_t| of the whole tensor, k_t = max(1, ⌊d_t·n⌋);
    None keeps everything, inf nothing."""
    n = blocks.numel
    thresholds, selections = [], {}
    for t, density in enumerate(densities):
        if density >= 1:
            thresholds.append(None)
        elif density <= 0 or n == 0:
            thresholds.append(math.inf)
        else:
            thresholds.append(None)
            selections[t] = Selection(_magnitude(task_vector(sample, t)), max(1, int(density * n)), n)
    while any(s.answer is None for s in selections.values()):
        pending = {t: s for t, s in selections.items() if s.answer is None}
        for group in blocks:
            scratch = torch.empty_like(group.ancestor)
            for t, selection in pending.items():
                selection.feed(_magnitude(torch.sub(group.tensors[t], group.ancestor, out=scratch), in_place=True))
        for selection in pending.values():
            selection.finish_pass()
    for t, selection in selections.items():
        thresholds[t] = selection.answer if selection.answer > 0 else None  # |τ| ≥ 0 keeps everything
    return thresholds


def _cutoff(threshold: float | None, dtype: torch.dtype) -> float | None:
    """The largest value of `dtype` below `threshold` (None and inf stay)."""
    return threshold if threshold is None or threshold == math.inf else _next_float(threshold, 0.0, dtype)


def _trimmed(group: TensorGroup, plan: TiesPlan) -> list[torch.Tensor]:
    """The trimmed (and rescaled) task vectors τ'_t of `group`, in the group's dtype."""
    given = optional_stats(group, "trimmed")
    scratch = torch.empty_like(group.ancestor)
    return [_trimmed_one(group, t, plan, given, scratch) for t in range(len(group.tensors))]


def _trimmed_one(group: TensorGroup, t: int, plan: TiesPlan, given, scratch=None) -> torch.Tensor:
    if given is not None:
        kept = given[t].to(group.ancestor.dtype)
    elif plan.cutoffs[t] == math.inf:
        kept = torch.zeros_like(group.ancestor)
    elif plan.cutoffs[t] is not None:  # as trim_by_magnitude's mask, in one operation (dropped entries are +0)
        kept = torch.nn.functional.hardshrink(torch.sub(group.tensors[t], group.ancestor, out=scratch), plan.cutoffs[t])
    else:
        kept = task_vector(group, t)
    return kept if plan.factors[t] is None else kept * plan.factors[t]


def _rescale_factor(blocks: TensorBlocks, t: int, plan: TiesPlan) -> torch.Tensor | None:
    """‖τ_t‖₁ / ‖τ'_t‖₁ over the whole tensor, as mergekit's rescale. Both sums run over the whole task
    vector at once (gathered from the blocks), so they round exactly as for an unblocked tensor."""
    original, kept = [], []
    for group in blocks:
        original.append(task_vector(group, t).flatten())
        kept.append(_trimmed_one(group, t, plan, optional_stats(group, "trimmed")).flatten())
    return l1_rescale_factor(torch.cat(kept), torch.cat(original))


class _TensorMajority:
    """The sign most entries of the whole tensor elect (+1 on a tie): a pass over every block, made when
    first asked for."""

    def __init__(self, blocks: TensorBlocks, plan: TiesPlan, weight, consensus_method: str):
        self.blocks, self.plan, self.weight, self.consensus_method = blocks, plan, weight, consensus_method
        self.value = None

    def __call__(self) -> float:
        if self.value is None:
            balance = 0.0
            for group in self.blocks:
                deltas = weighted_deltas(group, _trimmed(group, self.plan), self.weight)
                balance += sign_balance(election(deltas, self.consensus_method, upcast_dtype(group.ancestor.dtype)))
            self.value = 1.0 if balance >= 0 else -1.0
        return self.value
