"""mergekit's YAML merge configurations, run by our driver with mergekit's semantics.

The same file that drives `mergekit-yaml` (mergekit 0.1.5, https://github.com/arcee-ai/mergekit) gives the
same tensors here for the methods both projects have. What is read:

- `merge_method`: a mergekit name from `MERGEKIT_METHODS` or any of our method names.
- `models: [{model, parameters}]` (with `base_model` added as an input when not listed), or
  `slices: [{sources: [{model, layer_range: [a, b], parameters}], base_model, parameters}]`, which build the
  output layer by layer (renumbered from 0, `num_hidden_layers` of the output config updated). Outside the
  layers, the first slice's sources give the embeddings and the last slice's everything after the layers.
- `parameters` at the top, per slice and per model, in mergekit's precedence (model > slice > top). A value
  is a scalar, a gradient (a list interpolated over the layers of the slice: t = i / (n − 1) for layer i
  of n, t = 0 outside the layers) or a list of `{filter, value}` where the first entry whose `filter` is a
  substring of the tensor name (or `*`) applies.
- LiNeS's `lines_beta` / `lines_alpha` and KnOTS's `knots` (methods/lines.py, methods/knots.py; not mergekit's)
  in the top-level `parameters` only, as single values: they act on the whole merge of any method with a
  `base_model`, as `--x:lines_beta` and `--x:knots` do on the command line.
- `dtype` (working and output precision), `out_dtype`, `tokenizer_source`: `union` (the union vocabulary,
  every model's embedding / LM-head rows rebuilt for it as mergekit does: modelmerge.vocabulary), or `base`
  or `model:PATH` / `PATH` (vocabularies are not permuted then, so the models' vocabularies must agree).
- Model references `PATH` or `PATH+LORA_PATH` (the LoRA adapter folded into the model, W + s·B·A).

Every key's value is checked before any model is opened (`check_types`: the types mergekit's own schema
allows), a wrong one refused with its full path, e.g. `models[1].parameters must be a mapping ...`.

Layers are found by name: the tensors `<prefix>.<i>.<rest>` whose prefix has indices 0..n−1, n from the
config's `num_hidden_layers` when present. Tensors before the layers are told from those after them by
name (embeddings: `embed`, `wte`, `wpe`), where mergekit reads a per-architecture table.
"""
import atexit
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

import yaml

from modelmerge.io.formats import CheckpointError
from modelmerge.io.json_files import read_json_object
from modelmerge.io.reading import open_checkpoint
from modelmerge.lora_merge import LoraDeltaView
from modelmerge.merging.options import DTYPES, MergeError
from modelmerge.merging.parameters import DRIVER_PARAMETERS, load_method, resolve_parameters, split_driver_options
from modelmerge.merging.plan import (MergePlan, Source, TensorTask, check_same_tensors, model_count_problem,
                                    use_shared_basis)
from modelmerge.methods import MERGE_METHODS
from modelmerge.methods.base import Mergekit
from modelmerge.vocabulary import unify


# mergekit's methods, by its names (ours too): each declared by the class of ours that computes it (its `mergekit`).
MERGEKIT_METHODS = {cls.name: cls.mergekit for cls in dict.fromkeys(MERGE_METHODS.values()) if cls.mergekit}
TOP_LEVEL_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
                  "tokenizer_source"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")
_EMBEDDINGS = re.compile(r"embed|(^|\.)(wte|wpe)\.")
_LAYER = re.compile(r"^(.*?\.)(\d+)\.(.+)$")


def read_config(path):
    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as error:
        raise MergeError(f"config {path}: cannot read it ({error})") from None
    if not isinstance(config, dict):
        raise MergeError(f"config {path}: expected a mapping of mergekit keys at the top")
    unknown = sorted(set(config) - TOP_LEVEL_KEYS)
    if unknown:
        raise MergeError(f"config {path}: unsupported key(s) {', '.join(unknown)} (supported: {', '.join(sorted(TOP_LEVEL_KEYS))})")
    if "merge_method" not in config:
        raise MergeError(f"config {path}: merge_method is missing")
    if ("models" in config) == ("slices" in config):
        raise MergeError(f"config {path}: give exactly one of models and slices")
    try:
        check_types(config)
    except MergeError as error:
        raise MergeError(f"config {path}: {error}") from None
    return config


