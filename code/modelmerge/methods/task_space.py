"""What the data-free methods of the current field share (TSV-M, Iso-C, Iso-CTS, WUDI; EMR and MagMax use
the task vectors and the result): they treat each 2-D tensor as a matrix of task vectors τ_t = θ_t − θ_0
and give every other float tensor the mean of the τ_t; the result is θ_0 + λ·τ, computed in float32 or
better."""
import re

import torch

from .base import Parameter, TensorGroup, decomposition_cost, entries_cost
from .common import base_tensor, upcast_dtype

PARAMETERS = {
    "merge_lambda": Parameter(1.0, aliases=("lambda", "scaling_factor"), help="λ, scales the merged task vector"),
    "exclude": Parameter(None, type=str, help="regex (re.search) of 2-D tensors given the mean task vector instead"),
}


class TaskVectors:
    """τ_t = θ_t − θ_0 in float32 or better, computed when indexed (so a method going through the tasks one
    at a time holds one task vector, not T), or chunk by chunk of rows (`lazy`)."""

    def __init__(self, group: TensorGroup):
        self.ancestor = base_tensor(group)
        self.tensors = group.tensors
        self.dtype = upcast_dtype(self.ancestor.dtype)
        self.shape = tuple(self.ancestor.shape)

    def __len__(self):
        return len(self.tensors)

    def __getitem__(self, t) -> torch.Tensor:
        return self.tensors[t].to(self.dtype) - self.ancestor.to(self.dtype)

    def __iter__(self):
        return (self[t] for t in range(len(self)))

    def lazy(self, t) -> "Difference":
        """τ_t, read chunk by chunk of rows."""
        return Difference([self.tensors[t]], self.ancestor, self.dtype)

    def lazy_total(self) -> "Difference":
        """Σ_t τ_t, read chunk by chunk of rows."""
        return Difference(self.tensors, self.ancestor, self.dtype)


class Difference:
    """The matrix Σ_i (a_i − b) (in `dtype`; usually one a) that is never formed whole: indexing rows
    computes those rows, which is all the chunked products below (gram, times) read. `.T` is the
    transpose, `[:]` the whole matrix."""

    def __init__(self, minuends: list[torch.Tensor], subtrahend: torch.Tensor, dtype: torch.dtype):
        self.minuends, self.subtrahend, self.dtype = minuends, subtrahend, dtype
        self.shape, self.device = subtrahend.shape, subtrahend.device

    @property
    def T(self) -> "Difference":
        return Difference([a.T for a in self.minuends], self.subtrahend.T, self.dtype)

    def __getitem__(self, rows) -> torch.Tensor:
        below = self.subtrahend[rows].to(self.dtype)
        return total(a[rows].to(self.dtype) - below for a in self.minuends)

    def new_empty(self, *size) -> torch.Tensor:
        return torch.empty(*size, dtype=self.dtype, device=self.device)


def task_vectors(group: TensorGroup) -> TaskVectors:
    return TaskVectors(group)


def is_matrix(group: TensorGroup, exclude: str | None) -> bool:
    """Whether the tensor gets the method's matrix rule: 2-D and not matched by `exclude`."""
    return gets_matrix_rule(group.name, tuple(group.tensors[0].shape), exclude)


def gets_matrix_rule(name: str, shape: tuple[int, ...], exclude: str | None) -> bool:
    """Whether tensor `name` of `shape` gets the method's matrix rule: 2-D and not matched by `exclude`."""
    if len(shape) != 2:
        return False
    try:
        return not (exclude and re.search(exclude, name))
    except re.error as error:
        raise ValueError(f"exclude: not a regular expression: {exclude!r} ({error})") from None


def matrix_rule_cost(name, shape, inputs, exclude, decompositions) -> float:
    """MergeMethod.cost of a method that makes `decompositions` SVDs of each matrix it merges by its rule."""
    cost = entries_cost(shape, inputs)
    if gets_matrix_rule(name, shape, exclude):
        cost += decompositions * decomposition_cost(shape)
    return cost


def mean(tensors) -> torch.Tensor:
    return total(tensors) / len(tensors)


def total(tensors) -> torch.Tensor:
    """Σ_t of a sequence of tensors, accumulated in one new tensor; `TaskVectors` are summed chunk by chunk
    of rows (in the same order), so no task vector is formed whole."""
    if isinstance(tensors, TaskVectors) and tensors.shape:
        out = torch.empty(tensors.shape, dtype=tensors.dtype, device=tensors.ancestor.device)
        for rows in chunks(tensors.shape[0]):
            out[rows] = tensors.lazy_total()[rows]
        return out
    result = None
    for tensor in tensors:
        result = tensor.clone() if result is None else result.add_(tensor)
    return result


