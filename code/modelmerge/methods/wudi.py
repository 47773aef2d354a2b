"""WUDI-Merging: find the merged task vector that least disturbs each task's own inputs, estimated from
its task vector (whose rows span the task's input space), by gradient descent with no data.

Cheng, Xiong, Zheng, Ren, Zhang & Tao, "Whoever Started the Interference Should End It: Guiding Data-Free
Model Merging via Task Vectors", ICML 2025 (https://arxiv.org/abs/2503.08099).
"""
from dataclasses import dataclass

import torch

from .base import MergeMethod, Parameter, Sweep, TensorBlocks, TensorGroup, entries_cost, product_cost
from .task_space import PARAMETERS, gets_matrix_rule, is_matrix, mean, result, task_vectors


@dataclass(frozen=True)
class WudiPlan:
    """What WUDI takes from the whole tensor: G_t = τ_tᵀ τ_t / ‖τ_t‖²_F of each task whose task vector is
    not 0 (None for those that are), and G = Σ_t G_t."""

    grams: list[torch.Tensor | None]
    total: torch.Tensor | None
    merged: torch.Tensor | None = None  # a wide tensor's merged task vector, optimised whole in prepare


def input_grams(blocks: TensorBlocks) -> WudiPlan:
    """The plan from τ_tᵀ τ_t and ‖τ_t‖²_F accumulated over the blocks of rows."""
    products, norms, nonzero = None, None, None
    for group in blocks:
        taus = list(task_vectors(group))
        if products is None:
            products = [tau.new_zeros(tau.shape[1], tau.shape[1]) for tau in taus]
            norms, nonzero = [0.0] * len(taus), [False] * len(taus)
        for t, tau in enumerate(taus):
            products[t].addmm_(tau.T, tau)
            norms[t] += tau.square().sum()
            nonzero[t] = nonzero[t] or bool(tau.any())
    grams = [product.div_(norm) if live else None for product, norm, live in zip(products, norms, nonzero)]
    live = [gram for gram in grams if gram is not None]
    return WudiPlan(grams, sum(live) if live else None)


def least_interference(taus: list[torch.Tensor], plan: WudiPlan, iterations: int, learning_rate: float) -> torch.Tensor:
    """Minimise L(τ) = Σ_t ‖(τ − τ_t) τ_tᵀ‖²_F / ‖τ_t‖²_F from τ = Σ_t τ_t with Adam (as the authors).

    The gradient 2 Σ_t (τ − τ_t) G_t with G_t = τ_tᵀ τ_t / ‖τ_t‖²_F is 2 (τ G − B), G = Σ_t G_t and
    B = Σ_t τ_t G_t computed once, so an iteration costs one product instead of two per task. Each row of
    the gradient depends only on that row of τ and of B, and Adam is elementwise, so given G_t (`plan`,
    from the whole tensor) the rows `taus` hold are optimised alone. Task vectors that are 0 add nothing
    to L and are left out.
    """
    merged = torch.nn.Parameter(sum(taus))
    if plan.total is None or iterations == 0:
        return merged.detach()
    target = sum(tau @ gram for tau, gram in zip(taus, plan.grams) if gram is not None)
    gradient = torch.empty_like(target)
    optimizer = torch.optim.Adam([merged], lr=learning_rate, weight_decay=0)
    with torch.no_grad():
        for _ in range(iterations):
            merged.grad = torch.matmul(merged, plan.total, out=gradient).sub_(target).mul_(2)
            optimizer.step()
    return merged.detach()


class Wudi(MergeMethod):
    """WUDI on every 2-D tensor, the mean task vector elsewhere; θ_0 + λ·τ."""

    name = "wudi"
    paper = 'Cheng et al., "Whoever Started the Interference Should End It", ICML 2025 (https://arxiv.org/abs/2503.08099)'
    sweeps = (Sweep("wudi", fixed={"iterations": 300}),)
    aliases = ("wudi_merging",)
    needs_base = True
    elementwise = True  # row by row, once `prepare` has the Gram matrices of the whole tensor
    parameters = {
        **PARAMETERS,
        "iterations": Parameter(300, type=int, aliases=("iter_num",), range="[0, inf)", help="Adam steps per 2-D tensor (≥ 0)"),
        "learning_rate": Parameter(1e-5, aliases=("lr",), range="(0, inf)", help="Adam's learning rate (> 0)"),
    }

    def cost(self, name, shape, models, params):  # the Gram matrices, then one product with them per Adam step
        cost = entries_cost(shape, models + 1)
        if gets_matrix_rule(name, shape, params["exclude"]):
            m, n = shape
            cost += product_cost(models * m * n * n + params["iterations"] * 2 * m * n * min(n, 2 * models * m))
        return cost

    def prepare(self, blocks: TensorBlocks, *, exclude, iterations, learning_rate, **unused) -> WudiPlan | None:
        if not is_matrix(blocks.sample(1), exclude):
            return None
        if blocks.shape[0] >= blocks.shape[1]:
            return input_grams(blocks)
        # A wide matrix is optimised whole: its blocks hold few rows each, and a product of a few rows with
        # the large n x n Gram matrix streams that matrix from memory once per row block and iteration
        # (twice as slow), while its task vectors are no larger than the Gram matrices held anyway.
        whole = blocks.sample(blocks.numel)
        plan = input_grams(TensorBlocks.of(whole))
        merged = least_interference(list(task_vectors(whole)), plan, iterations, learning_rate)
        return WudiPlan([None] * len(plan.grams), None, merged)  # the Gram matrices are no longer needed

    def merge(self, group: TensorGroup, *, merge_lambda, exclude, iterations, learning_rate) -> torch.Tensor:
        taus = task_vectors(group)
        if not is_matrix(group, exclude):
            return result(group, mean(taus), merge_lambda)
        plan = group.prepared
        if plan is None:
            plan = self.prepare(TensorBlocks.of(group), exclude=exclude, iterations=iterations, learning_rate=learning_rate)
        if plan.merged is not None:
            tau = plan.merged[group.first_row: group.first_row + group.ancestor.shape[0]].clone()
        else:
            tau = least_interference(list(taus), plan, iterations, learning_rate)
        return result(group, tau, merge_lambda)
