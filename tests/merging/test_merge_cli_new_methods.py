"""The methods of issue 9 through code/merge.py: listed by --help with their parameters, and bad input
(a parameter outside its range, no θ_0, 2-D tensors of different shapes) is one line, exit status 2 and
no output."""
import merge as merge_program
import pytest
from tiny import make_tiny_bert, perturbed_copy

from modelmerge.merging.cli import run_cli

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


def test_help_lists_every_new_method_with_its_parameters(capsys):
    with pytest.raises(SystemExit):
        merge_program.parse_args(["--help"])
    text = capsys.readouterr().out
    for name in NEW_METHODS:
        assert f"\n  {name}" in text
    assert "--x:common_space_fraction (float; in [0, 1]; default 0.8)" in text
    assert "--x:iterations (int; in [0, inf); default 300)" in text
    assert "code/regmean_plusplus.py" in text and "code/adamerging.py" in text and "code/modulated_merge.py" in text


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