def check_types(config):
    """MergeError naming the full path of the first key (`models[1].parameters`) whose value has a type
    mergekit's schema (mergekit.config.MergeConfiguration) does not allow, or a key it does not know here."""
    _typed(config, "merge_method", str, "a method name (a string)")
    for key in ("base_model", "tokenizer_source"):
        _typed(config, key, (str, type(None)), "a model path (a string)")
    for key in ("dtype", "out_dtype"):
        _typed(config, key, (str, type(None)), f"one of {', '.join(DTYPES)}")
    _check_settings(config.get("parameters"), "parameters")
    for index, entry in enumerate(_list(config["models"], "models") if "models" in config else []):
        where = f"models[{index}]"
        _mapping(entry, where, {"model", "parameters"})
        _typed(entry, "model", str, "a model path (a string)", where, required=True)
        _check_settings(entry.get("parameters"), f"{where}.parameters")
    for index, entry in enumerate(_list(config["slices"], "slices") if "slices" in config else []):
        where = f"slices[{index}]"
        _mapping(entry, where, {"sources", "base_model", "parameters"})
        _typed(entry, "base_model", (str, type(None)), "a model path (a string)", where)
        _check_settings(entry.get("parameters"), f"{where}.parameters")
        for j, source in enumerate(_list(_required(entry, "sources", where), f"{where}.sources")):
            source_where = f"{where}.sources[{j}]"
            _mapping(source, source_where, {"model", "layer_range", "parameters"})
            _typed(source, "model", str, "a model path (a string)", source_where, required=True)
            _check_layer_range(_required(source, "layer_range", source_where), f"{source_where}.layer_range")
            _check_settings(source.get("parameters"), f"{source_where}.parameters")


_SCALARS = (bool, int, float, str)
_SETTING = ("a number, string or boolean, a list of them (a gradient) or {filter, value} entries")


def _typed(entry, key, types, expected, where=None, required=False):
    path = f"{where}.{key}" if where else key
    if key not in entry:
        if required:
            raise MergeError(f"{path} is missing")
        return
    if not isinstance(entry[key], types):
        raise MergeError(f"{path} must be {expected}, got {entry[key]!r}")


def _check_settings(settings, where):
    """`parameters`: null or a mapping of parameter names to settings (mergekit's ParameterSetting)."""
    if settings is None:
        return
    if not isinstance(settings, dict):
        raise MergeError(f"{where} must be a mapping of parameter names to values, got {settings!r}")
    for name, setting in settings.items():
        if not isinstance(name, str):
            raise MergeError(f"{where}: parameter name {name!r} must be a string")
        _check_setting(setting, f"{where}.{name}")


def _check_setting(setting, where):
    if isinstance(setting, _SCALARS):
        return
    entries = [setting] if isinstance(setting, dict) else setting
    if not isinstance(entries, list):
        raise MergeError(f"{where} must be {_SETTING}, got {setting!r}")
    if all(isinstance(value, _SCALARS) for value in entries):
        return
    for i, entry in enumerate(entries):
        at = where if isinstance(setting, dict) else f"{where}[{i}]"
        if not isinstance(entry, dict):
            raise MergeError(f"{at} must be a {{filter, value}} entry like the others of the list, got {entry!r}")
        _mapping(entry, at, {"filter", "value"})
        _typed(entry, "filter", (str, type(None)), "a substring of tensor names (a string)", at)
        value = _required(entry, "value", at)
        if not (isinstance(value, _SCALARS) or isinstance(value, list) and all(isinstance(v, _SCALARS) for v in value)):
            raise MergeError(f"{at}.value must be a number, string or boolean, or a list of them (a gradient), "
                             f"got {value!r}")


