"""CART (centered task arithmetic): the average of the models plus a low-rank approximation of each
model's deviation from that average.

Choi, Kim, Lee & Hong, "Revisiting Weight Averaging for Model Merging", 2024
(https://arxiv.org/abs/2412.12153); defaults from the authors' 8-task ViT-B/32 configuration
(github.com/JH-GEECS/CART: rank ratio 0.12, prior 2.0).

With θ̄ = (1/T) Σ_t θ_t = θ_0 + mean_t τ_t, each 2-D tensor becomes

    θ = θ̄ + λ · Σ_t SVD_k(θ_t − θ̄),    k = max(1, ⌊rank_ratio · min(m, n)⌋)  (0 when rank_ratio = 0)

Both ends of the rank are weight averaging: at k = 0 nothing is added, and at full rank the deviations
from their mean sum to zero. Every other tensor (and a 2-D one matched by `exclude`) is the average θ̄,
which is what the full-rank deviations of the authors' code give it. θ_0 cancels out of every term, so
the method does not need it.
"""
import torch

from .base import MergeMethod, Parameter, Sweep, TensorGroup
from .common import upcast_dtype
from .task_space import PARAMETERS, Difference, chunks, gram, is_matrix, matrix_rule_cost


def kept_rank(width: int, rank_ratio: float) -> int:
    """k of the paper: ⌊rank_ratio · width⌋, at least 1 unless rank_ratio is 0."""
    return 0 if rank_ratio == 0 else max(1, int(rank_ratio * width))


def add_low_rank(deviation, k: int, out: torch.Tensor) -> torch.Tensor:
    """out += the best rank-k approximation of `deviation` (a `Difference`, read chunk by chunk of rows).

    For a tall M = U S Vᵀ that is M V_k V_kᵀ: the projection onto the top-k eigenvectors of the small
    Gram matrix MᵀM (float64, accumulated over chunks of rows); a wide M is handled as its transpose."""
    wide = deviation.shape[0] < deviation.shape[1]
    matrix, target = (deviation.T, out.T) if wide else (deviation, out)
    if k >= matrix.shape[1]:  # full rank: the deviation itself
        for rows in chunks(matrix.shape[0]):
            target[rows] += matrix[rows]
        return out
    eigenvalues, vectors = torch.linalg.eigh(gram(matrix))
    top = vectors[:, eigenvalues.argsort(descending=True)[:k]]
    projection = top @ top.T
    for rows in chunks(matrix.shape[0]):
        target[rows] += (matrix[rows].to(torch.float64) @ projection).to(out.dtype)
    return out


class Cart(MergeMethod):
    """CART on every 2-D tensor, the average of the models elsewhere."""

    name = "cart"
    paper = 'Choi, Kim, Lee & Hong, "Revisiting Weight Averaging for Model Merging", 2024 (https://arxiv.org/abs/2412.12153)'
    sweeps = (Sweep("cart", "rank_ratio", (0.04, 0.08, 0.16, 0.32), {"merge_lambda": 2.0}),)
    aliases = ("centered_task_arithmetic",)
    parameters = {
        "merge_lambda": Parameter(2.0, aliases=("lambda", "scaling_factor", "prior"),
                                  help="λ, scales the sum of the low-rank deviations (the authors' prior)"),
        "rank_ratio": Parameter(0.12, range="[0, 1]", help="share of min(m, n) singular directions kept of each deviation"),
        "exclude": PARAMETERS["exclude"],
    }

    def cost(self, name, shape, models, params):  # one eigendecomposition per model's deviation
        return matrix_rule_cost(name, shape, models, params["exclude"], models if params["rank_ratio"] else 0)

    def merge(self, group: TensorGroup, *, merge_lambda, rank_ratio, exclude) -> torch.Tensor:
        out_dtype = (group.tensors[0] if group.ancestor is None else group.ancestor).dtype
        dtype = upcast_dtype(out_dtype)
        average = sum(x.to(dtype) for x in group.tensors) / len(group.tensors)
        k = kept_rank(min(average.shape), rank_ratio) if average.dim() == 2 else 0
        if k == 0 or not is_matrix(group, exclude):
            return average.to(out_dtype)
        low_rank = torch.zeros_like(average)
        for model in group.tensors:
            add_low_rank(Difference([model], average, dtype), k, low_rank)
        return average.add_(low_rank, alpha=merge_lambda).to(out_dtype)
