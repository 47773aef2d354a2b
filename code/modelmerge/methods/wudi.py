"""WUDI-Merging: find the merged task vector that least disturbs each task's own inputs, estimated from
its task vector (whose rows span the task's input space), by gradient descent with no data.

Cheng, Xiong, Zheng, Ren, Zhang & Tao, "Whoever Started the Interference Should End It: Guiding Data-Free
Model Merging via Task Vectors", ICML 2025 (https://arxiv.org/abs/2503.08099).
"""
import torch

from .base import MergeMethod, Parameter, TensorGroup
from .task_space import PARAMETERS, is_matrix, mean, result, task_vectors


def least_interference(taus: list[torch.Tensor], iterations: int, learning_rate: float) -> torch.Tensor:
    """Minimise L(τ) = Σ_t ‖(τ − τ_t) τ_tᵀ‖²_F / ‖τ_t‖²_F from τ = Σ_t τ_t with Adam (as the authors).

    The gradient 2 Σ_t (τ − τ_t) G_t with G_t = τ_tᵀ τ_t / ‖τ_t‖²_F is 2 (τ G − B), G = Σ_t G_t and
    B = Σ_t τ_t G_t computed once, so an iteration costs one product instead of two per task.
    Task vectors that are 0 add nothing to L and are left out.
    """
    live = [tau for tau in taus if tau.any()]
    merged = torch.nn.Parameter(sum(taus))
    if not live or iterations == 0:
        return merged.detach()
    grams = [tau.T @ tau / tau.square().sum() for tau in live]
    gram = sum(grams)
    target = sum(tau @ g for tau, g in zip(live, grams))
    del grams
    optimizer = torch.optim.Adam([merged], lr=learning_rate, weight_decay=0)
    with torch.no_grad():
        for _ in range(iterations):
            merged.grad = (merged @ gram).sub_(target).mul_(2)
            optimizer.step()
    return merged.detach()


class Wudi(MergeMethod):
    """WUDI on every 2-D tensor, the mean task vector elsewhere; θ_0 + λ·τ."""

    name = "wudi"
    aliases = ("wudi_merging",)
    needs_base = True
    parameters = {
        **PARAMETERS,
        "iterations": Parameter(300, type=int, aliases=("iter_num",), range="[0, inf)", help="Adam steps per 2-D tensor (≥ 0)"),
        "learning_rate": Parameter(1e-5, aliases=("lr",), range="(0, inf)", help="Adam's learning rate (> 0)"),
    }

    def merge(self, group: TensorGroup, *, merge_lambda, exclude, iterations, learning_rate) -> torch.Tensor:
        taus = task_vectors(group)
        if is_matrix(group, exclude):
            tau = least_interference(taus, iterations, learning_rate)
        else:
            tau = mean(taus)
        return result(group, tau, merge_lambda)