# Rows of a tall matrix taken to float64 at a time: the Gram matrices and products below are accumulated
# over such chunks, so no float64 copy of a whole (e.g. 30522 x 768 embedding) matrix is ever made.
CHUNK_ROWS = 256


def _tall(matrix: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(the matrix, or its transpose when it is wide, as a view; whether it was wide)."""
    wide = matrix.shape[0] < matrix.shape[1]
    return (matrix.T if wide else matrix), wide


def chunks(rows: int):
    """Slices of CHUNK_ROWS consecutive rows covering `rows`."""
    return (slice(start, min(start + CHUNK_ROWS, rows)) for start in range(0, rows, CHUNK_ROWS))


def gram(tall: torch.Tensor) -> torch.Tensor:
    """MᵀM in float64, accumulated over chunks of M's rows."""
    product = torch.zeros(tall.shape[1], tall.shape[1], dtype=torch.float64, device=tall.device)
    for rows in chunks(tall.shape[0]):
        chunk = tall[rows].to(torch.float64)
        product.addmm_(chunk.T, chunk)
    return product


def times(tall: torch.Tensor, right: torch.Tensor, out: torch.Tensor, finish=None) -> torch.Tensor:
    """out = finish(M @ right) computed in float64 chunk by chunk of M's rows and stored in out's dtype;
    `out` may be M itself (each chunk is read before it is written)."""
    for rows in chunks(tall.shape[0]):
        product = tall[rows].to(torch.float64) @ right
        out[rows] = product if finish is None else finish(product, rows)
    return out


def polar_and_singular_values(matrix: torch.Tensor, out: torch.Tensor | None = None):
    """(the orthogonal polar factor P Qᵀ of matrix = P Σ Qᵀ, all min(m, n) singular values Σ).

    The polar factor is the closest matrix with orthonormal columns (or rows, when it is wide), computed
    as M (MᵀM)^(-1/2) from the eigendecomposition of the small Gram matrix in float64 (several times faster
    than an SVD of a tall matrix); directions where M is singular (zero-padded blocks) are left out, which
    changes nothing where the singular values are 0. It is written into `out` (which may be `matrix`)
    when given."""
    m, wide = _tall(matrix)
    eigenvalues, vectors = torch.linalg.eigh(gram(m))
    keep = eigenvalues > eigenvalues.max().clamp(min=0) * m.shape[1] * torch.finfo(torch.float64).eps
    inverse_root = torch.where(keep, eigenvalues.clamp(min=torch.finfo(torch.float64).tiny).rsqrt(), 0)
    if out is None:
        out = torch.empty_like(matrix)
    times(m, (vectors * inverse_root) @ vectors.T, out.T if wide else out)
    return out, eigenvalues.clamp(min=0).sqrt().to(matrix.dtype)


def polar(matrix: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The orthogonal polar factor of `matrix` (see polar_and_singular_values)."""
    return polar_and_singular_values(matrix, out)[0]


def top_singular(matrix, k: int, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vᵀ) of the k largest singular triplets of `matrix` (a tensor or a `Difference`) from the
    eigendecomposition of its small Gram matrix in float64: exact enough for the leading triplets, which
    are all these methods keep, and several times faster than a full SVD of a tall matrix. Zero singular
    values get zero vectors. A tall matrix's U is written into `out` when given."""
    m, wide = _tall(matrix)
    eigenvalues, vectors = torch.linalg.eigh(gram(m))
    order = eigenvalues.argsort(descending=True)[:k]
    values = eigenvalues[order].clamp(min=0).sqrt()
    right = vectors[:, order]
    if out is None or wide:
        out = m.new_empty(m.shape[0], len(order))
    left = times(m, right, out, lambda product, rows: leading_left(product, values))
    right = right.to(matrix.dtype)
    u, vh = (right, left.T) if wide else (left, right.T)
    return u, values.to(matrix.dtype), vh


def scaled_product(left: torch.Tensor, values: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """left · diag(values) · right, chunk by chunk of rows; written into `left` when it has the product's
    shape (a square `right`), which it is no longer needed for."""
    out = left if right.shape[0] == right.shape[1] else left.new_empty(left.shape[0], right.shape[1])
    for rows in chunks(left.shape[0]):
        out[rows] = (left[rows] * values) @ right
    return out


def leading_left(product: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Left singular vectors M V / S from M V (0 where the singular value is 0)."""
    return torch.where(values > 0, product / torch.where(values > 0, values, 1), 0)


def result(group: TensorGroup, tau: torch.Tensor, merge_lambda: float) -> torch.Tensor:
    """θ_0 + λ·τ in the ancestor's dtype, computed in τ (which every caller has made for this)."""
    base = group.ancestor
    return tau.mul_(merge_lambda).add_(base.to(tau.dtype)).to(base.dtype)
