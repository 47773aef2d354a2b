"""Methods merged in blocks of rows give exactly (bit for bit) what they give on whole tensors, including
TIES, whose thresholds, rescale factors and majority sign are computed from the whole tensor in `prepare`."""
import dataclasses
import math

import pytest
import torch

from modelmerge.methods import MERGE_METHODS, TensorGroup, get_method
from modelmerge.methods import sparsify
from modelmerge.methods.base import TensorBlocks
from test_methods import randn

ROWS, COLUMNS = 300, 129  # 38,700 entries: more than TIES samples, so its thresholds take a pass over blocks
BLOCK_ROWS = 7  # odd, so blocks end in the middle of vectorised loops


def group_for(name, shape=(ROWS, COLUMNS), count=3, dtype=torch.float32, trimmed=False):
    base = randn(*shape, seed=0)
    thetas = [base + 0.1 * randn(*shape, seed=1 + t) for t in range(count)]
    stats = [{"fisher": randn(*shape, seed=10 + t).abs()} for t in range(count)]
    if trimmed:
        stats = [{"trimmed": sparsify.trim_by_magnitude(x - base, 0.3)} for x in thetas]
    if name in ("passthrough", "nearswap"):
        thetas, stats = thetas[:1], stats[:1]
    return TensorGroup(name, [x.to(dtype) for x in thetas], ancestor=base.to(dtype), statistics=stats,
                       ancestor_statistics={"fisher": randn(*shape, seed=19).abs()})


def resolved(method, count, overrides):
    params = {}
    for key, parameter in method.parameters.items():
        value = overrides.get(key, parameter.default)
        params[key] = [value] * count if parameter.per_model and not isinstance(value, list) else value
    return params


def merged_in_blocks(method, group, params, block_rows=BLOCK_ROWS):
    """What the merge driver does for an elementwise method: prepare over the blocks, then merge each."""
    rows = group.tensors[0].shape[0]
    ranges = [slice(start, min(start + block_rows, rows)) for start in range(0, rows, block_rows)]
    blocks = TensorBlocks(group.name, tuple(group.tensors[0].shape), lambda r: group if r is None else group.rows(r), ranges)
    prepared = method.prepare(blocks, **params)
    return torch.cat([method.merge(dataclasses.replace(group.rows(r), prepared=prepared), **params) for r in ranges])


CASES = [
    ("linear", {"weight": [0.2, 0.5, 1.3]}),
    ("linear", {"weight": [0.2, 0.5, 1.3], "normalize": False}),
    ("task_arithmetic", {"weight": [1.0, 0.5, 2.0], "merge_lambda": 0.3}),
    ("fisher", {"weight": [1.0, 2.0, 0.5], "fisher_floor": 1e-6}),
    ("uncertainty_based_gradient_matching", {"scaling_factor": 0.7, "scaling_factor_pt": 25000.0,
                                             "scaling_factors_ft": [112000.0, 8530.0, 67349.0]}),
    ("passthrough", {"scale": 0.5}),
    ("ties", {"density": [0.2, 0.5, 0.9]}),
    ("ties", {"density": 0.3, "weight": [1.0, 0.6, 1.5], "merge_lambda": 0.8, "normalize": False}),
    ("ties", {"density": 0.3, "consensus_method": "count"}),
    ("ties", {"density": 0.3, "global_majority_sign": -1}),
    ("ties", {"density": 0.3, "rescale": True}),
    ("ties", {"density": [0.0, 1.0, 0.4], "consensus_method": None}),
    ("ram", {"epsilon": 0.05}),
    ("model_stock", {}),
    ("model_stock", {"filter_wise": True}),
    ("ramplus_tl", {"epsilon": 0.05, "r": 0.5, "alpha": 1.0}),
    ("nearswap", {"t": 0.05}),
    ("magmax", {"merge_lambda": 0.7}),
    ("consensus", {"tall_mask_lambda": [0.4, 0.6, 0.5], "k": 2}),
    ("tall_masks", {"merge_lambda": 0.4}),
    ("emr", {"merge_lambda": 0.9}),
    ("della", {"density": [0.5, 0.3, 1.0], "epsilon": 0.1}),
    ("della", {"density": 0.4, "epsilon": 0.2, "rescale": False, "seed": 3}),
    ("della_linear", {"density": [0.6, 0.0, 0.5], "epsilon": 0.05}),
    ("wudi", {"iterations": 30, "learning_rate": 1e-3}),
    ("wudi", {"iterations": 5, "exclude": "^w"}),
    ("sce", {"select_topk": 0.3}),
    ("sce", {"select_topk": 1.0}),
    ("sce", {"select_topk": 0.0}),
]
# WUDI's Gram matrices are sums over rows, accumulated block by block: equal to rounding, not bit for bit.
ROUNDED_IN_BLOCKS = {"wudi"}