def _check_layer_range(value, where):
    if not (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise MergeError(f"{where} must be [first, end], two integers, got {value!r}")
    start, stop = value
    if start < 0:
        raise MergeError(f"{where}: {value} starts before layer 0")
    if start >= stop:
        raise MergeError(f"{where}: {value} is {'reversed' if start > stop else 'empty'}: [first, end] takes the "
                         "layers first to end - 1, so first must be below end")


def plan_config(config):
    """A MergePlan for the parsed YAML `config` (see the module docstring)."""
    name = config["merge_method"]
    method = load_method(name)  # one of ours, or a MergeError listing the known names
    mapping = MERGEKIT_METHODS.get(name) or Mergekit("ancestor" if method.needs_base else "input")
    if method.stats or method.base_stats:
        raise MergeError(f"merge_method {name}: needs statistics, which mergekit configurations cannot name; give the method and its statistics directly")
    references = _References()
    base_ref = config.get("base_model")
    tokenizer = None
    if config.get("tokenizer_source") == "union":
        tokenizer = references.unify(_model_references(config), base_ref)
    slices = _slices(config, references, base_ref)
    scopes = _ParameterScopes(method, mapping)
    top, wrappers = _driver_options(method, config)
    tasks = _plan_tasks(method, mapping, slices, scopes, {**config, "parameters": top})
    if (wrappers["knots"] or wrappers["lines_beta"] is not None) and any(t.merge and t.ancestor is None for t in tasks):
        raise MergeError(f"merge_method {name}: KnOTS (knots) and LiNeS (lines_beta) act on task vectors θ_t − θ_0: "
                         "they need base_model as the ancestor")
    if wrappers["knots"]:
        use_shared_basis(tasks)
    lines = None if wrappers["lines_beta"] is None else (wrappers["lines_alpha"], wrappers["lines_beta"])
    donor = references.get(base_ref) if base_ref else slices[0].sources[0].checkpoint
    json_updates = {}
    if "slices" in config:
        json_updates["config.json"] = {"num_hidden_layers": sum(len(s) for s in slices)}
    dtype, out_dtype = _dtype(config, "dtype"), _dtype(config, "out_dtype")  # config.json's dtype: run_tasks
    if tokenizer is not None:
        json_updates.setdefault("config.json", {})["vocab_size"] = len(tokenizer)
    tokenizer_from = _tokenizer_source(config.get("tokenizer_source"), references, donor, tokenizer)
    extra_files = {}
    if tokenizer_from:
        extra_files = {name: os.path.join(tokenizer_from, name) for name in TOKENIZER_FILES
                       if os.path.isfile(os.path.join(tokenizer_from, name))}
    return MergePlan(method, tasks, "model", files_from=donor.folder, extra_files=extra_files,
                     json_updates=json_updates, dtype=dtype, out_dtype=out_dtype or dtype,
                     inputs=references.paths() + ([tokenizer_from] if tokenizer_from else []), lines=lines)


def _driver_options(method, config):
    """(the top-level parameters without LiNeS's and KnOTS's options, those options checked): they act on the
    whole merge (merging.frontend), so they are read from the top-level parameters only, as single values."""
    scopes = [(f"models[{i}].parameters", entry.get("parameters")) for i, entry in enumerate(config.get("models") or [])]
    for i, entry in enumerate(config.get("slices") or []):
        scopes.append((f"slices[{i}].parameters", entry.get("parameters")))
        scopes += [(f"slices[{i}].sources[{j}].parameters", source.get("parameters"))
                   for j, source in enumerate(entry.get("sources") or [])]
    for where, settings in scopes:
        found = sorted(set(settings or {}) & set(DRIVER_PARAMETERS))
        if found:
            raise MergeError(f"{where}: '{found[0]}' is an option of the whole merge (LiNeS / KnOTS): "
                             "give it in the top-level parameters")
    return split_driver_options(method, config.get("parameters") or {})


class _References:
    """Checkpoints by mergekit model reference (`PATH` or `PATH+LORA_PATH`), each opened once."""

    def __init__(self):
        self._open = {}

    def get(self, reference):
        if not isinstance(reference, str):
            raise MergeError(f"model reference {reference!r}: expected a path")
        if reference not in self._open:
            self._open[reference] = self._open_reference(reference)
        return self._open[reference]

    @staticmethod
    def _open_reference(reference):
        try:
            if "+" in reference and not os.path.exists(reference):
                model, adapter = reference.split("+", 1)
                return LoraDeltaView(open_checkpoint(adapter), base=open_checkpoint(model))
            return open_checkpoint(reference)
        except CheckpointError as error:
            raise MergeError(f"model {reference}: {error}") from None

    def all(self):
        return list(self._open.values())

    def unify(self, references, base_reference):
        """Replace the checkpoints of `references` by views with the union vocabulary (modelmerge.vocabulary);
        return the union tokenizer."""
        references = list(dict.fromkeys(references))
        checkpoints = [self.get(reference) for reference in references]
        if any(c.folder is None for c in checkpoints):
            raise MergeError("tokenizer_source union: every model must be a model folder with its tokenizer")
        base_index = references.index(base_reference) if base_reference in references else None
        views, tokenizer = unify(checkpoints, base_index)
        self._open.update(zip(references, views))
        return tokenizer

    def paths(self):
        """Every file or folder the references name (`PATH+LORA_PATH` names two)."""
        return [path for reference in self._open
                for path in ([reference] if os.path.exists(reference) else reference.split("+", 1))]


@dataclass
class _SliceSource:
    reference: str
    checkpoint: Any
    layers: "LayerLayout"
    start: int
    stop: int
    parameters: dict


@dataclass
class _Slice:
    sources: list[_SliceSource]
    base_reference: str | None
    parameters: dict
    length: int

    def __len__(self):
        return self.length


def _slices(config, references, base_ref):
    if "models" in config:
        models = list(config["models"])
        if base_ref is not None and base_ref not in [m.get("model") for m in models]:
            models.append({"model": base_ref})
        sources = []
        for index, entry in enumerate(models):
            checkpoint = references.get(entry["model"])
            layers = LayerLayout.of(checkpoint)
            sources.append(_SliceSource(entry["model"], checkpoint, layers, 0, layers.count, entry.get("parameters") or {}))
        check_same_tensors([s.checkpoint for s in sources], "models")
        return [_Slice(sources, base_ref, {}, sources[0].layers.count)]
    slices = []
    for index, entry in enumerate(config["slices"]):
        sources = []
        for j, source in enumerate(entry["sources"]):
            where = f"slices[{index}].sources[{j}]"
            checkpoint = references.get(source["model"])
            layers = LayerLayout.of(checkpoint)
            start, stop = _layer_range(source["layer_range"], layers, where)
            sources.append(_SliceSource(source["model"], checkpoint, layers, start, stop, source.get("parameters") or {}))
        lengths = {s.stop - s.start for s in sources}
        if len(lengths) != 1:
            raise MergeError(f"slices[{index}]: all sources must span the same number of layers, got {sorted(lengths)}")
        slices.append(_Slice(sources, entry.get("base_model", base_ref), entry.get("parameters") or {}, lengths.pop()))
    return slices


def _layer_range(value, layers, where):
    """The layer range [first, end] (types checked by check_types) within the model's layers."""
    start, stop = value
    if stop > layers.count:
        raise MergeError(f"{where}.layer_range: {value} is outside the model's {layers.count} layers")
    return start, stop


def _list(value, where):
    if not isinstance(value, list) or not value:
        raise MergeError(f"{where} must be a non-empty list, got {value!r}")
    return value


def _mapping(value, where, keys):
    if not isinstance(value, dict):
        raise MergeError(f"{where} must be a mapping with keys {', '.join(sorted(keys))}, got {value!r}")
    unknown = sorted(map(str, set(value) - keys))
    if unknown:
        raise MergeError(f"{where}: unsupported key(s) {', '.join(unknown)} (supported: {', '.join(sorted(keys))})")
    return value


def _required(entry, key, where):
    if key not in entry:
        raise MergeError(f"{where}.{key} is missing")
    return entry[key]


class LayerLayout:
    """Where a checkpoint's layers are: tensors `<prefix><i>.<rest>` for i in 0..count−1."""

    def __init__(self, prefix, count, suffixes):
        self.prefix, self.count, self.suffixes = prefix, count, suffixes

    @classmethod
    def of(cls, checkpoint):
        expected = _config_layers(checkpoint)
        indices = {}
        for name in checkpoint.names:
            match = _LAYER.match(name)
            if match:
                indices.setdefault(match.group(1), set()).add(int(match.group(2)))
        candidates = [(len(found), prefix) for prefix, found in indices.items()
                      if found == set(range(len(found))) and (expected is None or len(found) == expected)]
        if not candidates:
            if expected:
                raise MergeError(f"{checkpoint.path}: cannot find its {expected} layers among the tensor names")
            return cls(None, 0, [])
        count, prefix = max(candidates)
        suffixes = [name[len(prefix) + 2:] for name in checkpoint.names if name.startswith(prefix + "0.")]
        return cls(prefix, count, suffixes)

    def index(self, name):
        """The layer index of tensor `name`, or None outside the layers."""
        if self.prefix is None or not name.startswith(self.prefix):
            return None
        head = name[len(self.prefix):].split(".", 1)[0]
        return int(head) if head.isdigit() and int(head) < self.count else None

    def name(self, index, suffix):
        return f"{self.prefix}{index}.{suffix}"


def _config_layers(checkpoint):
    config = os.path.join(checkpoint.folder or "", "config.json")
    if not checkpoint.folder or not os.path.isfile(config):
        return None
    return read_json_object(config).get("num_hidden_layers")


class _ParameterScopes:
    """mergekit's parameter settings, resolved per tensor (model > slice > top level)."""

    def __init__(self, method, mapping):
        self.method = method
        self.mapping = mapping
        self.defaults = mapping.defaults
        self.lookup = {}
        for name, parameter in method.parameters.items():
            self.lookup[name] = name
            self.lookup.update({alias: name for alias in parameter.aliases})

    def canonical(self, settings, where):
        result = {}
        for key, value in (settings or {}).items():
            if key in self.mapping.ignored:
                continue
            if key not in self.lookup:
                known = ", ".join(sorted(self.method.parameters)) or "none"
                raise MergeError(f"{where}: unknown parameter '{key}' for method {self.method.name} (its parameters: {known})")
            result[self.lookup[key]] = value
        return result

    def resolve(self, tensor_names, t, model_settings, shared_settings, num_models):
        """Parameters of one output tensor. `tensor_names[i]` is the tensor's name in model i (filters
        match it); `model_settings[i]` the settings of model i; `shared_settings` slice then top level."""
        supplied = {}
        for name, parameter in self.method.parameters.items():
            if parameter.per_model:
                values = [self._first(name, [own] + shared_settings, tensor_names[i], t)
                          for i, own in enumerate(model_settings)]
                if any(v is not None for v in values):
                    supplied[name] = [parameter.default if v is None else v for v in values]
                elif name in self.defaults:
                    supplied[name] = self.defaults[name]
            else:
                value = self._first(name, shared_settings, tensor_names[0], t)
                if value is None and name in self.defaults:
                    value = self.defaults[name]
                if value is not None:
                    supplied[name] = value
        return resolve_parameters(self.method, supplied, num_models)

    def _first(self, name, scopes, tensor_name, t):
        for scope in scopes:
            if name in scope:
                value = evaluate_setting(scope[name], tensor_name, t)
                if value is not None:
                    return value
        return None


def evaluate_setting(setting, tensor_name, t):
    """One parameter setting at a tensor: a scalar, a gradient over t in [0, 1], or filtered values."""
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if not setting:
        return None
    if all(not isinstance(v, (dict, list)) for v in setting):
        numbers = [_number(v) for v in setting]
        if any(n is None for n in numbers):  # booleans and words are picked, not interpolated
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(numbers) - 1)
        low = int(scaled)
        high = min(len(numbers) - 1, low + 1)
        fraction = scaled - low
        return (1 - fraction) * numbers[low] + fraction * numbers[high]
    for condition in setting:
        if not isinstance(condition, dict) or "value" not in condition:
            raise MergeError(f"parameter setting {setting!r}: expected a list of {{filter, value}} entries")
        pattern = condition.get("filter")
        if pattern is None or pattern == "*" or (tensor_name and pattern in tensor_name):
            return evaluate_setting(condition["value"], tensor_name, t)
    return None


