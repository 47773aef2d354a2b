"""Wrongly typed mergekit YAML: every key the front end reads, given a value of a wrong type, is refused
with one line naming the key's full path and the expected type (exit status 2, nothing written); what
mergekit 0.1.5's own schema (mergekit.config.MergeConfiguration) accepts is accepted."""
import os
import subprocess
import sys

import pytest
import yaml

import merge as merge_program
from modelmerge.merging.cli import run_cli
from modelmerge.merging.options import MergeError
from modelmerge.merging.mergekit import check_types
from sis_util import REPO
from tiny import make_tiny_bert

MODELS = {"merge_method": "ties", "base_model": "base", "models": [{"model": "a"}, {"model": "b"}]}
SLICES = {"merge_method": "slerp", "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]},
                                                           {"model": "b", "layer_range": [0, 2]}]}]}


def changed(config, path, value):
    """A deep copy of `config` with the key at `path` (a tuple of keys and indices) set to `value`."""
    config = yaml.safe_load(yaml.safe_dump(config))
    *parents, last = path
    entry = config
    for key in parents:
        entry = entry[key]
    entry[last] = value
    return config


# (base config, path, wrong value, what the message must say); mergekit's schema refuses each of them too.
WRONG_TYPES = {
    "merge_method a list": (MODELS, ("merge_method",), ["ties"], "merge_method must be a method name (a string), got ['ties']"),
    "merge_method a number": (MODELS, ("merge_method",), 3, "merge_method must be a method name (a string), got 3"),
    "base_model a list": (MODELS, ("base_model",), ["base"], "base_model must be a model path (a string), got ['base']"),
    "dtype a list": (MODELS, ("dtype",), ["float16"], "dtype must be one of"),
    "out_dtype a mapping": (MODELS, ("out_dtype",), {"a": 1}, "out_dtype must be one of"),
    "tokenizer_source a number": (MODELS, ("tokenizer_source",), 1, "tokenizer_source must be a model path (a string), got 1"),
    "top-level parameters a number": (MODELS, ("parameters",), 3,
                                      "parameters must be a mapping of parameter names to values, got 3"),
    "top-level parameter a mapping without value": (MODELS, ("parameters",), {"density": {"filter": "mlp"}},
                                                    "parameters.density.value is missing"),
    "top-level parameter a nested list": (MODELS, ("parameters",), {"density": [[0.1, 0.2]]},
                                          "parameters.density[0] must be a {filter, value} entry"),
    "models a mapping": (MODELS, ("models",), {"model": "a"}, "models must be a non-empty list"),
    "models empty": (MODELS, ("models",), [], "models must be a non-empty list, got []"),
    "models entry a string": (MODELS, ("models", 1), "b", "models[1] must be a mapping with keys model, parameters, got 'b'"),
    "models entry model a list": (MODELS, ("models", 1, "model"), ["b"], "models[1].model must be a model path (a string)"),
    "models entry model missing": (MODELS, ("models", 1), {"parameters": {"weight": 1}}, "models[1].model is missing"),
    "models entry parameters a list": (MODELS, ("models", 1, "parameters"), [1, 2],
                                       "models[1].parameters must be a mapping of parameter names to values, got [1, 2]"),
    "models entry parameter a set of filters with a bad value": (
        MODELS, ("models", 0, "parameters"), {"weight": [{"filter": "mlp", "value": {"x": 1}}]},
        "models[0].parameters.weight[0].value must be a number, string or boolean, or a list of them"),
    "filter a number": (MODELS, ("models", 0, "parameters"), {"weight": {"filter": 3, "value": 1}},
                        "models[0].parameters.weight.filter must be a substring of tensor names (a string), got 3"),
    "slices a string": (SLICES, ("slices",), "all", "slices must be a non-empty list, got 'all'"),
    "slice a list": (SLICES, ("slices", 0), [1], "slices[0] must be a mapping with keys base_model, parameters, sources"),
    "slice sources missing": (SLICES, ("slices", 0), {"parameters": {"t": 0.5}}, "slices[0].sources is missing"),
    "slice sources a mapping": (SLICES, ("slices", 0, "sources"), {"model": "a"}, "slices[0].sources must be a non-empty list"),
    "slice base_model a number": (SLICES, ("slices", 0, "base_model"), 7, "slices[0].base_model must be a model path (a string), got 7"),
    "slice parameters a string": (SLICES, ("slices", 0, "parameters"), "t=0.5",
                                  "slices[0].parameters must be a mapping of parameter names to values, got 't=0.5'"),
    "source a string": (SLICES, ("slices", 0, "sources", 1), "b", "slices[0].sources[1] must be a mapping with keys layer_range, model, parameters"),
    "source model a number": (SLICES, ("slices", 0, "sources", 1, "model"), 2, "slices[0].sources[1].model must be a model path (a string), got 2"),
    "source layer_range missing": (SLICES, ("slices", 0, "sources", 1), {"model": "b"}, "slices[0].sources[1].layer_range is missing"),
    "source layer_range a string": (SLICES, ("slices", 0, "sources", 1, "layer_range"), "0-2",
                                    "slices[0].sources[1].layer_range must be [first, end], two integers, got '0-2'"),
    "source layer_range of three": (SLICES, ("slices", 0, "sources", 1, "layer_range"), [0, 1, 2],
                                    "slices[0].sources[1].layer_range must be [first, end], two integers, got [0, 1, 2]"),
    "source layer_range of floats": (SLICES, ("slices", 0, "sources", 1, "layer_range"), [0.5, 2],
                                     "slices[0].sources[1].layer_range must be [first, end], two integers"),
    "source parameters a number": (SLICES, ("slices", 0, "sources", 1, "parameters"), 0.5,
                                   "slices[0].sources[1].parameters must be a mapping of parameter names to values, got 0.5"),
}
# Refused here though mergekit's schema lets them through (its merge then fails or ignores them).
REFUSED_HERE = {
    "layer_range reversed": (SLICES, ("slices", 0, "sources", 1, "layer_range"), [1, 0],
                             "slices[0].sources[1].layer_range: [1, 0] is reversed"),
    "layer_range empty": (SLICES, ("slices", 0, "sources", 0, "layer_range"), [1, 1], "slices[0].sources[0].layer_range: [1, 1] is empty"),
    "layer_range negative": (SLICES, ("slices", 0, "sources", 0, "layer_range"), [-1, 1], "starts before layer 0"),
    "unknown key in a models entry": (MODELS, ("models", 1, "weight"), 0.5, "models[1]: unsupported key(s) weight"),
    "unknown key in a source": (SLICES, ("slices", 0, "sources", 0, "layers"), 2, "slices[0].sources[0]: unsupported key(s) layers"),
    "unknown key in a filter entry": (MODELS, ("parameters",), {"density": {"value": 0.5, "filters": "mlp"}},
                                      "parameters.density: unsupported key(s) filters"),
}


