"""Karcher mean: the weighted Riemannian mean of the models' directions on the unit hypersphere, scaled to
their mean norm.

H. Karcher, "Riemannian center of mass and mollifier smoothing", 1977; for model merging see
https://arxiv.org/abs/2603.04972; computed as mergekit 0.1.5's `karcher`.
"""
import torch

from .base import MergeMethod, Mergekit, Parameter, Sweep, TensorGroup
from .common import upcast_dtype


def karcher_mean(tensors: list[torch.Tensor], alphas: list[float], max_iter: int, tol: float) -> torch.Tensor:
    """Fixed-point iteration of the weighted Karcher mean of the unit directions (inputs of norm ≤ tol are
    left out), started from their normalised weighted average, scaled by Σ α_t ‖x_t‖."""
    norms = [torch.linalg.vector_norm(x) for x in tensors]
    units = [torch.zeros_like(x) if n.item() == 0 else x / n for x, n in zip(tensors, norms)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    directions = [units[i] for i in valid]
    mean = torch.zeros_like(directions[0])
    for w, u in zip(weights, directions):
        mean += w * u
    mean_norm = torch.linalg.vector_norm(mean)
    mean = directions[0].clone() if mean_norm.item() < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for w, u in zip(weights, directions):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += w * (theta / torch.sin(theta)) * (u - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent)
        if tangent_norm.item() < tol:
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = torch.linalg.vector_norm(mean)
        if unit_norm.item() > tol:
            mean = mean / unit_norm
    return sum(a * n for a, n in zip(alphas, norms)) * mean


class Karcher(MergeMethod):
    """The Karcher mean of the models with equal weights (mergekit's `karcher`; a base model counts as one
    more model there)."""

    name = "karcher"
    mergekit = Mergekit("input")
    paper = 'H. Karcher, "Riemannian center of mass and mollifier smoothing", 1977'
    sweeps = (Sweep("karcher"),)
    parameters = {
        "max_iter": Parameter(10, type=int, range="[0, inf)", help="most fixed-point iterations (≥ 0)"),
        "tol": Parameter(1e-5, range="[0, inf)", help="stop when the tangent step is shorter than this"),
    }

    def merge(self, group: TensorGroup, *, max_iter, tol) -> torch.Tensor:
        out_dtype = group.tensors[0].dtype
        if len(group.tensors) == 1:
            return group.tensors[0]
        dtype = upcast_dtype(out_dtype)
        tensors = [x.to(dtype) for x in group.tensors]
        alphas = [1.0 / len(tensors)] * len(tensors)
        return karcher_mean(tensors, alphas, max_iter, tol).to(out_dtype)
