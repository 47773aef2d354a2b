"""The data-free methods of the current field (TSV-M, Iso-C, Iso-CTS, WUDI, MagMax, consensus/TALL):
each against a dense reference written here from its paper's formula (NumPy, float64), and the
properties the papers prove (orthogonal factors, flat spectra, T = 1 gives θ_0 + λτ)."""
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
    merged = run_method("tsv_m", TensorGroup("w", thetas, base=base), merge_lambda=0.7)
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
    np.testing.assert_allclose(as_np(run_method(name, TensorGroup("b", thetas, base=base), merge_lambda=0.5)), expected,
                               rtol=1e-5, atol=1e-6)


def test_exclude_gives_matching_matrices_the_mean():
    base, thetas = models(3, shape=SHAPE)
    merged = run_method("tsv_m", TensorGroup("embeddings.word", thetas, base=base), exclude="^embed")
    np.testing.assert_allclose(as_np(merged), as_np(base) + np.mean(np_task_vectors(base, thetas), axis=0), rtol=1e-5)
    with pytest.raises(ValueError, match="exclude: not a regular expression"):
        run_method("tsv_m", TensorGroup("w", thetas, base=base), exclude="(")


def test_iso_c_flattens_the_spectrum_of_the_summed_task_vectors():
    base, thetas = models(3, shape=SHAPE)
    merged = run_method("iso_c", TensorGroup("w", thetas, base=base))
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
    merged = run_method("iso_cts", TensorGroup("w", thetas, base=base), common_space_fraction=fraction)
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
    group = TensorGroup("w", [x.double() for x in thetas], base=base.double())
    ours = run_method("wudi", group, iterations=40, learning_rate=1e-3)
    torch.testing.assert_close(ours - base.double(), merged.detach(), rtol=1e-6, atol=1e-8)
    assert loss(ours - base.double()) < 0.8 * loss(sum(taus))


def test_magmax_takes_the_largest_magnitude_later_task_on_ties():
    base = torch.zeros(5)
    a = torch.tensor([1.0, -3.0, 2.0, 0.0, -1.0])
    b = torch.tensor([-2.0, 1.0, 2.0, 0.0, 1.0])
    merged = run_method("magmax", TensorGroup("x", [a, b], base=base), merge_lambda=0.5)
    torch.testing.assert_close(merged, 0.5 * torch.tensor([-2.0, -3.0, 2.0, 0.0, 1.0]))
    base, thetas = models(4, shape=SHAPE)
    taus = np.stack(np_task_vectors(base, thetas))
    expected = np.take_along_axis(taus, np.abs(taus).argmax(axis=0)[None], axis=0)[0]
    np.testing.assert_allclose(as_np(run_method("magmax", TensorGroup("x", thetas, base=base))), as_np(base) + expected, rtol=1e-6)


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_consensus_keeps_entries_selected_by_k_tall_masks(k):
    base, thetas = models(3, shape=SHAPE)
    taus = np_task_vectors(base, thetas)
    lambdas = [0.4, 0.6, 0.8]
    total = sum(taus)
    votes = sum((np.abs(tau) >= lam * np.abs(total - tau)).astype(int) for tau, lam in zip(taus, lambdas))
    expected = as_np(base) + 0.9 * total * (votes >= k)
    merged = run_method("consensus", TensorGroup("x", thetas, base=base), tall_mask_lambda=lambdas, k=k, merge_lambda=0.9)
    np.testing.assert_allclose(as_np(merged), expected, rtol=1e-5, atol=1e-6)
    if k == 0:
        np.testing.assert_allclose(as_np(merged), as_np(run_method("task_arithmetic", TensorGroup("x", thetas, base=base),
                                                                   merge_lambda=0.9)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,parameters", [("tsv_m", {}), ("wudi", {"iterations": 20, "learning_rate": 1e-3}),
                                             ("magmax", {}), ("consensus", {"k": 1}), ("emr", {}), ("tall_masks", {})])
def test_a_single_task_gives_theta_0_plus_lambda_tau(name, parameters):
    base, thetas = models(1, shape=SHAPE)
    merged = run_method(name, TensorGroup("w", thetas, base=base), merge_lambda=0.6, **parameters)
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
    merged = run_method(name, TensorGroup("w", thetas, base=base))
    if name == "tsv_m":
        expected = reference_tsv_m(taus)[0]
    elif name == "iso_c":
        u, s, vh = np.linalg.svd(sum(taus), full_matrices=False)
        expected = u @ vh * s.mean()
    else:
        expected = reference_iso_cts(taus, 0.8)[0]
    np.testing.assert_allclose(as_np(merged), as_np(base) + expected, rtol=1e-4, atol=1e-5)
