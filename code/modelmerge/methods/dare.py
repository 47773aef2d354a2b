"""DARE: randomly drop task-vector entries and rescale the rest, then task arithmetic (or TIES).

Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch",
ICML 2024 (https://arxiv.org/abs/2311.03099).
"""
import torch

from .base import MERGEKIT_PLUS_ON_TIES, MergeMethod, Mergekit, Parameter, Sweep, TensorGroup
from .common import base_tensor, per_model
from .sparsify import drop_and_rescale, tensor_generator
from .task_vectors import CONSENSUS_PARAMETERS, combine, combine_parameters, task_vector


class DareLinear(MergeMethod):
    """DARE then task arithmetic (mergekit's `dare_linear`, git-theta's `dare-task-arithmetic`).

    `rescale` divides the kept entries by the density as in the paper; mergekit 0.1.5 instead rescales
    each task vector to its original L1 norm (equal in expectation). git-theta's `dropout_probability`
    p sets every model's density to 1 − p.
    """

    name = "dare_linear"
    mergekit = Mergekit("ancestor")
    paper = 'Yu et al., "Language Models are Super Mario", ICML 2024 (https://arxiv.org/abs/2311.03099)'
    sweeps = (Sweep("dare linear", "dropout_probability", (0.1, 0.3, 0.5, 0.7), {"seed": 0}),)
    aliases = ("dare-task-arithmetic", "dare_task_arithmetic")
    needs_base = True
    parameters = {
        **combine_parameters(normalize=False),
        "density": Parameter(1.0, per_model=True, range="(0, 1]", help="probability of keeping each task-vector entry"),
        "dropout_probability": Parameter(None, range="[0, 1)", help="p: drop probability for every model (density = 1 − p)"),
        "rescale": Parameter(True, type=bool, help="divide the kept entries by the density"),
        "seed": Parameter(0, type=int, help="seed of the drop masks (combined with the tensor name and model)"),
    }

    def merge(self, group: TensorGroup, *, weight, density, dropout_probability, rescale, seed, merge_lambda,
              normalize, int8_mask, consensus_method=None, global_majority_sign=None) -> torch.Tensor:
        base_tensor(group)
        densities = self._densities(group, density, dropout_probability)
        deltas = [
            drop_and_rescale(task_vector(group, t), d, tensor_generator(seed, group.name, t), rescale)
            for t, d in enumerate(densities)
        ]
        return combine(group, deltas, weight, merge_lambda=merge_lambda, normalize=normalize,
                       consensus_method=consensus_method, global_majority_sign=global_majority_sign)

    @staticmethod
    def _densities(group, density, dropout_probability) -> list[float]:
        densities = per_model(density, group, "density")
        if dropout_probability is None:
            return densities
        if any(d != 1 for d in densities):
            raise ValueError("give either density or dropout_probability, not both")
        if not 0 <= dropout_probability <= 1:
            raise ValueError(f"dropout_probability must lie in [0, 1], got {dropout_probability}")
        return [1 - dropout_probability] * len(densities)


class DareTies(DareLinear):
    """DARE then TIES' sign election and disjoint merge (mergekit's `dare_ties`)."""

    name = "dare_ties"
    mergekit = Mergekit("ancestor", MERGEKIT_PLUS_ON_TIES)
    sweeps = (Sweep("dare ties", "dropout_probability", (0.1, 0.3, 0.5, 0.7), {"seed": 0}),)
    aliases = ("dare-ties",)
    parameters = {**DareLinear.parameters, **CONSENSUS_PARAMETERS}
