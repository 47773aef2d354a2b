"""KnOTS (Stoica et al., ICLR 2025) as an option of any merge with θ_0 or of a lora- merge: the shared basis is
FusionBench 0.2.33's subspace_alignment on the same inputs, task arithmetic in it is task arithmetic, TIES
acts on the aligned coordinates of LoRA updates, and bad input is one line with nothing written."""
import os
import subprocess
import sys

import merge as merge_program
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_lora_merge import deltas, make_adapter, run, scale
from test_methods import randn, run_method
from test_methods_fusion_bench import FUSION_BENCH
from tiny import make_tiny_bert

from modelmerge.merging.cli import run_cli
from modelmerge.methods import TensorGroup
from modelmerge.methods.knots import shared_basis

ALIGNMENT = r"""
import sys, torch
from fusion_bench.method.knots.knots_utils import subspace_alignment
taus = torch.load(sys.argv[1])
u, s, vhs = subspace_alignment(taus)
torch.save({"u": u, "s": s, "vhs": list(vhs)}, sys.argv[2])
"""


def test_the_shared_basis_is_fusion_benchs_subspace_alignment(tmp_path):
    if not os.path.isdir(os.path.join(FUSION_BENCH, "fusion_bench")):
        pytest.skip(f"FusionBench is not installed in {FUSION_BENCH} (bash .ci/install.sh)")
    low_rank = [randn(8, 2, seed=t) @ randn(2, 6, seed=10 + t) for t in range(3)]  # LoRA-like updates of rank 2
    taus = low_rank + [torch.zeros(8, 6)]  # a task without update adds no component
    torch.save(taus, tmp_path / "taus.pt")
    done = subprocess.run([sys.executable, "-c", ALIGNMENT, str(tmp_path / "taus.pt"), str(tmp_path / "out.pt")],
                          env=dict(os.environ, PYTHONPATH=FUSION_BENCH), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = torch.load(tmp_path / "out.pt")
    u, s, vhs = shared_basis(taus)
    assert len(s) == 6  # three rank-2 updates side by side
    torch.testing.assert_close(u, reference["u"], rtol=0, atol=1e-6)
    torch.testing.assert_close(s, reference["s"], rtol=0, atol=1e-6)
    for ours, theirs in zip(vhs, reference["vhs"], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    root = tmp_path_factory.mktemp("knots")
    base = make_tiny_bert(str(root / "base"), seed=0)
    return base, [make_adapter(base, root / f"a{i}", seed=30 + i, r=2, alpha=4) for i in range(3)]


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def test_task_arithmetic_in_the_shared_basis_is_task_arithmetic(lora, tmp_path):
    base, adapters = lora
    for name, extra in (("plain", []), ("knots", ["--x:knots", "true"])):
        run(["--merge", "lora-task_arithmetic", "--models", *adapters, "--ancestor", base, *extra,
             "--x:merge_lambda", "0.7", "--output", str(tmp_path / name)])
    plain, knots = weights(tmp_path / "plain"), weights(tmp_path / "knots")
    assert plain.keys() == knots.keys()
    for name in plain:
        torch.testing.assert_close(knots[name], plain[name], rtol=1e-5, atol=1e-6)


def test_lora_ties_with_knots_trims_the_aligned_coordinates(lora, tmp_path):
    base, adapters = lora
    run(["--merge", "lora-ties", "--models", *adapters, "--ancestor", base, "--x:knots", "true",
         "--x:density", "0.5", "--output", str(tmp_path / "out")])
    out, ancestor = weights(tmp_path / "out"), load_file(os.path.join(base, "model.safetensors"))
    changes = [deltas(a, scale(2, 4)) for a in adapters]
    for name, w0 in ancestor.items():
        if name not in changes[0]:
            continue
        taus = [c[name].double().numpy() for c in changes]
        u, s, vh = np.linalg.svd(np.concatenate(taus, axis=1), full_matrices=False)
        u, s, vh = u[:, s > 1e-4], s[s > 1e-4], vh[s > 1e-4]
        coordinates = [torch.from_numpy(v).float() for v in np.split(vh, len(taus), axis=1)]
        merged = run_method("ties", TensorGroup(name, coordinates, ancestor=torch.zeros_like(coordinates[0])), density=0.5)
        expected = w0.double().numpy() + (u * s) @ merged.double().numpy()
        np.testing.assert_allclose(out[name].double().numpy(), expected, rtol=1e-4, atol=1e-5)
        plain_ties = run_method("ties", TensorGroup(name, [w0 + c[name] for c in changes], ancestor=w0), density=0.5)
        assert not torch.allclose(out[name], plain_ties, atol=1e-4)  # not TIES on the weights


@pytest.mark.parametrize("extra,message", [
    (["--merge", "linear", "--x:knots", "true"], "KnOTS (knots) merges task updates θ_t − θ_0: it needs an --ancestor or a lora- merge"),
    (["--merge", "lora-ties", "--x:knots", "true", "ANCESTOR", "--aux_data", "ADAPTERS"], "KnOTS (knots) merges coordinates in a new basis"),
    (["--merge", "lora-ties", "--x:knots", "maybe", "ANCESTOR"], "parameter 'knots' of method ties: cannot read 'maybe' as bool"),
])
def test_bad_knots_input_is_one_line_and_writes_nothing(lora, tmp_path, capsys, extra, message):
    base, adapters = lora
    arguments = ["--models", *adapters[:2], "--output", str(tmp_path / "out")]
    for argument in extra:
        arguments += {"ANCESTOR": ["--ancestor", base], "ADAPTERS": adapters[:2]}.get(argument, [argument])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(merge_program.main, arguments)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_help_lists_knots(merge_help):
    assert "--x:knots (bool; default False)" in merge_help
