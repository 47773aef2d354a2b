"""EMR-Merging: elect one unified task vector, then give each task a mask and a rescaler that bring it
back towards that task's own model.

Huang, Ye, Li, Ouyang, Wang & Zhang, "EMR-Merging: Tuning-Free High-Performance Model Merging",
NeurIPS 2024 (https://arxiv.org/abs/2405.17461).

As a merge method (`--merge emr`) it gives the unified model θ_0 + λ·τ_uni; the per-task masks and
rescalers, and each task's model from them, are written by `code/modulated_merge.py`
(modelmerge.modulated).
"""
import torch

from .base import MergeMethod, Sweep, TensorGroup
from .task_space import PARAMETERS, result, task_vectors


def elect(taus: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(τ_uni, masks): γ = sign(Σ_t τ_t) (0 counts as −, as the authors' code does); m_t = [τ_t · γ > 0];
    τ_uni = γ · max_t |m_t ⊙ τ_t|, the largest magnitude among the task vectors that agree with γ."""
    flag = (sum(taus) > 0).to(taus[0].dtype) * 2 - 1
    masks = [tau * flag > 0 for tau in taus]
    magnitude = torch.zeros_like(taus[0])
    for tau, mask in zip(taus, masks):
        magnitude = torch.maximum(magnitude, (tau * mask).abs())
    return magnitude * flag, masks


class Emr(MergeMethod):
    """θ = θ_0 + λ·τ_uni (EMR's unified model, every tensor); see the module docstring for the modulators."""

    name = "emr"
    kind = "per-task"
    program = "modulated_merge.py"
    paper = 'Huang et al., "EMR-Merging: Tuning-Free High-Performance Model Merging", NeurIPS 2024 (https://arxiv.org/abs/2405.17461)'
    sweeps = (Sweep("emr (per-task)"),)
    aliases = ("emr_merging",)
    needs_base = True
    elementwise = True
    parameters = {"merge_lambda": PARAMETERS["merge_lambda"]}

    def merge(self, group: TensorGroup, *, merge_lambda) -> torch.Tensor:
        unified, _ = elect(list(task_vectors(group)))
        return result(group, unified, merge_lambda)

    @staticmethod
    def masks(taus: list[torch.Tensor], *, merge_lambda) -> list[torch.Tensor]:
        return elect(taus)[1]
