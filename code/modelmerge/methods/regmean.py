"""RegMean: per linear layer, the weight whose outputs best match every model's outputs on its own data.

Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023
(https://arxiv.org/abs/2212.09849).
"""
import logging
from dataclasses import replace

import torch

from .base import GRAM_KINDS, MergeMethod, Parameter, Sweep, TensorGroup
from .common import optional_stats, weighted_mean

logger = logging.getLogger(__name__)

WORK_DTYPE = torch.float64


def scale_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """G̃ = α G + (1 − α) diag(G)."""
    return alpha * gram + (1 - alpha) * torch.diag_embed(gram.diagonal())


def weights_out_in(group: TensorGroup) -> TensorGroup:
    """The group with its weights in nn.Linear's layout [out, in]: transposed where they are stored [in, out]
    (GPT-2's Conv1D, `group.stored_in_out`); Gram statistics are the same in both layouts, the other
    statistics (shaped like the weight) are transposed too. Transpose the merged [out, in] result back."""
    if not group.stored_in_out:
        return group

    def flip(tensor):
        return None if tensor is None else tensor.T

    return replace(
        group, tensors=[t.T for t in group.tensors], ancestor=flip(group.ancestor), initial=flip(group.initial),
        statistics=[{kind: t if kind in GRAM_KINDS else t.T for kind, t in stats.items()} for stats in group.statistics],
        ancestor_statistics={kind: t if kind in GRAM_KINDS else t.T for kind, t in group.ancestor_statistics.items()},
        stored_in_out=False,
    )


def check_linear_gram(group: TensorGroup, grams) -> None:
    """A Gram statistic belongs to a weight [out, in] and is [in, in]."""
    weight = group.tensors[0]
    if weight.dim() != 2:
        raise ValueError(f"a Gram statistic is given for tensor {group.name} of shape {tuple(weight.shape)}, "
                         "which is not a linear layer's weight [out, in]")
    for t, gram in enumerate(grams):
        if tuple(gram.shape) != (weight.shape[1], weight.shape[1]):
            raise ValueError(f"Gram statistic of model {t + 1} for tensor {group.name} has shape {tuple(gram.shape)}, "
                             f"expected [{weight.shape[1]}, {weight.shape[1]}]")


def average(group: TensorGroup) -> torch.Tensor:
    return weighted_mean(group.tensors, [1.0] * len(group.tensors), WORK_DTYPE, group)


class RegMean(MergeMethod):
    """W = (Σ_t G̃_t)⁻¹ Σ_t G̃_t W_tᵀ, transposed back; tensors without a Gram statistic are averaged.

    `alpha` (git-theta's `merge_lambda`, default 0.5 as there) shrinks the off-diagonal entries. A weight
    stored [in, out] (GPT-2's Conv1D, as its Gram statistics record) is merged as its transpose.
    """

    name = "regmean"
    paper = 'Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023 (https://arxiv.org/abs/2212.09849)'
    sweeps = (Sweep("regmean", "alpha", (0.1, 0.5, 0.9), statistics="gram"),)
    aliases = ("reg-mean", "reg_mean")
    optional_stats = ("gram",)
    parameters = {
        "alpha": Parameter(0.5, aliases=("merge_lambda",), range="[0, 1]", help="α: scale of the Gram matrices' off-diagonal entries"),
    }

    def merge(self, group: TensorGroup, *, alpha) -> torch.Tensor:
        grams = optional_stats(group, "gram")
        if grams is None:
            return average(group).to(group.tensors[0].dtype)
        if group.stored_in_out:
            return self.merge(weights_out_in(group), alpha=alpha).T
        check_linear_gram(group, grams)
        lhs = torch.zeros_like(grams[0], dtype=WORK_DTYPE)  # Σ G̃_t           [in, in]
        rhs = torch.zeros(group.tensors[0].shape[::-1], dtype=WORK_DTYPE, device=lhs.device)  # Σ G̃_t W_tᵀ  [in, out]
        for gram, weight in zip(grams, group.tensors):
            scaled = scale_off_diagonal(gram.to(WORK_DTYPE), alpha)
            lhs += scaled
            rhs += scaled @ weight.to(WORK_DTYPE).T
        merged_t = solve_on_support(lhs, rhs, average(group).T, group.name)
        return merged_t.T.to(group.tensors[0].dtype)


def solve_on_support(lhs: torch.Tensor, rhs: torch.Tensor, fallback: torch.Tensor, name: str) -> torch.Tensor:
    """Solve lhs · X = rhs for a symmetric `lhs` that may have zero rows and columns.

    An input feature that is zero on every model's data (a dimension no example activates) leaves a zero
    row and column in Σ G̃, so the sum is singular although the problem is not: the objective does not
    constrain that feature's weights at all. The system is solved on the non-zero sub-block, and the
    unconstrained rows keep `fallback` (the plain average; git-theta leaves them 0), all of them where every
    Gram matrix is zero (with a warning: no data reached that layer). A sub-block that is
    still singular (rank-deficient Grams with alpha = 1) cannot be handled and is an error.
    """
    support = (lhs != 0).any(dim=1)
    if not support.any():
        logger.warning("the Gram statistics of tensor %s are zero for every model: merged as the plain average", name)
        return fallback
    block = lhs[support][:, support]
    # Σ G̃ is positive semi-definite; Cholesky pivots near zero (relative to the largest diagonal entry)
    # mean the block is singular to working precision.
    factor, info = torch.linalg.cholesky_ex(block)
    tiny = block.diagonal().max() * block.shape[0] * torch.finfo(block.dtype).eps
    if info.item() != 0 or (factor.diagonal() ** 2).min() <= tiny:
        raise ValueError(f"the summed Gram matrix of tensor {name} is singular even on its non-zero block "
                         "(alpha < 1 regularises it with the diagonal)")
    merged = fallback.clone()
    merged[support] = torch.cholesky_solve(rhs[support], factor)
    return merged
