"""The methods mergekit also has give mergekit's result (its tensor functions, called directly, are the expectation):
the classic ones and mergekit 0.1.5's newer ones (model_stock, sce, nuslerp, multislerp, karcher, nearswap,
arcee_fusion, ram, ramplus_tl; DELLA's: test_della.py), plus the properties each newer method's definition promises."""
import pytest
import torch

from modelmerge.methods import TensorGroup
from test_methods import models, randn, run_method

registry = pytest.importorskip("mergekit.merge_methods.registry")
mergekit_base = pytest.importorskip("mergekit.merge_methods.base")


def mergekit(name, tensors, base_index=None, **parameters):
    group = mergekit_base.TensorGroup.from_tensors(tensors, base_index=base_index, name="x")
    (merged,) = registry.get(name)([group], parameters=parameters)
    return merged


@pytest.mark.parametrize("normalize", [True, False])
def test_linear(normalize):
    _, thetas = models(3)
    w = [0.3, 1.0, 0.6]
    ours = run_method("linear", TensorGroup("x", thetas), weight=w, normalize=normalize)
    torch.testing.assert_close(ours, mergekit("linear", thetas, weight=w, normalize=normalize))


@pytest.mark.parametrize("normalize", [True, False])
def test_task_arithmetic(normalize):
    base, thetas = models(3)
    w = [0.3, 1.0, 0.6]
    ours = run_method("task_arithmetic", TensorGroup("x", thetas, ancestor=base), weight=w, merge_lambda=0.7,
                      normalize=normalize)
    expected = mergekit("task_arithmetic", [base, *thetas], base_index=0, weight=w, normalize=normalize,
                        **{"lambda": 0.7})
    torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize("normalize,rescale", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("density", [[1.0, 1.0, 1.0], [0.2, 0.5, 0.8]])
def test_ties(density, normalize, rescale):
    base, thetas = models(3, shape=(16, 12))
    w = [1.0, 0.5, 0.8]
    ours = run_method("ties", TensorGroup("x", thetas, ancestor=base), weight=w, density=density, merge_lambda=0.9,
                      normalize=normalize, rescale=rescale)
    expected = mergekit("ties", [base, *thetas], base_index=0, weight=w, density=density, normalize=normalize,
                        rescale=rescale, **{"lambda": 0.9})
    torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize("name", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("rescale", [False, True])
def test_breadcrumbs(name, rescale):
    base, thetas = models(3, shape=(16, 12))
    parameters = dict(weight=[1.0, 0.5, 0.8], density=[0.5, 0.7, 0.9], gamma=[0.05, 0.1, 0.02], rescale=rescale)
    ours = run_method(name, TensorGroup("x", thetas, ancestor=base), **parameters)
    torch.testing.assert_close(ours, mergekit(name, [base, *thetas], base_index=0, **parameters))


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_without_dropping(name):
    """With density 1 nothing is random, so the two must agree exactly."""
    base, thetas = models(3)
    w = [1.0, 0.5, 0.8]
    ours = run_method(name, TensorGroup("x", thetas, ancestor=base), weight=w)
    torch.testing.assert_close(ours, mergekit(name, [base, *thetas], base_index=0, weight=w))


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("colinear", [False, True])
def test_slerp(t, colinear):
    a = randn(16, 12, seed=1)
    b = 3 * a + 1e-5 * randn(16, 12, seed=2) if colinear else randn(16, 12, seed=2)
    ours = run_method("slerp", TensorGroup("x", [a, b]), t=t)
    torch.testing.assert_close(ours, mergekit("slerp", [a, b], base_index=0, t=t))


def test_ties_in_bfloat16_computes_in_bfloat16_as_mergekit():
    """Without trimming: in half precision many magnitudes tie at the trimming threshold, where we keep all
    tied entries and mergekit keeps whichever its unstable sort puts first."""
    base, thetas = models(3, shape=(16, 12))
    base, thetas = base.bfloat16(), [x.bfloat16() for x in thetas]
    ours = run_method("ties", TensorGroup("x", thetas, ancestor=base), weight=[1.0, 0.5, 0.7])
    expected = mergekit("ties", [base, *thetas], base_index=0, weight=[1.0, 0.5, 0.7])
    assert ours.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


# --- mergekit 0.1.5's newer methods -----------------------------------------------------------------------------


def close(ours, theirs):
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape", [(16, 12), (12,)])
def test_model_stock(filter_wise, shape):
    base, thetas = models(3, shape=shape)
    ours = run_method("model_stock", TensorGroup("x", thetas, ancestor=base), filter_wise=filter_wise)
    close(ours, mergekit("model_stock", [base, *thetas], base_index=0, filter_wise=filter_wise))


def test_model_stock_of_two_follows_the_paper():
    """T = 2: t = 2 cos / (1 + cos) between θ_0 and the average (Jang et al., eq. 7)."""
    base, thetas = models(2)
    a, b = (x - base for x in thetas)
    cos = (a * b).sum() / (a.norm() * b.norm())
    t = 2 * cos / (1 + cos)
    close(run_method("model_stock", TensorGroup("x", thetas, ancestor=base)), t * (thetas[0] + thetas[1]) / 2 + (1 - t) * base)


@pytest.mark.parametrize("select_topk", [1.0, 0.3, 0.0])
def test_sce(select_topk):
    base, thetas = models(3, shape=(16, 12))
    ours = run_method("sce", TensorGroup("x", thetas, ancestor=base), select_topk=select_topk)
    close(ours, mergekit("sce", [base, *thetas], base_index=0, select_topk=select_topk))


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("row_wise,flatten", [(False, True), (True, False), (False, False)])
def test_nuslerp(with_base, row_wise, flatten):
    base, thetas = models(2, shape=(16, 12))
    w = [0.3, 0.9]
    ours = run_method("nuslerp", TensorGroup("x", thetas, ancestor=base if with_base else None), weight=w,
                      nuslerp_row_wise=row_wise, nuslerp_flatten=flatten)
    inputs, index = ([base, *thetas], 0) if with_base else (thetas, None)
    close(ours, mergekit("nuslerp", inputs, base_index=index, weight=w, nuslerp_row_wise=row_wise,
                         nuslerp_flatten=flatten))


def test_nuslerp_equal_weights_is_the_slerp_midpoint():
    _, (a, b) = models(2, shape=(16, 12))
    close(run_method("nuslerp", TensorGroup("x", [a, b])), run_method("slerp", TensorGroup("x", [a, b]), t=0.5))


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("normalize_weights", [True, False])
def test_multislerp(with_base, normalize_weights):
    base, thetas = models(3, shape=(16, 12))
    w = [0.2, 0.5, 0.3]
    ours = run_method("multislerp", TensorGroup("x", thetas, ancestor=base if with_base else None), weight=w,
                      normalize_weights=normalize_weights)
    inputs, index = ([base, *thetas], 0) if with_base else (thetas, None)
    close(ours, mergekit("multislerp", inputs, base_index=index, weight=w, normalize_weights=normalize_weights))


def test_multislerp_of_opposite_models_with_balancing_weights():
    """Two: no mean direction, so the weighted sum (here 0); three: an error asking for other weights."""
    a = randn(4, 3, seed=5)
    close(run_method("multislerp", TensorGroup("x", [a, -a]), weight=[1.0, 1.0]), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="weighted mean direction of the models is zero"):
        run_method("multislerp", TensorGroup("x", [a, -a, a]), weight=[1.0, 2.0, 1.0])


@pytest.mark.parametrize("count", [2, 3])
def test_karcher(count):
    _, thetas = models(count, shape=(16, 12))
    close(run_method("karcher", TensorGroup("x", thetas), max_iter=20), mergekit("karcher", thetas, max_iter=20))


def test_karcher_of_two_is_their_slerp_midpoint_scaled_to_the_mean_norm():
    a, b = randn(8, seed=1), randn(8, seed=2)
    ua, ub = a / a.norm(), b / b.norm()
    angle = torch.arccos((ua * ub).sum())
    midpoint = (torch.sin(angle / 2) * (ua + ub)) / torch.sin(angle)
    close(run_method("karcher", TensorGroup("x", [a, b]), max_iter=50), midpoint * (a.norm() + b.norm()) / 2)


@pytest.mark.parametrize("t", [0.0, 0.05, 1.0])
def test_nearswap(t):
    base, (theta,) = models(1, shape=(16, 12))
    ours = run_method("nearswap", TensorGroup("x", [theta], ancestor=base), t=t)
    close(ours, mergekit("nearswap", [base, theta], base_index=0, t=t))


def test_arcee_fusion():
    base, (theta,) = models(1, shape=(16, 12))
    theta = theta.clone()
    theta[3] += 2.0  # one row whose distribution moves a lot: its changes pass the threshold
    ours = run_method("arcee_fusion", TensorGroup("x", [theta], ancestor=base))
    close(ours, mergekit("arcee_fusion", [base, theta], base_index=0))
    assert torch.equal(ours[3], theta[3]) and torch.equal(ours[0], base[0])


def sparse_models(count=3, shape=(16, 12)):
    """Task vectors that change overlapping random halves of the entries, as RAM assumes."""
    base, thetas = models(count, shape=shape)
    masks = [randn(*shape, seed=50 + t) > 0 for t in range(count)]
    return base, [torch.where(m, x, base) for m, x in zip(masks, thetas)]


@pytest.mark.parametrize("name,parameters", [("ram", {}), ("ramplus_tl", {}), ("ramplus_tl", {"r": 0.5, "alpha": 1.0})])
def test_ram(name, parameters):
    base, thetas = sparse_models()
    ours = run_method(name, TensorGroup("x", thetas, ancestor=base), **parameters)
    close(ours, mergekit(name, [base, *thetas], base_index=0, **parameters))


def test_ram_takes_unique_changes_whole_and_averages_shared_ones():
    base = torch.zeros(4)
    a, b = torch.tensor([1.0, 2.0, 0.0, 0.0]), torch.tensor([3.0, 0.0, 5.0, 0.0])
    close(run_method("ram", TensorGroup("x", [a, b], ancestor=base)), torch.tensor([2.0, 2.0, 5.0, 0.0]))
