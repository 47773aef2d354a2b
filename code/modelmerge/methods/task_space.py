"""What the data-free methods of the current field share (TSV-M, Iso-C, Iso-CTS, WUDI): they treat each
2-D tensor as a matrix of task vectors τ_t = θ_t − θ_0 and give every other float tensor the mean of
the τ_t; the result is θ_0 + λ·τ, computed in float32 or better."""
import re

import torch

from .base import Parameter, TensorGroup
from .common import base_tensor, upcast_dtype

PARAMETERS = {
    "merge_lambda": Parameter(1.0, aliases=("lambda", "scaling_factor"), help="λ, scales the merged task vector"),
    "exclude": Parameter(None, type=str, help="regex (re.search) of 2-D tensors given the mean task vector instead"),
}


def task_vectors(group: TensorGroup) -> list[torch.Tensor]:
    """τ_t = θ_t − θ_0 in float32 or better."""
    base = base_tensor(group)
    dtype = upcast_dtype(base.dtype)
    return [x.to(dtype) - base.to(dtype) for x in group.tensors]


def is_matrix(group: TensorGroup, exclude: str | None) -> bool:
    """Whether the tensor gets the method's matrix rule: 2-D and not matched by `exclude`."""
    if group.tensors[0].dim() != 2:
        return False
    try:
        return not (exclude and re.search(exclude, group.name))
    except re.error as error:
        raise ValueError(f"exclude: not a regular expression: {exclude!r} ({error})") from None


def mean(tensors: list[torch.Tensor]) -> torch.Tensor:
    return sum(tensors) / len(tensors)


def polar(matrix: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor P Qᵀ of matrix = P Σ Qᵀ: the closest matrix with orthonormal columns
    (or rows, when it is wide)."""
    p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    return p @ qh


def result(group: TensorGroup, tau: torch.Tensor, merge_lambda: float) -> torch.Tensor:
    """θ_0 + λ·τ in the ancestor's dtype."""
    base = group.base
    return (base.to(tau.dtype) + merge_lambda * tau).to(base.dtype)
