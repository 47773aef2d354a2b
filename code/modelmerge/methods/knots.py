"""KnOTS: merge the task updates of each weight matrix in one shared SVD basis, with any merge method. An
option of every merge with an ancestor, meant for LoRA adapters (`lora-` merges), given as the method
parameter `knots` (`--x:knots true`), which the merge driver takes out before the method sees it.

Stoica, Ramesh, Ecsedi, Choshen & Hoffman, "Model Merging with SVD to Tie the KnOTS", ICLR 2025
(https://arxiv.org/abs/2410.19735). For a 2-D tensor with task updates τ_t = θ_t − θ_0 [out, in], as
FusionBench 0.2.33 aligns them (fusion_bench.method.knots.knots_utils.subspace_alignment):

    [τ_1, …, τ_T] = U · diag(S) · [V_1, …, V_T]      (thin SVD in float64; components with S ≤ 1e-4 dropped)
    θ = θ_0 + U · diag(S) · merge(V_1, …, V_T)       (the method merging the V_t as task vectors from 0)

Task arithmetic in the basis is task arithmetic (U S Σ_t V_t = Σ_t τ_t); sparsifying methods (TIES, DARE,
...) then act on aligned coordinates instead of on unrelated LoRA factors. Other tensors are merged as
without the option. Statistics describe the weights, not their coordinates, so a method given statistics
refuses the option.
"""
import torch

from .base import MethodDeclaration, Parameter, Sweep, TensorGroup

PARAMETERS = {
    "knots": Parameter(False, type=bool, help="KnOTS: merge every 2-D tensor's task updates in their shared SVD basis "
                                              "(any method with θ_0; meant for lora- merges)"),
}
SUPPORT = 1e-4  # singular values at or below this are no part of the basis (FusionBench's eps)


class Knots(MethodDeclaration):
    """KnOTS (Stoica et al., ICLR 2025), with any method given θ_0 or in a lora- merge: a shared SVD basis.

    The catalogue's entry for KnOTS: its parameter, and TIES in the shared basis."""

    name = "knots"
    kind = "modifier"
    paper = 'Stoica et al., "Model Merging with SVD to Tie the KnOTS", ICLR 2025 (https://arxiv.org/abs/2410.19735)'
    parameters = PARAMETERS
    sweeps = (Sweep("ties + knots", "density", (0.1, 0.2, 0.3, 0.5), {"merge_lambda": 1.0, "knots": True}, method="ties"),)


def shared_basis(taus: list[torch.Tensor]):
    """(U, S, [V_t]) of the thin SVD of the task updates side by side, without components of S ≤ SUPPORT,
    in the updates' dtype."""
    dtype = taus[0].dtype
    u, s, vh = torch.linalg.svd(torch.cat(taus, dim=1).to(torch.float64), full_matrices=False)
    kept = s > SUPPORT
    u, s, vh = u[:, kept].to(dtype), s[kept].to(dtype), vh[kept].to(dtype)
    return u, s, list(torch.split(vh, taus[0].shape[1], dim=1))


def merge_in_shared_basis(group: TensorGroup, merge) -> torch.Tensor:
    """θ_0 + U S · merge(the coordinates V_t, as a TensorGroup of task vectors from 0) for a 2-D `group`."""
    base = group.ancestor
    u, s, coordinates = shared_basis([x - base for x in group.tensors])
    if not len(s):  # no update above the support: nothing to merge
        return base.clone()
    merged = merge(TensorGroup(group.name, coordinates, ancestor=torch.zeros_like(coordinates[0])))
    return base + (u * s) @ merged