def _number(value):
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _plan_tasks(method, mapping, slices, scopes, config):
    top = scopes.canonical(config.get("parameters"), "parameters")
    tasks = []
    first, last = slices[0], slices[-1]
    pre, post = _outside_layers(first.sources[0])
    for name in pre:
        tasks.append(_task(method, mapping, first, [name] * len(first.sources), name, 0.0, scopes, top))
    out_index = 0
    for slice_ in slices:
        for offset in range(len(slice_)):
            t = offset / (len(slice_) - 1) if len(slice_) > 1 else 1.0
            for suffix in slice_.sources[0].layers.suffixes:
                in_names = [s.layers.name(s.start + offset, suffix) for s in slice_.sources]
                out_name = slice_.sources[0].layers.name(out_index, suffix)
                tasks.append(_task(method, mapping, slice_, in_names, out_name, t, scopes, top))
            out_index += 1
    for name in post:
        tasks.append(_task(method, mapping, last, [name] * len(last.sources), name, 0.0, scopes, top))
    return tasks


def _outside_layers(source):
    others = [n for n in source.checkpoint.names if source.layers.index(n) is None]
    pre = [n for n in others if _EMBEDDINGS.search(n)]
    return pre, [n for n in others if not _EMBEDDINGS.search(n)]


def _task(method, mapping, slice_, in_names, out_name, t, scopes, top):
    """The task for one output tensor of one slice: inputs by the base model's role, parameters resolved."""
    inputs = []
    for source, in_name in zip(slice_.sources, in_names):
        if in_name not in source.checkpoint:
            raise MergeError(f"model {source.reference} has no tensor {in_name} (needed for {out_name})")
        inputs.append((source, Source(source.checkpoint, in_name)))
    base = None
    if slice_.base_reference is not None and mapping.base_role != "input":
        found = [pair for pair in inputs if pair[0].reference == slice_.base_reference]
        if not found:
            raise MergeError(f"base_model {slice_.base_reference} is not among the sources of its slice")
        base = found[0]
        inputs = [pair for pair in inputs if pair is not base]
        if mapping.base_role == "first":
            inputs, base = [base] + inputs, None
    elif method.needs_base:
        raise MergeError(f"merge_method {method.name} needs base_model")
    count = len(inputs)
    problem = model_count_problem(method, count)
    if problem:
        raise MergeError(f"tensor {out_name}: {problem}")
    shared = [scopes.canonical(slice_.parameters, "slice parameters"), top]
    own = [scopes.canonical(source.parameters, f"parameters of {source.reference}") for source, _ in inputs]
    names = [src.name for _, src in inputs]
    try:
        params = scopes.resolve(names, t, own, shared, count)
    except MergeError as error:
        raise MergeError(f"tensor {out_name}: {error}") from None
    shapes = {tuple(src.info().shape) for _, src in inputs + ([base] if base else [])}
    if len(shapes) > 1:
        raise MergeError(f"tensor {out_name}: its sources have different shapes {sorted(shapes)}")
    return TensorTask(out_name, [src for _, src in inputs], ancestor=base[1] if base else None, params=params,
                      merge=inputs[0][1].info().dtype.is_floating_point)


