"""The methods mergekit also has give mergekit's result (its tensor functions, called directly, are the expectation)."""
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
    ours = run_method("task_arithmetic", TensorGroup("x", thetas, base=base), weight=w, merge_lambda=0.7,
                      normalize=normalize)
    expected = mergekit("task_arithmetic", [base, *thetas], base_index=0, weight=w, normalize=normalize,
                        **{"lambda": 0.7})
    torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize("normalize,rescale", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("density", [[1.0, 1.0, 1.0], [0.2, 0.5, 0.8]])
def test_ties(density, normalize, rescale):
    base, thetas = models(3, shape=(16, 12))
    w = [1.0, 0.5, 0.8]
    ours = run_method("ties", TensorGroup("x", thetas, base=base), weight=w, density=density, merge_lambda=0.9,
                      normalize=normalize, rescale=rescale)
    expected = mergekit("ties", [base, *thetas], base_index=0, weight=w, density=density, normalize=normalize,
                        rescale=rescale, **{"lambda": 0.9})
    torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize("name", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("rescale", [False, True])
def test_breadcrumbs(name, rescale):
    base, thetas = models(3, shape=(16, 12))
    parameters = dict(weight=[1.0, 0.5, 0.8], density=[0.5, 0.7, 0.9], gamma=[0.05, 0.1, 0.02], rescale=rescale)
    ours = run_method(name, TensorGroup("x", thetas, base=base), **parameters)
    torch.testing.assert_close(ours, mergekit(name, [base, *thetas], base_index=0, **parameters))


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_without_dropping(name):
    """With density 1 nothing is random, so the two must agree exactly."""
    base, thetas = models(3)
    w = [1.0, 0.5, 0.8]
    ours = run_method(name, TensorGroup("x", thetas, base=base), weight=w)
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
    ours = run_method("ties", TensorGroup("x", thetas, base=base), weight=[1.0, 0.5, 0.7])
    expected = mergekit("ties", [base, *thetas], base_index=0, weight=[1.0, 0.5, 0.7])
    assert ours.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
