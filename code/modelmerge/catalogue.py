"""The catalogue of merge methods: what every method declares about itself in its own module
(`modelmerge.methods.base.MethodDeclaration`), collected, checked, and turned into everything else:

- `DECLARATIONS`: every method: the merge methods of the registry (modelmerge.methods), the modifiers of any
  merge with θ_0 (LiNeS, KnOTS) and the data-aware methods that run their own programs (`DATA_AWARE`);
- `sweeps()`: the entries of the experiments' method suites, {label: entry}, in the order the reports list them
  (merge methods in registry order, then the modifiers' entries, the per-task methods, the data-aware ones);
- `methods_help()`: the method list of `code/merge.py --help`; `add_parameter_arguments` and
  `check_parameter_arguments`: a data-aware program's `--PARAMETER` arguments, as its method declares them;
- `catalogue_json()`: the text of recipe/model_merging/catalogue.json, what the recipes and configs read (they
  build graphs without importing torch); `methods_markdown()`: the text of docs/methods.md.

`python scripts/catalogue.py` writes both files; tests/methods/test_catalogue.py checks that they are current.
"""
import json

from modelmerge.adamerging import AdaMerging
from modelmerge.methods import MERGE_METHODS
from modelmerge.methods.base import KINDS, SCALING_FACTORS, MethodDeclaration, Parameter, Sweep
from modelmerge.methods.knots import Knots
from modelmerge.methods.lines import Lines
from modelmerge.regmean_plusplus import RegMeanPlusPlus

DATA_AWARE: tuple[type[MethodDeclaration], ...] = (RegMeanPlusPlus, AdaMerging)  # one line per data-aware method
MODIFIERS: tuple[type[MethodDeclaration], ...] = (Lines, Knots)
DECLARATIONS: tuple[type[MethodDeclaration], ...] = (*dict.fromkeys(MERGE_METHODS.values()), *MODIFIERS, *DATA_AWARE)
JSON_PATH = "recipe/model_merging/catalogue.json"  # relative to the repository root
MARKDOWN_PATH = "docs/methods.md"
_SWEEP_ORDER = {"element-wise": 0, "whole-tensor": 0, "modifier": 1, "per-task": 2, "data-aware": 3}


class CatalogueError(ValueError):
    """A method's declaration contradicts itself or another's."""


def kind(cls) -> str:
    """The method's kind (`methods.base.KINDS`): declared, else element-wise or whole-tensor as it merges."""
    declared = cls.kind or ("element-wise" if getattr(cls, "elementwise", False) else "whole-tensor")
    if declared not in KINDS:
        raise CatalogueError(f"method {cls.name}: kind {declared!r} is none of {', '.join(KINDS)}")
    return declared


def declaration(name: str) -> type[MethodDeclaration]:
    """The declaring class of method `name` (a name or an alias)."""
    for cls in DECLARATIONS:
        if name == cls.name or name in cls.aliases:
            return cls
    raise CatalogueError(f"unknown method {name!r}; known: {', '.join(sorted(cls.name for cls in DECLARATIONS))}")


def sweeps() -> dict[str, dict]:
    """{label: entry} of every declared `Sweep`: the method merged, its kind, the parameter swept and its grid
    (a list, or "scaling_factors": the preset's α grid), the fixed parameters, the statistic each model is given
    (None, "fisher", "gram") and θ_0's, the entry it starts from, the parameters set from data set sizes, and for
    a data-aware method the split of each task's data it runs on and whether it takes θ_0."""
    entries = {}
    declaring = sorted(DECLARATIONS, key=lambda cls: _SWEEP_ORDER[kind(cls)])
    for owner in declaring:
        for sweep in owner.__dict__.get("sweeps", ()):  # its own: a subclass does not repeat its parent's
            if sweep.label in entries:
                raise CatalogueError(f"sweep label {sweep.label!r} is declared twice ({owner.name})")
            entries[sweep.label] = _entry(owner, sweep)
    for label, entry in entries.items():
        if entry["initial"] is not None and entry["initial"] not in entries:
            raise CatalogueError(f"sweep {label!r} starts from {entry['initial']!r}, which is no sweep's label")
    return entries


