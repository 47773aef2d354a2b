"""DELLA and DELLA-linear (Deep et al., 2024; mergekit 0.1.5's della, della_linear): ours give mergekit's tensors
(its kernels, called directly, are the expectation, with the random keep decisions of both replaced by one rule),
keep each entry with a probability rising with its magnitude within its row (within its filter for conv
kernels), merge in blocks what one draw over the whole tensor gives, and refuse an epsilon leaving (0, 1)."""
import pytest
import torch

from modelmerge.methods import TensorGroup, della, get_method
from test_methods import models, randn, run_method
from test_methods_blockwise import COLUMNS, ROWS, group_for, merged_in_blocks, resolved
from test_methods_mergekit import close, mergekit


@pytest.mark.parametrize("name", ["della", "della_linear"])
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("shape", [(16, 12), (12,)])
def test_della(deterministic_draws, name, rescale, shape):
    base, thetas = models(3, shape=shape)
    parameters = dict(weight=[1.0, 0.5, 0.8], density=[0.5, 0.7, 0.4], epsilon=[0.1, 0.2, 0.05], rescale=rescale)
    ours = run_method(name, TensorGroup("x", thetas, ancestor=base), merge_lambda=0.9, **parameters)
    close(ours, mergekit(name, [base, *thetas], base_index=0, **{"lambda": 0.9}, **parameters))


def test_della_keeps_entries_with_probabilities_rising_with_magnitude():
    """Within a row the smallest entry is kept with probability density − ε, the largest with density + ε
    (frequencies over many seeds); the draws are reproducible per (seed, tensor name, model)."""
    delta = torch.arange(1.0, 11.0).repeat(3, 1)
    probabilities = della.keep_probabilities(delta, 0.5, 0.2)
    torch.testing.assert_close(probabilities[0], torch.linspace(0.3, 0.7, 10))
    group = TensorGroup("x", [delta], ancestor=torch.zeros_like(delta))
    kept = torch.stack([run_method("della_linear", group, density=0.5, epsilon=0.2, rescale=False, seed=s) != 0
                        for s in range(400)]).double().mean(dim=(0, 1))
    torch.testing.assert_close(kept, torch.linspace(0.3, 0.7, 10, dtype=torch.float64), atol=0.06, rtol=0)
    again = run_method("della_linear", group, density=0.5, epsilon=0.2, seed=3)
    assert torch.equal(again, run_method("della_linear", group, density=0.5, epsilon=0.2, seed=3))
    other = TensorGroup("y", [delta], ancestor=torch.zeros_like(delta))
    assert not torch.equal(again, run_method("della_linear", other, density=0.5, epsilon=0.2, seed=3))


def test_della_ranks_entries_within_each_row_ties_in_column_order():
    """Each entry's position in its row sorted ascending (a stable sort: equal magnitudes in column order),
    counted by brute force; the CPU's float32 sort of packed keys and torch's argsort (float64) agree."""
    magnitudes = randn(6, 41, seed=5).abs().mul(4).round().div(4)  # many ties, zeros among them
    expected = torch.tensor([[float(sum(v < row[j] for v in row) + sum(v == row[j] for v in row[:j])) for j in range(len(row))]
                             for row in magnitudes.tolist()])
    for values in (magnitudes, magnitudes.double()):
        order = della.row_order(values)
        positions = torch.empty_like(order).scatter_(1, order, torch.arange(41).expand_as(order))
        assert torch.equal(positions.float(), expected)


def test_della_ranks_a_conv_kernel_within_each_filter():
    """ViT/CLIP patch embeddings are 4-D [filters, channels, h, w]: DELLA ranks |δ| within each filter."""
    delta = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    found = della.keep_probabilities(delta, density=0.5, epsilon=0.1)
    flat = delta.reshape(4, -1).abs()
    ranks = flat.argsort(1).argsort(1).double()
    torch.testing.assert_close(found, (0.4 + ranks / 11 * 0.2).reshape(delta.shape).to(found.dtype))


def test_della_rejects_an_epsilon_leaving_the_unit_interval():
    base, thetas = models(2)
    with pytest.raises(ValueError, match="epsilon must leave density ± epsilon inside"):
        run_method("della", TensorGroup("x", thetas, ancestor=base), density=0.2, epsilon=0.3)


@pytest.mark.parametrize("shape", [(ROWS, COLUMNS), (ROWS * COLUMNS,)])
def test_della_in_blocks_draws_what_one_draw_over_the_whole_tensor_gives(shape):
    """Each model's keep decisions: one uniform draw over the whole tensor from its generator against the
    rank-based probabilities (a 1-D tensor ranked as one row, even when merged in blocks), then the L1
    rescale; della_linear is θ_0 + Σ_t w_t τ'_t."""
    from modelmerge.methods.della import keep_probabilities
    from modelmerge.methods.sparsify import tensor_generator
    method = get_method("della_linear")()
    group = group_for("della_linear", shape=shape)
    params = resolved(method, 3, {"density": [0.5, 0.3, 0.7], "epsilon": 0.1, "seed": 4, "weight": [1.0, 0.5, 2.0]})
    whole = method.merge(group, **params)
    assert torch.equal(merged_in_blocks(method, group, params, block_rows=ROWS * 7 if len(shape) == 1 else 7), whole)
    expected = group.ancestor.clone()
    for t, (theta, density, weight) in enumerate(zip(group.tensors, [0.5, 0.3, 0.7], [1.0, 0.5, 2.0])):
        tau = theta - group.ancestor
        uniform = torch.rand(shape, generator=tensor_generator(4, group.name, t))
        kept = tau * (uniform < keep_probabilities(tau, density, 0.1))
        expected += weight * kept * (tau.abs().sum() / kept.abs().sum())
    torch.testing.assert_close(whole, expected, rtol=1e-5, atol=1e-6)
