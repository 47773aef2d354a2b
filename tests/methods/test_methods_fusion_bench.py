"""The data-free methods against FusionBench 0.2.33's own functions (the reference code the field's
tables come from): TSV-M, Iso-C, Iso-CTS, WUDI, MagMax, EMR, TALL masks, TATR. FusionBench runs in a subprocess
with its folder (.ci/install.sh, $FUSION_BENCH_DIR) on the path, so its pins never meet the project's."""
import os
import subprocess
import sys

import pytest
import torch

from modelmerge.methods import TensorGroup
from modelmerge.methods.consensus import tall_masks
from modelmerge.methods.emr import elect
from test_methods import randn, run_method

FUSION_BENCH = os.environ.get("FUSION_BENCH_DIR", os.path.expanduser("~/.cache/modelmerge/fusion_bench-0.2.33"))
SHAPES = {"w": (12, 9), "wide": (6, 10), "b": (7,)}
WUDI_STEPS = 20

REFERENCE = r"""
import sys, torch
from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts
from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction
from fusion_bench.method.wudi.wudi import wudi_merging
from fusion_bench.method.magmax.magmax import _magmax_select
from fusion_bench.method.emr_merging.utils import emr_merge
from fusion_bench.method.tall_mask.utils import generate_task_masks
inputs = torch.load(sys.argv[1])
base, taus = inputs["base"], inputs["taus"]
unified, masks, rescalers = emr_merge(taus)
out = {
    "tsv_m": compute_and_sum_svd_mem_reduction(taus, accelerator="cpu"),
    "iso_c": iso_c(taus, accelerator="cpu"),
    "iso_cts": iso_cts(taus, common_space_fraction=0.8, accelerator="cpu"),
    "wudi": {k: v.detach() for k, v in wudi_merging(taus, accelerator="cpu", iter_num=int(sys.argv[3])).items()},
    "magmax": _magmax_select(taus),
    "emr": (unified, masks, rescalers),
    "tall": {k: generate_task_masks(torch.stack([t[k].flatten() for t in taus]), torch.stack([(base[k] + t[k]).flatten() for t in taus]),
                                    base[k].flatten(), tall_mask_lambda=0.6).reshape(len(taus), *base[k].shape) for k in base},
}
torch.save(out, sys.argv[2])
"""


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    if not os.path.isdir(os.path.join(FUSION_BENCH, "fusion_bench")):
        pytest.skip(f"FusionBench is not installed in {FUSION_BENCH} (bash .ci/install.sh)")
    root = tmp_path_factory.mktemp("fusion_bench")
    base = {k: randn(*shape, seed=i) for i, (k, shape) in enumerate(SHAPES.items())}
    taus = [{k: 0.1 * randn(*shape, seed=10 * (t + 1) + i) for i, (k, shape) in enumerate(SHAPES.items())} for t in range(3)]
    torch.save({"base": base, "taus": taus}, root / "inputs.pt")
    env = dict(os.environ, PYTHONPATH=FUSION_BENCH)
    done = subprocess.run([sys.executable, "-c", REFERENCE, str(root / "inputs.pt"), str(root / "out.pt"), str(WUDI_STEPS)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return base, taus, torch.load(root / "out.pt")


def ours(name, base, taus, key, **parameters):
    group = TensorGroup(key, [base[key] + t[key] for t in taus], ancestor=base[key])
    return run_method(name, group, **parameters) - base[key]


@pytest.mark.parametrize("name", ["tsv_m", "iso_c", "iso_cts", "magmax"])
@pytest.mark.parametrize("key", list(SHAPES))
def test_the_merged_task_vector_is_fusion_benchs(case, name, key):
    base, taus, reference = case
    torch.testing.assert_close(ours(name, base, taus, key), reference[name][key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("key", list(SHAPES))
def test_wudi_is_fusion_benchs(case, key):
    base, taus, reference = case
    torch.testing.assert_close(ours("wudi", base, taus, key, iterations=WUDI_STEPS), reference["wudi"][key],
                               rtol=1e-4, atol=1e-5)


def test_emr_unified_vector_masks_and_rescalers_are_fusion_benchs(case):
    base, taus, reference = case
    unified, masks, rescalers = reference["emr"]
    own, kept = torch.zeros(3), torch.zeros(3)
    for key in SHAPES:
        tau_uni, our_masks = elect([t[key] for t in taus])
        torch.testing.assert_close(tau_uni, unified[key])
        assert all(torch.equal(m, r) for m, r in zip(our_masks, masks[key]))
        own += torch.stack([t[key].abs().mean() for t in taus])
        kept += torch.stack([(tau_uni * m).abs().mean() for m in our_masks])
    torch.testing.assert_close(own / kept, rescalers)  # what modelmerge.modulated writes (tests/methods/test_modulated_merge.py)


def test_tall_masks_are_fusion_benchs(case):
    base, taus, reference = case
    for key in SHAPES:
        masks = tall_masks([t[key] for t in taus], [0.6] * 3)
        assert all(torch.equal(m, r) for m, r in zip(masks, reference["tall"][key]))


TRUST_REGION = r"""
import sys, torch
from torch import nn
from fusion_bench.method.trust_region.clip_task_arithmetic import TaskArithmeticWithTrustRegionForCLIP
inputs = torch.load(sys.argv[1])
base, taus = inputs["base"], inputs["taus"]


class Pool:  # what the algorithm reads of a model pool: θ_0 and the fine-tuned models
    def __init__(self, key):
        self.key = key

    def load_pretrained_model(self):
        return module(base[self.key])

    def named_models(self):
        return [(f"task{t}", module(base[self.key] + tau[self.key])) for t, tau in enumerate(taus)]


def module(tensor):
    holder = nn.Module()
    holder.register_parameter("w", nn.Parameter(tensor.clone()))
    return holder


out = {}
for quantile in map(float, sys.argv[3].split(",")):
    algorithm = TaskArithmeticWithTrustRegionForCLIP(scaling_factor=0.3, threshold_quantile=quantile, max_samples=1,
                                                     batch_size=1, zero_shot=True)
    out[quantile] = {key: algorithm.run(Pool(key)).w.detach() for key in base}  # one tensor per model: our per-tensor rule
torch.save(out, sys.argv[2])
"""
QUANTILES = (0.99, 0.7, 0.0)


@pytest.fixture(scope="module")
def trust_region(case, tmp_path_factory):
    base, taus, _ = case
    root = tmp_path_factory.mktemp("trust_region")
    torch.save({"base": base, "taus": taus}, root / "inputs.pt")
    done = subprocess.run([sys.executable, "-c", TRUST_REGION, str(root / "inputs.pt"), str(root / "out.pt"),
                           ",".join(map(str, QUANTILES))],
                          env=dict(os.environ, PYTHONPATH=FUSION_BENCH), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(root / "out.pt")


@pytest.mark.parametrize("quantile", QUANTILES)
@pytest.mark.parametrize("key", list(SHAPES))
def test_tatr_is_fusion_benchs_data_free_trust_region(case, trust_region, quantile, key):
    base, taus, _ = case
    merged = run_method("tatr", TensorGroup(key, [base[key] + t[key] for t in taus], ancestor=base[key]),
                        threshold_quantile=quantile)
    torch.testing.assert_close(merged, trust_region[quantile][key], rtol=0, atol=1e-7)
    kept = (merged - base[key]) != 0
    assert int(kept.sum()) == int(kept.numel() * quantile)  # the entries below the ⌊q·n⌋-th smallest conflict
