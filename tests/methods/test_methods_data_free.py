"""The data-free methods of the current field (TSV-M, Iso-C, Iso-CTS, WUDI, MagMax, consensus/TALL, CART,
PCB-merging, TATR): each against a dense reference written here from its paper's formula and, where they differ,
its authors' code (NumPy, float64), and the properties the papers prove or state (orthogonal factors, flat
spectra, T = 1 gives θ_0 + λτ)."""
import numpy as np
import pytest
import torch

from modelmerge.methods import TensorGroup
from test_methods import as_np, models, run_method

SHAPE = (12, 9)  # min(m, n) = 9: with 3 tasks each keeps 3 singular vectors, with 4 tasks 2 (one left unused)


def np_task_vectors(base, thetas):
    return [as_np(x) - as_np(base) for x in thetas]


def np_polar(matrix):
    p, _, qh = np.linalg.svd(matrix, full_matrices=False)
    return p @ qh


def reference_tsv_m(taus):
    m, n = taus[0].shape
    k = min(m, n) // len(taus)
    us, ss, vhs = zip(*(np.linalg.svd(tau, full_matrices=False) for tau in taus))
    stacked_u = np.zeros((m, min(m, n)))
    stacked_s = np.zeros(min(m, n))
    stacked_vh = np.zeros((min(m, n), n))
    for t in range(len(taus)):
        stacked_u[:, t * k:(t + 1) * k] = us[t][:, :k]
        stacked_s[t * k:(t + 1) * k] = ss[t][:k]
        stacked_vh[t * k:(t + 1) * k] = vhs[t][:k]
    return np_polar(stacked_u) @ np.diag(stacked_s) @ np_polar(stacked_vh), stacked_s