@pytest.mark.parametrize("name,overrides", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_elementwise_methods_give_the_same_result_in_blocks(name, overrides, dtype):
    method = get_method(name)()
    group = group_for(name, dtype=dtype)
    params = resolved(method, len(group.tensors), overrides)
    whole = method.merge(group, **params)
    if name in ROUNDED_IN_BLOCKS:
        torch.testing.assert_close(merged_in_blocks(method, group, params), whole, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(merged_in_blocks(method, group, params), whole)
    assert torch.equal(merged_in_blocks(method, group, params, block_rows=ROWS), whole)


def test_every_elementwise_method_is_tested_in_blocks():
    assert {cls.name for cls in MERGE_METHODS.values() if cls.elementwise} == {name for name, _ in CASES}


def test_ties_in_blocks_with_given_trimmed_task_vectors_and_small_tensors():
    method = get_method("ties")()
    for group in (group_for("ties", trimmed=True), group_for("ties", shape=(37, 5))):
        params = resolved(method, 3, {"density": 0.3, "rescale": True})
        assert torch.equal(merged_in_blocks(method, group, params), method.merge(group, **params))


def test_ties_breaks_a_tie_between_non_zero_values_with_the_majority_of_the_whole_tensor():
    """Row 0 (its own block) cancels exactly in one entry; every other elected sign is negative, so the
    tensor's majority is -1 and the first model's +1 there does not count."""
    base = torch.zeros(ROWS, COLUMNS)
    first = torch.zeros(ROWS, COLUMNS)
    first[0, 0] = 1.0
    second = -torch.ones(ROWS, COLUMNS)
    second[0, 0] = -1.0
    group = TensorGroup("w", [first, second], ancestor=base)
    method = get_method("ties")()
    params = resolved(method, 2, {"normalize": False})
    whole = method.merge(group, **params)
    assert whole[0, 0] == -1.0 and whole[1, 1] == -1.0
    assert torch.equal(merged_in_blocks(method, group, params), whole)


def test_ties_reads_the_blocks_once_for_thresholds_and_again_only_for_a_contested_tie():
    method = get_method("ties")()
    group = group_for("ties")
    reads = []

    def read(rows):
        reads.append(rows)
        return group if rows is None else group.rows(rows)

    ranges = [slice(start, start + 100) for start in range(0, ROWS, 100)]
    params = resolved(method, 3, {"density": 0.2})
    plan = method.prepare(TensorBlocks("w", (ROWS, COLUMNS), read, ranges), **params)
    assert sum(isinstance(r, slice) for r in reads) == len(ranges)  # one pass, for the thresholds
    for rows in ranges:
        method.merge(dataclasses.replace(group.rows(rows), prepared=plan), **params)
    assert sum(isinstance(r, slice) for r in reads) == len(ranges)  # no tie between non-zero values: no majority
    assert plan.majority() == 1.0 and sum(isinstance(r, slice) for r in reads) == 2 * len(ranges)


def test_tensor_blocks_sample_spreads_rows_and_reads_small_tensors_whole():
    group = group_for("ties")
    blocks = TensorBlocks.of(group)
    sample = blocks.sample(1000)
    rows = sample.tensors[0].shape[0]
    assert rows == math.ceil(1000 / COLUMNS)
    assert torch.equal(sample.tensors[0][0], group.tensors[0][0]) and torch.equal(sample.tensors[0][-1], group.tensors[0][-1])
    assert blocks.sample(ROWS * COLUMNS) is group


def test_sce_in_blocks_takes_the_first_entries_tied_at_the_kth_variance():
    """Task vectors of -1/0/1 have few distinct variances, so many entries tie at the k-th largest; the
    selection keeps the first of them in flat order, in blocks as on the whole tensor, and the result is
    SCE's formula written out with that selection."""
    generator = torch.Generator().manual_seed(5)
    base = torch.zeros(ROWS, COLUMNS)
    thetas = [torch.randint(-1, 2, (ROWS, COLUMNS), generator=generator).float() for _ in range(3)]
    group = TensorGroup("w", thetas, ancestor=base)
    method = get_method("sce")()
    params = {"select_topk": 0.3, "int8_mask": False}
    whole = method.merge(group, **params)
    assert torch.equal(merged_in_blocks(method, group, params), whole)

    taus = torch.stack(thetas)
    variance = taus.var(dim=0, unbiased=False).flatten()
    k = int(torch.count_nonzero(variance) * 0.3)
    assert (variance == variance.sort(descending=True).values[k - 1]).sum() > 1  # the case tested: a tie
    mask = torch.zeros(ROWS * COLUMNS)
    mask[variance.argsort(descending=True, stable=True)[:k]] = 1
    selected = taus * mask.view(ROWS, COLUMNS)
    energy = selected.square().mean(dim=(1, 2))
    weights = (energy / energy.sum()).view(-1, 1, 1)
    sign = torch.where(selected.sum(0) >= 0, 1.0, -1.0)
    agrees = (selected.sign() == sign) * weights
    expected = (selected * agrees).sum(0) / agrees.sum(0).clamp(min=1e-6)
    torch.testing.assert_close(whole, expected, rtol=1e-6, atol=1e-7)


def test_wudi_optimises_a_wide_matrix_whole_and_hands_out_its_blocks():
    """A wide matrix (its blocks would hold few rows) is optimised whole in prepare: in blocks bit for bit
    what it is whole, and that is Adam on the paper's loss (autograd, as the authors)."""
    method = get_method("wudi")()
    group = group_for("wudi", shape=(60, COLUMNS))
    params = resolved(method, 3, {"iterations": 20, "learning_rate": 1e-3})
    whole = method.merge(group, **params)
    assert torch.equal(merged_in_blocks(method, group, params), whole)
    taus = [(x - group.ancestor).double() for x in group.tensors]
    merged = torch.nn.Parameter(sum(taus).clone())
    optimizer = torch.optim.Adam([merged], lr=1e-3)
    for _ in range(20):
        optimizer.zero_grad()
        sum(((merged - t) @ t.T).square().sum() / t.square().sum() for t in taus).backward()
        optimizer.step()
    torch.testing.assert_close(whole.double(), group.ancestor.double() + merged.detach(), rtol=1e-4, atol=1e-5)
