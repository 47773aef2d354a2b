"""Model breadcrumbs: drop each task vector's largest outliers and its smallest entries, then task arithmetic.

Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks", ECCV 2024
(https://arxiv.org/abs/2312.06795).
"""
import torch

from .base import MERGEKIT_PLUS_ON_TIES, MergeMethod, Mergekit, Parameter, Sweep, TensorGroup
from .common import base_tensor, per_model
from .sparsify import drop_outliers_and_small
from .task_vectors import CONSENSUS_PARAMETERS, combine, combine_parameters, task_vector


class Breadcrumbs(MergeMethod):
    """Breadcrumbs masks then task arithmetic (mergekit's `breadcrumbs`)."""

    name = "breadcrumbs"
    mergekit = Mergekit("ancestor")
    paper = 'Davari & Belilovsky, "Model Breadcrumbs", ECCV 2024 (https://arxiv.org/abs/2312.06795)'
    sweeps = (Sweep("breadcrumbs", "density", (0.5, 0.7, 0.9), {"gamma": 0.01}),)
    needs_base = True
    parameters = {
        **combine_parameters(normalize=False),
        "density": Parameter(1.0, per_model=True, range="(0, 1]", help="fraction of each task vector kept"),
        "gamma": Parameter(0.01, per_model=True, range="[0, 1)", help="fraction of largest-magnitude entries dropped"),
        "rescale": Parameter(False, type=bool, help="rescale the kept entries to the task vector's L1 norm"),
    }

    def merge(self, group: TensorGroup, *, weight, density, gamma, rescale, merge_lambda, normalize, int8_mask,
              consensus_method=None, global_majority_sign=None) -> torch.Tensor:
        base_tensor(group)
        densities, gammas = per_model(density, group, "density"), per_model(gamma, group, "gamma")
        deltas = [
            drop_outliers_and_small(task_vector(group, t), d, g, rescale)
            for t, (d, g) in enumerate(zip(densities, gammas))
        ]
        return combine(group, deltas, weight, merge_lambda=merge_lambda, normalize=normalize,
                       consensus_method=consensus_method, global_majority_sign=global_majority_sign)


class BreadcrumbsTies(Breadcrumbs):
    """Breadcrumbs masks then TIES' sign election and disjoint merge (mergekit's `breadcrumbs_ties`)."""

    name = "breadcrumbs_ties"
    mergekit = Mergekit("ancestor", MERGEKIT_PLUS_ON_TIES)
    parameters = {**Breadcrumbs.parameters, **CONSENSUS_PARAMETERS}
