"""The merge programs end to end on tiny random BERTs: results against direct formulas, inputs in every
layout, outputs that load, and every kind of bad input ending in one clear error and no output."""
import json
import os
import subprocess
import sys

import merge as merge_program
import pytest
import task_arithmetic as task_arithmetic_program
import torch
import uncertainty_based_gradient_matching as ubgm_program
from safetensors.torch import load_file, save_file
from tiny import dtype_copy, make_tiny_bert, perturbed_copy
from transformers import BertForSequenceClassification

from modelmerge.merging.cli import run_cli as run_program
from sis_util import REPO


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def write_fisher(folder, like, seed, scale=1.0):
    """A Fisher statistics folder (fisher.safetensors) with positive random values shaped like model `like`."""
    generator = torch.Generator().manual_seed(seed)
    os.makedirs(folder, exist_ok=True)
    fisher = {n: scale * torch.rand(t.shape, generator=generator) for n, t in weights(like).items()}
    save_file(fisher, os.path.join(folder, "fisher.safetensors"))
    return str(folder), fisher


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    base = make_tiny_bert(str(root / "base"), seed=0)
    models = [perturbed_copy(base, str(root / f"ft{i}"), seed=i) for i in (1, 2, 3)]
    fishers = [write_fisher(root / f"fisher{i}", models[i], seed=10 + i) for i in range(3)]
    base_fisher = write_fisher(root / "fisher0", base, seed=10)
    return {"root": root, "base": base, "models": models, "fishers": fishers, "base_fisher": base_fisher}


def run(argv, program=merge_program):
    return run_program(program.main, argv + (["--no_progress"] if program is merge_program else []))


def assert_fails(argv, message, capsys, program=merge_program, output=None):
    with pytest.raises(SystemExit) as exit_info:
        run(argv, program)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error:") and message in err, err
    if output is not None:
        parent = os.path.dirname(output)
        assert not any(name.startswith(os.path.basename(output)) or ".tmp-" in name for name in os.listdir(parent))
    return err


def test_task_arithmetic_equals_the_formula_and_loads(zoo, tmp_path, capsys):
    out = str(tmp_path / "merged")
    summary = run(["--merge", "task_arithmetic", "--models", *zoo["models"], "--ancestor", zoo["base"],
                   "--x:merge_lambda", "0.3", "--x:weight", "1", "2", "0.5", "--output", out])
    assert capsys.readouterr().out.strip() == summary.line()
    assert summary.merged == 41 and summary.copied == 0 and summary.peak_rss_bytes > 0
    base, fts = weights(zoo["base"]), [weights(m) for m in zoo["models"]]
    merged = weights(out)
    for name, theta_0 in base.items():
        expected = theta_0 + 0.3 * sum(w * (ft[name] - theta_0) for w, ft in zip((1, 2, 0.5), fts))
        torch.testing.assert_close(merged[name], expected, rtol=1e-6, atol=1e-6)
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
    model = BertForSequenceClassification.from_pretrained(out)
    torch.testing.assert_close(model.state_dict()["classifier.weight"], merged["classifier.weight"])


def test_the_papers_task_arithmetic_script(zoo, tmp_path):
    out = str(tmp_path / "ta")
    run(["--pretrained_model_name_or_path", zoo["base"], "--ft_model_name_or_paths", ",".join(zoo["models"]),
         "--scaling_factor", "0.7", "--task_type", "SEQ_CLS", "--out_model_path", out], task_arithmetic_program)
    base, fts, merged = weights(zoo["base"]), [weights(m) for m in zoo["models"]], weights(out)
    for name, theta_0 in base.items():
        torch.testing.assert_close(merged[name], theta_0 + 0.7 * sum(ft[name] - theta_0 for ft in fts), rtol=1e-6, atol=1e-6)


