"""mergekit YAML configurations: the same file run by mergekit 0.1.5 and by `code/merge.py --config` gives
the same tensors (linear, ties, task_arithmetic, slerp, breadcrumbs, slices), with gradients and filters;
mergekit's other method names are accepted; bad configurations fail clearly. mergekit 0.1.5's newer methods
likewise, and the git-theta-style command line with the same parameters gives their tensors too."""
import json
import os
import shutil

import merge as merge_program
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from tiny import make_tiny_bert, perturbed_copy
from transformers import BertForSequenceClassification

from modelmerge.merging.cli import run_cli as run_program
from modelmerge.merging.mergekit import evaluate_setting

mergekit_merge = pytest.importorskip("mergekit.merge")
from mergekit.config import MergeConfiguration  # noqa: E402


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A base, three fine-tunes of it (4 layers, so gradients are interpolated between their points), and
    an all-zero model with two exactly opposite models, whose task vectors sum to exactly 0."""
    root = tmp_path_factory.mktemp("mergekit")
    base = make_tiny_bert(str(root / "base"), seed=0, num_hidden_layers=4)
    zoo = {"base": base, **{f"ft{i}": perturbed_copy(base, str(root / f"ft{i}"), seed=i, scale=0.05) for i in (1, 2, 3)}}
    for name, sign in (("zero", 0.0), ("plus", 1.0), ("minus", -1.0)):
        shutil.copytree(base, root / name)
        save_file({n: sign * t for n, t in load_file(os.path.join(zoo["ft1"], "model.safetensors")).items()},
                  root / name / "model.safetensors", metadata={"format": "pt"})
        zoo[name] = str(root / name)
    return zoo


def write_config(tmp_path, config, zoo):
    """`config` with model names replaced by their paths, written to merge.yml."""
    text = yaml.safe_dump(config)
    for name, path in zoo.items():
        text = text.replace(f"@{name}@", path)
    path = tmp_path / "merge.yml"
    path.write_text(text)
    return str(path)


def run_both(tmp_path, config, zoo):
    """(mergekit's tensors, ours, our output folder) for one configuration."""
    path = write_config(tmp_path, config, zoo)
    with open(path) as f:
        parsed = MergeConfiguration.model_validate(yaml.safe_load(f))
    theirs, ours = tmp_path / "mergekit", tmp_path / "ours"
    mergekit_merge.run_merge(parsed, str(theirs), mergekit_merge.MergeOptions(quiet=True, write_model_card=False))
    run_program(merge_program.main, ["--config", path, str(ours), "--no_progress"])
    return load_file(theirs / "model.safetensors"), load_file(ours / "model.safetensors"), ours


def assert_same(theirs, ours):
    assert ours.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


CONFIGS = {
    "linear": {
        "merge_method": "linear",
        "base_model": "@base@",  # linear ignores the base role: mergekit merges it as one more model
        "models": [{"model": "@ft1@", "parameters": {"weight": [1.0, 0.2]}}, {"model": "@ft2@", "parameters": {"weight": 0.5}}],
        "parameters": {"weight": 0.3},
    },
    "task_arithmetic": {
        "merge_method": "task_arithmetic",
        "base_model": "@base@",
        "models": [{"model": "@ft1@", "parameters": {"weight": 0.7}}, {"model": "@ft2@", "parameters": {"weight": [0.1, 0.9]}},
                   {"model": "@ft3@", "parameters": {"weight": [{"filter": "attention", "value": 2.0}, {"value": 0.4}]}}],
        "parameters": {"lambda": 0.6},
    },
    "ties": {
        "merge_method": "ties",
        "base_model": "@base@",
        "models": [{"model": "@ft1@", "parameters": {"weight": 1.0, "density": [0.2, 0.8]}},
                   {"model": "@ft2@", "parameters": {"weight": 0.5, "density": 0.5}},
                   {"model": "@ft3@", "parameters": {"weight": [0.3, 1.0, 0.6]}}],
        "parameters": {"density": [{"filter": "intermediate", "value": 0.3}, {"value": 0.6}], "lambda": 1.3},
    },
    "ties with rescaling": {
        "merge_method": "ties",
        "base_model": "@base@",
        "models": [{"model": "@ft1@", "parameters": {"weight": 1.0}}, {"model": "@ft2@", "parameters": {"weight": 0.5}}],
        "parameters": {"density": 0.4, "rescale": True, "normalize": False},
    },
    "ties electing + where task vectors cancel": {
        "merge_method": "ties",
        "base_model": "@zero@",
        "models": [{"model": "@plus@", "parameters": {"weight": 1.0}}, {"model": "@minus@", "parameters": {"weight": 1.0}}],
        "parameters": {"density": 0.5},
    },
    "slerp": {
        "merge_method": "slerp",
        "base_model": "@ft1@",
        "models": [{"model": "@ft1@"}, {"model": "@ft2@"}],
        "parameters": {"t": [{"filter": "attention", "value": [0.0, 0.5, 1.0]}, {"filter": "output", "value": [1, 0.2]},
                             {"value": 0.4}]},
    },
    "breadcrumbs_ties": {
        "merge_method": "breadcrumbs_ties",
        "base_model": "@base@",
        "models": [{"model": "@ft1@", "parameters": {"weight": 1.0, "density": 0.7, "gamma": 0.05}},
                   {"model": "@ft2@", "parameters": {"weight": 0.6, "density": 0.8}}],
    },
    "dare_linear at density 1": {
        "merge_method": "dare_linear",
        "base_model": "@base@",
        "models": [{"model": "@ft1@", "parameters": {"weight": 1.0}}, {"model": "@ft2@", "parameters": {"weight": 0.4}}],
        "parameters": {"density": 1.0},
    },
}


@pytest.mark.parametrize("name", CONFIGS)
def test_the_same_yaml_gives_mergekits_tensors(zoo, tmp_path, name):
    theirs, ours, _ = run_both(tmp_path, CONFIGS[name], zoo)
    assert_same(theirs, ours)


def test_slices_assemble_layers_like_mergekit_and_load(zoo, tmp_path):
    config = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": "@ft1@", "layer_range": [0, 2]}]},
                   {"sources": [{"model": "@ft2@", "layer_range": [1, 2]}]},
                   {"sources": [{"model": "@ft3@", "layer_range": [0, 1]}]}],  # 4 layers in all
        "dtype": "float16",
    }
    theirs, ours, folder = run_both(tmp_path, config, zoo)
    assert_same(theirs, ours)
    ft2, ft3 = load_file(os.path.join(zoo["ft2"], "model.safetensors")), load_file(os.path.join(zoo["ft3"], "model.safetensors"))
    name = "bert.encoder.layer.{}.output.dense.weight"
    assert torch.equal(ours[name.format(2)], ft2[name.format(1)].half())  # renumbered
    assert torch.equal(ours["classifier.weight"], ft3["classifier.weight"].half())  # after the layers: last slice
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 4
    assert BertForSequenceClassification.from_pretrained(folder).config.num_hidden_layers == 4


