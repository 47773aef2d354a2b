"""Consensus merging and TALL masks: per-task masks select the entries of the multi-task vector that
matter to a task; consensus keeps the entries at least k tasks select.

Wang, Dimitriadis, Ortiz-Jiménez, Fleuret & Frossard, "Localizing Task Information for Improved Model
Merging and Compression", ICML 2024 (https://arxiv.org/abs/2405.07813).
"""
import torch

from .base import MergeMethod, Parameter, Sweep, TensorGroup
from .common import base_tensor, per_model, upcast_dtype
from .task_space import PARAMETERS


def tall_masks(taus: list[torch.Tensor], lambdas: list[float]) -> list[torch.Tensor]:
    """m_t = |τ_t| ≥ λ_t · |τ_MTL − τ_t|, τ_MTL = Σ_t τ_t: the entries where task t dominates the others."""
    multi_task = sum(taus)
    return [tau.abs() >= lam * (multi_task - tau).abs() for tau, lam in zip(taus, lambdas)]


class Consensus(MergeMethod):
    """θ = θ_0 + λ · τ_MTL ⊙ [Σ_t m_t ≥ k] with the TALL masks m_t: the task-arithmetic vector without the
    entries fewer than k tasks need (k = 0 gives task arithmetic; "selfish" entries of one task are
    dropped with k = 2)."""

    name = "consensus"
    paper = ('Wang et al., "Localizing Task Information for Improved Model Merging and Compression", '
             "ICML 2024 (https://arxiv.org/abs/2405.07813)")
    sweeps = (Sweep("consensus (ta)", "k", (1, 2, 3), {"tall_mask_lambda": 0.6}),)
    aliases = ("consensus_ta", "tall_masks_consensus")
    needs_base = True
    elementwise = True
    parameters = {
        "merge_lambda": PARAMETERS["merge_lambda"],
        "tall_mask_lambda": Parameter(0.6, per_model=True, range="[0, inf)", help="λ_t of each task's TALL mask (≥ 0)"),
        "k": Parameter(2, type=int, aliases=("consensus_k",), range="[0, inf)", help="least number of tasks that select an entry (≥ 0)"),
    }

    def merge(self, group: TensorGroup, *, merge_lambda, tall_mask_lambda, k) -> torch.Tensor:
        base = base_tensor(group)
        lambdas = per_model(tall_mask_lambda, group, "tall_mask_lambda")
        dtype = upcast_dtype(base.dtype)
        taus = [x.to(dtype) - base.to(dtype) for x in group.tensors]
        votes = sum(m.to(torch.int32) for m in tall_masks(taus, lambdas))
        kept = sum(taus) * (votes >= k)
        return (base.to(dtype) + merge_lambda * kept).to(base.dtype)


class TallMasks(MergeMethod):
    """TALL masks' unified model θ_0 + λ·τ_MTL (task arithmetic); the per-task masks m_t, and each task's
    model θ_0 + m_t ⊙ λ·τ_MTL, are written by `code/modulated_merge.py` (modelmerge.modulated)."""

    name = "tall_masks"
    kind = "per-task"
    program = "modulated_merge.py"
    paper = Consensus.paper
    sweeps = (Sweep("tall masks (per-task)", "tall_mask_lambda", (0.2, 0.4, 0.6)),)
    needs_base = True
    elementwise = True
    parameters = {key: value for key, value in Consensus.parameters.items() if key != "k"}

    def merge(self, group: TensorGroup, *, merge_lambda, tall_mask_lambda) -> torch.Tensor:
        base = base_tensor(group)
        dtype = upcast_dtype(base.dtype)
        multi_task = sum(x.to(dtype) - base.to(dtype) for x in group.tensors)
        return (base.to(dtype) + merge_lambda * multi_task).to(base.dtype)

    @staticmethod
    def masks(taus: list[torch.Tensor], *, merge_lambda, tall_mask_lambda) -> list[torch.Tensor]:
        return tall_masks(taus, tall_mask_lambda)
