"""Every merge method against a direct formula written here independently, plus the invariants between them."""
import inspect
import logging
import math

import numpy as np
import pytest
import torch

from modelmerge.methods import MERGE_METHODS, TensorGroup, get_method
from modelmerge.methods.sparsify import tensor_generator
from modelmerge.methods.sparsify import trim_by_magnitude

SHAPE = (6, 5)


def run_method(name, group, **overrides):
    """Call method `name` on `group` with its defaults, as the driver resolves them, and `overrides`."""
    method = get_method(name)()
    params = {}
    for key, parameter in method.parameters.items():
        value = overrides.pop(key, parameter.default)
        if parameter.per_model and not isinstance(value, (list, tuple)):
            value = [value] * len(group.tensors)
        params[key] = value
    assert not overrides, f"not parameters of {name}: {overrides}"
    return method.merge(group, **params)


def randn(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def models(count=3, shape=SHAPE, seed=0, scale=0.1):
    """An ancestor and `count` fine-tuned models around it."""
    base = randn(*shape, seed=seed)
    return base, [base + scale * randn(*shape, seed=seed + 1 + t) for t in range(count)]


def as_np(tensor):
    return tensor.detach().double().numpy()


# --- registry --------------------------------------------------------------------------------------

def test_registry_names_aliases_and_unknown_name():
    assert get_method("average") is get_method("linear")
    assert get_method("task-arithmetic") is get_method("task_arithmetic")
    assert get_method("reg-mean") is get_method("regmean")
    assert get_method("dare-task-arithmetic") is get_method("dare_linear")
    for key, cls in MERGE_METHODS.items():
        assert key == cls.name or key in cls.aliases
    with pytest.raises(ValueError, match="unknown merge method 'nope'.*task_arithmetic.*ties"):
        get_method("nope")


@pytest.mark.parametrize("name", sorted({cls.name for cls in MERGE_METHODS.values()}))
def test_merge_accepts_exactly_the_declared_parameters(name):
    cls = get_method(name)
    signature = inspect.signature(cls.merge)
    keywords = {p.name for p in signature.parameters.values() if p.kind is p.KEYWORD_ONLY}
    without_default = {p.name for p in signature.parameters.values()
                       if p.kind is p.KEYWORD_ONLY and p.default is p.empty}
    assert without_default <= set(cls.parameters) <= keywords


def test_lambda_aliases_follow_git_theta_and_mergekit():
    for name in ("task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs"):
        assert {"lambda", "scaling_factor"} <= set(get_method(name).parameters["merge_lambda"].aliases)


# --- linear ----------------------------------------------------------------------------------------

def test_linear_weighted_mean_and_raw_sum():
    _, thetas = models()
    w = [0.2, 0.5, 1.3]
    group = TensorGroup("x", thetas)
    expected = sum(wt * as_np(x) for wt, x in zip(w, thetas))
    np.testing.assert_allclose(as_np(run_method("linear", group, weight=w)), expected / sum(w), rtol=1e-6)
    np.testing.assert_allclose(as_np(run_method("linear", group, weight=w, normalize=False)), expected, rtol=1e-6)
    np.testing.assert_allclose(as_np(run_method("average", group)), np.mean([as_np(x) for x in thetas], 0), rtol=1e-6)


def test_linear_weights_summing_to_zero_is_an_error_naming_the_tensor():
    _, thetas = models(2)
    with pytest.raises(ValueError, match="layer.0.weight"):
        run_method("linear", TensorGroup("layer.0.weight", thetas), weight=[1.0, -1.0])


def test_wrong_number_of_per_model_values_is_an_error():
    _, thetas = models(3)
    with pytest.raises(ValueError, match="weight: got 2 values for 3 models"):
        run_method("linear", TensorGroup("x", thetas), weight=[1.0, 2.0])


# --- task arithmetic -------------------------------------------------------------------------------

def test_task_arithmetic_formula():
    base, thetas = models()
    w, lam = [1.0, 0.5, 2.0], 0.3
    group = TensorGroup("x", thetas, ancestor=base)
    summed = sum(wt * (as_np(x) - as_np(base)) for wt, x in zip(w, thetas))
    np.testing.assert_allclose(as_np(run_method("task_arithmetic", group, weight=w, merge_lambda=lam)),
                               as_np(base) + lam * summed, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(as_np(run_method("task_arithmetic", group, weight=w, merge_lambda=lam, normalize=True)),
                               as_np(base) + lam * summed / sum(w), rtol=1e-5, atol=1e-6)


def test_methods_needing_the_ancestor_say_so():
    _, thetas = models()
    with pytest.raises(ValueError, match="ancestor.*tensor x"):
        run_method("task_arithmetic", TensorGroup("x", thetas))


# --- TIES ------------------------------------------------------------------------------------------

def ties_by_loops(base, deltas, weights, lam, normalize, consensus="sum", majority=None):
    """TIES entry by entry: elect, select the agreeing entries, (weighted) disjoint mean."""
    d = [w * delta.ravel() for w, delta in zip(weights, deltas)]
    n = d[0].size
    elected = np.array([np.sign(sum(dt[i] for dt in d)) if consensus == "sum"
                        else np.sign(sum(np.sign(dt[i]) for dt in d)) for i in range(n)])
    if majority is None:
        majority = 1.0 if (elected > 0).sum() >= (elected < 0).sum() else -1.0
    elected[elected == 0] = majority
    out = np.empty(n)
    for i in range(n):
        chosen = [t for t in range(len(d)) if d[t][i] != 0 and np.sign(d[t][i]) == elected[i]]
        total = sum(d[t][i] for t in chosen)
        divisor = sum(weights[t] for t in chosen) or 1.0
        out[i] = total / divisor if normalize else total
    return base + lam * out.reshape(base.shape)


def trim_by_sorting(delta, density):
    k = max(1, int(density * delta.size))
    order = np.argsort(-np.abs(delta.ravel()), kind="stable")
    kept = np.zeros(delta.size)
    kept[order[:k]] = delta.ravel()[order[:k]]
    return kept.reshape(delta.shape)


@pytest.mark.parametrize("consensus", ["sum", "count"])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_matches_entrywise_loops(consensus, normalize):
    base, thetas = models(3)
    density, w, lam = [0.5, 0.3, 0.7], [1.0, 0.6, 1.5], 0.8
    deltas = [trim_by_sorting(as_np(x) - as_np(base), d) for x, d in zip(thetas, density)]
    expected = ties_by_loops(as_np(base), deltas, w, lam, normalize, consensus)
    got = run_method("ties", TensorGroup("x", thetas, ancestor=base), density=density, weight=w, merge_lambda=lam,
                     normalize=normalize, consensus_method=consensus)
    np.testing.assert_allclose(as_np(got), expected, rtol=1e-5, atol=1e-6)


def test_ties_uses_precomputed_trimmed_task_vectors_and_the_global_majority_sign():
    base = torch.zeros(2, 3)
    # Entry (0, 0) cancels exactly, so the majority sign decides it; the trimmed statistics are used as given.
    trimmed = [torch.tensor([[1.0, 2.0, 0.0], [0.0, -1.0, -3.0]]), torch.tensor([[-1.0, 0.0, -4.0], [0.0, -2.0, 0.0]])]
    thetas = [torch.full((2, 3), 9.0), torch.full((2, 3), -9.0)]  # ignored: the statistic replaces θ_t − θ_0
    group = TensorGroup("x", thetas, ancestor=base, statistics=[{"trimmed": t} for t in trimmed])
    for sign in (1, -1):
        expected = ties_by_loops(as_np(base), [as_np(t) for t in trimmed], [1.0, 1.0], 1.0, True, majority=sign)
        got = run_method("ties", group, global_majority_sign=sign)
        np.testing.assert_allclose(as_np(got), expected)
    assert run_method("ties", group, global_majority_sign=1)[0, 0] == 1.0
    assert run_method("ties", group, global_majority_sign=-1)[0, 0] == -1.0
    # Without a global sign, the tensor's majority (here negative: 3 of the 4 non-zero elected signs) decides.
    assert run_method("ties", group)[0, 0] == -1.0


def test_ties_with_trimmed_statistics_of_only_some_models_is_an_error():
    base, thetas = models(2)
    group = TensorGroup("enc.w", thetas, ancestor=base, statistics=[{"trimmed": thetas[0] - base}, {}])
    with pytest.raises(ValueError, match="'trimmed' is missing for tensor enc.w in model.*2"):
        run_method("ties", group)


def test_trim_by_magnitude_keeps_the_largest_entries():
    delta = randn(7, 9, seed=3)
    for density in (0.01, 0.2, 0.5, 0.99):
        np.testing.assert_array_equal(as_np(trim_by_magnitude(delta, density)), trim_by_sorting(as_np(delta), density))
    assert torch.equal(trim_by_magnitude(delta, 1.0), delta)
    assert not trim_by_magnitude(delta, 0.0).any()


# --- DARE ------------------------------------------------------------------------------------------

def test_dare_is_the_formula_with_the_seeded_mask():
    base, thetas = models(2, shape=(40, 30))
    density, w, lam, seed = [0.3, 0.6], [1.0, 0.5], 0.7, 11
    group = TensorGroup("enc.layer.1.w", thetas, ancestor=base)
    expected = as_np(base).copy()
    for t, (x, d) in enumerate(zip(thetas, density)):
        keep = torch.rand(base.shape, generator=tensor_generator(seed, "enc.layer.1.w", t)) < d
        expected += lam * w[t] * np.where(as_np(keep), (as_np(x) - as_np(base)) / d, 0.0)
    got = run_method("dare_linear", group, density=density, weight=w, merge_lambda=lam, seed=seed)
    np.testing.assert_allclose(as_np(got), expected, rtol=1e-5, atol=1e-6)


def test_dare_keeps_the_density_fraction_and_rescales_the_kept_entries():
    base = torch.zeros(200, 500)
    theta = torch.ones(200, 500)
    merged = run_method("dare_linear", TensorGroup("w", [theta], ancestor=base), density=0.3)
    kept = merged != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01  # 100k Bernoulli(0.3) draws: 4.5 sigma is 0.0065
    assert torch.allclose(merged[kept], torch.full_like(merged[kept], 1 / 0.3))
    unscaled = run_method("dare_linear", TensorGroup("w", [theta], ancestor=base), density=0.3, rescale=False)
    assert torch.equal(unscaled != 0, kept) and torch.all(unscaled[kept] == 1)


def test_dare_masks_depend_on_seed_and_name_but_not_on_merge_order():
    base, thetas = models(2, shape=(30, 30))
    groups = {name: TensorGroup(name, thetas, ancestor=base) for name in ("a.weight", "b.weight")}
    forward = {n: run_method("dare_ties", groups[n], density=0.5, seed=7) for n in ("a.weight", "b.weight")}
    backward = {n: run_method("dare_ties", groups[n], density=0.5, seed=7) for n in ("b.weight", "a.weight")}
    for name in groups:
        assert torch.equal(forward[name], backward[name])
    assert not torch.equal(run_method("dare_ties", groups["a.weight"], density=0.5, seed=8), forward["a.weight"])
    renamed = TensorGroup("b.weight", thetas, ancestor=base)
    assert not torch.equal(run_method("dare_ties", renamed, density=0.5, seed=7), forward["a.weight"])


def test_dare_dropout_probability_is_one_minus_density():
    base, thetas = models(2)
    group = TensorGroup("x", thetas, ancestor=base)
    assert torch.equal(run_method("dare_linear", group, dropout_probability=0.2),
                       run_method("dare_linear", group, density=0.8))
    with pytest.raises(ValueError, match="either density or dropout_probability"):
        run_method("dare_linear", group, dropout_probability=0.2, density=0.5)


def test_dare_ties_without_dropping_is_ties():
    base, thetas = models(3)
    group = TensorGroup("x", thetas, ancestor=base)
    w = [1.0, 0.3, 2.0]
    torch.testing.assert_close(run_method("dare_ties", group, weight=w, normalize=True),
                               run_method("ties", group, weight=w))


# --- breadcrumbs -----------------------------------------------------------------------------------

def breadcrumbs_mask_by_sorting(delta, density, gamma):
    n = delta.size
    keep, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep - top)
    order = np.argsort(np.abs(delta.ravel()), kind="stable")
    mask = np.zeros(n, dtype=bool)
    mask[order[bottom: bottom + keep]] = True
    return mask.reshape(delta.shape)


@pytest.mark.parametrize("name", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_drops_outliers_and_small_entries(name):
    base, thetas = models(3, shape=(10, 10))
    density, gamma, lam = [0.6, 0.5, 0.9], [0.1, 0.05, 0.3], 0.5
    deltas = [np.where(breadcrumbs_mask_by_sorting(as_np(x) - as_np(base), d, g), as_np(x) - as_np(base), 0.0)
              for x, d, g in zip(thetas, density, gamma)]
    if name == "breadcrumbs":
        expected = as_np(base) + lam * sum(deltas)
    else:
        expected = ties_by_loops(as_np(base), deltas, [1.0] * 3, lam, normalize=False)
    got = run_method(name, TensorGroup("x", thetas, ancestor=base), density=density, gamma=gamma, merge_lambda=lam)
    np.testing.assert_allclose(as_np(got), expected, rtol=1e-5, atol=1e-6)


def test_breadcrumbs_rescale_restores_the_l1_norm():
    base, (theta,) = models(1, shape=(10, 10))
    merged = run_method("breadcrumbs", TensorGroup("x", [theta], ancestor=base), density=0.5, gamma=0.1, rescale=True)
    assert math.isclose((merged - base).abs().sum().item(), (theta - base).abs().sum().item(), rel_tol=1e-5)
    assert ((merged - base) != 0).sum().item() == 50


# --- Fisher ----------------------------------------------------------------------------------------

def test_fisher_weighted_average_with_zero_sums_divided_by_one():
    _, thetas = models(3)
    fishers = [randn(*SHAPE, seed=20 + t).abs() for t in range(3)]
    for f in fishers:
        f[0, :] = 0  # no Fisher mass on the first row in any model
    w = [1.0, 2.0, 0.5]
    group = TensorGroup("x", thetas, statistics=[{"fisher": f} for f in fishers])
    got = as_np(run_method("fisher", group, weight=w))
    for i in range(SHAPE[0]):
        for j in range(SHAPE[1]):
            numerator = sum(w[t] * fishers[t][i, j].item() * thetas[t][i, j].item() for t in range(3))
            denominator = sum(w[t] * fishers[t][i, j].item() for t in range(3)) or 1.0
            assert math.isclose(got[i, j], numerator / denominator, rel_tol=1e-5, abs_tol=1e-7)
    assert not got[0].any()
    floored = run_method("fisher", group, weight=w, fisher_floor=1e-6)
    np.testing.assert_allclose(as_np(floored[0]), sum(wt * as_np(x[0]) for wt, x in zip(w, thetas)) / sum(w), rtol=1e-5)


def test_fisher_with_equal_fishers_is_the_average():
    _, thetas = models(3)
    fisher = randn(*SHAPE, seed=5).abs() + 0.1
    group = TensorGroup("x", thetas, statistics=[{"fisher": fisher}] * 3)
    torch.testing.assert_close(run_method("fisher", group), run_method("average", TensorGroup("x", thetas)))


def test_fisher_missing_statistic_names_the_tensor():
    _, thetas = models(2)
    with pytest.raises(ValueError, match="'fisher' of model 2 is missing for tensor enc.w"):
        run_method("fisher", TensorGroup("enc.w", thetas, statistics=[{"fisher": thetas[0]}, {}]))


# --- RegMean ---------------------------------------------------------------------------------------

def grams_of(count, size, seed, examples=20):
    """X_tᵀX_t of random inputs, float64 like the Gram program writes them."""
    return [(lambda x: x.T @ x)(randn(examples, size, seed=seed + t, dtype=torch.float64)) for t in range(count)]


def regmean_by_numpy(weights, grams, alpha):
    scaled = [alpha * g + (1 - alpha) * np.diag(np.diag(g)) for g in grams]
    return np.linalg.solve(sum(scaled), sum(s @ w.T for s, w in zip(scaled, weights))).T


@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_regmean_solves_the_normal_equations(alpha):
    _, thetas = models(3, shape=(4, 6))
    grams = grams_of(3, 6, seed=30)
    group = TensorGroup("dense.weight", thetas, statistics=[{"gram": g} for g in grams])
    expected = regmean_by_numpy([as_np(x) for x in thetas], [g.numpy() for g in grams], alpha)
    np.testing.assert_allclose(as_np(run_method("regmean", group, alpha=alpha)), expected, rtol=1e-5, atol=1e-6)


def test_regmean_averages_tensors_without_gram_and_inverts_the_nonzero_block():
    _, thetas = models(2, shape=(4, 6))
    assert torch.allclose(run_method("regmean", TensorGroup("dense.bias", thetas)), (thetas[0] + thetas[1]) / 2)
    grams = grams_of(2, 6, seed=31)
    for g in grams:  # input feature 2 is never active
        g[2, :] = 0
        g[:, 2] = 0
    merged = as_np(run_method("regmean", TensorGroup("w", thetas, statistics=[{"gram": g} for g in grams]), alpha=0.5))
    keep = [0, 1, 3, 4, 5]
    sub = regmean_by_numpy([as_np(x)[:, keep] for x in thetas], [g.numpy()[np.ix_(keep, keep)] for g in grams], 0.5)
    np.testing.assert_allclose(merged[:, keep], sub, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(merged[:, 2], (as_np(thetas[0])[:, 2] + as_np(thetas[1])[:, 2]) / 2, rtol=1e-6)


def test_regmean_singular_system_and_bad_gram_shape_are_errors_naming_the_tensor():
    _, thetas = models(2, shape=(4, 6))
    rank_two = [(lambda x: x.T @ x)(randn(2, 6, seed=40 + t, dtype=torch.float64)) for t in range(2)]
    with pytest.raises(ValueError, match="layer.3.weight.*singular"):
        run_method("regmean", TensorGroup("layer.3.weight", thetas, statistics=[{"gram": g} for g in rank_two]), alpha=1.0)
    with pytest.raises(ValueError, match="layer.3.weight.*expected \\[6, 6\\]"):
        run_method("regmean", TensorGroup("layer.3.weight", thetas, statistics=[{"gram": torch.eye(4)}] * 2))


# --- MaTS ------------------------------------------------------------------------------------------

def test_mats_regmean_objective_converges_to_regmean():
    base, thetas = models(3, shape=(4, 6))
    grams = grams_of(3, 6, seed=50)
    group = TensorGroup("w", thetas, ancestor=base, statistics=[{"gram": g} for g in grams])
    torch.testing.assert_close(run_method("mats", group, objective="regmean", iterations=50, alpha=0.7),
                               run_method("regmean", group, alpha=0.7), rtol=1e-5, atol=1e-6)


def test_mats_average_objective_is_the_average_from_any_start():
    base, thetas = models(3)
    group = TensorGroup("x", thetas, ancestor=base, initial=base + 1.0)
    torch.testing.assert_close(run_method("mats", group, objective="average", iterations=3),
                               run_method("average", TensorGroup("x", thetas)))


def test_mats_fisher_objective_converges_to_fisher_merging():
    _, thetas = models(2, shape=(3, 4))
    fishers = [randn(3, 4, seed=60 + t).abs() + 0.05 for t in range(2)]
    group = TensorGroup("x", thetas, statistics=[{"fisher": f} for f in fishers])
    torch.testing.assert_close(run_method("mats", group, objective="fisher", iterations=12),
                               run_method("fisher", group), rtol=1e-5, atol=1e-6)


def test_mats_blockwise_fisher_solves_the_kronecker_system():
    _, thetas = models(2, shape=(3, 4))
    grams = grams_of(2, 4, seed=70)
    out_grams = grams_of(2, 3, seed=80)
    group = TensorGroup("w", thetas, statistics=[{"gram": g, "output_grad_gram": s} for g, s in zip(grams, out_grams)])
    # vec(S W G) = (Gᵀ ⊗ S) vec(W) with column-major vec.
    A = sum(np.kron(g.numpy().T, s.numpy()) for g, s in zip(grams, out_grams))
    b = sum(np.kron(g.numpy().T, s.numpy()) @ as_np(w).ravel(order="F") for g, s, w in zip(grams, out_grams, thetas))
    expected = np.linalg.solve(A, b).reshape((3, 4), order="F")
    got = run_method("mats", group, objective="blockwise_fisher", iterations=100)
    np.testing.assert_allclose(as_np(got), expected, rtol=1e-4, atol=1e-5)


def test_mats_one_iteration_is_one_steepest_descent_step_from_the_initial_model(caplog):
    _, thetas = models(2, shape=(3, 4))
    grams = grams_of(2, 4, seed=90)
    start = torch.zeros(3, 4)
    group = TensorGroup("w", thetas, statistics=[{"gram": g} for g in grams], initial=start)
    total = sum(g.numpy() for g in grams)
    residual = sum(as_np(w) @ g.numpy() for w, g in zip(thetas, grams)) - as_np(start) @ total
    step = (residual * residual).sum() / (residual * (residual @ total)).sum()
    with caplog.at_level(logging.DEBUG, logger="modelmerge.methods.mats"):
        got = run_method("mats", group, objective="regmean", iterations=1)
    np.testing.assert_allclose(as_np(got), as_np(start) + step * residual, rtol=1e-5, atol=1e-6)
    assert "w: CG iteration 1, residual" in caplog.text
    assert "w: 1 CG iterations, residual" in caplog.text
    assert torch.equal(run_method("mats", group, objective="regmean", iterations=0), start)


def test_mats_starts_from_the_ancestor_when_no_initial_model_is_given():
    base, thetas = models(2, shape=(3, 4))
    grams = grams_of(2, 4, seed=91)
    group = TensorGroup("w", thetas, ancestor=base, statistics=[{"gram": g} for g in grams])
    assert torch.equal(run_method("mats", group, iterations=0), base)
    group.ancestor = None
    torch.testing.assert_close(run_method("mats", group, iterations=0), (thetas[0] + thetas[1]) / 2)


def test_mats_rejects_unknown_objective_and_missing_statistics():
    _, thetas = models(2)
    with pytest.raises(ValueError, match="objective must be one of"):
        run_method("mats", TensorGroup("x", thetas), objective="hessian")
    with pytest.raises(ValueError, match="'fisher' of model 1 is missing for tensor x"):
        run_method("mats", TensorGroup("x", thetas), objective="fisher")


# --- slerp / mlerp ---------------------------------------------------------------------------------

def slerp_by_numpy(t, a, b):
    ua, ub = a / np.linalg.norm(a), b / np.linalg.norm(b)
    omega = np.arccos(np.clip((ua * ub).sum(), -1, 1))
    return (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)


def test_slerp_follows_the_arc_and_hits_both_ends():
    a, b = randn(*SHAPE, seed=100), randn(*SHAPE, seed=101)
    group = TensorGroup("x", [a, b])
    for t in (0.0, 0.25, 0.5, 0.9, 1.0):
        np.testing.assert_allclose(as_np(run_method("slerp", group, t=t)), slerp_by_numpy(t, as_np(a), as_np(b)),
                                   rtol=1e-5, atol=1e-6)
    unit_a, unit_b = a / a.norm(), b / b.norm()
    mid = run_method("slerp", TensorGroup("x", [unit_a, unit_b]), t=0.5)
    assert math.isclose(mid.norm().item(), 1.0, rel_tol=1e-5)


def test_slerp_is_linear_for_nearly_colinear_tensors_and_needs_two_models():
    a = randn(*SHAPE, seed=102)
    b = 2 * a + 1e-4 * randn(*SHAPE, seed=103)
    torch.testing.assert_close(run_method("slerp", TensorGroup("x", [a, b]), t=0.3), 0.7 * a + 0.3 * b)
    with pytest.raises(ValueError, match="exactly 2 models, got 3"):
        run_method("slerp", TensorGroup("x", [a, b, a]))


def test_mlerp_keeps_the_direction_of_the_average_and_the_mean_norm():
    _, thetas = models(3, scale=1.0)
    w = [1.0, 2.0, 3.0]
    merged = as_np(run_method("mlerp", TensorGroup("x", thetas), weight=w))
    lerp = sum(wt * as_np(x) for wt, x in zip(w, thetas)) / sum(w)
    norm = sum(wt * np.linalg.norm(as_np(x)) for wt, x in zip(w, thetas)) / sum(w)
    np.testing.assert_allclose(merged, lerp / np.linalg.norm(lerp) * norm, rtol=1e-5)
    with pytest.raises(ValueError, match="tensor y"):
        run_method("mlerp", TensorGroup("y", [thetas[0], -thetas[0]]))


# --- uncertainty-based gradient matching ----------------------------------------------------------

def test_ubgm_matches_the_released_formula():
    base, thetas = models(3)
    hessians = [randn(*SHAPE, seed=110 + t).abs() for t in range(3)]
    h0 = randn(*SHAPE, seed=119).abs()
    alpha, c0, cs, delta = 0.7, 25000.0, [112000.0, 8530.0, 67349.0], 1e-12
    group = TensorGroup("x", thetas, ancestor=base, statistics=[{"fisher": h} for h in hessians], ancestor_statistics={"fisher": h0})
    got = run_method("uncertainty_based_gradient_matching", group, scaling_factor=alpha, scaling_factor_pt=c0,
                     scaling_factors_ft=cs, delta_0=delta)
    H, H0, th0 = [as_np(h) for h in hessians], as_np(h0), as_np(base)
    P = 1.0 / (sum(alpha * c * h for c, h in zip(cs, H)) + c0 * H0 + delta)
    expected = th0 + alpha * sum(P * (c * h + delta + c0 * H0) * (as_np(x) - th0) for c, h, x in zip(cs, H, thetas))
    np.testing.assert_allclose(as_np(got), expected, rtol=1e-5, atol=1e-6)


def test_ubgm_in_float32_is_bit_identical_to_the_released_script():
    base, thetas = models(3)
    hessians = [1e-4 * randn(*SHAPE, seed=140 + t).abs() for t in range(3)]
    h0 = 1e-4 * randn(*SHAPE, seed=149).abs()
    alpha, c0, cs, delta = 1.0, 25000.0, [112000.0, 8530.0, 67349.0], 1e-12
    # The released script's expressions, in its order (uncertainty_based_gradient_matching.py, Daheim et al.).
    preconditioner = 1.0 / (sum([alpha * c * h for h, c in zip(hessians, cs)]) + c0 * h0 + delta)
    summed = sum([(preconditioner * (c * h + delta + c0 * h0)) * (x - base) for x, h, c in zip(thetas, hessians, cs)])
    expected = base + alpha * summed
    group = TensorGroup("x", thetas, ancestor=base, statistics=[{"fisher": h} for h in hessians], ancestor_statistics={"fisher": h0})
    got = run_method("ubgm", group, scaling_factor=alpha, scaling_factor_pt=c0, scaling_factors_ft=cs, delta_0=delta)
    assert torch.equal(got, expected)


def test_ubgm_with_zero_hessians_is_task_arithmetic_with_lambda_alpha():
    base, thetas = models(3)
    zero = torch.zeros(SHAPE)
    group = TensorGroup("x", thetas, ancestor=base, statistics=[{"fisher": zero}] * 3, ancestor_statistics={"fisher": zero})
    got = run_method("ubgm", group, scaling_factor=0.4, scaling_factors_ft=[5.0, 6.0, 7.0], delta_0=1e-3)
    torch.testing.assert_close(got, run_method("task_arithmetic", group, merge_lambda=0.4))


def test_ubgm_zero_denominator_and_wrong_factor_count_are_errors():
    base, thetas = models(2)
    hessian = torch.ones(SHAPE)
    hessian[1, 2] = 0
    group = TensorGroup("layer.1.w", thetas, ancestor=base, statistics=[{"fisher": hessian}] * 2,
                        ancestor_statistics={"fisher": torch.zeros(SHAPE)})
    with pytest.raises(ValueError, match="zero denominator.*layer.1.w.*1 entries"):
        run_method("ubgm", group, delta_0=0.0)
    with pytest.raises(ValueError, match="scaling_factors_ft: got 3 values for 2 models"):
        run_method("ubgm", group, scaling_factors_ft=[1.0, 2.0, 3.0])


# --- passthrough -----------------------------------------------------------------------------------

def test_passthrough_returns_the_single_model():
    _, (theta, other) = models(2)
    assert run_method("passthrough", TensorGroup("x", [theta])) is theta
    torch.testing.assert_close(run_method("passthrough", TensorGroup("x", [theta]), scale=0.5), 0.5 * theta)
    with pytest.raises(ValueError, match="exactly 1 model"):
        run_method("passthrough", TensorGroup("x", [theta, other]))


# --- invariants over all methods -------------------------------------------------------------------

def identical_group(name, theta, count=3):
    """`count` copies of `theta`, as ancestor too, with every statistic a method may ask for."""
    g = grams_of(1, theta.shape[1], seed=120)[0]
    s = grams_of(1, theta.shape[0], seed=121)[0]
    stats = {"fisher": theta.abs() + 0.1, "gram": g, "output_grad_gram": s, "gradient_magnitude": theta.abs() + 0.1}
    count = {"slerp": 2, "nuslerp": 2, "passthrough": 1, "nearswap": 1, "arcee_fusion": 1}.get(name, count)
    return TensorGroup("x", [theta.clone() for _ in range(count)], ancestor=theta.clone(),
                       statistics=[dict(stats) for _ in range(count)], ancestor_statistics={"fisher": theta.abs()})


EXTRA = {"ties": {"density": 0.4}, "dare_linear": {"density": 0.5}, "dare_ties": {"density": 0.5},
         "breadcrumbs": {"density": 0.5}, "breadcrumbs_ties": {"density": 0.5}, "mats": {"iterations": 30},
         "della": {"density": 0.5}, "della_linear": {"density": 0.5}, "sce": {"select_topk": 0.5}, "nearswap": {"t": 0.01},
         "wudi": {"iterations": 10}}


@pytest.mark.parametrize("name", sorted({cls.name for cls in MERGE_METHODS.values()}))
def test_merging_identical_models_returns_them(name):
    theta = randn(*SHAPE, seed=130)
    torch.testing.assert_close(run_method(name, identical_group(name, theta), **EXTRA.get(name, {})), theta,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("name", sorted({cls.name for cls in MERGE_METHODS.values()}))
def test_methods_return_the_input_dtype(name, dtype):
    base, thetas = models(3)
    group = identical_group(name, base)
    group.tensors = [x.to(dtype) for x in thetas[: len(group.tensors)]]
    group.ancestor = base.to(dtype)
    merged = run_method(name, group, **EXTRA.get(name, {}))
    assert merged.dtype == dtype and merged.shape == base.shape and torch.isfinite(merged).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("name", sorted({cls.name for cls in MERGE_METHODS.values()}))
def test_methods_on_the_gpu_agree_with_the_cpu(name):
    base, thetas = models(3)
    group = identical_group(name, base)
    group.tensors = thetas[: len(group.tensors)]
    on_cpu = run_method(name, group, **EXTRA.get(name, {}))
    moved = TensorGroup(group.name, [x.cuda() for x in group.tensors], ancestor=group.ancestor.cuda(),
                        statistics=[{k: v.cuda() for k, v in s.items()} for s in group.statistics],
                        ancestor_statistics={k: v.cuda() for k, v in group.ancestor_statistics.items()})
    on_gpu = run_method(name, moved, **EXTRA.get(name, {}))
    assert on_gpu.device.type == "cuda"
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-4, atol=1e-5)
