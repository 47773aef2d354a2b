"""The catalogue of methods (modelmerge.catalogue): its generated files are current, it holds every registered
method, a contradictory declaration is refused, and the configs and recipes restate nothing of it."""
import ast
import glob
import importlib.util
import json
import os

import pytest
from sis_util import REPO

from modelmerge import catalogue
from modelmerge.methods import MERGE_METHODS
from modelmerge.methods.base import MergeMethod, Parameter, Sweep

# Names the configs and recipes used to restate the catalogue with; derived from it now.
RESTATEMENTS = ("MERGE_GRIDS", "DATA_AWARE", "PER_TASK", "MODULATED_METHODS", "merge_methods")


def graph_sources():
    """{path: parsed module} of every config and recipe module."""
    paths = glob.glob(os.path.join(REPO, "config", "*.py")) + glob.glob(os.path.join(REPO, "recipe", "**", "*.py"),
                                                                        recursive=True)
    return {os.path.relpath(path, REPO): ast.parse(open(path, encoding="utf-8").read()) for path in sorted(paths)}


def load_script():
    spec = importlib.util.spec_from_file_location("catalogue_script", os.path.join(REPO, "scripts", "catalogue.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_files_are_current():
    assert load_script().stale() == [], "run python scripts/catalogue.py"


def test_every_registered_method_is_in_the_catalogue_under_every_name():
    with open(os.path.join(REPO, catalogue.JSON_PATH), encoding="utf-8") as f:
        methods = json.load(f)["methods"]
    for name, cls in MERGE_METHODS.items():
        assert cls in catalogue.DECLARATIONS
        assert name == cls.name or name in methods[cls.name]["aliases"]
        assert set(methods[cls.name]["parameters"]) == set(cls.parameters)
        assert methods[cls.name]["kind"] == ("per-task" if cls.name in ("emr", "tall_masks") else
                                             "element-wise" if cls.elementwise else "whole-tensor")
    assert {methods[name]["kind"] for name in ("regmean_plusplus", "adamerging")} == {"data-aware"}
    assert {methods[name]["kind"] for name in ("lines", "knots")} == {"modifier"}
    assert all(method["paper"] for method in methods.values())


def test_sweeps_are_the_methods_own_declarations():
    sweeps = catalogue.sweeps()
    assert sweeps["regmean"] == {
        "method": "regmean", "kind": "whole-tensor", "parameter": "alpha", "grid": [0.1, 0.5, 0.9], "fixed": {},
        "statistics": "gram", "ancestor_statistics": None, "initial": None, "dataset_sizes": {}, "task_data": None,
        "needs_ancestor": False}
    gradient_matching = sweeps["gradient matching"]
    assert (gradient_matching["statistics"], gradient_matching["ancestor_statistics"]) == ("fisher", "fisher")
    assert gradient_matching["dataset_sizes"] == {"scaling_factor_pt": "ancestor", "scaling_factors_ft": "models"}
    assert sweeps["ties + lines"]["method"] == "ties" and sweeps["adamerging"]["task_data"] == "validation"
    kinds = [entry["kind"] for entry in sweeps.values()]  # report order: merges, modifiers' entries, per-task, data-aware
    assert kinds[-4:] == ["per-task", "per-task", "data-aware", "data-aware"]


def test_family_suites_take_every_method_but_the_data_aware_at_each_setting():
    from model_merging.catalogue import SWEEPS, suite_methods

    suite = suite_methods(0.3, [10, 20], 30)
    assert list(suite)[0] == "task arithmetic"  # MaTS starts from it
    assert set(suite) == {label for label, entry in SWEEPS.items() if entry["kind"] != "data-aware"}
    assert suite["ties"]["parameters"] == {"density": 0.3, "merge_lambda": 1.0}  # grid[len // 2] of 0.1, 0.2, 0.3, 0.5
    assert list(suite["ties"]["settings"]) == [0.1, 0.2, 0.3, 0.5] and list(suite["average"]["settings"]) == [None]
    assert suite["gradient matching"]["parameters"] == {"scaling_factor": 0.3, "delta_0": 1e-12, "scaling_factor_pt": 30,
                                                        "scaling_factors_ft": [10, 20]}
    assert suite["gradient matching"]["settings"] == {0.3: suite["gradient matching"]["parameters"]}
    short = suite_methods(0.3, [10, 20], 30, (0.3, 1.0), points=3)
    assert list(short["ties"]["settings"]) == [0.2, 0.3, 0.5] and list(short["tsv-m"]["settings"]) == [0.3, 1.0]
    assert short["ties"]["settings"][0.2] == {"density": 0.2, "merge_lambda": 1.0}
    assert list(suite_methods(0.3, [1], 1, points=2)["ties"]["settings"]) == [0.3, 0.5]  # the middle always kept
    with pytest.raises(ValueError, match="lacks the suite's α 0.3"):
        suite_methods(0.3, [10, 20], 30, (0.5, 1.0))


@pytest.mark.parametrize("sweep, message", [
    (Sweep("bad", "no_such_parameter", (1.0,)), "has no parameter 'no_such_parameter'"),
    (Sweep("bad", "alpha", (0.5, 2.0)), "alpha=2.0 must lie in [0, 1]"),
    (Sweep("bad", initial="no such label"), "starts from 'no such label', which is no sweep's label"),
    (Sweep("average"), "sweep label 'average' is declared twice"),
])
def test_a_contradictory_declaration_is_refused(sweep, message, monkeypatch):
    class Bad(MergeMethod):
        name = "bad"
        parameters = {"alpha": Parameter(0.5, range="[0, 1]")}
        sweeps = (sweep,)

    monkeypatch.setattr(catalogue, "DECLARATIONS", (*catalogue.DECLARATIONS, Bad))
    with pytest.raises(catalogue.CatalogueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        catalogue.sweeps()


def test_merge_help_lists_every_method_of_the_catalogue(merge_help):
    for cls in catalogue.DECLARATIONS:
        assert f"\n  {cls.name}" in merge_help
    assert "--x:lines_beta (float; in [0, inf); default None)" in merge_help
    assert "--iterations (int; in [0, inf); default 100)" in merge_help  # AdaMerging's, a program argument


def test_configs_and_recipes_restate_nothing():
    """No config or recipe names the old restatements, or a method (its names that are no statistic kind, as
    'fisher' is) except as a key (preset["gradient_matching"]), in a comparison, or as the `method` a
    TaskDataMergeJob declares it runs; no config imports another."""
    names = {name for cls in catalogue.DECLARATIONS for name in (cls.name, *cls.aliases)}
    names -= {kind for cls in catalogue.DECLARATIONS for kind in (*cls.stats, *cls.optional_stats, *cls.base_stats)}
    for path, tree in graph_sources().items():
        allowed = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Subscript):
                allowed.add(id(node.slice))
            elif isinstance(node, ast.Dict):
                allowed.update(id(key) for key in node.keys)
            elif isinstance(node, ast.Compare):
                allowed.update(id(operand) for operand in (node.left, *node.comparators))
            elif isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["method"]:
                allowed.add(id(node.value))
        for node in ast.walk(tree):
            assert not (isinstance(node, ast.Name) and node.id in RESTATEMENTS), f"{path}:{node.lineno}: {node.id}"
            if isinstance(node, ast.Constant) and node.value in names and not isinstance(node.value, bool):
                assert id(node) in allowed, f"{path}:{node.lineno}: method {node.value!r} named outside the catalogue"
            if isinstance(node, (ast.Import, ast.ImportFrom)) and path.startswith("config"):
                modules = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any(m == "config" or m.startswith("config.") for m in modules), f"{path} imports a config"


def test_mergekit_names_are_the_methods_declarations():
    from modelmerge.merging.mergekit import MERGEKIT_METHODS

    assert set(MERGEKIT_METHODS) == {  # mergekit 0.1.5's methods that ours compute as it does
        "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "slerp",
        "passthrough", "model_stock", "della", "della_linear", "sce", "nuslerp", "multislerp", "karcher", "nearswap",
        "arcee_fusion", "ram", "ramplus_tl"}
    assert MERGEKIT_METHODS["ties"].defaults == {"global_majority_sign": 1} == MERGEKIT_METHODS["dare_ties"].defaults
    assert (MERGEKIT_METHODS["slerp"].base_role, MERGEKIT_METHODS["karcher"].base_role) == ("first", "input")
    assert MERGEKIT_METHODS["task_arithmetic"].ignored == ("density", "rescale")
    assert catalogue.mergekit_names(MERGE_METHODS["fisher"]) == []  # needs statistics, which YAML cannot name
    assert catalogue.mergekit_names(MERGE_METHODS["tsv_m"]) == ["tsv_m", "tsvm", "tsv-m"]  # ours, by our names


def test_data_aware_programs_and_jobs_take_the_declared_defaults():
    """code/adamerging.py, code/regmean_plusplus.py and their Jobs default to what the methods declare (0.5, 100,
    1e-3, 0.3 as written in the papers' setups), and the programs refuse values outside the declared ranges."""
    import inspect

    import adamerging
    import regmean_plusplus
    from model_merging.merge import AdaMergingJob, RegMeanPlusPlusJob

    required = {adamerging: ["--ancestor", "a", "--models", "b", "--datasets", "c", "--output", "o"],
                regmean_plusplus: ["--models", "b", "--datasets", "c", "--output", "o"]}
    expected = {adamerging: {"iterations": 100, "learning_rate": 1e-3, "prior": 0.3}, regmean_plusplus: {"alpha": 0.5}}
    jobs = {adamerging: AdaMergingJob, regmean_plusplus: RegMeanPlusPlusJob}
    for program, defaults in expected.items():
        declared = catalogue.declaration(jobs[program].method).parameters
        assert {name: parameter.default for name, parameter in declared.items()} == defaults
        args = program.parse_args(required[program])
        assert {name: getattr(args, name) for name in defaults} == defaults
        signature = inspect.signature(jobs[program].__init__).parameters
        assert {name: signature[name].default for name in defaults} == defaults
        name = next(iter(defaults))
        with pytest.raises(SystemExit):
            program.parse_args([*required[program], f"--{name}", "-1"])
