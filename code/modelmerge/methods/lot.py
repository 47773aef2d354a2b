"""LOT Merging (layer-wise optimal task vector merging): per linear layer, the task vector whose outputs drift
least, in the least-squares sense, from every expert's outputs on that expert's own inputs.

Sun, Li, Wang, Liu, Geng & Li, "Towards Minimizing Feature Drift in Model Merging: Layer-wise Task Vector
Fusion for Adaptive Knowledge Integration", NeurIPS 2025 (https://arxiv.org/abs/2505.23859). With X_t the
inputs of a linear layer of expert t on its exemplars (one row per token) and τ_t = W_t − W_0 [out, in],

    min_τ Σ_t ‖X_t (W_0 + τ)ᵀ − X_t (W_0 + τ_t)ᵀ‖²   ⇒   τᵀ = (Σ_t X_tᵀX_t)⁺ Σ_t X_tᵀX_t τ_tᵀ,

the minimum-norm solution (the Moore–Penrose pseudoinverse ⁺), from the Gram matrices G_t = X_tᵀX_t that
RegMean uses too. Unlike RegMean it solves for the task vector: input directions no exemplar reaches keep
θ_0's weights (the task vector is 0 there) instead of a regularised average, and no off-diagonal shrinkage
is applied. Tensors that are not linear weights with a Gram statistic (biases, normalisation layers,
embeddings) get the mean of the task vectors, θ_0 + (1/T) Σ_t τ_t, the minimiser of the same drift for a
bias when every task has as many exemplar rows. The paper's closed form for a normalisation layer's scale (each dimension's task vectors weighted by
Σ x̂² of that dimension's normalised inputs) needs a statistic the project's Gram job does not compute; such
scales are averaged too.
"""
import torch

from .base import MergeMethod, Parameter, Sweep, TensorGroup
from .common import base_tensor, optional_stats
from .regmean import WORK_DTYPE, average, check_linear_gram, weights_out_in


class Lot(MergeMethod):
    """W_0 + ((Σ_t G_t)⁺ Σ_t G_t τ_tᵀ)ᵀ on linear weights with a Gram statistic, the mean task vector elsewhere."""

    name = "lot"
    paper = 'Sun et al., "Towards Minimizing Feature Drift in Model Merging", NeurIPS 2025 (https://arxiv.org/abs/2505.23859)'
    sweeps = (Sweep("lot", statistics="gram"),)  # the least-squares task vector: no hyperparameter
    aliases = ("lot_merging", "lot-merging")
    needs_base = True
    optional_stats = ("gram",)
    parameters = {
        "rcond": Parameter(None, range="[0, 1)",
                           help="eigenvalues of Σ_t G_t at or below rcond × the largest are treated as zero in the "
                                "pseudoinverse (default: torch.linalg.pinv's, size × float64 epsilon)"),
    }

    def merge(self, group: TensorGroup, *, rcond) -> torch.Tensor:
        grams = optional_stats(group, "gram")
        if grams is None:
            return average(group).to(group.tensors[0].dtype)
        if group.stored_in_out:
            return self.merge(weights_out_in(group), rcond=rcond).T
        check_linear_gram(group, grams)
        base = base_tensor(group).to(WORK_DTYPE)
        lhs = torch.zeros_like(grams[0], dtype=WORK_DTYPE)  # Σ G_t          [in, in]
        rhs = torch.zeros(base.shape[::-1], dtype=WORK_DTYPE, device=lhs.device)  # Σ G_t τ_tᵀ  [in, out]
        for gram, weight in zip(grams, group.tensors):
            gram = gram.to(WORK_DTYPE)
            lhs += gram
            rhs += gram @ (weight.to(WORK_DTYPE) - base).T
        tau_t = torch.linalg.pinv(lhs, rtol=rcond, hermitian=True) @ rhs
        return (base + tau_t.T).to(group.tensors[0].dtype)