def _entry(owner, sweep: Sweep) -> dict:
    cls = declaration(sweep.method) if sweep.method else owner
    if sweep.method and kind(owner) != "modifier":
        raise CatalogueError(f"sweep {sweep.label!r} of {owner.name} names method {sweep.method}: only modifiers do")
    statistics = sweep.statistics or (cls.stats[0] if cls.stats else None)
    values = sweep.grid if sweep.grid != SCALING_FACTORS else ()
    for name, value in [*sweep.fixed.items(), *((sweep.parameter, v) for v in values)]:
        _check_value(sweep.label, cls, name, value)
    if sweep.parameter is not None:
        _parameter(cls, sweep.parameter, sweep.label)
    return {"method": cls.name, "kind": kind(cls), "parameter": sweep.parameter,
            "grid": sweep.grid if isinstance(sweep.grid, str) else list(sweep.grid), "fixed": dict(sweep.fixed),
            "statistics": statistics, "ancestor_statistics": cls.base_stats[0] if cls.base_stats else None,
            "initial": sweep.initial, "dataset_sizes": dict(cls.dataset_sizes), "task_data": cls.task_data,
            "needs_ancestor": cls.needs_base}


def _parameter(cls, name: str, label: str) -> Parameter:
    """Parameter `name` of method `cls`, or of a modifier when `cls` takes θ_0."""
    available = dict(cls.parameters)
    if cls.needs_base and kind(cls) in ("element-wise", "whole-tensor"):
        for modifier in MODIFIERS:
            available.update(modifier.parameters)
    if name not in available:
        raise CatalogueError(f"sweep {label!r}: {cls.name} has no parameter {name!r} "
                             f"(its parameters: {', '.join(available) or 'none'})")
    return available[name]


def _check_value(label, cls, name, value):
    parameter = _parameter(cls, name, label)
    problem = parameter.problem(value) if value is not None and not isinstance(value, bool) else None
    if problem:
        raise CatalogueError(f"sweep {label!r}: {name}={value!r} {problem}")


def _parameter_record(parameter: Parameter) -> dict:
    return {"type": parameter.type.__name__, "default": parameter.default, "per_model": parameter.per_model,
            "range": parameter.range, "choices": list(parameter.choices), "aliases": list(parameter.aliases),
            "required": parameter.required, "help": parameter.help}


def method_record(cls) -> dict:
    """What the catalogue says of one method (its entry under "methods" in catalogue.json)."""
    return {"aliases": list(cls.aliases), "kind": kind(cls), "paper": cls.paper, "program": cls.program,
            "needs_ancestor": cls.needs_base, "statistics": list(cls.stats),
            "optional_statistics": list(cls.optional_stats), "ancestor_statistics": list(cls.base_stats),
            "parameters": {name: _parameter_record(p) for name, p in cls.parameters.items()},
            "dataset_sizes": dict(cls.dataset_sizes), "task_data": cls.task_data,
            "mergekit": mergekit_names(cls)}


def mergekit_names(cls) -> list[str]:
    """The `merge_method` names a mergekit YAML configuration may give for `cls` (modelmerge.merging.mergekit):
    its name where mergekit has the method (`cls.mergekit`), and its own names where it needs no statistics (a
    configuration cannot name them); none for the kinds code/merge.py --config does not run."""
    if kind(cls) not in ("element-wise", "whole-tensor", "per-task"):
        return []
    names = [cls.name] if cls.mergekit else []
    if not (cls.stats or cls.base_stats):
        names += [name for name in (cls.name, *cls.aliases) if name not in names]
    return names


def catalogue() -> dict:
    """Everything catalogue.json holds: {"methods": {name: method_record}, "sweeps": sweeps()}."""
    return {"methods": {cls.name: method_record(cls) for cls in DECLARATIONS}, "sweeps": sweeps()}


def catalogue_json() -> str:
    return json.dumps(catalogue(), indent=1, ensure_ascii=False, allow_nan=False) + "\n"


def parameter_detail(parameter: Parameter) -> str:
    """'float, one per model; in [0, 1]; default 0.5': a parameter as --help and the docs table give it."""
    parts = [parameter.type.__name__ + (", one per model" if parameter.per_model else "")]
    if parameter.range:
        parts.append(f"in {parameter.range}")
    if parameter.choices:
        parts.append("one of " + ", ".join(map(str, parameter.choices)))
    parts.append(f"default {parameter.default}")
    return "; ".join(parts)


def _needs(cls) -> list[str]:
    needs = ["θ_0"] if cls.needs_base else []
    needs += [f"statistic '{kind}'" for kind in cls.stats]
    return needs + [f"ancestor statistic '{kind}'" for kind in cls.base_stats]


