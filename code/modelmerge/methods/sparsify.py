"""Sparsifiers of the task-vector family: each keeps some entries of a task vector τ = θ − θ_0 and zeroes
the rest, before the family combines the task vectors (methods/task_vectors.py).

- `trim_by_magnitude`: the largest magnitudes (TIES; Yadav et al., "TIES-Merging", NeurIPS 2023,
  https://arxiv.org/abs/2306.01708), with the exact k-th selection of modelmerge.selection;
- `drop_and_rescale`: random drops, the kept entries rescaled (DARE; Yu et al., "Language Models are Super
  Mario", ICML 2024, https://arxiv.org/abs/2311.03099), seeded per tensor and model by `tensor_generator`;
- `drop_outliers_and_small`: the largest outliers and the smallest entries dropped (Model Breadcrumbs;
  Davari & Belilovsky, ECCV 2024, https://arxiv.org/abs/2312.06795).
"""
import hashlib

import torch

from ..selection import kth_largest
from .task_vectors import restore_l1_norm


def trim_by_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = max(1, ⌊density·n⌋) entries of largest magnitude, zero the rest (mergekit's `magnitude`).

    Entries tied with the k-th largest magnitude are all kept.
    """
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    magnitude = delta.abs().flatten()
    threshold = kth_largest(magnitude, max(1, int(density * magnitude.numel())))
    return delta * (magnitude >= threshold).view(delta.shape)


def drop_and_rescale(delta: torch.Tensor, density: float, generator: torch.Generator, rescale: bool) -> torch.Tensor:
    """Keep each entry with probability `density` (drop with p = 1 − density); divide the kept by `density`.

    The uniform draws come from `generator` on the CPU, so a seed gives the same mask on every device.
    """
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    keep = torch.rand(delta.shape, generator=generator) < density
    dropped = delta * keep.to(delta.device)
    return dropped / density if rescale else dropped


def tensor_generator(seed: int, tensor_name: str, model_index: int) -> torch.Generator:
    """A generator seeded from (seed, tensor name, model): masks do not depend on the order tensors are merged in."""
    digest = hashlib.sha256(f"{seed}\0{tensor_name}\0{model_index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def drop_outliers_and_small(delta: torch.Tensor, density: float, gamma: float, rescale: bool) -> torch.Tensor:
    """Keep ⌊density·n⌋ entries: those just below the ⌊gamma·n⌋ largest magnitudes (mergekit's
    `magnitude_outliers`). `rescale` restores the task vector's L1 norm, as mergekit does."""
    if density >= 1:
        return delta
    n = delta.numel()
    keep_count = int(density * n)
    top_count = int(gamma * n)
    bottom_count = max(0, n - keep_count - top_count)  # fewer outliers are dropped when density needs them
    magnitude = delta.abs().flatten()
    if magnitude.device.type == "cpu":
        magnitude = magnitude.float()
    order = torch.sort(magnitude).indices
    mask = torch.zeros(n, dtype=torch.bool, device=delta.device)
    mask[order[bottom_count: bottom_count + keep_count]] = True
    kept = delta * mask.view(delta.shape)
    return restore_l1_norm(kept, delta) if rescale else kept
