"""mergekit 0.1.5's newer methods from YAML: the same file run by mergekit and by `code/merge.py --config`
gives the same tensors, and the git-theta-style command line with the same parameters gives them too."""
import merge as merge_program
import pytest
import torch
from safetensors.torch import load_file

from modelmerge.merging.cli import run_cli as run_program
from modelmerge.methods import della
from test_mergekit import assert_same, run_both, zoo  # noqa: F401  (zoo is a fixture)

TWO = [{"model": "@ft1@", "parameters": {"weight": 0.7}}, {"model": "@ft2@", "parameters": {"weight": 0.4}}]
THREE = TWO + [{"model": "@ft3@", "parameters": {"weight": 0.5}}]
CONFIGS = {
    "model_stock": {"merge_method": "model_stock", "base_model": "@base@",
                    "models": [{"model": "@ft1@"}, {"model": "@ft2@"}, {"model": "@ft3@"}],
                    "parameters": {"filter_wise": [{"filter": "attention", "value": True}, {"value": False}]}},
    "della": {"merge_method": "della", "base_model": "@base@",
              "models": [{"model": "@ft1@", "parameters": {"weight": 1.0, "density": 0.6, "epsilon": 0.2}},
                         {"model": "@ft2@", "parameters": {"weight": 0.5, "density": [0.3, 0.7]}}],
              "parameters": {"lambda": 0.9, "epsilon": 0.1}},
    "della_linear": {"merge_method": "della_linear", "base_model": "@base@",
                     "models": [{"model": "@ft1@", "parameters": {"weight": 0.6, "density": 0.5}},
                                {"model": "@ft2@", "parameters": {"weight": 0.4, "density": 0.5}}]},
    "sce": {"merge_method": "sce", "base_model": "@base@",
            "models": [{"model": "@ft1@"}, {"model": "@ft2@"}, {"model": "@ft3@"}], "parameters": {"select_topk": 0.4}},
    "nuslerp about a base": {"merge_method": "nuslerp", "base_model": "@base@", "models": TWO,
                             "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}},
    "nuslerp": {"merge_method": "nuslerp", "models": TWO},
    "multislerp": {"merge_method": "multislerp", "base_model": "@base@", "models": THREE},
    "karcher": {"merge_method": "karcher", "base_model": "@base@", "models": [{"model": "@ft1@"}, {"model": "@ft2@"}],
                "parameters": {"max_iter": 5}},
    "nearswap": {"merge_method": "nearswap", "base_model": "@base@", "models": [{"model": "@ft1@"}],
                 "parameters": {"t": [0.001, 0.1]}},
    "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": "@base@", "models": [{"model": "@ft1@"}]},
    "ram": {"merge_method": "ram", "base_model": "@base@", "models": [{"model": "@ft1@"}, {"model": "@ft2@"}],
            "parameters": {"epsilon": 0.03}},
    "ramplus_tl": {"merge_method": "ramplus_tl", "base_model": "@base@",
                   "models": [{"model": "@ft1@"}, {"model": "@ft2@"}, {"model": "@ft3@"}],
                   "parameters": {"epsilon": 0.03, "r": 0.4, "alpha": 0.5}},
}


@pytest.fixture
def deterministic_draws(monkeypatch):
    """DELLA's draws replaced by one rule in both programs (see test_methods_mergekit_new)."""
    monkeypatch.setattr(torch, "bernoulli", lambda p, *a, **k: (p >= 0.5).to(p.dtype))
    monkeypatch.setattr(della, "draw", lambda p, generator, out=None: (p >= 0.5) if out is None else out.copy_(p >= 0.5))


@pytest.mark.parametrize("name", CONFIGS)
def test_the_same_yaml_gives_mergekits_tensors(zoo, tmp_path, deterministic_draws, name):  # noqa: F811
    theirs, ours, _ = run_both(tmp_path, CONFIGS[name], zoo)
    assert_same(theirs, ours)