def released_ubgm(theta_0, h_0, thetas, hessians, alpha, c_0, c_t, delta_0):
    """The formula exactly as the authors' released script evaluates it, on one tensor."""
    preconditioner = 1.0 / (sum(alpha * c * h for h, c in zip(hessians, c_t)) + c_0 * h_0 + delta_0)
    summed = sum(preconditioner * (c * h + delta_0 + c_0 * h_0) * (theta - theta_0)
                 for theta, h, c in zip(thetas, hessians, c_t))
    return theta_0 + alpha * summed


def test_the_papers_gradient_matching_script_matches_the_released_formula(zoo, tmp_path):
    out = str(tmp_path / "ubgm")
    fisher_paths = [path for path, _ in zoo["fishers"]]
    # The pretrained Hessian given as a model-shaped `hessian/` folder, as the paper's code stores it.
    hessian = tmp_path / "pretrained_stats" / "hessian"
    hessian.mkdir(parents=True)
    save_file(zoo["base_fisher"][1], hessian / "model.safetensors")
    run(["--pretrained_model_name_or_path", zoo["base"], "--pretrained_hessian_path", str(hessian),
         "--ft_model_name_or_paths", ",".join(zoo["models"]), "--ft_hessian_paths", ",".join(fisher_paths),
         "--scaling_factors_ft", "112000,8530,67349", "--scaling_factor_pt", "25000", "--scaling_factor", "0.8",
         "--delta_0", "1e-12", "--task_type", "SEQ_CLS", "--out_model_path", out], ubgm_program)
    base, fts, merged = weights(zoo["base"]), [weights(m) for m in zoo["models"]], weights(out)
    for name, theta_0 in base.items():
        expected = released_ubgm(theta_0, zoo["base_fisher"][1][name], [ft[name] for ft in fts],
                                 [f[name] for _, f in zoo["fishers"]], 0.8, 25000.0, [112000.0, 8530.0, 67349.0], 1e-12)
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)


def test_gradient_matching_with_zero_hessians_is_task_arithmetic(zoo, tmp_path):
    zeros = []
    for i, model in enumerate(zoo["models"] + [zoo["base"]]):
        path, _ = write_fisher(tmp_path / f"zero{i}", model, seed=0, scale=0.0)
        zeros.append(path)
    run(["--merge", "uncertainty_based_gradient_matching", "--models", *zoo["models"], "--ancestor", zoo["base"],
         "--aux_data", *zeros[:3], "--ancestor_aux_data", zeros[3], "--x:scaling_factor", "0.6",
         "--x:scaling_factors_ft", "3,5,7", "--x:scaling_factor_pt", "11", "--x:delta_0", "1e-12",
         "--output", str(tmp_path / "ubgm")])
    run(["--merge", "task_arithmetic", "--models", *zoo["models"], "--ancestor", zoo["base"],
         "--x:merge_lambda", "0.6", "--output", str(tmp_path / "ta")])
    ubgm, ta = weights(tmp_path / "ubgm"), weights(tmp_path / "ta")
    for name in ta:
        torch.testing.assert_close(ubgm[name], ta[name], rtol=1e-5, atol=1e-6)


def test_fisher_merging_with_equal_fishers_is_the_average(zoo, tmp_path):
    same = zoo["fishers"][0][0]
    run(["--merge", "fisher", "--models", *zoo["models"], "--aux_data", same, same, same, "--output", str(tmp_path / "f")])
    fts, merged = [weights(m) for m in zoo["models"]], weights(tmp_path / "f")
    for name in merged:
        torch.testing.assert_close(merged[name], sum(ft[name] for ft in fts) / 3, rtol=1e-5, atol=1e-6)


def test_merging_identical_models_returns_them(zoo, tmp_path):
    model = zoo["models"][0]
    summary = run(["--merge", "ties", "--models", model, model, "--ancestor", model, "--x:density", "0.3",
                   "--output", str(tmp_path / "same")])
    assert summary.copied == 41 and summary.merged == 0
    expected, merged = weights(model), weights(tmp_path / "same")
    assert all(torch.equal(merged[n], t) for n, t in expected.items())


