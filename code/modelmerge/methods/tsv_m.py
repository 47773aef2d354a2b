"""TSV-M: merge the task vectors' top singular vectors after removing their interference by
orthogonalisation.

Gargiulo, Crisostomi, Bucarelli, Scardapane, Silvestri & Rodolà, "Task Singular Vectors: Reducing Task
Interference in Model Merging", CVPR 2025 (https://arxiv.org/abs/2412.00081).
"""
import torch

from .base import SCALING_FACTORS, MergeMethod, Sweep, TensorGroup
from .task_space import (PARAMETERS, is_matrix, matrix_rule_cost, mean, polar, result, scaled_product, task_vectors,
                         top_singular)


def task_singular_vectors(taus) -> torch.Tensor:
    """Each τ_t = U S Vᵀ keeps its first k = ⌊min(m, n)/T⌋ singular triplets; U's columns, S and Vᵀ's rows
    are stacked in task order (zero-padded to min(m, n)); the U and Vᵀ stacks are replaced by their
    polar factors: τ = polar(U_st) · diag(S_st) · polar(Vᵀ_st). `taus` is a sequence of the T task
    vectors (`TaskVectors`), each read chunk by chunk of rows and never formed whole; the polar factors
    and the product are computed in place where the shapes allow."""
    m, n = taus.shape
    width = min(m, n)
    k = width // len(taus)
    stacked_u = torch.zeros(m, width, dtype=taus.dtype, device=taus.ancestor.device)
    stacked_s = stacked_u.new_zeros(width)
    stacked_vh = stacked_u.new_zeros(width, n)
    for t in range(len(taus)):
        block = slice(t * k, (t + 1) * k)
        u, s, vh = top_singular(taus.lazy(t), k, out=stacked_u[:, block])
        stacked_u[:, block], stacked_s[block], stacked_vh[block] = u[:, :k], s[:k], vh[:k]
    stacked_u, stacked_vh = polar(stacked_u, out=stacked_u), polar(stacked_vh, out=stacked_vh)
    return scaled_product(stacked_u, stacked_s, stacked_vh)


class TsvM(MergeMethod):
    """TSV-M on every 2-D tensor, the mean task vector elsewhere; θ_0 + λ·τ (the paper's α is λ)."""

    name = "tsv_m"
    paper = 'Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025 (https://arxiv.org/abs/2412.00081)'
    sweeps = (Sweep("tsv-m", "merge_lambda", SCALING_FACTORS),)
    aliases = ("tsvm", "tsv-m")
    needs_base = True
    parameters = PARAMETERS

    def cost(self, name, shape, models, params):
        return matrix_rule_cost(name, shape, models + 1, params["exclude"], models + 2)  # T SVDs, two polar factors

    def merge(self, group: TensorGroup, *, merge_lambda, exclude) -> torch.Tensor:
        taus = task_vectors(group)
        tau = task_singular_vectors(taus) if is_matrix(group, exclude) else mean(taus)
        return result(group, tau, merge_lambda)
