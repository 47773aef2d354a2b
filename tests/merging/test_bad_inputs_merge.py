"""Bad input to the merge programs (merge.py, trim.py, task_arithmetic.py, uncertainty_based_gradient_matching.py),
as one table: each case ends in exit status 2 with one line `error: ...` naming the value, file or tensor
and the cause, no traceback, no output (nor temporary) left, and every input file as it was."""
import collections
import hashlib
import logging
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import merge as merge_program
import task_arithmetic as task_arithmetic_program
import trim as trim_program
import uncertainty_based_gradient_matching as ubgm_program
from modelmerge.merging.cli import run_cli
from tiny import make_tiny_bert, perturbed_copy

SHAPES = {"enc.w": (12, 8), "enc.b": (8,), "head.w": (8, 3)}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Paths by name: an ancestor, two models, their Fisher statistics, and broken or hostile inputs."""
    root = tmp_path_factory.mktemp("inputs")
    generator = torch.Generator().manual_seed(0)

    def save(name, tensors, file="model.safetensors"):
        folder = root / name
        folder.mkdir()
        save_file(tensors, folder / file)
        return str(folder)

    base = {n: torch.randn(s, generator=generator) for n, s in SHAPES.items()}
    paths = {"base": save("base", base)}
    for name in ("a", "b"):
        paths[name] = save(name, {n: t + 0.1 * torch.randn(t.shape, generator=generator) for n, t in base.items()})
        paths["f" + name] = save("f" + name, {n: torch.rand(s, generator=generator) for n, s in SHAPES.items()},
                                 "fisher.safetensors")
    negative = {n: torch.rand(s, generator=generator) for n, s in SHAPES.items()}
    negative["enc.w"][3, 4] = -0.5
    paths["negative_fisher"] = save("negative_fisher", negative, "fisher.safetensors")
    corrupt = root / "corrupt"
    corrupt.mkdir()
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    paths["corrupt"] = str(corrupt)

    class Hostile:
        def __reduce__(self):
            return (os.system, ("echo owned",))

    torch.save({"enc.w": torch.zeros(12, 8), "payload": Hostile()}, root / "hostile.pt")
    paths["hostile"] = str(root / "hostile.pt")
    bad_config = root / "bad_config"
    bad_config.mkdir()
    save_file(base, bad_config / "model.safetensors")
    (bad_config / "config.json").write_text('{"model_type": "bert",')
    paths["bad_config"] = str(bad_config)
    mine = root / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("the user's own file")
    paths["mine"] = str(mine)
    config = root / "bad_density.yml"
    config.write_text(f"merge_method: ties\nbase_model: {paths['base']}\nmodels:\n"
                      f"  - model: {paths['a']}\n    parameters: {{density: -0.3, weight: 1.0}}\n"
                      f"  - model: {paths['b']}\n    parameters: {{density: 0.5, weight: 1.0}}\n")
    paths["bad_density.yml"] = str(config)
    return paths


def merge(method, *extra):
    return lambda p, out: ["--merge", method, "--ancestor", p["base"], "--models", p["a"], p["b"], "--output", out,
                           "--no_progress", *extra]


def fisher(*extra, stats=("fa", "fb")):
    return lambda p, out: ["--merge", "fisher", "--models", p["a"], p["b"], "--aux_data", *[p[s] for s in stats],
                           "--output", out, "--no_progress", *extra]


def trim(*extra, model="a", output=None):
    return lambda p, out: ["--model", p[model], "--ancestor", p["base"], "--output", p[output] if output else out,
                           *extra]


M, T = merge_program.main, trim_program.main
CASES = [
    # method parameters outside their ranges
    ("ties density negative", M, merge("ties", "--x:density", "-0.3"), "parameter 'density' of method ties must lie in (0, 1], got -0.3"),
    ("ties density above 1", M, merge("ties", "--x:density", "1.5"), "must lie in (0, 1], got 1.5"),
    ("ties density 0", M, merge("ties", "--x:density", "0"), "must lie in (0, 1], got 0.0"),
    ("ties density per model", M, merge("ties", "--x:density", "0.5,-1"), "must lie in (0, 1], got -1.0"),
    ("ties consensus", M, merge("ties", "--x:consensus_method", "vote"), "consensus_method' of method ties must be one of sum, count"),
    ("ties majority sign", M, merge("ties", "--x:global_majority_sign", "0"), "must be one of 1, -1, got 0"),
    ("dare p = 1", M, merge("dare_linear", "--x:dropout_probability", "1"), "'dropout_probability' of method dare_linear must lie in [0, 1), got 1.0"),
    ("dare p negative", M, merge("dare_ties", "--x:dropout_probability", "-0.1"), "must lie in [0, 1)"),
    ("breadcrumbs gamma", M, merge("breadcrumbs", "--x:gamma", "1"), "'gamma' of method breadcrumbs must lie in [0, 1)"),
    ("lambda nan", M, merge("task_arithmetic", "--x:merge_lambda", "nan"), "'merge_lambda' of method task_arithmetic must be finite, got nan"),
    ("lambda inf", M, merge("task_arithmetic", "--x:lambda", "inf"), "must be finite, got inf"),
    ("lambda text", M, merge("task_arithmetic", "--x:merge_lambda", "lots"), "cannot read 'lots' as float"),
    ("mats iterations", M, merge("mats", "--x:objective", "average", "--x:iterations", "-1"), "'iterations' of method mats must lie in [0, inf), got -1"),
    ("mats objective", M, merge("mats", "--x:objective", "fishy"), "must be one of average, fisher, regmean, blockwise_fisher"),
    ("regmean alpha", M, merge("regmean", "--x:alpha", "2"), "'alpha' of method regmean must lie in [0, 1], got 2.0"),
    ("slerp t", M, lambda p, out: ["--merge", "slerp", "--models", p["a"], p["b"], "--x:t", "1.5", "--output", out], "'t' of method slerp must lie in [0, 1]"),
    ("fisher weight negative", M, fisher("--x:weight", "1,-1"), "'weight' of method fisher must lie in [0, inf), got -1.0"),
    ("ubgm delta negative", M, merge("ubgm", "--aux_data", "FA", "FB", "--ancestor_aux_data", "FA", "--x:delta_0", "-1"),
     "'delta_0' of method uncertainty_based_gradient_matching must lie in [0, inf)"),
    ("yaml density", M, lambda p, out: ["--config", p["bad_density.yml"], out], "must lie in (0, 1], got -0.3"),
    # statistics
    ("negative fisher", M, fisher(stats=("fa", "negative_fisher")), "statistic 'fisher' enc.w in"),
    ("statistics a method does not use", M, lambda p, out: merge("task_arithmetic")(p, out) + ["--aux_data", p["fa"], p["fb"]],
     "method task_arithmetic uses no statistics of the models; drop --aux_data"),
    ("ancestor statistics a method does not use", M, merge("fisher", "--aux_data", "FA", "FB", "--ancestor_aux_data", "FA"),
     "method fisher uses no statistics of the ancestor; drop --ancestor_aux_data"),
    # tensor selection
    ("include matches nothing", M, merge("task_arithmetic", "--include", "decoder"), "include 'decoder' select no floating-point tensor"),
    ("exclude everything", M, merge("task_arithmetic", "--exclude", "."), "exclude '.' select no floating-point tensor"),
    ("include not a regex", M, merge("task_arithmetic", "--include", "enc.(w"), "include pattern 'enc.(w' is not a regular expression"),
    # options
    ("device gpu0", M, merge("task_arithmetic", "--device", "gpu0"), "device 'gpu0' is not a torch device (cpu, cuda or cuda:N)"),
    ("shard size", M, merge("task_arithmetic", "--max_shard_size", "lots"), "not a size: 'lots'"),
    ("lora rank", M, lambda p, out: ["--merge", "lora-linear", "--models", p["a"], p["b"], "--lora_rank", "0", "--output", out],
     "the LoRA rank must be at least 1, got 0"),
    ("unknown method", M, merge("tie"), "unknown merge method 'tie'"),
    ("unknown parameter", M, merge("ties", "--x:densty", "0.5"), "unknown parameter 'densty' for method ties"),
    ("missing ancestor", M, lambda p, out: ["--merge", "ties", "--models", p["a"], p["b"], "--output", out], "method ties needs the ancestor"),
    # inputs
    ("missing model", M, lambda p, out: ["--merge", "linear", "--models", p["a"], p["a"] + "-nope", "--output", out], "-nope: no such file or folder"),
    ("corrupt weights", M, lambda p, out: ["--merge", "linear", "--models", p["a"], p["corrupt"], "--output", out],
     "corrupt/model.safetensors: not a readable safetensors file"),
    ("corrupt config.json", M, lambda p, out: ["--merge", "linear", "--models", p["bad_config"], p["b"], "--dtype", "float16",
                                               "--output", out], "bad_config/config.json: not valid JSON"),
    ("pickle checkpoint", M, lambda p, out: ["--merge", "linear", "--models", p["a"], p["hostile"], "--output", out],
     "hostile.pt: refused: a pickle checkpoint that names posix.system"),
    # outputs
    ("output is a model", M, lambda p, out: merge("task_arithmetic")(p, p["a"]), "is the input"),
    ("output is the ancestor", M, lambda p, out: merge("task_arithmetic", "--overwrite")(p, p["base"]), "is the input"),
    ("output inside a model", M, lambda p, out: merge("task_arithmetic")(p, os.path.join(p["a"], "m")), "lies inside the input"),
    ("output is the user's folder", M, lambda p, out: merge("task_arithmetic")(p, p["mine"]), "exists and is not an output of this program"),
    # trim.py
    ("trim density negative", T, trim("--density", "-1"), "argument --density: the density must lie in (0, 1], got -1"),
    ("trim density text", T, trim("--density", "half"), "argument --density: not a number: 'half'"),
    ("trim device", T, trim("--density", "0.5", "--device", "gpu0"), "device 'gpu0' is not a torch device"),
    ("trim output is the model", T, trim("--density", "0.5", output="a"), "is the input"),
    ("trim user's folder", T, trim("--density", "0.5", output="mine"), "exists and is not an output of this program"),
    ("trim pickle", T, trim("--density", "0.5", model="hostile"), "refused: a pickle checkpoint"),
    # the paper's scripts
    ("task arithmetic nan", task_arithmetic_program.main,
     lambda p, out: ["--pretrained_model_name_or_path", p["base"], "--ft_model_name_or_paths", f"{p['a']},{p['b']}",
                     "--scaling_factor", "nan", "--out_model_path", out], "must be finite, got nan"),
    ("ubgm negative c_t", ubgm_program.main,
     lambda p, out: ["--pretrained_model_name_or_path", p["base"], "--ft_model_name_or_paths", f"{p['a']},{p['b']}",
                     "--pretrained_hessian_path", p["fa"], "--ft_hessian_paths", f"{p['fa']},{p['fb']}",
                     "--scaling_factors_ft", "100,-5", "--out_model_path", out],
     "'scaling_factors_ft' of method uncertainty_based_gradient_matching must lie in [0, inf), got -5.0"),
]


def fingerprint(paths):
    """SHA-256 of every file under the input paths."""
    found = {}
    for path in paths:
        for root, _, files in os.walk(path) if os.path.isdir(path) else [(os.path.dirname(path), [], [os.path.basename(path)])]:
            for name in files:
                with open(os.path.join(root, name), "rb") as f:
                    found[os.path.join(root, name)] = hashlib.sha256(f.read()).hexdigest()
    return found


@pytest.mark.parametrize("main,argv,message", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_exit_2_no_output_and_inputs_intact(main, argv, message, inputs, tmp_path, capsys):
    out = str(tmp_path / "out")
    args = [{"FA": inputs["fa"], "FB": inputs["fb"]}.get(a, a) for a in argv(inputs, out)]
    before = fingerprint(inputs.values())
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, args)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert exit_info.value.code == 2 and len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err
    assert os.listdir(tmp_path) == [] and fingerprint(inputs.values()) == before
    for path in inputs.values():
        parent = os.path.dirname(path)
        assert not [name for name in os.listdir(parent) if ".tmp-" in name]


def test_the_help_lists_every_method_with_its_parameters_and_ranges(merge_help):
    from modelmerge.methods import MERGE_METHODS

    for cls in set(MERGE_METHODS.values()):
        assert f"\n  {cls.name}" in merge_help and all(f"--x:{name} (" in merge_help for name in cls.parameters)
    for line in ("  ties  needs θ_0", "--x:density (float, one per model; in (0, 1]; default 1.0)",
                 "--x:dropout_probability (float; in [0, 1); default None)", "  fisher  needs statistic 'fisher'"):
        assert line in merge_help


def test_a_tensor_without_fisher_mass_is_the_weighted_average_with_a_warning(inputs, tmp_path, caplog):
    """Matena & Raffel's Fisher floor makes a tensor whose Fishers are all zero the λ-weighted average;
    the other tensors stay Fisher-weighted."""
    stats = []
    for name in ("fa", "fb"):
        fisher = load_file(os.path.join(inputs[name], "fisher.safetensors"))
        fisher["head.w"] = torch.zeros(SHAPES["head.w"])
        folder = tmp_path / f"zero_{name}"
        folder.mkdir()
        save_file(fisher, folder / "fisher.safetensors")
        stats.append((str(folder), fisher))
    out = str(tmp_path / "out")
    with caplog.at_level(logging.WARNING):
        run_cli(merge_program.main, ["--merge", "fisher", "--models", inputs["a"], inputs["b"], "--aux_data",
                                     *[s for s, _ in stats], "--x:weight", "1,3", "--output", out, "--no_progress"])
    assert "statistic 'fisher' of tensor head.w is zero for every model" in caplog.text
    assert "enc.w" not in caplog.text
    merged = load_file(os.path.join(out, "model.safetensors"))
    theta = [load_file(os.path.join(inputs[m], "model.safetensors")) for m in ("a", "b")]
    torch.testing.assert_close(merged["head.w"], (theta[0]["head.w"] + 3 * theta[1]["head.w"]) / 4)
    f = [s["enc.w"] for _, s in stats]
    expected = (f[0] * theta[0]["enc.w"] + 3 * f[1] * theta[1]["enc.w"]) / (f[0] + 3 * f[1])
    torch.testing.assert_close(merged["enc.w"], expected)


def test_a_state_dict_of_plain_tensors_in_a_pickle_is_read(inputs, tmp_path):
    """The refusal is only for pickles naming other objects: a torch.save'd state dict merges."""
    state = load_file(os.path.join(inputs["b"], "model.safetensors"))
    torch.save(collections.OrderedDict(state), tmp_path / "b.pt")
    run_cli(merge_program.main, ["--merge", "linear", "--models", inputs["a"], str(tmp_path / "b.pt"),
                                 "--output", str(tmp_path / "out"), "--no_progress"])
    assert set(load_file(tmp_path / "out" / "model.safetensors")) == set(SHAPES)