def methods_help() -> str:
    """Every method with its parameters, defaults and ranges, for code/merge.py --help: the merge methods
    (`--merge NAME --x:PARAMETER VALUE`), the modifiers of any merge with θ_0 (`--x:PARAMETER VALUE`), and the
    data-aware methods with their programs (`code/PROGRAM --PARAMETER VALUE`)."""
    lines = []
    for cls in sorted(set(MERGE_METHODS.values()), key=lambda cls: cls.name):
        needs = _needs(cls)
        aliases = f" (also {', '.join(cls.aliases)})" if cls.aliases else ""
        per_task = "  per-task masks: code/modulated_merge.py" if kind(cls) == "per-task" else ""
        lines.append(f"  {cls.name}{aliases}" + (f"  needs {', '.join(needs)}" if needs else "") + per_task)
        lines += [f"      --x:{name} ({parameter_detail(p)}): {p.help}" for name, p in cls.parameters.items()]
    for cls in MODIFIERS:  # the first line of its docstring says what it does to a merge
        lines.append(f"  {cls.name}: {cls.__doc__.splitlines()[0]}")
        lines += [f"      --x:{name} ({parameter_detail(p)}): {p.help}" for name, p in cls.parameters.items()]
    for cls in DATA_AWARE:
        needs = _needs(cls)
        lines.append(f"  {cls.name}: run by code/{cls.program} on each task's {cls.task_data} data"
                     + (f", needs {', '.join(needs)}" if needs else ""))
        lines += [f"      --{name} ({parameter_detail(p)}): {p.help}" for name, p in cls.parameters.items()]
    return "\n".join(lines)


def add_parameter_arguments(parser, cls):
    """One `--NAME` argument of `parser` for each parameter the method `cls` declares: its type, default and help."""
    for name, parameter in cls.parameters.items():
        parser.add_argument(f"--{name}", type=parameter.type, default=parameter.default,
                            help=f"{parameter.help} ({parameter_detail(parameter)})")


def check_parameter_arguments(parser, cls, args):
    """A usage error for the first argument of `add_parameter_arguments` outside its declared range or choices."""
    for name, parameter in cls.parameters.items():
        value = getattr(args, name)
        problem = None if value is None else parameter.problem(value)
        if problem:
            parser.error(f"--{name} {problem}, got {value}")


def _grid_text(entry: dict) -> str:
    if entry["parameter"] is None:
        return "once"
    grid = "the preset's α grid" if entry["grid"] == SCALING_FACTORS else ", ".join(map(str, entry["grid"]))
    return f"{entry['parameter']} ∈ {{{grid}}}"


def methods_markdown() -> str:
    """docs/methods.md: one row per method, then one per sweep entry."""
    lines = ["# Merge methods", "",
             "Generated by `python scripts/catalogue.py` from the methods' own declarations (`modelmerge.catalogue`);",
             "do not edit. How each method computes its merge, and the files it reads: [merging.md](merging.md).", "",
             "| method | aliases | kind | needs | parameters (default) | mergekit names | paper |",
             "|---|---|---|---|---|---|---|"]
    for cls in DECLARATIONS:
        parameters = "<br>".join(f"`{name}` ({parameter_detail(p)})" for name, p in cls.parameters.items())
        needs = ", ".join(_needs(cls) + [f"optional statistic '{kind}'" for kind in cls.optional_stats])
        program = "" if cls.program == "merge.py" else f" (`code/{cls.program}`)"
        lines.append(f"| `{cls.name}` | {', '.join(cls.aliases)} | {kind(cls)}{program} | {needs} | {parameters} | "
                     f"{', '.join(mergekit_names(cls))} | {cls.paper} |")
    lines += ["", "## Sweeps", "",
              "The entries of config/merging_methods.py and of the family suites (config/vit_tasks.py,",
              "config/t5_tasks.py): each value of the grid merged, the best on validation reported (the family",
              "suites' offline presets merge three values about the grid's middle and their own α grid).", "",
              "| label | method | kind | grid | fixed | statistics | starts from |", "|---|---|---|---|---|---|---|"]
    for label, entry in sweeps().items():
        fixed = ", ".join(f"{name}={value}" for name, value in entry["fixed"].items())
        statistics = ", ".join(filter(None, [entry["statistics"] and f"each model's {entry['statistics']}",
                                             entry["ancestor_statistics"] and f"θ_0's {entry['ancestor_statistics']}"]))
        lines.append(f"| {label} | `{entry['method']}` | {entry['kind']} | {_grid_text(entry)} | {fixed} | "
                     f"{statistics} | {entry['initial'] or ''} |")
    return "\n".join(lines) + "\n"
