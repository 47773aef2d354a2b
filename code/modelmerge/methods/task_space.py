"""What the data-free methods of the current field share (TSV-M, Iso-C, Iso-CTS, WUDI; EMR and MagMax use
the task vectors and the result): they treat each 2-D tensor as a matrix of task vectors τ_t = θ_t − θ_0
and give every other float tensor the mean of the τ_t; the result is θ_0 + λ·τ, computed in float32 or
better."""
import re

import torch

from .base import Parameter, TensorGroup
from .common import base_tensor, upcast_dtype

PARAMETERS = {
    "merge_lambda": Parameter(1.0, aliases=("lambda", "scaling_factor"), help="λ, scales the merged task vector"),
    "exclude": Parameter(None, type=str, help="regex (re.search) of 2-D tensors given the mean task vector instead"),
}


class TaskVectors:
    """τ_t = θ_t − θ_0 in float32 or better, computed when indexed (so a method going through the tasks one
    at a time holds one task vector, not T)."""

    def __init__(self, group: TensorGroup):
        self.base = base_tensor(group)
        self.tensors = group.tensors
        self.dtype = upcast_dtype(self.base.dtype)

    def __len__(self):
        return len(self.tensors)

    def __getitem__(self, t) -> torch.Tensor:
        return self.tensors[t].to(self.dtype) - self.base.to(self.dtype)

    def __iter__(self):
        return (self[t] for t in range(len(self)))


def task_vectors(group: TensorGroup) -> TaskVectors:
    return TaskVectors(group)


def is_matrix(group: TensorGroup, exclude: str | None) -> bool:
    """Whether the tensor gets the method's matrix rule: 2-D and not matched by `exclude`."""
    if group.tensors[0].dim() != 2:
        return False
    try:
        return not (exclude and re.search(exclude, group.name))
    except re.error as error:
        raise ValueError(f"exclude: not a regular expression: {exclude!r} ({error})") from None


def mean(tensors) -> torch.Tensor:
    return total(tensors) / len(tensors)


def total(tensors) -> torch.Tensor:
    """Σ_t of a sequence of tensors (a lazy one is taken one at a time), accumulated in one new tensor."""
    result = None
    for tensor in tensors:
        result = tensor.clone() if result is None else result.add_(tensor)
    return result


def polar(matrix: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor P Qᵀ of matrix = P Σ Qᵀ: the closest matrix with orthonormal columns
    (or rows, when it is wide). Computed as M (MᵀM)^(-1/2) from the eigendecomposition of the small Gram
    matrix in float64 (several times faster than an SVD of a tall matrix); directions where M is
    singular (zero-padded blocks) are left out, which changes nothing where the singular values are 0."""
    wide = matrix.shape[0] < matrix.shape[1]
    m = (matrix.T if wide else matrix).to(torch.float64)
    eigenvalues, vectors = torch.linalg.eigh(m.T @ m)
    keep = eigenvalues > eigenvalues.max().clamp(min=0) * m.shape[1] * torch.finfo(torch.float64).eps
    inverse_root = torch.where(keep, eigenvalues.clamp(min=torch.finfo(torch.float64).tiny).rsqrt(), 0)
    factor = (m @ ((vectors * inverse_root) @ vectors.T)).to(matrix.dtype)
    return factor.T if wide else factor


def top_singular(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vᵀ) of the k largest singular triplets of `matrix` from the eigendecomposition of its small
    Gram matrix in float64: exact enough for the leading triplets, which are all these methods keep, and
    several times faster than a full SVD of a tall matrix. Zero singular values get zero vectors."""
    wide = matrix.shape[0] < matrix.shape[1]
    m = (matrix.T if wide else matrix).to(torch.float64)
    eigenvalues, vectors = torch.linalg.eigh(m.T @ m)
    order = eigenvalues.argsort(descending=True)[:k]
    values = eigenvalues[order].clamp(min=0).sqrt()
    right = vectors[:, order]
    left = (m @ right) / torch.where(values > 0, values, 1)
    left = torch.where(values > 0, left, 0)
    u, vh = (right, left.T) if wide else (left, right.T)
    return u.to(matrix.dtype), values.to(matrix.dtype), vh.to(matrix.dtype)


def result(group: TensorGroup, tau: torch.Tensor, merge_lambda: float) -> torch.Tensor:
    """θ_0 + λ·τ in the ancestor's dtype."""
    base = group.base
    return (base.to(tau.dtype) + merge_lambda * tau).to(base.dtype)
