"""MaTS: solve the merging objective's linear system (Σ_t F_t) θ = Σ_t F_t θ_t by conjugate gradient.

Tam, Bansal & Raffel, "Merging by Matching Models in Task Parameter Subspaces", TMLR 2024
(https://arxiv.org/abs/2312.04339).
"""
import logging
import math

import torch

from .base import MergeMethod, Parameter, Sweep, TensorGroup
from .common import optional_stats, stat
from .regmean import WORK_DTYPE, average, check_linear_gram, scale_off_diagonal, weights_out_in

logger = logging.getLogger(__name__)

OBJECTIVES = ("average", "fisher", "regmean", "blockwise_fisher")


class Mats(MergeMethod):
    """k conjugate-gradient iterations on (Σ_t F_t) θ = Σ_t F_t θ_t, for one of the objectives

    - 'average':          F_t = I (the solution is the average);
    - 'fisher':           F_t = diag(Fisher_t) (statistic 'fisher', needed for every tensor);
    - 'regmean':          F_t = G̃_t ⊗ I, the matvec W ↦ W G̃_t (statistic 'gram', [in, in]);
    - 'blockwise_fisher': F_t = G_t ⊗ S_t, the matvec W ↦ S_t W G_t ('gram' and 'output_grad_gram').

    With 'regmean'/'blockwise_fisher', tensors without a Gram statistic (biases, embeddings, norms) are
    averaged; `alpha` shrinks the Grams' off-diagonal entries as RegMean does (1: unchanged); a weight stored
    [in, out] (GPT-2's Conv1D, as its Gram statistics record) is merged as its transpose.
    CG starts from `group.initial` when the driver gives one, else from the ancestor (git-theta's
    convention: `--ancestor` is MaTS' starting point, e.g. a task-arithmetic merge), else from the
    average. Each tensor's iterations and residuals are logged (INFO: summary, DEBUG: every iteration).
    """

    name = "mats"
    paper = 'Tam, Bansal & Raffel, "Merging by Matching Models in Task Parameter Subspaces", TMLR 2024 (https://arxiv.org/abs/2312.04339)'
    sweeps = tuple(Sweep(f"mats ({label})", "iterations", (5, 20, 50), {"objective": objective, "alpha": 0.9},
                         statistics="gram", initial="task arithmetic")
                     for label, objective in (("regmean", "regmean"), ("blockwise fisher", "blockwise_fisher")))
    aliases = ("covariance-mats", "covariance_mats")
    optional_stats = ("fisher", "gram", "output_grad_gram")
    parameters = {
        "objective": Parameter("regmean", type=str, choices=OBJECTIVES, help="what the merge minimises"),
        "iterations": Parameter(10, type=int, range="[0, inf)", help="conjugate-gradient iterations k"),
        "tolerance": Parameter(1e-12, range="[0, inf)", help="stop early once |residual| <= tolerance * |Σ F_t θ_t|"),
        "alpha": Parameter(1.0, range="[0, 1]", help="α: scale of the Gram matrices' off-diagonal entries"),
    }

    def merge(self, group: TensorGroup, *, objective, iterations, tolerance, alpha) -> torch.Tensor:
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {iterations}")
        if group.stored_in_out and objective in ("regmean", "blockwise_fisher"):
            return self.merge(weights_out_in(group), objective=objective, iterations=iterations,
                              tolerance=tolerance, alpha=alpha).T
        system = linear_system(group, objective, alpha)
        if system is None:
            return average(group).to(group.tensors[0].dtype)
        matvec, rhs = system
        start = group.initial if group.initial is not None else group.ancestor
        start = average(group) if start is None else start.to(WORK_DTYPE)
        merged = conjugate_gradient(matvec, rhs, start, iterations, tolerance, group.name)
        return merged.to(group.tensors[0].dtype)


def linear_system(group: TensorGroup, objective: str, alpha: float):
    """(matvec, Σ_t F_t θ_t) for `objective`, or None when the tensor has no statistic to weight it."""
    thetas = [theta.to(WORK_DTYPE) for theta in group.tensors]
    if objective == "average":
        count = len(thetas)
        return (lambda x: count * x), sum(thetas)
    if objective == "fisher":
        fishers = [stat(group, t, "fisher").to(WORK_DTYPE) for t in range(len(thetas))]
        total = sum(fishers)
        return (lambda x: total * x), sum(f * theta for f, theta in zip(fishers, thetas))
    grams = optional_stats(group, "gram")
    if grams is None:
        return None
    check_linear_gram(group, grams)
    grams = [scale_off_diagonal(g.to(WORK_DTYPE), alpha) for g in grams]
    if objective == "regmean":
        total = sum(grams)
        return (lambda x: x @ total), sum(theta @ g for theta, g in zip(thetas, grams))
    out_grams = [stat(group, t, "output_grad_gram").to(WORK_DTYPE) for t in range(len(thetas))]
    for t, s in enumerate(out_grams):
        if tuple(s.shape) != (thetas[0].shape[0],) * 2:
            raise ValueError(f"output_grad_gram of model {t + 1} for tensor {group.name} has shape "
                             f"{tuple(s.shape)}, expected [{thetas[0].shape[0]}, {thetas[0].shape[0]}]")
    return (
        (lambda x: sum(s @ x @ g for s, g in zip(out_grams, grams))),
        sum(s @ theta @ g for s, theta, g in zip(out_grams, thetas, grams)),
    )


def conjugate_gradient(matvec, rhs: torch.Tensor, start: torch.Tensor, iterations: int, tolerance: float,
                       name: str) -> torch.Tensor:
    """At most `iterations` steps of CG for the symmetric positive semi-definite system matvec(x) = rhs."""
    x = start.clone()
    residual = rhs - matvec(x)
    direction = residual.clone()
    squared = torch.sum(residual * residual).item()
    rhs_norm = torch.linalg.vector_norm(rhs).item()
    initial, target = math.sqrt(squared), tolerance * rhs_norm
    done = 0
    while done < iterations and math.sqrt(squared) > target:
        product = matvec(direction)
        curvature = torch.sum(direction * product).item()
        if curvature < 0:
            raise ValueError(f"the merging system of tensor {name} is not positive semi-definite "
                             "(negative statistics?)")
        if curvature == 0:  # no progress is possible along this direction: the reachable part is solved
            break
        step = squared / curvature
        x.add_(direction, alpha=step)
        residual.add_(product, alpha=-step)
        new_squared = torch.sum(residual * residual).item()
        direction = residual + (new_squared / squared) * direction
        squared = new_squared
        done += 1
        logger.debug("%s: CG iteration %d, residual %.4e", name, done, math.sqrt(squared))
    final = torch.linalg.vector_norm(rhs - matvec(x)).item()
    logger.info("%s: %d CG iterations, residual %.4e -> %.4e (|rhs| %.4e)", name, done, initial, final, rhs_norm)
    return x
