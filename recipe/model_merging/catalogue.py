"""The catalogue of merge methods as the recipes and configs read it: catalogue.json beside this file, which
`python scripts/catalogue.py` writes from the methods' own declarations (code/modelmerge/catalogue.py), so
that graphs are built without importing torch.

- `METHODS`: {name: what the method declares (kind, parameters, statistics, paper, ...)};
- `SWEEPS`: {label: one entry of the experiments' method suites}, in report order: "method", "kind", the
  "parameter" swept over "grid" (a list, or "scaling_factors": the preset's α grid), "fixed" parameters, the
  "statistics" each model is given and θ_0's ("ancestor_statistics"), the entry it starts from ("initial"),
  the parameters set from the data set sizes ("dataset_sizes"), a data-aware method's "task_data" split;
- `grid`, `parameters`, `suite_methods`: the values swept, the parameters at one of them, a family suite's
  entries (each with its settings); `default`: a method's declared default of one parameter (the data-aware Jobs'
  defaults).
"""
import json
import os

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "catalogue.json")
with open(PATH, encoding="utf-8") as _file:
    _CATALOGUE = json.load(_file)
METHODS: dict = _CATALOGUE["methods"]
SWEEPS: dict = _CATALOGUE["sweeps"]
SCALING_FACTORS = "scaling_factors"


def default(method, parameter):
    """The default value that method `method` declares for its parameter `parameter`."""
    return METHODS[method]["parameters"][parameter]["default"]


def grid(entry, scaling_factors):
    """The values the entry's parameter is merged at ([None]: merged once), `scaling_factors` the preset's α grid."""
    if entry["parameter"] is None:
        return [None]
    return list(scaling_factors) if entry["grid"] == SCALING_FACTORS else list(entry["grid"])


def middle(entry, scaling_factor):
    """The setting a family suite merged the entry at before it chose on validation (one of its grid's still):
    the middle of its grid, or `scaling_factor` for α."""
    if entry["parameter"] is None:
        return None
    return scaling_factor if entry["grid"] == SCALING_FACTORS else entry["grid"][len(entry["grid"]) // 2]


def parameters(entry, value, ancestor_size, model_sizes):
    """The method parameters of the entry with its parameter at `value` (None: not swept): its fixed ones, and
    those set from the data set sizes (θ_0's `ancestor_size`, each model's of `model_sizes`)."""
    result = dict(entry["fixed"])
    if value is not None:
        result[entry["parameter"]] = value
    sizes = {"ancestor": ancestor_size, "models": list(model_sizes)}
    result.update({name: sizes[source] for name, source in entry["dataset_sizes"].items()})
    return result


def suite_grid(entry, scaling_factors, points=None):
    """The values a family suite merges the entry at: its grid (for α the suite's `scaling_factors`), or, with
    `points`, that many of them about the middle of a catalogue grid."""
    values = grid(entry, scaling_factors)
    if points is None or entry["grid"] == SCALING_FACTORS or len(values) <= points:
        return values
    start = min(max(len(values) // 2 - (points - 1) // 2, 0), len(values) - points)
    return values[start:start + points]


def suite_methods(scaling_factor, model_sizes, ancestor_size, scaling_factors=None, points=None):
    """{label: catalogue entry with "settings" ({value: parameters} at each value of `suite_grid`, merged each,
    the best on validation reported) and "parameters" (at `middle`: the setting MaTS starts from)} of every
    method a family suite merges (all but the data-aware ones); the entries others start from first (MaTS from
    task arithmetic). `scaling_factors` (default [`scaling_factor`]) must hold `scaling_factor`."""
    scaling_factors = [scaling_factor] if scaling_factors is None else list(scaling_factors)
    if scaling_factor not in scaling_factors:
        raise ValueError(f"suite_methods: the α grid {scaling_factors} lacks the suite's α {scaling_factor}")
    methods = {}
    for label, entry in SWEEPS.items():
        if entry["kind"] == "data-aware":
            continue
        settings = {value: parameters(entry, value, ancestor_size, model_sizes)
                    for value in suite_grid(entry, scaling_factors, points)}
        methods[label] = {**entry, "settings": settings, "parameters": settings[middle(entry, scaling_factor)]}
    starts = {entry["initial"] for entry in methods.values()} - {None}
    return {**{label: methods[label] for label in methods if label in starts}, **methods}
