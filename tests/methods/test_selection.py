"""The streamed exact k-th selection (modelmerge.selection) against a brute-force sort, over thousands of
generated inputs built to be hard: many exact zeros and ties, heavy tails, samples that mislead above and
below the answer, densities near 0 and 1, three floating-point types, blocks of any size fed in any order,
and tiny memory budgets that force the counting passes. Then TIES and the trimmed statistic, which select
with it, against a dense reference on such tensors."""
import dataclasses
import math

import numpy as np
import pytest
import torch

from modelmerge import selection as selection_module
from modelmerge.methods import get_method
from modelmerge.methods import ties
from modelmerge.methods.base import TensorBlocks, TensorGroup
from modelmerge.selection import Selection, float_keys, kth_largest
from modelmerge.methods.sparsify import trim_by_magnitude

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def kth_by_sorting(values, k):
    return float(torch.sort(values.double().flatten(), descending=True).values[k - 1])


def generated_values(rng, n, dtype):
    """n values of one of several hard shapes."""
    shape = rng.integers(7)
    if shape == 0:  # heavy tails
        x = rng.standard_cauchy(n)
    elif shape == 1:  # mostly exact zeros
        x = rng.normal(size=n) * (rng.random(n) < rng.choice([0.01, 0.1, 0.5]))
    elif shape == 2:  # a few distinct levels: ties everywhere
        x = rng.integers(-3, 4, size=n).astype(float) * rng.choice([1.0, 0.5, 1e-3])
    elif shape == 3:  # a block of large values (the rows a sample may hit), the rest small
        x = rng.normal(size=n) * 1e-3
        start = rng.integers(n)
        x[start: start + max(1, n // rng.integers(2, 10))] = 1.0
    elif shape == 4:  # all equal
        x = np.full(n, rng.choice([0.0, 1.0, -2.5]))
    elif shape == 5:  # magnitudes over many orders, with signed zeros
        x = np.exp(rng.uniform(-30, 10, size=n)) * rng.choice([-1.0, 1.0], size=n)
        x[rng.random(n) < 0.2] = -0.0
    else:
        x = np.abs(rng.normal(size=n))
    x = np.clip(x, -6e4, 6e4)  # finite in float16
    return torch.from_numpy(x).to(dtype)


def generated_sample(rng, values, k):
    """A sample of `values`: evenly spaced, or built to bracket the answer too high or too low."""
    n, kind = values.numel(), rng.integers(5)
    m = min(n, int(rng.integers(1, max(2, n // 4) + 1)))
    order = torch.sort(values.double(), descending=True).indices
    if kind == 0:
        return values[torch.linspace(0, n - 1, m).round().long().unique()]
    if kind == 1:  # only values far above the answer
        return values[order[: max(1, min(m, k // 2))]]
    if kind == 2:  # only values far below it
        return values[order[n - max(1, min(m, (n - k) // 2)):]] if k < n else values[order[-1:]]
    if kind == 3:
        return values[torch.from_numpy(rng.choice(n, size=m, replace=False))]
    return values[order[min(n - 1, k - 1 + int(rng.integers(0, max(1, (n - k) // 3 + 1))))]].reshape(1)


def select_in_passes(sample, values, k, rng, max_kept=None):
    """Run a Selection over `values` fed in random blocks in a random order; (answer, passes)."""
    selection = Selection(sample, k, values.numel(), max_kept=max_kept)
    passes = 0
    while selection.answer is None:
        cuts = np.sort(rng.choice(np.arange(1, values.numel()), size=min(values.numel() - 1, int(rng.integers(0, 8))),
                                  replace=False)) if values.numel() > 1 else []
        blocks = list(torch.tensor_split(values, torch.tensor(cuts, dtype=torch.long)))
        for index in rng.permutation(len(blocks)):
            selection.feed(blocks[index])
        selection.finish_pass()
        passes += 1
        assert passes <= 6
    return selection.answer, passes


def most_passes(dtype):
    """The first pass, then at most one pass per HISTOGRAM_BITS of the key width, then one keeping the values."""
    return 2 + math.ceil((torch.finfo(dtype).bits - 1) / selection_module.HISTOGRAM_BITS)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_selection_matches_sorting_on_thousands_of_hard_inputs(dtype):
    rng = np.random.default_rng(12345 + DTYPES.index(dtype))
    for case in range(1500):
        n = int(rng.choice([1, 2, 3, 10, 100, 1000, int(rng.integers(1, 3000))]))
        values = generated_values(rng, n, dtype)
        density = float(rng.choice([1e-4, 0.01, 0.2, 0.5, 0.99, 0.9999, rng.random()]))
        k = int(rng.choice([1, n, max(1, int(density * n))]))
        sample = generated_sample(rng, values, k)
        max_kept = int(rng.choice([0, 1, 8, 100, 10**6]))
        answer, passes = select_in_passes(sample, values, k, rng, max_kept)
        expected = kth_by_sorting(values, k)
        assert answer == expected, (case, n, k, max_kept)
        assert passes <= most_passes(dtype), (case, passes)


def test_selection_on_float64_and_signed_zeros():
    rng = np.random.default_rng(5)
    for _ in range(300):
        values = generated_values(rng, int(rng.integers(1, 500)), torch.float64)
        k = int(rng.integers(1, values.numel() + 1))
        answer, passes = select_in_passes(generated_sample(rng, values, k), values, k, rng, max_kept=int(rng.integers(0, 20)))
        assert answer == kth_by_sorting(values, k) and passes <= most_passes(torch.float64)


def test_the_issue_case_terminates_with_the_exact_threshold():
    """15 % of a task vector's rows at 1.0, every sampled row among them, the rest small, density 0.2:
    the bracket lies above the answer (the old selection alternated between its two sides for ever)."""
    rows, columns = 3000, 64
    values = torch.rand(rows, columns, generator=torch.Generator().manual_seed(0)) * 1e-3
    sampled = torch.linspace(0, rows - 1, 100).round().long()
    big = torch.zeros(rows, dtype=torch.bool)
    big[sampled] = True
    big[torch.randperm(rows, generator=torch.Generator().manual_seed(1))[: int(0.15 * rows) - 100]] = True
    values[big] = 1.0
    flat, k = values.flatten(), int(0.2 * values.numel())
    for max_kept in (None, 0, 1000):
        selection = Selection(values[sampled].flatten(), k, flat.numel(), max_kept=max_kept)
        passes = 0
        while selection.answer is None:
            for block in flat.split(4096):
                selection.feed(block)
            selection.finish_pass()
            passes += 1
        assert selection.answer == kth_by_sorting(flat, k) and passes <= most_passes(torch.float32)


def test_each_pass_strictly_narrows_the_candidates():
    rng = np.random.default_rng(9)
    for _ in range(200):
        values = generated_values(rng, int(rng.integers(2, 2000)), torch.float32)
        k = int(rng.integers(1, values.numel() + 1))
        selection = Selection(generated_sample(rng, values, k), k, values.numel(), max_kept=int(rng.integers(0, 50)))
        widths = [selection.high - selection.low]
        while selection.answer is None:
            selection.feed(values)
            selection.finish_pass()
            if selection.answer is None:
                widths.append(selection.high - selection.low)
        assert all(later < earlier for earlier, later in zip(widths, widths[1:]))


def test_float_keys_order_like_the_values():
    values = torch.tensor([-math.inf, -1e30, -1.0, -1e-40, -0.0, 0.0, 1e-45, 1e-40, 1.0, 3e38, math.inf])
    keys = float_keys(values)
    assert torch.equal(keys, torch.sort(keys).values) and keys[4] == keys[5] == 0
    assert len(set(keys.tolist())) == len(values) - 1
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        assert torch.equal(float_keys(values.to(dtype)), torch.sort(float_keys(values.to(dtype))).values)


def test_selection_refuses_a_rank_outside_the_values():
    with pytest.raises(ValueError, match="0-th largest of 5"):
        Selection(torch.ones(2), 0, 5)
    with pytest.raises(ValueError, match="6-th largest of 5"):
        Selection(torch.ones(2), 6, 5)


@pytest.mark.parametrize("k", [1, 5, 300_000, 1_499_999, 1_500_000])
def test_kth_largest_on_a_large_tensor_is_exact(k):
    values = torch.randn(1_500_000, generator=torch.Generator().manual_seed(4)).abs()
    values[:200_000] = 0  # many ties at zero
    assert kth_largest(values, k) == kth_by_sorting(values, k)


# --- TIES and the trimmed statistic on such tensors --------------------------------------------------

def trimmed_reference(delta, density):
    """Every entry whose magnitude is at least the k-th largest (k = max(1, ⌊density·n⌋)), by sorting."""
    if density >= 1:
        return delta
    magnitude = delta.abs().double().flatten()
    threshold = torch.sort(magnitude, descending=True).values[max(1, int(density * magnitude.numel())) - 1]
    return delta * (magnitude >= threshold).view(delta.shape)


def ties_reference(base, thetas, densities):
    """Dense TIES with unit weights, λ = 1, normalised, sign by sum, ties broken by the tensor's majority."""
    deltas = [trimmed_reference(x - base, d).double() for x, d in zip(thetas, densities)]
    elected = torch.stack(deltas).sum(0).sign()
    majority = 1.0 if (elected > 0).sum() >= (elected < 0).sum() else -1.0
    elected[elected == 0] = majority
    agree = [(d != 0) & (d.sign() == elected) for d in deltas]
    total = sum(d * a for d, a in zip(deltas, agree))
    count = sum(a.double() for a in agree).clamp(min=1)
    return base.double() + total / count


def adversarial_group(rng, rows, columns, sampled_rows, count=3):
    """A base and models whose task vectors are large exactly on the rows a sample reads (or small there)."""
    base = torch.from_numpy(rng.normal(size=(rows, columns))).float()
    thetas = []
    for _ in range(count):
        delta = generated_values(rng, rows * columns, torch.float32).view(rows, columns) * 1e-3
        delta[sampled_rows] = float(rng.choice([1.0, 0.0, 1e-6]))
        thetas.append(base + delta)
    return base, thetas


def merged_in_blocks(method, group, params, block_rows):
    rows = group.tensors[0].shape[0]
    ranges = [slice(start, min(start + block_rows, rows)) for start in range(0, rows, block_rows)]
    blocks = TensorBlocks(group.name, tuple(group.tensors[0].shape), lambda r: group if r is None else group.rows(r), ranges)
    prepared = method.prepare(blocks, **params)
    return torch.cat([method.merge(dataclasses.replace(group.rows(r), prepared=prepared), **params) for r in ranges])


def test_ties_in_blocks_matches_dense_ties_when_the_sample_misleads(monkeypatch):
    monkeypatch.setattr(ties, "SAMPLE_SIZE", 256)  # the tensors here are larger: thresholds take passes
    rng = np.random.default_rng(3)
    method = get_method("ties")()
    for case in range(40):
        rows, columns = int(rng.integers(20, 120)), int(rng.integers(8, 40))
        sampled = torch.linspace(0, rows - 1, math.ceil(256 * rows / (rows * columns))).round().long().unique()
        base, thetas = adversarial_group(rng, rows, columns, sampled)
        monkeypatch.setattr(selection_module, "MIN_KEPT", int(rng.choice([0, 10, 1 << 16])))
        densities = [float(rng.choice([0.001, 0.2, 0.5, 0.999])) for _ in thetas]
        params = {"weight": [1.0] * 3, "density": densities, "rescale": False, "merge_lambda": 1.0, "normalize": True,
                  "consensus_method": "sum", "global_majority_sign": None, "int8_mask": False}
        got = merged_in_blocks(method, TensorGroup("w", thetas, ancestor=base), params, int(rng.integers(1, rows + 1)))
        torch.testing.assert_close(got.double(), ties_reference(base, thetas, densities), rtol=0, atol=1e-6,
                                   msg=f"case {case}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_trim_by_magnitude_matches_sorting_on_hard_inputs(dtype, monkeypatch):
    monkeypatch.setattr(selection_module, "SAMPLE_SIZE", 64)
    monkeypatch.setattr(selection_module, "MIN_KEPT", 16)
    rng = np.random.default_rng(11)
    for _ in range(200):
        delta = generated_values(rng, int(rng.integers(1, 4000)), dtype)
        density = float(rng.choice([1e-4, 0.01, 0.2, 0.9999, rng.random()]))
        assert torch.equal(trim_by_magnitude(delta, density), trimmed_reference(delta, density))