@pytest.mark.parametrize("count", [3, 4])
def test_tsv_m_follows_the_paper_and_its_factors_are_orthogonal(count):
    base, thetas = models(count, shape=SHAPE)
    merged = run_method("tsv_m", TensorGroup("w", thetas, ancestor=base), merge_lambda=0.7)
    expected, singular_values = reference_tsv_m(np_task_vectors(base, thetas))
    np.testing.assert_allclose(as_np(merged), as_np(base) + 0.7 * expected, rtol=1e-4, atol=1e-5)
    # orthonormal polar factors: the merged task vector's singular values are exactly the kept ones
    tau = (as_np(merged) - as_np(base)) / 0.7
    np.testing.assert_allclose(np.linalg.svd(tau, compute_uv=False), np.sort(singular_values)[::-1], rtol=1e-4, atol=1e-5)
    assert np.linalg.matrix_rank(tau, tol=1e-4) == (min(SHAPE) // count) * count


@pytest.mark.parametrize("name", ["tsv_m", "iso_c", "iso_cts", "wudi"])
def test_other_tensors_get_the_mean_task_vector(name):
    base, thetas = models(3, shape=(7,))
    expected = as_np(base) + 0.5 * np.mean(np_task_vectors(base, thetas), axis=0)
    np.testing.assert_allclose(as_np(run_method(name, TensorGroup("b", thetas, ancestor=base), merge_lambda=0.5)), expected,
                               rtol=1e-5, atol=1e-6)


def test_exclude_gives_matching_matrices_the_mean():
    base, thetas = models(3, shape=SHAPE)
    merged = run_method("tsv_m", TensorGroup("embeddings.word", thetas, ancestor=base), exclude="^embed")
    np.testing.assert_allclose(as_np(merged), as_np(base) + np.mean(np_task_vectors(base, thetas), axis=0), rtol=1e-5)
    with pytest.raises(ValueError, match="exclude: not a regular expression"):
        run_method("tsv_m", TensorGroup("w", thetas, ancestor=base), exclude="(")


def test_iso_c_flattens_the_spectrum_of_the_summed_task_vectors():
    base, thetas = models(3, shape=SHAPE)
    merged = run_method("iso_c", TensorGroup("w", thetas, ancestor=base))
    total = sum(np_task_vectors(base, thetas))
    u, s, vh = np.linalg.svd(total, full_matrices=False)
    np.testing.assert_allclose(as_np(merged), as_np(base) + u @ np.diag(np.full_like(s, s.mean())) @ vh, rtol=1e-4, atol=1e-5)
    spectrum = np.linalg.svd(as_np(merged) - as_np(base), compute_uv=False)
    np.testing.assert_allclose(spectrum, np.full_like(spectrum, s.mean()), rtol=1e-4)


def reference_iso_cts(taus, fraction):
    m, n = taus[0].shape
    width, count = min(m, n), len(taus)
    k_c = width - round((width - int(width * fraction)) / count) * count
    k_t = (width - k_c) // count
    u, s, vh = np.linalg.svd(sum(taus), full_matrices=False)
    blocks_u, blocks_s, blocks_vh = [], [], []
    for tau in taus:
        own = tau - u[:, :k_c] @ u[:, :k_c].T @ tau
        ou, os_, ovh = np.linalg.svd(own, full_matrices=False)
        blocks_u.append(ou[:, :k_t]), blocks_s.append(os_[:k_t]), blocks_vh.append(ovh[:k_t])
    stacked_u = np.concatenate(blocks_u + [u[:, :k_c]], axis=1)
    stacked_s = np.concatenate(blocks_s + [s[:k_c]])
    stacked_vh = np.concatenate(blocks_vh + [vh[:k_c]], axis=0)
    return np_polar(stacked_u) @ np_polar(stacked_vh) * stacked_s.mean(), k_c


@pytest.mark.parametrize("fraction", [0.8, 0.5, 0.0, 1.0])
def test_iso_cts_follows_the_paper(fraction):
    base, thetas = models(3, shape=SHAPE)
    merged = run_method("iso_cts", TensorGroup("w", thetas, ancestor=base), common_space_fraction=fraction)
    expected, k_c = reference_iso_cts(np_task_vectors(base, thetas), fraction)
    assert k_c == {0.8: 9 - 3, 0.5: 9 - 6, 0.0: 0, 1.0: 9}[fraction]
    np.testing.assert_allclose(as_np(merged), as_np(base) + expected, rtol=1e-4, atol=1e-5)
    spectrum = np.linalg.svd(expected, compute_uv=False)
    np.testing.assert_allclose(spectrum, np.full_like(spectrum, spectrum[0]), rtol=1e-4)  # isotropic, full rank


def test_wudi_is_adam_on_the_papers_loss():
    """The paper's loss differentiated by autograd and stepped by torch's Adam (the authors' code) gives
    our iterates; the loss falls."""
    base, thetas = models(3, shape=SHAPE)
    taus = [(x - base).double() for x in thetas]

    def loss(tau):
        return sum(((tau - t) @ t.T).square().sum() / t.square().sum() for t in taus)

    merged = torch.nn.Parameter(sum(taus).clone())
    optimizer = torch.optim.Adam([merged], lr=1e-3)
    for _ in range(40):
        optimizer.zero_grad()
        loss(merged).backward()
        optimizer.step()
    group = TensorGroup("w", [x.double() for x in thetas], ancestor=base.double())
    ours = run_method("wudi", group, iterations=40, learning_rate=1e-3)
    torch.testing.assert_close(ours - base.double(), merged.detach(), rtol=1e-6, atol=1e-8)
    assert loss(ours - base.double()) < 0.8 * loss(sum(taus))


def test_magmax_takes_the_largest_magnitude_later_task_on_ties():
    base = torch.zeros(5)
    a = torch.tensor([1.0, -3.0, 2.0, 0.0, -1.0])
    b = torch.tensor([-2.0, 1.0, 2.0, 0.0, 1.0])
    merged = run_method("magmax", TensorGroup("x", [a, b], ancestor=base), merge_lambda=0.5)
    torch.testing.assert_close(merged, 0.5 * torch.tensor([-2.0, -3.0, 2.0, 0.0, 1.0]))
    base, thetas = models(4, shape=SHAPE)
    taus = np.stack(np_task_vectors(base, thetas))
    expected = np.take_along_axis(taus, np.abs(taus).argmax(axis=0)[None], axis=0)[0]
    np.testing.assert_allclose(as_np(run_method("magmax", TensorGroup("x", thetas, ancestor=base))), as_np(base) + expected, rtol=1e-6)


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_consensus_keeps_entries_selected_by_k_tall_masks(k):
    base, thetas = models(3, shape=SHAPE)
    taus = np_task_vectors(base, thetas)
    lambdas = [0.4, 0.6, 0.8]
    total = sum(taus)
    votes = sum((np.abs(tau) >= lam * np.abs(total - tau)).astype(int) for tau, lam in zip(taus, lambdas))
    expected = as_np(base) + 0.9 * total * (votes >= k)
    merged = run_method("consensus", TensorGroup("x", thetas, ancestor=base), tall_mask_lambda=lambdas, k=k, merge_lambda=0.9)
    np.testing.assert_allclose(as_np(merged), expected, rtol=1e-5, atol=1e-6)
    if k == 0:
        np.testing.assert_allclose(as_np(merged), as_np(run_method("task_arithmetic", TensorGroup("x", thetas, ancestor=base),
                                                                   merge_lambda=0.9)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,parameters", [("tsv_m", {}), ("wudi", {"iterations": 20, "learning_rate": 1e-3}),
                                             ("magmax", {}), ("consensus", {"k": 1}), ("emr", {}), ("tall_masks", {})])
def test_a_single_task_gives_theta_0_plus_lambda_tau(name, parameters):
    base, thetas = models(1, shape=SHAPE)
    merged = run_method(name, TensorGroup("w", thetas, ancestor=base), merge_lambda=0.6, **parameters)
    torch.testing.assert_close(merged, base + 0.6 * (thetas[0] - base), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(40, 9), (9, 40)])