def _dtype(config, key):
    value = config.get(key)
    if value is None:
        return None
    if value not in DTYPES:
        raise MergeError(f"{key}: {value!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[value]


def _model_references(config):
    """Every model reference of the configuration: base_model first, then the models in order."""
    found = [config["base_model"]] if config.get("base_model") else []
    for entry in config.get("models") or []:
        found.append(entry.get("model") if isinstance(entry, dict) else None)
    for entry in config.get("slices") or []:
        for source in (entry.get("sources") or []) if isinstance(entry, dict) else []:
            found.append(source.get("model") if isinstance(source, dict) else None)
    return [reference for reference in found if isinstance(reference, str)]


def _tokenizer_source(value, references, donor, union=None):
    """The folder whose tokenizer files replace the donor's: the union tokenizer written to a temporary
    folder, or an input's after checking that the vocabularies need no permuting."""
    if value is None:
        return None
    if union is not None:
        folder = tempfile.mkdtemp(prefix="union-tokenizer-")
        atexit.register(shutil.rmtree, folder, True)
        union.save_pretrained(folder)
        return folder
    if value == "base":
        folders = [c.folder for c in references.all() if c.folder]
        _check_same_vocabulary(folders, value)
        return donor.folder
    path = value[len("model:"):] if value.startswith("model:") else value
    folder = references.get(path).folder
    _check_same_vocabulary([c.folder for c in references.all() if c.folder], f"model:{path}")
    return folder


def _check_same_vocabulary(folders, source):
    from transformers import AutoTokenizer

    vocabularies = {folder: AutoTokenizer.from_pretrained(folder).get_vocab() for folder in folders}
    reference = next(iter(vocabularies.values()), None)
    for folder, vocabulary in vocabularies.items():
        if vocabulary != reference:
            raise MergeError(
                f"tokenizer_source {source}: the vocabulary of {folder} differs from the others; "
                "merging models with different vocabularies (embedding permutation) is not supported"
            )