def test_slerp_over_slices_of_two_models(zoo, tmp_path):
    config = {
        "merge_method": "slerp",
        "base_model": "@ft1@",
        "slices": [{"sources": [{"model": "@ft1@", "layer_range": [0, 3]}, {"model": "@ft2@", "layer_range": [1, 4]}]},
                   {"sources": [{"model": "@ft1@", "layer_range": [3, 4]}, {"model": "@ft3@", "layer_range": [0, 1]}],
                    "parameters": {"t": 0.9}}],
        "parameters": {"t": [0.1, 0.7, 0.2]},
    }
    theirs, ours, _ = run_both(tmp_path, config, zoo)
    assert_same(theirs, ours)


@pytest.mark.parametrize("method", ["dare_ties", "breadcrumbs", "dare_linear", "task_arithmetic"])
def test_other_mergekit_methods_are_accepted_under_their_names(zoo, tmp_path, method):
    config = {"merge_method": method, "base_model": "@base@",
              "models": [{"model": "@ft1@", "parameters": {"weight": 0.5, "density": 0.6}},
                         {"model": "@ft2@", "parameters": {"weight": 0.5, "density": 0.6}}],
              "parameters": {"int8_mask": True, "normalize": True}}
    summary = run_program(merge_program.main, ["--config", write_config(tmp_path, config, zoo), str(tmp_path / "out"), "--no_progress"])
    assert summary.merged == 73  # every tensor of the 4-layer model


def test_tokenizer_source_copies_that_models_tokenizer(zoo, tmp_path):
    config = {"merge_method": "linear", "models": [{"model": "@ft1@", "parameters": {"weight": 1}},
                                                   {"model": "@ft2@", "parameters": {"weight": 1}}],
              "tokenizer_source": "model:@ft3@"}
    (tmp_path / "ft3").mkdir()
    run_program(merge_program.main, ["--config", write_config(tmp_path, config, zoo), str(tmp_path / "out"), "--no_progress"])
    assert (tmp_path / "out" / "tokenizer.json").read_text() == open(os.path.join(zoo["ft3"], "tokenizer.json")).read()