@pytest.mark.parametrize("name", ["tsv_m", "iso_c", "iso_cts"])
def test_svd_methods_accumulate_over_chunks_of_rows(monkeypatch, name, shape):
    """The Gram matrices and products are accumulated over chunks of rows (7 here, so chunks end inside
    the matrix) and in place: still the papers' formulas, for tall and wide matrices."""
    from modelmerge.methods import task_space
    monkeypatch.setattr(task_space, "CHUNK_ROWS", 7)
    base, thetas = models(3, shape=shape)
    taus = np_task_vectors(base, thetas)
    merged = run_method(name, TensorGroup("w", thetas, ancestor=base))
    if name == "tsv_m":
        expected = reference_tsv_m(taus)[0]
    elif name == "iso_c":
        u, s, vh = np.linalg.svd(sum(taus), full_matrices=False)
        expected = u @ vh * s.mean()
    else:
        expected = reference_iso_cts(taus, 0.8)[0]
    np.testing.assert_allclose(as_np(merged), as_np(base) + expected, rtol=1e-4, atol=1e-5)


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
    merged = run_method("cart", TensorGroup("w", thetas, ancestor=base), rank_ratio=rank_ratio, merge_lambda=1.7)
    np.testing.assert_allclose(as_np(merged), reference_cart(thetas, rank_ratio, 1.7), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rank_ratio", [0.0, 1.0])
def test_cart_at_rank_zero_and_full_rank_is_weight_averaging(rank_ratio):
    base, thetas = models(3, shape=SHAPE)
    merged = run_method("cart", TensorGroup("w", thetas, ancestor=base), rank_ratio=rank_ratio, merge_lambda=2.0)
    np.testing.assert_allclose(as_np(merged), np.mean([as_np(x) for x in thetas], axis=0), rtol=1e-6, atol=1e-6)


def test_cart_keeps_one_direction_at_least():
    base, thetas = models(3, shape=SHAPE)
    merged = run_method("cart", TensorGroup("w", thetas, ancestor=base), rank_ratio=0.01, merge_lambda=1.0)
    average = np.mean([as_np(x) for x in thetas], axis=0)
    np.testing.assert_allclose(as_np(merged), reference_cart(thetas, 0.01, 1.0), rtol=1e-5, atol=1e-6)
    assert 1 <= np.linalg.matrix_rank(as_np(merged) - average, tol=1e-5) <= 3


def test_cart_gives_other_and_excluded_tensors_the_average():
    base, thetas = models(3, shape=(7,))
    np.testing.assert_allclose(as_np(run_method("cart", TensorGroup("b", thetas, ancestor=base))),
                               np.mean([as_np(x) for x in thetas], axis=0), rtol=1e-6)
    base, thetas = models(3, shape=SHAPE)
    merged = run_method("cart", TensorGroup("embeddings.word", thetas, ancestor=base), exclude="^embed")
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
    merged = run_method("pcb", TensorGroup("w", thetas, ancestor=base), pcb_ratio=ratio, clamp_ratio=clamp_ratio,
                        merge_lambda=1.2)
    np.testing.assert_allclose(as_np(merged), reference_pcb(base, thetas, ratio, clamp_ratio, 1.2), rtol=1e-5, atol=1e-6)


def test_pcb_keeps_the_top_ratio_of_each_task_and_averages_within_the_range_of_the_kept_values():
    base, thetas = models(3, shape=(20, 10))
    taus = [x - base for x in thetas]
    merged = run_method("pcb", TensorGroup("w", thetas, ancestor=base), pcb_ratio=0.2, clamp_ratio=0.0) - base
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
    merged = run_method("pcb", TensorGroup("w", [theta] * 3, ancestor=base), pcb_ratio=0.3, clamp_ratio=0.0) - base
    tau = theta - base
    kept = merged != 0
    assert int(kept.sum()) == 29  # the entries strictly above the 70th of 100 ordered balancing weights
    torch.testing.assert_close(merged[kept], tau[kept])



# --- TATR (its tensors are FusionBench's: tests/methods/test_methods_fusion_bench.py) ---------------

@pytest.mark.parametrize("quantile", [0.99, 0.5])
def test_tatr_masks_the_most_conflicting_entries(quantile):
    base, thetas = models(3, shape=SHAPE)
    taus = np.stack([as_np(x) - as_np(base) for x in thetas])
    omega = np.abs(taus).sum(axis=0) ** 2 - (taus ** 2).sum(axis=0)  # Σ_i Σ_(j≠i) |τ_i||τ_j|
    threshold = np.sort(omega.ravel())[int(omega.size * quantile)]
    expected = as_np(base) + 0.4 * taus.sum(axis=0) * (omega < threshold)
    merged = run_method("tatr", TensorGroup("w", thetas, ancestor=base), threshold_quantile=quantile, merge_lambda=0.4)
    np.testing.assert_allclose(as_np(merged), expected, rtol=1e-5, atol=1e-6)


def test_tatr_of_one_task_has_no_conflict_to_keep():
    base, thetas = models(1, shape=SHAPE)
    torch.testing.assert_close(run_method("tatr", TensorGroup("w", thetas, ancestor=base)), base)


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
        group = TensorGroup(name, [m[name] for m in inputs], ancestor=ancestor[name])
        if not tensor.is_floating_point() or all(torch.equal(m[name], ancestor[name]) for m in inputs):
            continue
        expected = run_method(method, group, **{k[len("--x:"):].replace("prior", "merge_lambda"): float(v)
                                                 for k, v in params.items()})
        torch.testing.assert_close(tensor, expected.to(tensor.dtype), rtol=1e-5, atol=1e-6)


def test_help_lists_the_methods(merge_help):
    assert "\n  cart (also centered_task_arithmetic)" in merge_help
    assert "--x:rank_ratio (float; in [0, 1]; default 0.12)" in merge_help
    assert "\n  pcb (also pcb_merging, pcb-merging)  needs θ_0" in merge_help
    assert "--x:pcb_ratio (float; in (0, 1]; default 0.1)" in merge_help
    assert "\n  tatr (also trust_region, task_arithmetic_trust_region)  needs θ_0" in merge_help
    assert "\n  lot (also lot_merging, lot-merging)  needs θ_0" in merge_help
    assert "--x:rcond (float; in [0, 1); default None)" in merge_help
