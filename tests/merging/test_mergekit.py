"""mergekit YAML configurations: the same file run by mergekit 0.1.5 and by `code/merge.py --config` gives
the same tensors (linear, ties, task_arithmetic, slerp, breadcrumbs, slices), with gradients and filters;
mergekit's other method names are accepted; bad configurations fail clearly."""
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
from modelmerge.mergekit_config import evaluate_setting

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