def mergekit_schema():
    return pytest.importorskip("mergekit.config").MergeConfiguration


@pytest.mark.parametrize("case", sorted(WRONG_TYPES) + sorted(REFUSED_HERE))
def test_a_wrong_value_is_one_line_naming_its_path_exit_2_and_no_output(tmp_path, capsys, case):
    base, path, value, message = {**WRONG_TYPES, **REFUSED_HERE}[case]
    config = tmp_path / "merge.yml"
    config.write_text(yaml.safe_dump(changed(base, path, value)))
    with pytest.raises(SystemExit) as exit_:
        run_cli(merge_program.main, ["--config", str(config), str(tmp_path / "out"), "--no_progress"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert message in err and err.startswith(f"error: config {config}: ") and err.count("\n") == 1, err
    assert sorted(os.listdir(tmp_path)) == ["merge.yml"]


@pytest.mark.parametrize("case", sorted(WRONG_TYPES))
def test_mergekit_refuses_the_same_wrong_types(case):
    from pydantic import ValidationError

    base, path, value, _ = WRONG_TYPES[case]
    with pytest.raises((ValidationError, RuntimeError)):  # RuntimeError: its "models or slices" validator
        mergekit_schema().model_validate(changed(base, path, value))


VALID_SETTINGS = [0.5, 1, True, "auto", [0.0, 0.5, 1.0], [True, False], {"value": 0.3},
                  {"filter": "mlp", "value": [0.1, 0.9]}, [{"filter": "attention", "value": 2.0}, {"value": 0.4}], []]


@pytest.mark.parametrize("setting", VALID_SETTINGS, ids=repr)
@pytest.mark.parametrize("where", [("parameters",), ("models", 0, "parameters"), ("slices", 0, "parameters"),
                                   ("slices", 0, "sources", 0, "parameters")])
def test_every_setting_mergekit_accepts_is_accepted_at_every_level(setting, where):
    config = changed(SLICES if where[0] == "slices" else MODELS, where, {"weight": setting})
    mergekit_schema().model_validate(config)
    check_types(config)  # no MergeError


def test_null_parameters_and_base_model_are_accepted_as_mergekit_does():
    config = {**changed(MODELS, ("models", 0, "parameters"), None), "parameters": None, "dtype": None,
              "tokenizer_source": None}
    mergekit_schema().model_validate(config)
    check_types(config)
    check_types(changed(SLICES, ("slices", 0, "base_model"), None))


def test_the_checks_name_the_first_bad_key_in_document_order():
    config = changed(changed(MODELS, ("models", 0, "parameters"), 1), ("models", 1, "parameters"), 2)
    with pytest.raises(MergeError, match=r"^models\[0\]\.parameters must be"):
        check_types(config)


def test_a_boolean_for_a_numeric_parameter_is_refused_not_read_as_1(tmp_path, capsys):
    base, other = make_tiny_bert(tmp_path / "base"), make_tiny_bert(tmp_path / "other", seed=1)
    config = {"merge_method": "ties", "base_model": base, "models": [{"model": other}], "parameters": {"density": True}}
    (tmp_path / "merge.yml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_:
        run_cli(merge_program.main, ["--config", str(tmp_path / "merge.yml"), str(tmp_path / "out"), "--no_progress"])
    assert exit_.value.code == 2 and "parameter 'density' of method ties: cannot read True as float" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_program_prints_no_traceback(tmp_path):
    config = tmp_path / "merge.yml"
    config.write_text("merge_method: [ties]\nmodels:\n  - model: a\n")
    done = subprocess.run([sys.executable, os.path.join(REPO, "code", "merge.py"), "--config", str(config),
                           str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == (f"error: config {config}: merge_method must be a method name (a string), "
                                            "got ['ties']")
    assert "Traceback" not in done.stderr and sorted(os.listdir(tmp_path)) == ["merge.yml"]