@pytest.mark.parametrize("name,models,parameters", [
    ("sce", ["ft1", "ft2", "ft3"], ["--x:select_topk", "0.4"]),
    ("ramplus_tl", ["ft1", "ft2", "ft3"], ["--x:epsilon=0.03", "--x:r", "0.4", "--x:alpha", "0.5"]),
    ("della", ["ft1", "ft2"], ["--x:weight", "1.0", "0.5", "--x:density", "0.6,0.5", "--x:epsilon", "0.1",
                               "--x:lambda", "0.9"]),
])
def test_the_command_line_gives_what_the_yaml_gives(zoo, tmp_path, deterministic_draws, name, models, parameters):  # noqa: F811
    config = {"merge_method": name, "base_model": "@base@", "models": [{"model": f"@{m}@"} for m in models],
              "parameters": {"select_topk": 0.4} if name == "sce" else {"epsilon": 0.03, "r": 0.4, "alpha": 0.5}}
    if name == "della":
        config = {"merge_method": "della", "base_model": "@base@", "parameters": {"epsilon": 0.1, "lambda": 0.9},
                  "models": [{"model": "@ft1@", "parameters": {"weight": 1.0, "density": 0.6}},
                             {"model": "@ft2@", "parameters": {"weight": 0.5, "density": 0.5}}]}
    theirs, _, _ = run_both(tmp_path, config, zoo)
    out = tmp_path / "cli.safetensors"
    run_program(merge_program.main, ["--merge", name, "--models", *[zoo[m] for m in models], "--ancestor", zoo["base"],
                                     *parameters, "--output", str(out), "--no_progress"])
    assert_same(theirs, load_file(out))


# --- LiNeS and KnOTS, options of the whole merge (not mergekit's): the YAML's top-level parameters -----------

WRAPPED = {  # label: method, YAML top-level parameters, the same on the command line, the method's own among them
    "task_arithmetic + lines": ("task_arithmetic", {"lines_beta": 0.6}, ["--x:lines_beta", "0.6"], []),
    "ties + lines at a given alpha": ("ties", {"density": 0.5, "lines_alpha": 0.4, "lines_beta": 0.3},
                                      ["--x:density", "0.5", "--x:lines_alpha", "0.4", "--x:lines_beta", "0.3"],
                                      ["--x:density", "0.5"]),
    "ties + knots": ("ties", {"density": 0.5, "knots": True}, ["--x:density", "0.5", "--x:knots", "true"],
                     ["--x:density", "0.5"]),
    "breadcrumbs + knots + lines": ("breadcrumbs", {"density": 0.7, "knots": True, "lines_beta": 0.5},
                                    ["--x:density", "0.7", "--x:knots", "true", "--x:lines_beta", "0.5"],
                                    ["--x:density", "0.7"]),
}


@pytest.mark.parametrize("label", WRAPPED)
def test_lines_and_knots_from_yaml_are_the_command_lines(zoo, tmp_path, label):  # noqa: F811
    from test_mergekit import write_config
    method, parameters, arguments, plain = WRAPPED[label]
    config = {"merge_method": method, "base_model": "@base@", "parameters": parameters,
              "models": [{"model": "@ft1@"}, {"model": "@ft2@"}, {"model": "@ft3@"}]}
    yaml_out, cli_out, plain_out = (tmp_path / name for name in ("yaml.safetensors", "cli.safetensors", "plain.safetensors"))
    run_program(merge_program.main, ["--config", write_config(tmp_path, config, zoo), str(yaml_out), "--no_progress"])
    inputs = ["--models", *[zoo[m] for m in ("ft1", "ft2", "ft3")], "--ancestor", zoo["base"], "--no_progress"]
    run_program(merge_program.main, ["--merge", method, *inputs, *arguments, "--output", str(cli_out)])
    run_program(merge_program.main, ["--merge", method, *inputs, *plain, "--output", str(plain_out)])
    ours, cli, without = load_file(yaml_out), load_file(cli_out), load_file(plain_out)
    assert_same(cli, ours)
    assert any(not torch.allclose(ours[n], without[n]) for n in ours)  # the options did act


@pytest.mark.parametrize("config,message", [
    ({"merge_method": "ties", "base_model": "@base@", "models": [{"model": "@ft1@", "parameters": {"knots": True}}]},
     "models[0].parameters: 'knots' is an option of the whole merge (LiNeS / KnOTS): give it in the top-level parameters"),
    ({"merge_method": "linear", "models": [{"model": "@ft1@"}, {"model": "@ft2@"}], "parameters": {"lines_beta": 0.5}},
     "merge_method linear: KnOTS (knots) and LiNeS (lines_beta) act on task vectors θ_t − θ_0: they need base_model"),
    ({"merge_method": "ties", "base_model": "@base@", "models": [{"model": "@ft1@"}], "parameters": {"lines_beta": [0.1, 0.5]}},
     "parameter 'lines_beta' of method ties: cannot read [0.1, 0.5] as float"),
    ({"merge_method": "ties", "base_model": "@base@", "models": [{"model": "@ft1@"}], "parameters": {"lines_alpha": 0.5}},
     "parameter 'lines_alpha' is LiNeS's α: give lines_beta too"),
])
def test_lines_and_knots_in_yaml_refused_where_they_cannot_act(zoo, tmp_path, capsys, config, message):  # noqa: F811
    from test_mergekit import write_config
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        run_program(merge_program.main, ["--config", write_config(tmp_path, config, zoo), str(out), "--no_progress"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
