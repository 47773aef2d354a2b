"""Iso-C and Iso-CTS: flatten the singular spectrum of the merged task matrix (Iso-C), after enriching it
with each task's own directions outside a common subspace (Iso-CTS).

Marczak, Magistri, Cygert, Twardowski, Bagdanov & van de Weijer, "No Task Left Behind: Isotropic Model
Merging with Common and Task-Specific Subspaces", ICML 2025 (https://arxiv.org/abs/2502.04959).
"""
import torch

from .base import SCALING_FACTORS, MergeMethod, Parameter, Sweep, TensorGroup
from .task_space import (PARAMETERS, chunks, gram, is_matrix, leading_left, matrix_rule_cost, mean, polar,
                         polar_and_singular_values, result, scaled_product, task_vectors, times, top_singular, total)


def isotropic(matrix: torch.Tensor) -> torch.Tensor:
    """U · (mean of S) · Vᵀ for matrix = U S Vᵀ: the same singular vectors with a flat spectrum, i.e. the
    polar factor U Vᵀ times the mean singular value (computed in place of `matrix`)."""
    factor, singular_values = polar_and_singular_values(matrix, out=matrix)
    return factor.mul_(singular_values.mean())


def space_sizes(width: int, tasks: int, fraction: float) -> tuple[int, int]:
    """(k_c, k_t): common directions k_c = width − round((width − ⌊f·width⌋)/T)·T, so that the rest splits
    evenly into T task blocks of k_t (k_c kept ≥ 0)."""
    common = width - round((width - int(width * fraction)) / tasks) * tasks
    common = max(0, common)
    return common, (width - common) // tasks


def leading_outside(tau: torch.Tensor, common_u: torch.Tensor, k: int, out: torch.Tensor | None = None):
    """The k leading singular triplets of (I − U_c U_cᵀ) τ without forming it when τ is tall: from its Gram
    τᵀτ − (U_cᵀτ)ᵀ(U_cᵀτ) (float64, accumulated over chunks of rows), left vectors (τV − U_c(U_cᵀτ)V)/S;
    a wide τ is projected directly. `tau` may be a `Difference`, read chunk by chunk; a tall τ's left
    vectors are written into `out` when given."""
    if tau.shape[0] < tau.shape[1] or k == 0:
        tau = tau[:]  # formed whole: a wide matrix is small
        return top_singular(tau - common_u @ (common_u.T @ tau), k)
    inside = torch.zeros(common_u.shape[1], tau.shape[1], dtype=torch.float64, device=tau.device)
    for rows in chunks(tau.shape[0]):
        inside.addmm_(common_u[rows].to(torch.float64).T, tau[rows].to(torch.float64))
    eigenvalues, vectors = torch.linalg.eigh(gram(tau) - inside.T @ inside)
    order = eigenvalues.argsort(descending=True)[:k]
    values = eigenvalues[order].clamp(min=0).sqrt()
    right = vectors[:, order]
    inside_right = inside @ right

    def outside(product, rows):  # τV − U_c(U_cᵀτ)V, then divided by S
        return leading_left(product - common_u[rows].to(torch.float64) @ inside_right, values)

    left = times(tau, right, out if out is not None else tau.new_empty(tau.shape[0], k), outside)
    return left, values.to(tau.dtype), right.T.to(tau.dtype)


def common_and_task_specific(taus, fraction: float) -> torch.Tensor:
    """Iso-CTS: the first k_c singular triplets of Σ_t τ_t, and for each task the first k_t of τ_t with the
    common column space projected out; task blocks (in task order) then the common block are stacked, the
    U and Vᵀ stacks replaced by their polar factors and all singular values by their mean."""
    m, n = taus.shape
    width = min(m, n)
    k_c, k_t = space_sizes(width, len(taus), fraction)
    stacked_u = torch.zeros(m, width, dtype=taus.dtype, device=taus.ancestor.device)
    stacked_s, stacked_vh = stacked_u.new_zeros(width), stacked_u.new_zeros(width, n)
    common = slice(len(taus) * k_t, len(taus) * k_t + k_c)
    u, s, vh = top_singular(taus.lazy_total(), k_c, out=stacked_u[:, common])
    stacked_u[:, common], stacked_s[common], stacked_vh[common] = u[:, :k_c], s[:k_c], vh[:k_c]
    del u
    common_u = stacked_u[:, common]
    for t in range(len(taus)):
        block = slice(t * k_t, (t + 1) * k_t)
        own_u, own_s, own_vh = leading_outside(taus.lazy(t), common_u, k_t, out=stacked_u[:, block])
        stacked_u[:, block], stacked_s[block], stacked_vh[block] = own_u[:, :k_t], own_s[:k_t], own_vh[:k_t]
    stacked_u, stacked_vh = polar(stacked_u, out=stacked_u), polar(stacked_vh, out=stacked_vh)
    return scaled_product(stacked_u, stacked_s.mean().expand(width), stacked_vh)


class IsoC(MergeMethod):
    """Iso-C on every 2-D tensor (the sum of the task vectors with a flat spectrum), the mean task vector
    elsewhere; θ_0 + λ·τ."""

    name = "iso_c"
    paper = ('Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces", '
             "ICML 2025 (https://arxiv.org/abs/2502.04959)")
    sweeps = (Sweep("iso-c", "merge_lambda", SCALING_FACTORS),)
    aliases = ("iso-c",)
    needs_base = True
    parameters = PARAMETERS

    def cost(self, name, shape, models, params):
        return matrix_rule_cost(name, shape, models + 1, params["exclude"], 1)  # the polar factor of the sum

    def merge(self, group: TensorGroup, *, merge_lambda, exclude) -> torch.Tensor:
        taus = task_vectors(group)
        tau = isotropic(total(taus)) if is_matrix(group, exclude) else mean(taus)
        return result(group, tau, merge_lambda)


class IsoCts(MergeMethod):
    """Iso-CTS on every 2-D tensor, the mean task vector elsewhere; θ_0 + λ·τ."""

    name = "iso_cts"
    paper = IsoC.paper
    sweeps = (Sweep("iso-cts", "merge_lambda", SCALING_FACTORS, {"common_space_fraction": 0.8}),)
    aliases = ("iso-cts",)
    needs_base = True
    parameters = {
        **PARAMETERS,
        "common_space_fraction": Parameter(0.8, range="[0, 1]", help="f: share of the directions taken from the common space, in [0, 1]"),
    }

    def cost(self, name, shape, models, params):  # the sum's SVD, one per task, two polar factors
        return matrix_rule_cost(name, shape, models + 1, params["exclude"], models + 3)

    def merge(self, group: TensorGroup, *, merge_lambda, exclude, common_space_fraction) -> torch.Tensor:
        taus = task_vectors(group)
        if is_matrix(group, exclude):
            tau = common_and_task_specific(taus, common_space_fraction)
        else:
            tau = mean(taus)
        return result(group, tau, merge_lambda)
