"""Methods of issue 19 (CART, PCB-merging, TATR): each against a dense reference written here from its
paper's formula and its authors' code (NumPy, float64), and the properties the papers state."""
import numpy as np
import pytest
import torch

from modelmerge.methods import TensorGroup
from test_methods import as_np, models, run_method

SHAPE = (12, 9)


# --- CART ------------------------------------------------------------------------------------------

def reference_cart(thetas, rank_ratio, merge_lambda):
    """θ̄ + λ Σ_t SVD_k(θ_t − θ̄), k = max(1, ⌊r·min(m, n)⌋), from full SVDs."""
    thetas = [as_np(x) for x in thetas]
    average = np.mean(thetas, axis=0)
    k = max(1, int(rank_ratio * min(average.shape)))
    low_rank = np.zeros_like(average)
    for theta in thetas:
        u, s, vh = np.linalg.svd(theta - average, full_matrices=False)
        low_rank += (u[:, :k] * s[:k]) @ vh[:k]
    return average + merge_lambda * low_rank


@pytest.mark.parametrize("shape", [SHAPE, (5, 11)])
@pytest.mark.parametrize("rank_ratio", [0.12, 0.3, 0.5])
def test_cart_follows_the_paper(shape, rank_ratio):
    base, thetas = models(4, shape=shape)
    merged = run_method("cart", TensorGroup("w", thetas, base=base), rank_ratio=rank_ratio, merge_lambda=1.7)
    np.testing.assert_allclose(as_np(merged), reference_cart(thetas, rank_ratio, 1.7), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rank_ratio", [0.0, 1.0])
def test_cart_at_rank_zero_and_full_rank_is_weight_averaging(rank_ratio):
    base, thetas = models(3, shape=SHAPE)
    merged = run_method("cart", TensorGroup("w", thetas, base=base), rank_ratio=rank_ratio, merge_lambda=2.0)
    np.testing.assert_allclose(as_np(merged), np.mean([as_np(x) for x in thetas], axis=0), rtol=1e-6, atol=1e-6)


def test_cart_keeps_one_direction_at_least():
    base, thetas = models(3, shape=SHAPE)
    merged = run_method("cart", TensorGroup("w", thetas, base=base), rank_ratio=0.01, merge_lambda=1.0)
    average = np.mean([as_np(x) for x in thetas], axis=0)
    np.testing.assert_allclose(as_np(merged), reference_cart(thetas, 0.01, 1.0), rtol=1e-5, atol=1e-6)
    assert 1 <= np.linalg.matrix_rank(as_np(merged) - average, tol=1e-5) <= 3


def test_cart_gives_other_and_excluded_tensors_the_average():
    base, thetas = models(3, shape=(7,))
    np.testing.assert_allclose(as_np(run_method("cart", TensorGroup("b", thetas, base=base))),
                               np.mean([as_np(x) for x in thetas], axis=0), rtol=1e-6)
    base, thetas = models(3, shape=SHAPE)
    merged = run_method("cart", TensorGroup("embeddings.word", thetas, base=base), exclude="^embed")
    np.testing.assert_allclose(as_np(merged), np.mean([as_np(x) for x in thetas], axis=0), rtol=1e-6)


def test_cart_needs_no_ancestor_and_accumulates_over_chunks(monkeypatch):
    from modelmerge.methods import task_space
    monkeypatch.setattr(task_space, "CHUNK_ROWS", 7)
    for shape in [(40, 9), (9, 40)]:
        _, thetas = models(3, shape=shape)
        merged = run_method("cart", TensorGroup("w", thetas), rank_ratio=0.3, merge_lambda=2.0)
        np.testing.assert_allclose(as_np(merged), reference_cart(thetas, 0.3, 2.0), rtol=1e-5, atol=1e-6)



# --- PCB-merging -----------------------------------------------------------------------------------

def reference_pcb(base, thetas, ratio, clamp_ratio, merge_lambda):
    """The authors' pcb-merging.py on one tensor, with sorted copies for the quantiles (NumPy, float64)."""
    taus = np.stack([(as_np(x) - as_np(base)).ravel() for x in thetas])
    n, d = taus.shape

    def normalize(x):
        low, high = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
        return np.where(high > low, (x - low) / np.where(high > low, high - low, 1), 0.0)

    ordered = np.sort(np.abs(taus), axis=1)
    magnitude = np.clip(np.abs(taus), ordered[:, [int(d * clamp_ratio)]], ordered[:, [int(d * (1 - clamp_ratio)) - 1]])
    clamped = np.sign(taus) * magnitude
    balance = np.exp(n * normalize(magnitude) ** 2) * np.tanh(taus * taus.sum(axis=0))
    floor = np.sort(balance, axis=1)[:, [int(d * (1 - ratio))]]
    scale = normalize(np.maximum(balance, floor))
    merged = (clamped * scale).sum(axis=0) / np.maximum(scale.sum(axis=0), 1e-12)
    return as_np(base) + merge_lambda * merged.reshape(base.shape)


@pytest.mark.parametrize("shape,ratio,clamp_ratio", [(SHAPE, 0.1, 0.0001), (SHAPE, 0.3, 0.05), ((7,), 0.5, 0.0), ((40, 9), 0.05, 0.01)])
def test_pcb_follows_the_authors_definition(shape, ratio, clamp_ratio):
    base, thetas = models(4, shape=shape)
    merged = run_method("pcb", TensorGroup("w", thetas, base=base), pcb_ratio=ratio, clamp_ratio=clamp_ratio,
                        merge_lambda=1.2)
    np.testing.assert_allclose(as_np(merged), reference_pcb(base, thetas, ratio, clamp_ratio, 1.2), rtol=1e-5, atol=1e-6)


def test_pcb_keeps_the_top_ratio_of_each_task_and_averages_within_the_range_of_the_kept_values():
    base, thetas = models(3, shape=(20, 10))
    taus = [x - base for x in thetas]
    merged = run_method("pcb", TensorGroup("w", thetas, base=base), pcb_ratio=0.2, clamp_ratio=0.0) - base
    # each task contributes at most its 0.2·200 − 1 = 39 entries strictly above its threshold
    assert 0 < int((merged != 0).sum()) <= 3 * 39
    # a weighted mean of the tasks' values at every entry: between their smallest and largest
    stacked = torch.stack(taus)
    kept = merged != 0
    assert bool((merged[kept] <= stacked.max(0).values[kept] + 1e-6).all())
    assert bool((merged[kept] >= stacked.min(0).values[kept] - 1e-6).all())


def test_pcb_of_identical_task_vectors_keeps_the_top_ratio_of_their_balance():
    """All tasks equal: the weights cancel in the weighted mean, so the kept entries are τ itself."""
    base, (theta,) = models(1, shape=(10, 10))
    merged = run_method("pcb", TensorGroup("w", [theta] * 3, base=base), pcb_ratio=0.3, clamp_ratio=0.0) - base
    tau = theta - base
    kept = merged != 0
    assert int(kept.sum()) == 29  # the entries strictly above the 70th of 100 ordered balancing weights
    torch.testing.assert_close(merged[kept], tau[kept])



# --- TATR (its tensors are FusionBench's: tests/test_methods_fusion_bench.py) ----------------------

@pytest.mark.parametrize("quantile", [0.99, 0.5])
def test_tatr_masks_the_most_conflicting_entries(quantile):
    base, thetas = models(3, shape=SHAPE)
    taus = np.stack([as_np(x) - as_np(base) for x in thetas])
    omega = np.abs(taus).sum(axis=0) ** 2 - (taus ** 2).sum(axis=0)  # Σ_i Σ_(j≠i) |τ_i||τ_j|
    threshold = np.sort(omega.ravel())[int(omega.size * quantile)]
    expected = as_np(base) + 0.4 * taus.sum(axis=0) * (omega < threshold)
    merged = run_method("tatr", TensorGroup("w", thetas, base=base), threshold_quantile=quantile, merge_lambda=0.4)
    np.testing.assert_allclose(as_np(merged), expected, rtol=1e-5, atol=1e-6)


def test_tatr_of_one_task_has_no_conflict_to_keep():
    base, thetas = models(1, shape=SHAPE)
    torch.testing.assert_close(run_method("tatr", TensorGroup("w", thetas, base=base)), base)


# --- through code/merge.py -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from tiny import make_tiny_bert, perturbed_copy
    root = tmp_path_factory.mktemp("recent")
    base = make_tiny_bert(str(root / "base"), seed=0)
    return base, [perturbed_copy(base, str(root / f"ft{i}"), seed=i, scale=0.05) for i in (1, 2, 3)]


def merged_tensors(folder):
    from safetensors.torch import load_file
    import glob
    return {k: v for path in sorted(glob.glob(f"{folder}/*.safetensors")) for k, v in load_file(path).items()}


@pytest.mark.parametrize("method,parameters", [("cart", ["--x:rank_ratio", "0.25", "--x:prior", "1.5"]),
                                               ("pcb", ["--x:pcb_ratio", "0.2", "--x:merge_lambda", "1.2"]),
                                               ("tatr", ["--x:threshold_quantile", "0.9"])])
def test_merge_program_writes_the_method_tensor_by_tensor(zoo, tmp_path, method, parameters):
    import merge as merge_program
    from modelmerge.merging.cli import run_cli
    base, models_ = zoo
    run_cli(merge_program.main, ["--merge", method, "--models", *models_, "--ancestor", base, *parameters,
                                 "--output", str(tmp_path / "out"), "--no_progress"])
    out, inputs, ancestor = merged_tensors(tmp_path / "out"), [merged_tensors(m) for m in models_], merged_tensors(base)
    params = dict(zip(parameters[::2], parameters[1::2]))
    for name, tensor in out.items():
        group = TensorGroup(name, [m[name] for m in inputs], base=ancestor[name])
        if not tensor.is_floating_point() or all(torch.equal(m[name], ancestor[name]) for m in inputs):
            continue
        expected = run_method(method, group, **{k[len("--x:"):].replace("prior", "merge_lambda"): float(v)
                                                 for k, v in params.items()})
        torch.testing.assert_close(tensor, expected.to(tensor.dtype), rtol=1e-5, atol=1e-6)


def test_help_lists_the_methods(capsys):
    import merge as merge_program
    with pytest.raises(SystemExit):
        merge_program.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "\n  cart (also centered_task_arithmetic)" in text
    assert "--x:rank_ratio (float; in [0, 1]; default 0.12)" in text
    assert "\n  pcb (also pcb_merging, pcb-merging)  needs θ_0" in text
    assert "--x:pcb_ratio (float; in (0, 1]; default 0.1)" in text
    assert "\n  tatr (also trust_region, task_arithmetic_trust_region)  needs θ_0" in text
    assert "\n  lot (also lot_merging, lot-merging)  needs θ_0" in text
    assert "--x:rcond (float; in [0, 1); default None)" in text
