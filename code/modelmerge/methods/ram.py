"""RAM and RAM+ (tensor-local): average task-vector entries over the models that change them, keep entries
only one model changes whole (RAM+ amplifies those by how much the model shares with the others).

"Reinforced Agent Merging" (https://arxiv.org/abs/2601.13572); computed as mergekit 0.1.5's `ram` and
`ramplus_tl`.
"""
import torch

from .base import MergeMethod, Mergekit, Parameter, Sweep, TensorBlocks, TensorGroup
from .common import base_tensor, upcast_dtype
from .task_vectors import task_vector

EPSILON = Parameter(1e-5, range="[0, inf)", help="a task-vector entry counts as changed when its magnitude exceeds this")


def changes(group: TensorGroup, epsilon: float):
    """(task vectors [T, n] with unchanged entries zeroed, changed masks [T, n], count of models changing each entry)."""
    dtype = upcast_dtype(group.ancestor.dtype)
    deltas = torch.stack([task_vector(group, t).to(dtype).reshape(-1) for t in range(len(group.tensors))])
    changed = deltas.abs() > epsilon
    return deltas * changed, changed, changed.sum(dim=0, keepdim=True)


def rebuild(group: TensorGroup, merged_flat: torch.Tensor) -> torch.Tensor:
    return (group.ancestor.to(merged_flat.dtype) + merged_flat.reshape(group.ancestor.shape)).to(group.ancestor.dtype)


class Ram(MergeMethod):
    """θ = θ_0 + Σ_t τ_t ⊙ c_t / max(n, 1), c_t = [|τ_t| > ε], n = Σ_t c_t: entries changed by one model
    are taken whole, the others averaged over the models that change them."""

    name = "ram"
    mergekit = Mergekit("ancestor")
    paper = '"Reinforced Agent Merging" (https://arxiv.org/abs/2601.13572)'
    sweeps = (Sweep("ram"),)
    needs_base = True
    elementwise = True
    parameters = {"epsilon": EPSILON}

    def merge(self, group: TensorGroup, *, epsilon) -> torch.Tensor:
        base_tensor(group)
        deltas, _, counts = changes(group, epsilon)
        return rebuild(group, (deltas / counts.clamp(min=1)).sum(dim=0))


class RamPlusTensorLocal(MergeMethod):
    """As RAM, but the entries only model t changes are scaled by λ_t = 1 + r · clamp(ρ_t, 0, α), ρ_t the
    number of entries t shares with another model over the number only t changes (in this tensor; counted
    in `prepare` when the tensor is merged in blocks of rows)."""

    name = "ramplus_tl"
    mergekit = Mergekit("ancestor")
    paper = '"Reinforced Agent Merging" (https://arxiv.org/abs/2601.13572)'
    sweeps = (Sweep("ram+ (tensor-local)"),)
    needs_base = True
    elementwise = True
    parameters = {
        "r": Parameter(0.1, range="[0, inf)", help="strength of the amplification of a model's own entries"),
        "alpha": Parameter(0.2, range="[0, inf)", help="largest shared/own ratio counted"),
        "epsilon": EPSILON,
    }

    def prepare(self, blocks: TensorBlocks, *, r, alpha, epsilon) -> torch.Tensor:
        shared = own = 0
        for group in blocks:
            _, changed, counts = changes(group, epsilon)
            shared = shared + (changed & (counts > 1)).sum(dim=1)
            own = own + (changed & (counts == 1)).sum(dim=1)
        rho = shared / own.clamp(min=epsilon)
        return 1 + r * rho.clamp(min=0, max=alpha)

    def merge(self, group: TensorGroup, *, r, alpha, epsilon) -> torch.Tensor:
        base_tensor(group)
        scale = group.prepared
        if scale is None:
            scale = self.prepare(TensorBlocks.of(group), r=r, alpha=alpha, epsilon=epsilon)
        deltas, changed, counts = changes(group, epsilon)
        unique, overlap = counts == 1, counts > 1
        merged = deltas * unique * scale.to(deltas.dtype).unsqueeze(-1) + deltas * overlap / counts.clamp(min=1)
        return rebuild(group, merged.sum(dim=0))