def test_a_layer_whose_gram_matrices_are_all_zero_is_the_plain_average_with_a_warning(caplog):
    from modelmerge.methods import TensorGroup, get_method

    generator = torch.Generator().manual_seed(3)
    weights = [torch.randn(4, 6, generator=generator) for _ in range(3)]
    group = TensorGroup("enc.w", weights, statistics=[{"gram": torch.zeros(6, 6, dtype=torch.float64)} for _ in weights])
    with caplog.at_level(logging.WARNING):
        merged = get_method("regmean")().merge(group, alpha=0.5)
    assert "Gram statistics of tensor enc.w are zero for every model" in caplog.text
    torch.testing.assert_close(merged, sum(weights) / 3)


# --- the methods of issue 9: listed by --help with their parameters; bad parameters, no θ_0, other shapes ---

NEW_METHODS = ["model_stock", "della", "della_linear", "sce", "nuslerp", "multislerp", "karcher", "nearswap",
               "arcee_fusion", "ram", "ramplus_tl", "tsv_m", "iso_c", "iso_cts", "wudi", "magmax", "consensus",
               "tall_masks", "emr"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_new")
    base = make_tiny_bert(str(root / "base"), seed=0)
    models = [perturbed_copy(base, str(root / f"ft{i}"), seed=i, scale=0.05) for i in (1, 2)]
    wider = make_tiny_bert(str(root / "wider"), seed=3, intermediate_size=48)
    return base, models, wider


def test_help_lists_every_new_method_with_its_parameters(merge_help):
    for name in NEW_METHODS:
        assert f"\n  {name}" in merge_help
    assert "--x:common_space_fraction (float; in [0, 1]; default 0.8)" in merge_help
    assert "--x:iterations (int; in [0, inf); default 300)" in merge_help
    assert all(program in merge_help for program in ("code/regmean_plusplus.py", "code/adamerging.py",
                                                     "code/modulated_merge.py"))


@pytest.mark.parametrize("method,parameters,message", [
    ("della", ["--x:density", "0"], "parameter 'density' of method della must lie in (0, 1], got 0.0"),
    ("wudi", ["--x:iterations", "-1"], "parameter 'iterations' of method wudi must lie in [0, inf), got -1"),
    ("iso_cts", ["--x:common_space_fraction", "1.5"], "parameter 'common_space_fraction' of method iso_cts must lie in [0, 1], got 1.5"),
    ("sce", ["--x:select_topk", "2"], "parameter 'select_topk' of method sce must lie in [0, 1], got 2.0"),
    ("della", ["--x:density", "0.2", "--x:epsilon", "0.3"], "epsilon must leave density ± epsilon inside (0, 1)"),
])
def test_a_parameter_outside_its_range_is_one_line(zoo, tmp_path, capsys, method, parameters, message):
    base, models, _ = zoo
    with pytest.raises(SystemExit) as exit_info:
        run_cli(merge_program.main, ["--merge", method, "--models", *models, "--ancestor", base, *parameters,
                                     "--output", str(tmp_path / "out"), "--no_progress"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method", ["tsv_m", "wudi", "model_stock", "emr"])
def test_no_ancestor_and_different_shapes_are_one_line(zoo, tmp_path, capsys, method):
    base, models, wider = zoo
    for arguments, message in ((["--models", *models], f"method {method} needs the ancestor θ_0"),
                               (["--models", models[0], wider, "--ancestor", base], "has shape [64] in")):
        with pytest.raises(SystemExit) as exit_info:
            run_cli(merge_program.main, ["--merge", method, *arguments, "--output", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err, err
        assert not (tmp_path / "out").exists()
