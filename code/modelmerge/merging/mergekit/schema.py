"""A mergekit YAML configuration read and every key's type checked, as mergekit's schema
(mergekit.config.MergeConfiguration, 0.1.5) allows, before any model is opened."""
import yaml

from modelmerge.merging.options import DTYPES, MergeError

TOP_LEVEL_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
                  "tokenizer_source"}
_SCALARS = (bool, int, float, str)
_SETTING = ("a number, string or boolean, a list of them (a gradient) or {filter, value} entries")


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
        raise MergeError(f"config {path}: unsupported key(s) {', '.join(unknown)} "
                         f"(supported: {', '.join(sorted(TOP_LEVEL_KEYS))})")
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


def config_dtype(config, key):
    """The torch dtype that `config[key]` (`dtype`, `out_dtype`) names, None if not given."""
    value = config.get(key)
    if value is None:
        return None
    if value not in DTYPES:
        raise MergeError(f"{key}: {value!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[value]


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
