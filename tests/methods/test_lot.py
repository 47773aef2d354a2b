"""LOT Merging (methods/lot.py) against a dense reference written from the paper's objective: the minimum-norm
least-squares task vector over the stacked features of every task, Σ_t ‖X_t τᵀ − X_t τ_tᵀ‖², solved by
NumPy's SVD-based lstsq on the features themselves (not on their Gram matrices); plus the invariants the
objective implies."""
import numpy as np
import pytest
import torch

from modelmerge.methods import TensorGroup
from test_methods import as_np, models, randn, run_method

OUT, IN = 5, 8


def features(count, rows, seed, zero_columns=()):
    """X_t [rows, IN] of each task, float64; `zero_columns`: input features no example activates."""
    xs = [randn(rows, IN, seed=seed + t, dtype=torch.float64) for t in range(count)]
    for x in xs:
        x[:, list(zero_columns)] = 0
    return xs


def group_of(base, thetas, xs, name="layer.0.dense.weight"):
    return TensorGroup(name, thetas, ancestor=base, statistics=[{"gram": x.T @ x} for x in xs])


def least_squares_reference(base, thetas, xs):
    """W_0 + τ, τ the minimum-norm minimiser of Σ_t ‖X_t τᵀ − X_t τ_tᵀ‖² over the stacked features."""
    stacked = np.concatenate([x.numpy() for x in xs])
    targets = np.concatenate([x.numpy() @ (as_np(theta) - as_np(base)).T for x, theta in zip(xs, thetas)])
    tau_t, *_ = np.linalg.lstsq(stacked, targets, rcond=None)
    return as_np(base) + tau_t.T


@pytest.mark.parametrize("rows,zero_columns", [(30, ()), (2, ()), (30, (1, 6))])
def test_lot_is_the_minimum_norm_least_squares_task_vector(rows, zero_columns):
    """Full-rank features, too few rows for the inputs (3 tasks × 2 rows < 8), and features never active."""
    base, thetas = models(3, shape=(OUT, IN))
    xs = features(3, rows, seed=10, zero_columns=zero_columns)
    merged = run_method("lot", group_of(base, thetas, xs))
    np.testing.assert_allclose(as_np(merged), least_squares_reference(base, thetas, xs), rtol=1e-5, atol=1e-6)


def test_lot_keeps_the_ancestor_where_no_exemplar_reaches():
    """The merged task vector lies in the span of the features: inputs orthogonal to every X_t see θ_0."""
    base, thetas = models(3, shape=(OUT, IN))
    xs = features(3, 2, seed=20)
    merged = as_np(run_method("lot", group_of(base, thetas, xs)))
    stacked = np.concatenate([x.numpy() for x in xs])
    _, s, vh = np.linalg.svd(stacked)
    null = vh[len(s):].T  # [IN, IN − 6]: no exemplar has a component there
    assert null.shape[1] == IN - 6
    np.testing.assert_allclose((merged - as_np(base)) @ null, 0, atol=1e-6)
    assert np.abs((as_np(thetas[0]) - as_np(base)) @ null).max() > 1e-2  # the experts do move there


def test_lot_of_one_task_reproduces_its_features():
    """One task: no drift at all on its own features, with full-rank features the expert itself."""
    base, (theta,) = models(1, shape=(OUT, IN))
    few = features(1, 3, seed=30)
    merged = run_method("lot", group_of(base, [theta], few))
    np.testing.assert_allclose(few[0].numpy() @ as_np(merged).T, few[0].numpy() @ as_np(theta).T, atol=1e-5)
    torch.testing.assert_close(run_method("lot", group_of(base, [theta], features(1, 20, seed=31))), theta,
                               rtol=1e-5, atol=1e-5)


def test_lot_of_identical_models_is_that_model_wherever_features_reach():
    base, (theta,) = models(1, shape=(OUT, IN))
    torch.testing.assert_close(run_method("lot", group_of(base, [theta] * 3, features(3, 20, seed=40))), theta,
                               rtol=1e-5, atol=1e-5)


def test_lot_with_full_rank_grams_is_regmean_without_shrinkage():
    """(Σ G)⁻¹ Σ G_t (W_0 + τ_t) = W_0 + (Σ G)⁻¹ Σ G_t τ_t: RegMean at α = 1 when Σ G is invertible."""
    base, thetas = models(3, shape=(OUT, IN))
    group = group_of(base, thetas, features(3, 20, seed=50))
    torch.testing.assert_close(run_method("lot", group), run_method("regmean", group, alpha=1.0), rtol=1e-5, atol=1e-6)


def test_lot_averages_the_task_vectors_of_tensors_without_gram():
    base, thetas = models(3, shape=(OUT,))
    merged = run_method("lot", TensorGroup("layer.0.dense.bias", thetas, ancestor=base))
    np.testing.assert_allclose(as_np(merged), as_np(base) + np.mean([as_np(t) - as_np(base) for t in thetas], axis=0),
                               rtol=1e-6, atol=1e-7)


def test_lot_merges_weights_stored_in_out_as_their_transpose():
    base, thetas = models(3, shape=(OUT, IN))
    xs = features(3, 2, seed=60)
    expected = least_squares_reference(base, thetas, xs)
    group = TensorGroup("h.0.attn.c_attn.weight", [t.T.contiguous() for t in thetas], ancestor=base.T.contiguous(),
                        statistics=[{"gram": x.T @ x} for x in xs], stored_in_out=True)
    np.testing.assert_allclose(as_np(run_method("lot", group)), expected.T, rtol=1e-5, atol=1e-6)


def test_lot_cutoff_drops_small_directions():
    """rcond: directions of Σ G with eigenvalue below rcond × the largest count as unreached (task vector 0)."""
    base, thetas = models(2, shape=(OUT, IN))
    xs = features(2, 20, seed=70)
    for x in xs:
        x[:, 3] *= 1e-4  # input feature 3 is barely active: eigenvalue ~1e-8 of the largest
    group = group_of(base, thetas, xs)
    kept = as_np(run_method("lot", group))
    cut = as_np(run_method("lot", group, rcond=1e-6))
    np.testing.assert_allclose(kept, least_squares_reference(base, thetas, xs), rtol=1e-4, atol=1e-5)
    e3 = np.eye(IN)[:, 3]
    assert abs(((cut - as_np(base)) @ e3)).max() < 1e-3 < abs(((kept - as_np(base)) @ e3)).max()


def test_lot_refuses_a_gram_of_the_wrong_shape_naming_the_tensor():
    base, thetas = models(2, shape=(OUT, IN))
    group = TensorGroup("layer.3.weight", thetas, ancestor=base, statistics=[{"gram": torch.eye(4, dtype=torch.float64)}] * 2)
    with pytest.raises(ValueError, match="layer.3.weight.*expected \\[8, 8\\]"):
        run_method("lot", group)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_lot_on_the_gpu_is_the_reference():
    base, thetas = models(3, shape=(OUT, IN))
    xs = features(3, 2, seed=80)
    group = TensorGroup("w", [t.cuda() for t in thetas], ancestor=base.cuda(), statistics=[{"gram": (x.T @ x).cuda()} for x in xs])
    merged = run_method("lot", group)
    assert merged.device.type == "cuda"
    np.testing.assert_allclose(as_np(merged.cpu()), least_squares_reference(base, thetas, xs), rtol=1e-5, atol=1e-6)
