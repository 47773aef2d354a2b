"""TIES: trim each task vector to its largest entries, elect a sign per entry, average the agreeing entries.

Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023
(https://arxiv.org/abs/2306.01708).
"""
import math

import torch

from .base import MergeMethod, Parameter, TensorGroup
from .common import base_tensor, optional_stats, per_model
from .task_vectors import CONSENSUS_PARAMETERS, combine, combine_parameters, restore_l1_norm, task_vector

# Above this many entries the exact selection first brackets the answer with a sample (see kth_largest).
_SAMPLED_SELECTION_MIN = 1 << 20
_SAMPLE_SIZE = 1 << 16


def trim_by_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = max(1, ⌊density·n⌋) entries of largest magnitude, zero the rest (mergekit's `magnitude`).

    Entries tied with the k-th largest magnitude are all kept.
    """
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    magnitude = delta.abs().flatten()
    if magnitude.device.type == "cpu" and magnitude.dtype in (torch.float16, torch.bfloat16):
        magnitude = magnitude.float()
    k = max(1, int(density * magnitude.numel()))
    threshold = kth_largest(magnitude, k)
    return delta * (magnitude >= threshold).view(delta.shape)


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The exact k-th largest entry of the 1-D tensor `values`.

    A full selection over a large tensor dominates the cost of a TIES merge, so the answer is first
    bracketed between two quantiles of a fixed pseudo-random sample, and the exact selection runs only on the
    entries inside the bracket (about 2% of them). When the bracket misses, it falls back to the full one.
    """
    n = values.numel()
    if n < _SAMPLED_SELECTION_MIN:
        return values.kthvalue(n - k + 1).values
    index = torch.randint(n, (_SAMPLE_SIZE,), generator=torch.Generator().manual_seed(0))
    sample = values[index.to(values.device)]
    m = sample.numel()
    quantile = 1 - k / n  # the answer's rank from below, as a fraction
    lo_rank, hi_rank = math.floor((quantile - 0.01) * m), math.ceil((quantile + 0.01) * m) + 1
    # A bracket reaching past the sample's extremes is left open on that side.
    lo = sample.kthvalue(lo_rank).values if lo_rank >= 1 else values.new_tensor(-math.inf)
    hi = sample.kthvalue(hi_rank).values if hi_rank <= m else values.new_tensor(math.inf)
    above = int((values > hi).sum())
    band = values[(values >= lo) & (values <= hi)]
    rank = k - above  # the answer is the rank-th largest entry of the band, if the bracket holds it
    if 1 <= rank <= band.numel():
        return band.kthvalue(band.numel() - rank + 1).values
    return values.kthvalue(n - k + 1).values


class Ties(MergeMethod):
    """TIES as mergekit's `ties` (weights, density, rescale, normalize, λ), plus git-theta's precomputed trimmed
    task vectors (statistic 'trimmed', e.g. from code/trim.py) and its `global_majority_sign`.

    mergekit elects +1 where the sign election ties; `global_majority_sign=1` reproduces that exactly.
    """

    name = "ties"
    needs_base = True
    optional_stats = ("trimmed",)
    parameters = {
        **combine_parameters(normalize=True),
        "density": Parameter(1.0, per_model=True, help="fraction of each task vector kept (largest magnitudes)"),
        "rescale": Parameter(False, type=bool, help="rescale each trimmed task vector to its untrimmed L1 norm"),
        **CONSENSUS_PARAMETERS,
    }

    def merge(self, group: TensorGroup, *, weight, density, rescale, merge_lambda, normalize, consensus_method,
              global_majority_sign, int8_mask) -> torch.Tensor:
        base_tensor(group)
        trimmed = optional_stats(group, "trimmed")
        if trimmed is None:
            densities = per_model(density, group, "density")
            trimmed = [trim_by_magnitude(task_vector(group, t), d) for t, d in enumerate(densities)]
        if rescale:
            trimmed = [restore_l1_norm(kept.to(group.base.dtype), task_vector(group, t))
                       for t, kept in enumerate(trimmed)]
        return combine(group, trimmed, weight, merge_lambda=merge_lambda, normalize=normalize,
                       consensus_method=consensus_method, global_majority_sign=global_majority_sign)
