"""JSON configs of the programs: one dataclass per program, checked key by key, logged and saved when resolved.

A config file is one JSON object. Keys are the dataclass's fields: fields without a default are required,
unknown keys are refused, every value is checked against the field's type (`int`, `float`, `str`, `bool`,
`list[str]`, `dict`, `X | None`, `Literal[...]`). A dataclass may refine its values in `__post_init__`
(raising `ConfigError`). `run_program` is the common `main` of the programs under `code/`.

A dataclass may also accept the keys of the paper authors' configs (Daheim et al., 2024, their
`finetune_roberta_imdb.json` & co.) through a class attribute `PAPER_KEYS`: {key: `Alias(field)`} for a
key that means one of ours (`Alias(field, values)`: only the listed values, each meaning ours),
{key: `Ignored(why, type, values)`} for one that has no effect here (only the
listed values, if any, are accepted: those matching what the program does anyway).
"""
import argparse
import dataclasses
import json
import logging
import os
import types
import typing

from modelmerge.atomic import OutputError, release_outputs
from modelmerge.io.json_files import read_json_object

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key or path and the cause."""


@dataclasses.dataclass(frozen=True)
class Alias:
    """A key of the paper authors' configs that means our key `field`; with `values` ({theirs: ours}) only those
    values are accepted, each standing for ours."""

    field: str
    values: dict | None = None


@dataclasses.dataclass(frozen=True)
class Ignored:
    """A key of the paper authors' configs without effect here (`why`); its value must have `type` and be in `values`."""

    why: str
    type: object = object
    values: tuple | None = None


def from_dict(cls, data, where="config"):
    """Build dataclass `cls` from the mapping `data`; `where` prefixes key names in error messages."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a JSON object, not {type(data).__name__}")
    fields = {field.name: field for field in dataclasses.fields(cls) if field.init}
    paper_keys = getattr(cls, "PAPER_KEYS", {})
    unknown = sorted(set(data) - set(fields) - set(paper_keys))
    if unknown:
        allowed = sorted(set(fields) | set(paper_keys))
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed keys: {', '.join(allowed)}")
    data = _translate_paper_keys(data, paper_keys, where)
    missing = [name for name, field in fields.items() if name not in data and _is_required(field)]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {', '.join(missing)}")
    hints = typing.get_type_hints(cls)
    values = {name: _check_type(value, hints[name], f"{where}.{name}") for name, value in data.items()}
    return cls(**values)


def load_config(cls, path):
    """Read the JSON file `path` into dataclass `cls`, checking every key."""
    return from_dict(cls, read_json_object(path, f"config file {path}", ConfigError), where=os.path.basename(path))


# Keys of the paper authors' configs that every program here accepts (see PAPER_KEYS above).
SHARED_PAPER_KEYS = {
    "max_input_length": Alias("max_length"),
    "overwrite_output_dir": Alias("overwrite"),
    "cache_dir": Ignored("models and data are read from local folders or the Hub's own cache; nothing is cached here",
                         str | None),
    "max_output_length": Ignored("it bounds the targets of sequence-to-sequence models; a classifier has none", int),
    "dataset_config_name": Ignored("labels are class indices, as the authors' 'classification' configuration gives them",
                                   str | None, ("classification", None)),
    # The authors' search job sets these to null: the model folder's own config and tokenizer.
    "config_name": Ignored("the model folder's own config is used", type(None), (None,)),
    "tokenizer_name": Ignored("the model folder's own tokenizer is used", type(None), (None,)),
}


def to_dict(config):
    """The resolved config as a JSON-ready dict (nested dataclasses included)."""
    return dataclasses.asdict(config)


def log_config(config):
    logger.info("resolved %s:\n%s", type(config).__name__, json.dumps(to_dict(config), indent=2))


def run_program(config_cls, run, description, argv=None):
    """`main` of a program: `PROGRAM CONFIG.json` → load and check the config, log it, call `run(config)`.

    Returns the exit status: 0 on success, 2 when the config (or the data or model it names) is unusable.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("config", help="JSON config file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(config_cls, args.config)
        _check_outputs_spare_the_config(config, args.config)
        log_config(config)
        run(config)
    except (ConfigError, OutputError) as error:  # OutputError: another process writes the output, a full disk
        logger.error("%s: %s", args.config, error)
        return 2
    finally:
        release_outputs()
    return 0


def _check_outputs_spare_the_config(config, config_path):
    """Refuse an output (the config's `output_paths()`) that is or holds the config file itself."""
    config_file = os.path.realpath(config_path)
    for key, path in getattr(config, "output_paths", dict)().items():
        output = os.path.realpath(path)
        if config_file == output or config_file.startswith(output.rstrip(os.sep) + os.sep):
            raise ConfigError(f"{key}: {path} holds the config file {config_path}; choose another path")


def _translate_paper_keys(data, paper_keys, where):
    """`data` with the paper authors' keys renamed to ours (a clash with a different value is refused) and ignored ones dropped."""
    translated = {key: value for key, value in data.items() if key not in paper_keys}
    for key in sorted(set(data) & set(paper_keys)):
        meaning, value = paper_keys[key], data[key]
        if isinstance(meaning, Alias):
            if meaning.values is not None:
                if not isinstance(value, str) or value not in meaning.values:
                    raise ConfigError(f"{where}.{key} (the authors' name for {meaning.field}) must be one of "
                                      f"{', '.join(map(repr, meaning.values))}, got {value!r}")
                value = meaning.values[value]
            if meaning.field in translated and translated[meaning.field] != value:
                raise ConfigError(f"{where}: {key} ({data[key]!r}) and {meaning.field} ({translated[meaning.field]!r}) "
                                  "name the same setting with different values; give one of them")
            translated[meaning.field] = value
            continue
        _check_type(value, meaning.type, f"{where}.{key}")
        if meaning.values is not None and value not in meaning.values:
            raise ConfigError(f"{where}.{key} must be one of {', '.join(map(repr, meaning.values))}, got {value!r} "
                              f"({meaning.why})")
        logger.info("%s: key %s (%r) has no effect here: %s", where, key, value, meaning.why)
    return translated


def _is_required(field):
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _check_type(value, expected, where):
    """`value` if it has type `expected` (ints are accepted as floats), else ConfigError naming `where`."""
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _check_type(value, option, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where} must be {_describe(expected)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_check_type(item, args[0], f"{where}[{i}]") for i, item in enumerate(value)] if args else value
    if expected is object:
        return value
    if expected is type(None):
        if value is not None:
            raise ConfigError(f"{where} must be null, got {value!r}")
        return value
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is int and isinstance(value, bool):
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if not isinstance(value, origin or expected):
        raise ConfigError(f"{where} must be {_describe(expected)}, got {value!r}")
    return value


def _describe(expected):
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "an object",
             type(None): "null"}
    if typing.get_origin(expected) in (typing.Union, types.UnionType):
        return " or ".join(_describe(option) for option in typing.get_args(expected))
    if typing.get_origin(expected) is list:
        return "a list"
    return names.get(expected, getattr(expected, "__name__", str(expected)))
