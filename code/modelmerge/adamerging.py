"""AdaMerging (layer-wise): learn one merge coefficient per task and parameter tensor by minimising the
entropy of the merged model's predictions on unlabelled inputs of every task, then merge with them.

Yang, Wang, Shen, Liu, Guo, Wang & Tao, "AdaMerging: Adaptive Model Merging for Multi-Task Learning",
ICLR 2024 (https://arxiv.org/abs/2310.02575):

    θ(λ)_k = θ_0,k + Σ_t λ_t,k τ_t,k          (k: a parameter tensor, "layer-wise" in the paper)
    min_λ  Σ_t E_{x ∈ X_t} H(softmax(f(x; θ(λ))))

from λ = `prior` (0.3 in the paper), with Adam, the coefficients clamped to [0, 1] in every forward pass
as the authors' code does. Buffers (position ids) and tensors equal in every model are not merged.
"""
import logging
from dataclasses import dataclass

import torch
from torch.func import functional_call
from tqdm import tqdm

from modelmerge.methods.base import MethodDeclaration, Parameter, Sweep

logger = logging.getLogger(__name__)


class AdaMerging(MethodDeclaration):
    """AdaMerging as the catalogue lists it: run by code/adamerging.py on each task's validation inputs."""

    name = "adamerging"
    kind = "data-aware"
    paper = 'Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024 (https://arxiv.org/abs/2310.02575)'
    needs_base = True
    parameters = {
        "iterations": Parameter(100, type=int, range="[0, inf)", help="Adam steps (≥ 0)"),
        "learning_rate": Parameter(1e-3, range="(0, inf)", help="Adam's learning rate"),
        "prior": Parameter(0.3, range="[0, 1]", help="the initial coefficient of every task and tensor"),
    }
    sweeps = (Sweep("adamerging", "iterations", (50, 200)),)
    program = "adamerging.py"
    task_data = "validation"


@dataclass
class AdaMergingResult:
    names: list[str]  # the merged parameter tensors, one coefficient column each
    coefficients: torch.Tensor  # [T, len(names)], clamped to [0, 1]
    entropy: list[float]  # the summed mean entropy over the tasks' batches, at each step (before it)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean over examples of −Σ_c p_c log p_c, p = softmax(logits)."""
    log_p = torch.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1).mean()


class LayerWiseMerge:
    """θ(λ) of `model`'s parameters from θ_0 and the task models' parameters (name -> tensor dicts)."""

    def __init__(self, base: dict, tasks: list[dict]):
        self.base = base
        self.names = [n for n in base if any(not torch.equal(t[n], base[n]) for t in tasks)]
        self.vectors = [{n: t[n] - base[n] for n in self.names} for t in tasks]

    def parameters(self, coefficients: torch.Tensor) -> dict:
        merged = dict(self.base)
        for k, name in enumerate(self.names):
            merged[name] = self.base[name] + sum(coefficients[t, k] * v[name] for t, v in enumerate(self.vectors))
        return merged


def learn_coefficients(model, base: dict, tasks: list[dict], batches: list[list[dict]], *, iterations=100,
                       learning_rate=1e-3, prior=0.3, progress=True) -> AdaMergingResult:
    """Adam on the layer-wise coefficients; `batches[t]` are task t's unlabelled input batches (model
    keyword arguments), visited in turn, one batch of every task per step."""
    merge = LayerWiseMerge(base, tasks)
    device = next(iter(base.values())).device
    raw = torch.full((len(tasks), len(merge.names)), float(prior), device=device, requires_grad=True)
    optimizer = torch.optim.Adam([raw], lr=learning_rate)
    history = []
    model.eval()
    for step in tqdm(range(iterations), desc="AdaMerging", disable=not progress):
        params = merge.parameters(raw.clamp(0, 1))
        loss = sum(entropy(functional_call(model, params, kwargs=task_batches[step % len(task_batches)]).logits)
                   for task_batches in batches)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    with torch.no_grad():
        params = merge.parameters(raw.clamp(0, 1))
        history.append(float(sum(entropy(functional_call(model, params, kwargs=b[0]).logits) for b in batches)))
    logger.info("entropy %.4f -> %.4f over %d steps", history[0], history[-1], iterations)
    return AdaMergingResult(merge.names, raw.detach().clamp(0, 1), history)


def merged_state(base: dict, tasks: list[dict], result: AdaMergingResult) -> dict:
    """θ(λ) with the learned coefficients, as plain tensors."""
    merge = LayerWiseMerge(base, tasks)
    with torch.no_grad():
        return {n: t.detach() for n, t in merge.parameters(result.coefficients).items()}
