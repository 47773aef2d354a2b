"""Every method run tensor by tensor over tiny random BERTs' state dicts, as the driver does."""
import pytest
import torch
from transformers import BertForSequenceClassification

from modelmerge.methods import MERGE_METHODS, TensorGroup
from test_methods import EXTRA, run_method
from tiny import tiny_bert_config

NUM_MODELS = 3


def bert(seed):
    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config()).eval()


@pytest.fixture(scope="module")
def family():
    """An ancestor, three fine-tunes of it, diagonal Fishers, gradient magnitudes and the Gram matrices of every linear
    layer."""
    ancestor = bert(0)
    base = ancestor.state_dict()
    generator = torch.Generator().manual_seed(1)
    floats = [n for n, t in base.items() if t.is_floating_point()]
    models = [{n: base[n] + 0.02 * torch.randn(base[n].shape, generator=generator) if n in floats else base[n]
               for n in base} for _ in range(NUM_MODELS)]
    linear = {f"{n}.weight" for n, m in ancestor.named_modules() if isinstance(m, torch.nn.Linear)}
    stats = []
    for _ in range(NUM_MODELS + 1):
        s = {}
        for n in floats:
            s[n] = {"fisher": torch.rand(base[n].shape, generator=generator),
                    "gradient_magnitude": torch.rand(base[n].shape, generator=generator)}
            if n in linear:
                x = torch.randn(40, base[n].shape[1], generator=generator, dtype=torch.float64)
                g = torch.randn(40, base[n].shape[0], generator=generator, dtype=torch.float64)
                s[n].update(gram=x.T @ x, output_grad_gram=g.T @ g)
        stats.append(s)
    return base, models, stats[:NUM_MODELS], stats[NUM_MODELS], floats, linear


def merge_state_dict(name, base, models, stats, base_stats, floats, **params):
    merged = dict(base)
    for n in floats:
        group = TensorGroup(n, [m[n] for m in models], ancestor=base[n], statistics=[s[n] for s in stats],
                            ancestor_statistics=base_stats[n])
        merged[n] = run_method(name, group, **params)
    return merged


def group_size(name):
    return {"slerp": 2, "nuslerp": 2, "passthrough": 1, "nearswap": 1, "arcee_fusion": 1}.get(name, NUM_MODELS)


@pytest.mark.parametrize("name", sorted({cls.name for cls in MERGE_METHODS.values()}))
def test_every_method_gives_a_loadable_working_model(name, family):
    base, models, stats, base_stats, floats, _ = family
    k = group_size(name)
    merged = merge_state_dict(name, base, models[:k], stats[:k], base_stats, floats, **EXTRA.get(name, {}))
    model = bert(5)
    model.load_state_dict(merged, strict=True)
    logits = model(input_ids=torch.tensor([[2, 10, 11, 12, 3]])).logits
    assert torch.isfinite(logits).all()
    if name != "passthrough":
        assert any(not torch.equal(merged[n], models[0][n]) for n in floats)


@pytest.mark.parametrize("name", ["linear", "ties", "fisher", "regmean", "mats", "slerp", "mlerp"])
def test_merging_identical_transformers_returns_them(name, family):
    base, models, stats, base_stats, floats, _ = family
    k = group_size(name)
    same = [models[0]] * k
    # ties keeps its default density 1 (nothing trimmed); MaTS needs regularised Grams, since where 40
    # examples leave a Gram rank-deficient it keeps its starting point (the ancestor) in the null space.
    params = {"mats": {"iterations": 100, "alpha": 0.5}}.get(name, {})
    merged = merge_state_dict(name, base, same, [stats[0]] * k, base_stats, floats, **params)
    for n in floats:
        torch.testing.assert_close(merged[n], models[0][n], rtol=1e-5, atol=1e-6)


def test_task_arithmetic_and_ubgm_follow_their_formulas_on_every_tensor(family):
    base, models, stats, base_stats, floats, _ = family
    cs, c0, alpha = [3.0, 5.0, 7.0], 11.0, 0.6
    ta = merge_state_dict("task_arithmetic", base, models, stats, base_stats, floats, merge_lambda=alpha)
    ubgm = merge_state_dict("uncertainty_based_gradient_matching", base, models, stats, base_stats, floats,
                            scaling_factor=alpha, scaling_factor_pt=c0, scaling_factors_ft=cs, delta_0=1e-8)
    for n in floats:
        theta_0 = base[n].double()
        deltas = [m[n].double() - theta_0 for m in models]
        torch.testing.assert_close(ta[n].double(), theta_0 + alpha * sum(deltas), rtol=1e-5, atol=1e-6)
        hs = [s[n]["fisher"].double() for s in stats]
        h0 = base_stats[n]["fisher"].double()
        p = 1 / (sum(alpha * c * h for c, h in zip(cs, hs)) + c0 * h0 + 1e-8)
        expected = theta_0 + alpha * sum(p * (c * h + 1e-8 + c0 * h0) * d for c, h, d in zip(cs, hs, deltas))
        torch.testing.assert_close(ubgm[n].double(), expected, rtol=1e-5, atol=1e-6)


def test_mats_regmean_objective_equals_regmean_on_every_linear_layer(family):
    base, models, stats, base_stats, floats, linear = family
    regmean = merge_state_dict("regmean", base, models, stats, base_stats, floats, alpha=0.8)
    mats = merge_state_dict("mats", base, models, stats, base_stats, floats, objective="regmean", alpha=0.8,
                            iterations=200)
    average = merge_state_dict("linear", base, models, stats, base_stats, floats)
    for n in floats:
        torch.testing.assert_close(mats[n], regmean[n], rtol=1e-4, atol=1e-5)
        if n not in linear:
            torch.testing.assert_close(regmean[n], average[n])