def test_include_exclude_dtype_and_a_bare_output_file(zoo, tmp_path):
    out = str(tmp_path / "merged.safetensors")
    summary = run(["--merge", "linear", "--models", *zoo["models"][:2], "--ancestor", zoo["base"],
                   "--include", r"^bert\.", "--exclude", r"LayerNorm", "--dtype", "float16", "--output", out])
    base, fts, merged = weights(zoo["base"]), [weights(m) for m in zoo["models"][:2]], load_file(out)
    assert merged.keys() == base.keys()
    kept = [n for n in base if not n.startswith("bert.") or "LayerNorm" in n]
    assert summary.copied == len(kept) and summary.merged == len(base) - len(kept)
    for name, theta_0 in base.items():
        assert merged[name].dtype == torch.float16
        expected = theta_0 if name in kept else (fts[0][name].half() + fts[1][name].half()) / 2
        torch.testing.assert_close(merged[name], expected.half(), rtol=1e-3, atol=1e-3)


def test_dtype_is_written_into_the_config(zoo, tmp_path):
    out = tmp_path / "bf16"
    run(["--merge", "average", "--models", *zoo["models"][:2], "--dtype", "bfloat16", "--output", str(out)])
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in weights(out).values())


def config_dtype(folder):
    return json.loads((folder / "config.json").read_text())["dtype"]


def test_mixed_dtype_models_merge_in_the_ancestors_dtype_and_the_config_says_so(zoo, tmp_path):
    """Issue 21: fp16 + bf16 models with an fp32 ancestor gave fp16 tensors and "dtype": "float32"."""
    half = dtype_copy(zoo["models"][0], tmp_path / "fp16", torch.float16)
    brain = dtype_copy(zoo["models"][1], tmp_path / "bf16", torch.bfloat16)
    base = weights(zoo["base"])
    for order in ((half, brain), (brain, half)):
        out = tmp_path / f"merged-{len(os.listdir(tmp_path))}"
        run(["--merge", "task_arithmetic", "--models", *order, "--ancestor", zoo["base"], "--x:merge_lambda", "0.5",
             "--output", str(out)])
        merged, thetas = weights(out), [weights(m) for m in order]
        assert config_dtype(out) == "float32"
        for name, theta_0 in base.items():
            assert merged[name].dtype == torch.float32
            expected = theta_0 + 0.5 * sum(theta[name].float() - theta_0 for theta in thetas)  # fp32 arithmetic
            torch.testing.assert_close(merged[name], expected, rtol=1e-6, atol=1e-7)
    half_base = dtype_copy(zoo["base"], tmp_path / "base16", torch.float16)
    out = tmp_path / "to-fp16-ancestor"
    run(["--merge", "task_arithmetic", "--models", *zoo["models"][:2], "--ancestor", half_base, "--output", str(out)])
    assert config_dtype(out) == "float16" and {t.dtype for t in weights(out).values()} == {torch.float16}


def test_without_an_ancestor_the_first_models_dtype_is_the_outputs(zoo, tmp_path):
    half = dtype_copy(zoo["models"][1], tmp_path / "fp16", torch.float16)
    outputs = {}
    for first, models in ((torch.float32, [zoo["models"][0], half]), (torch.float16, [half, zoo["models"][0]])):
        out = tmp_path / str(first)
        run(["--merge", "average", "--models", *models, "--output", str(out)])
        assert config_dtype(out) == str(first)[6:]
        outputs[first] = weights(out)
        assert all(t.dtype == first for t in outputs[first].values() if t.is_floating_point())
    a, b = weights(zoo["models"][0]), weights(half)
    for name, merged in outputs[torch.float32].items():
        if merged.is_floating_point():
            torch.testing.assert_close(merged, (a[name] + b[name].float()) / 2, rtol=1e-6, atol=1e-7)
            assert torch.equal(outputs[torch.float16][name], merged.half())  # the same fp32 result, rounded once