def test_settings_are_scalars_gradients_or_filtered_values():
    gradient = [0.0, 1.0, 0.5]
    assert evaluate_setting(gradient, "x", 0.0) == 0.0
    assert evaluate_setting(gradient, "x", 0.25) == pytest.approx(0.5)
    assert evaluate_setting(gradient, "x", 0.75) == pytest.approx(0.75)
    assert evaluate_setting(gradient, "x", 1.0) == 0.5
    assert evaluate_setting([True, False], "x", 0.9) is True  # picked, not interpolated
    filtered = [{"filter": "mlp", "value": [1, 3]}, {"value": 7}]
    assert evaluate_setting(filtered, "layers.0.mlp.up", 0.5) == pytest.approx(2.0)
    assert evaluate_setting(filtered, "layers.0.attn.q", 0.5) == 7
    assert evaluate_setting([{"filter": "mlp", "value": 1}], "attn", 0.0) is None


@pytest.mark.parametrize("config, message", [
    ({"merge_method": "frankenmerge", "models": [{"model": "@ft1@"}]}, "unknown merge method 'frankenmerge'"),
    ({"merge_method": "ties", "models": [{"model": "@ft1@"}, {"model": "@ft2@"}]}, "needs base_model"),
    ({"merge_method": "ties", "base_model": "@base@", "models": [{"model": "@ft1@", "parameters": {"densty": 0.5}}]},
     "unknown parameter 'densty'"),
    ({"merge_method": "linear", "models": [{"model": "@ft1@"}], "merge_options": {}}, "unsupported key(s) merge_options"),
    ({"merge_method": "slerp", "base_model": "@ft1@", "models": [{"model": "@ft1@"}, {"model": "@ft2@"}, {"model": "@ft3@"}]},
     "slerp merges exactly 2 models, got 3"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "@ft1@", "layer_range": [1, 5]}]}]},
     "outside the model's 4 layers"),
    ({"merge_method": "linear", "slices": [{"sources": [{"model": "@ft1@", "layer_range": [0, 2]},
                                                        {"model": "@ft2@", "layer_range": [0, 1]}]}]}, "same number of layers"),
])
def test_bad_configurations_fail_clearly(zoo, tmp_path, capsys, config, message):
    with pytest.raises(SystemExit):
        run_program(merge_program.main, ["--config", write_config(tmp_path, config, zoo), str(tmp_path / "out")])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_model_plus_lora_reference_is_the_adapter_folded_into_the_model(zoo, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], init_lora_weights=False)
    get_peft_model(BertForSequenceClassification.from_pretrained(zoo["base"]), config).save_pretrained(tmp_path / "adapter")
    yml = write_config(tmp_path, {"merge_method": "linear", "models": [
        {"model": f"@base@+{tmp_path / 'adapter'}", "parameters": {"weight": 1.0}}]}, zoo)
    run_program(merge_program.main, ["--config", yml, str(tmp_path / "out"), "--no_progress"])
    peft_model = PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(zoo["base"]), str(tmp_path / "adapter"))
    expected = peft_model.merge_and_unload().state_dict()
    merged = BertForSequenceClassification.from_pretrained(tmp_path / "out").state_dict()
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-5, atol=1e-6)


# --- mergekit 0.1.5's newer methods from YAML, and the command line with the same parameters -----------------

TWO = [{"model": "@ft1@", "parameters": {"weight": 0.7}}, {"model": "@ft2@", "parameters": {"weight": 0.4}}]
THREE = TWO + [{"model": "@ft3@", "parameters": {"weight": 0.5}}]
NEWER_CONFIGS = {
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


@pytest.mark.parametrize("name", NEWER_CONFIGS)
def test_the_same_yaml_gives_mergekits_tensors_for_the_newer_methods(zoo, tmp_path, deterministic_draws, name):
    theirs, ours, _ = run_both(tmp_path, NEWER_CONFIGS[name], zoo)
    assert_same(theirs, ours)


@pytest.mark.parametrize("name,models,parameters", [
    ("sce", ["ft1", "ft2", "ft3"], ["--x:select_topk", "0.4"]),
    ("ramplus_tl", ["ft1", "ft2", "ft3"], ["--x:epsilon=0.03", "--x:r", "0.4", "--x:alpha", "0.5"]),
    ("della", ["ft1", "ft2"], ["--x:weight", "1.0", "0.5", "--x:density", "0.6,0.5", "--x:epsilon", "0.1",
                               "--x:lambda", "0.9"]),
])
def test_the_command_line_gives_what_the_yaml_gives(zoo, tmp_path, deterministic_draws, name, models, parameters):
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
def test_lines_and_knots_from_yaml_are_the_command_lines(zoo, tmp_path, label):
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
def test_lines_and_knots_in_yaml_refused_where_they_cannot_act(zoo, tmp_path, capsys, config, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        run_program(merge_program.main, ["--config", write_config(tmp_path, config, zoo), str(out), "--no_progress"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