def test_dtype_overrides_the_rule_and_updates_an_older_torch_dtype_key(zoo, tmp_path):
    base = dtype_copy(zoo["base"], tmp_path / "base", torch.float32)
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    config["torch_dtype"] = config.pop("dtype")  # as transformers 4 wrote it
    (tmp_path / "base" / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    run(["--merge", "task_arithmetic", "--models", *zoo["models"][:2], "--ancestor", base, "--dtype", "bfloat16",
         "--output", str(out)])
    written = json.loads((out / "config.json").read_text())
    assert written["dtype"] == written["torch_dtype"] == "bfloat16"
    assert BertForSequenceClassification.from_pretrained(out).dtype == torch.bfloat16


@pytest.mark.parametrize("keys, expected", [({}, torch.float32), ({"out_dtype": "bfloat16"}, torch.bfloat16),
                                            ({"dtype": "float16"}, torch.float16)])
def test_mergekit_yaml_follows_the_same_dtype_rule(zoo, tmp_path, keys, expected):
    import yaml

    half = dtype_copy(zoo["models"][0], tmp_path / "fp16", torch.float16)
    brain = dtype_copy(zoo["models"][1], tmp_path / "bf16", torch.bfloat16)
    config = {"merge_method": "task_arithmetic", "base_model": zoo["base"],
              "models": [{"model": m, "parameters": {"weight": 0.5}} for m in (half, brain)], **keys}
    (tmp_path / "merge.yml").write_text(yaml.safe_dump(config))
    run(["--config", str(tmp_path / "merge.yml"), str(tmp_path / "out")])
    assert config_dtype(tmp_path / "out") == str(expected)[6:]
    assert {t.dtype for t in weights(tmp_path / "out").values() if t.is_floating_point()} == {expected}


def test_bin_sharded_and_bare_inputs_give_the_same_merge_and_outputs_shard(zoo, tmp_path):
    first, second = (weights(m) for m in zoo["models"][:2])
    (tmp_path / "bin").mkdir()
    torch.save(first, tmp_path / "bin" / "pytorch_model.bin")
    (tmp_path / "sharded").mkdir()
    names = sorted(second)
    save_file({n: second[n] for n in names[:20]}, tmp_path / "sharded" / "a.safetensors")
    save_file({n: second[n] for n in names[20:]}, tmp_path / "sharded" / "b.safetensors")
    weight_map = {n: ("a" if i < 20 else "b") + ".safetensors" for i, n in enumerate(names)}
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    save_file(weights(zoo["base"]), tmp_path / "base.safetensors")
    run(["--merge", "task_arithmetic", "--models", str(tmp_path / "bin"), str(tmp_path / "sharded"),
         "--ancestor", str(tmp_path / "base.safetensors"), "--max_shard_size", "20kB", "--output", str(tmp_path / "a")])
    run(["--merge", "task_arithmetic", "--models", *zoo["models"][:2], "--ancestor", zoo["base"], "--output", str(tmp_path / "b")])
    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    shards = {}
    for shard in set(index["weight_map"].values()):
        shards.update(load_file(tmp_path / "a" / shard))
    expected = weights(tmp_path / "b")
    assert shards.keys() == expected.keys() and all(torch.equal(shards[n], expected[n]) for n in expected)


def test_non_float_tensors_are_copied_from_the_ancestor(tmp_path):
    def state(seed):
        generator = torch.Generator().manual_seed(seed)
        return {"w": torch.randn(3, generator=generator), "position_ids": torch.arange(4) + seed}

    for i in range(3):
        save_file(state(i), tmp_path / f"m{i}.safetensors")
    summary = run(["--merge", "task_arithmetic", "--models", str(tmp_path / "m1.safetensors"), str(tmp_path / "m2.safetensors"),
                   "--ancestor", str(tmp_path / "m0.safetensors"), "--output", str(tmp_path / "out.safetensors")])
    merged = load_file(tmp_path / "out.safetensors")
    assert torch.equal(merged["position_ids"], torch.arange(4)) and summary.copied == 1
    torch.testing.assert_close(merged["w"], state(1)["w"] + state(2)["w"] - state(0)["w"])


def _corrupt(zoo, tmp_path, change):
    """A copy of the first model (safetensors file) with `change` applied to its tensors."""
    tensors = weights(zoo["models"][0])
    change(tensors)
    path = str(tmp_path / "corrupt.safetensors")
    save_file(tensors, path)
    return path


def test_bad_inputs_end_in_one_clear_error_and_no_output(zoo, tmp_path, capsys):
    out = str(tmp_path / "out")
    models, base = zoo["models"], zoo["base"]
    fisher_paths = [p for p, _ in zoo["fishers"]]
    ta = ["--merge", "task_arithmetic", "--ancestor", base, "--output", out]

    missing = _corrupt(zoo, tmp_path, lambda t: t.pop("classifier.bias"))
    assert_fails(ta + ["--models", models[1], missing], "classifier.bias only in", capsys, output=out)
    reshaped = _corrupt(zoo, tmp_path, lambda t: t.update({"classifier.bias": torch.zeros(3)}))
    assert_fails(ta + ["--models", models[1], reshaped], "tensor classifier.bias has shape [2]", capsys, output=out)
    nan = _corrupt(zoo, tmp_path, lambda t: t["bert.pooler.dense.weight"].__setitem__((0, 0), float("nan")))
    err = assert_fails(ta + ["--models", models[1], nan], "NaN or infinite", capsys, output=out)
    assert "bert.pooler.dense.weight" in err and nan in err
    assert_fails(ta + ["--models", *models, "--x:merge_lambda", "lots"], "cannot read 'lots' as float", capsys, output=out)
    assert_fails(ta + ["--models", *models, "--x:lambada", "1"], "unknown parameter 'lambada'", capsys, output=out)
    assert_fails(ta + ["--models", *models, "--x:weight", "1", "2"], "one value per model (3), got 2", capsys, output=out)
    assert_fails(["--merge", "tie", "--models", *models, "--output", out], "unknown merge method 'tie'", capsys, output=out)
    assert_fails(["--merge", "task_arithmetic", "--models", *models, "--output", out], "needs the ancestor θ_0", capsys, output=out)
    assert_fails(["--merge", "slerp", "--models", *models, "--output", out], "exactly 2 models, got 3", capsys, output=out)

    fisher = ["--merge", "fisher", "--models", *models, "--output", out]
    assert_fails(fisher + ["--aux_data", *fisher_paths[:2]], "got 2 statistics for 3 models", capsys, output=out)
    assert_fails(fisher, "needs statistics (fisher)", capsys, output=out)
    partial = tmp_path / "partial"
    partial.mkdir()
    stats = dict(zoo["fishers"][0][1])
    stats.pop("bert.embeddings.LayerNorm.weight")
    save_file(stats, partial / "fisher.safetensors")
    assert_fails(fisher + ["--aux_data", *fisher_paths[:2], str(partial)],
                 "no 'fisher' for tensor bert.embeddings.LayerNorm.weight", capsys, output=out)
    infinite = tmp_path / "infinite"
    infinite.mkdir()
    stats = dict(zoo["fishers"][0][1])
    stats["classifier.weight"] = torch.full_like(stats["classifier.weight"], float("inf"))
    save_file(stats, infinite / "fisher.safetensors")
    err = assert_fails(fisher + ["--aux_data", *fisher_paths[:2], str(infinite)], "statistic 'fisher' classifier.weight", capsys, output=out)
    assert "NaN or infinite" in err


def test_gradient_matching_errors(zoo, tmp_path, capsys):
    out = str(tmp_path / "out")
    zero = write_fisher(tmp_path / "zero", zoo["base"], seed=0, scale=0.0)[0]
    fisher_paths = [p for p, _ in zoo["fishers"]]
    common = ["--pretrained_model_name_or_path", zoo["base"], "--ft_model_name_or_paths", ",".join(zoo["models"][:2]),
              "--out_model_path", out]
    assert_fails(common + ["--pretrained_hessian_path", zero, "--ft_hessian_paths", f"{zero},{zero}",
                           "--scaling_factors_ft", "1,1"], "zero denominator", capsys, ubgm_program, out)
    assert_fails(common + ["--pretrained_hessian_path", zero, "--ft_hessian_paths", ",".join(fisher_paths[:2]),
                           "--scaling_factors_ft", "1,2,3"], "--scaling_factors_ft: 3 values for 2 models", capsys, ubgm_program, out)
    assert_fails(common + ["--pretrained_hessian_path", zero, "--ft_hessian_paths", fisher_paths[0],
                           "--scaling_factors_ft", "1,2"], "--ft_hessian_paths: 1 paths for 2 models", capsys, ubgm_program, out)


def test_a_failed_merge_keeps_an_existing_output(zoo, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "marker").write_text("previous result")
    assert_fails(["--merge", "slerp", "--models", *zoo["models"], "--output", str(out)], "exactly 2", capsys)
    assert os.listdir(tmp_path) == ["out"] and (out / "marker").read_text() == "previous result"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_cuda_without_a_gpu_is_an_error(zoo, tmp_path, capsys):
    assert_fails(["--merge", "linear", "--models", *zoo["models"], "--device", "cuda", "--output", str(tmp_path / "o")],
                 "no CUDA device", capsys)


def test_the_program_prints_progress_and_a_summary_and_fails_with_status_2(zoo, tmp_path):
    command = [sys.executable, os.path.join(REPO, "code", "merge.py"), "--merge", "linear", "--models", *zoo["models"][:2]]
    done = subprocess.run(command + ["--output", str(tmp_path / "ok")], capture_output=True, text=True, check=True)
    assert done.stdout.startswith("merged 41 tensors, copied 0, ") and "peak RSS" in done.stdout
    assert "41/41" in done.stderr  # the progress bar
    failed = subprocess.run(command + [zoo["base"], "--x:weight", "1,2", "--output", str(tmp_path / "bad")],
                            capture_output=True, text=True)
    assert failed.returncode == 2 and failed.stderr.strip().endswith("needs one value per model (3), got 2")
    assert not (tmp_path / "bad").exists()


BLOCKWISE_MERGES = {
    "task_arithmetic": ["--x:merge_lambda", "0.4", "--x:weight", "1.0,0.5,0.7"],
    "ties": ["--x:density", "0.3,0.6,0.9", "--x:consensus_method", "count"],
    "linear": ["--x:weight", "0.2,0.5,1.3"],
    "fisher": ["--x:weight", "0.2,0.5,1.3"],
    "uncertainty_based_gradient_matching": ["--x:scaling_factors_ft", "112000,8530,67349", "--x:scaling_factor_pt", "25000"],
}


@pytest.mark.parametrize("method", sorted(BLOCKWISE_MERGES))
def test_elementwise_methods_merged_in_row_blocks_give_the_same_files(method, zoo, tmp_path, monkeypatch):
    from modelmerge.merging import execute

    argv = ["--merge", method, "--models", *zoo["models"], "--ancestor", zoo["base"], *BLOCKWISE_MERGES[method]]
    if method in ("fisher", "uncertainty_based_gradient_matching"):
        argv += ["--aux_data", *[p for p, _ in zoo["fishers"]]]
    if method == "uncertainty_based_gradient_matching":
        argv += ["--ancestor_aux_data", zoo["base_fisher"][0]]
    monkeypatch.setattr(execute, "BLOCK_BYTES", 2**40)
    run(argv + ["--output", str(tmp_path / "whole")])
    blocks = []
    read_group = execute._read_group
    monkeypatch.setattr(execute, "_read_group", lambda task, rows, *a: blocks.append(rows) or read_group(task, rows, *a))
    monkeypatch.setattr(execute, "BLOCK_BYTES", 1000)  # word embeddings: 400 rows of 128 bytes, 7 rows a block
    run(argv + ["--output", str(tmp_path / "blocks")])
    assert slice(0, 7) in blocks and slice(399, 400) in blocks
    with open(tmp_path / "whole" / "model.safetensors", "rb") as whole, open(tmp_path / "blocks" / "model.safetensors", "rb") as in_blocks:
        assert whole.read() == in_blocks.read()


def test_bad_values_in_a_late_block_are_found_and_named(zoo, tmp_path, monkeypatch, capsys):
    from modelmerge.merging import execute

    monkeypatch.setattr(execute, "BLOCK_BYTES", 1000)
    nan = _corrupt(zoo, tmp_path, lambda t: t["bert.embeddings.word_embeddings.weight"].__setitem__((399, 0), float("nan")))
    for method in ("task_arithmetic", "ties"):
        assert_fails(["--merge", method, "--models", nan, zoo["models"][1], "--ancestor", zoo["base"],
                      "--output", str(tmp_path / "bad")], "bert.embeddings.word_embeddings.weight", capsys,
                     output=str(tmp_path / "bad"))
    hessian = tmp_path / "zero_hessian"
    hessian.mkdir()
    stats = dict(zoo["base_fisher"][1])
    stats["bert.embeddings.word_embeddings.weight"] = torch.zeros_like(stats["bert.embeddings.word_embeddings.weight"])
    save_file(stats, hessian / "fisher.safetensors")
    zero = {n: torch.zeros_like(t) for n, t in stats.items()}
    for i in range(3):
        (tmp_path / f"zero{i}").mkdir()
        save_file(zero, tmp_path / f"zero{i}" / "fisher.safetensors")
    err = assert_fails(["--merge", "ubgm", "--models", *zoo["models"], "--ancestor", zoo["base"],
                        "--aux_data", *[str(tmp_path / f"zero{i}") for i in range(3)],
                        "--ancestor_aux_data", str(hessian), "--x:delta_0", "0", "--output", str(tmp_path / "bad")],
                       "zero denominator", capsys, output=str(tmp_path / "bad"))
    assert "bert.embeddings.word_embeddings.weight (rows 0-6)" in err and "(224 entries)" in err  # 7 rows of 32


def test_cpu_merges_run_on_one_thread_unless_omp_num_threads_is_set(zoo, tmp_path, monkeypatch, record_threads,
                                                                     restore_threads):
    from modelmerge.methods.task_arithmetic import TaskArithmetic

    seen = record_threads(TaskArithmetic)
    argv = ["--merge", "task_arithmetic", "--models", *zoo["models"], "--ancestor", zoo["base"]]
    torch.set_num_threads(2)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    run(argv + ["--output", str(tmp_path / "default")])
    assert set(seen) == {1} and torch.get_num_threads() == 2
    seen.clear()
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    run(argv + ["--output", str(tmp_path / "asked")])
    assert set(seen) == {2}


def test_threads_sets_the_merges_torch_threads(zoo, tmp_path, monkeypatch, record_threads):
    from modelmerge.methods.tsv_m import TsvM

    seen = record_threads(TsvM)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads = torch.get_num_threads()
    run(["--merge", "tsv_m", "--models", *zoo["models"], "--ancestor", zoo["base"], "--threads", "2",
         "--output", str(tmp_path / "out")])
    assert set(seen) == {2} and torch.get_num_threads() == threads


def test_statistics_a_method_does_not_use_are_refused(zoo, tmp_path, capsys):
    """A Fisher given to TIES (which reads only 'trimmed' statistics) would be silently ignored."""
    assert_fails(["--merge", "ties", "--models", *zoo["models"], "--ancestor", zoo["base"],
                  "--aux_data", *[p for p, _ in zoo["fishers"]], "--output", str(tmp_path / "out")],
                 f"method ties reads statistics trimmed; {zoo['fishers'][0][0]} holds fisher", capsys,
                 output=str(tmp_path / "out"))
