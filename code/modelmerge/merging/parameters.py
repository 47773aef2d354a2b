"""Methods by name and their parameters: given values converted to the declared types, defaults filled in,
per-model values made one per model, and every value checked against its declared range or choices."""
from modelmerge.merging.options import MergeError
from modelmerge.methods import get_method
from modelmerge.methods.knots import PARAMETERS as KNOTS_PARAMETERS
from modelmerge.methods.lines import PARAMETERS as LINES_PARAMETERS

DRIVER_PARAMETERS = {**LINES_PARAMETERS, **KNOTS_PARAMETERS}  # options of the whole merge (split_driver_options)


def load_method(name):
    """The method registered under `name`, or a MergeError listing the known names."""
    try:
        return get_method(name)()
    except ValueError as error:
        raise MergeError(str(error)) from None


def resolve_parameters(method, supplied, num_models):
    """Method parameters from `supplied` (name or alias -> value; command-line strings or YAML values):
    defaults filled in, per-model values made lists of `num_models`, values converted to the declared
    types and checked against their ranges."""
    given = _canonical(method, supplied)
    resolved = {}
    for name, parameter in method.parameters.items():
        if name in given:
            resolved[name] = _convert(method, name, parameter, given[name], num_models)
        elif parameter.required:
            raise MergeError(f"method {method.name} needs parameter '{name}' ({parameter.help or 'no default'})")
        elif parameter.per_model and parameter.default is not None and not isinstance(parameter.default, (list, tuple)):
            resolved[name] = [parameter.default] * num_models
        else:
            resolved[name] = parameter.default
    return resolved


def split_driver_options(method, supplied):
    """(`supplied` without the options every method takes, {lines_alpha, lines_beta, knots} converted and checked):
    LiNeS and KnOTS wrap any method with an ancestor, so the merge driver takes them (methods/lines.py,
    methods/knots.py)."""
    rest = {key: value for key, value in supplied.items() if key not in DRIVER_PARAMETERS}
    options = {name: _checked(method, name, parameter, supplied.get(name, parameter.default))
               for name, parameter in DRIVER_PARAMETERS.items()}
    if options["lines_alpha"] is not None and options["lines_beta"] is None:
        raise MergeError("parameter 'lines_alpha' is LiNeS's α: give lines_beta too")
    return rest, options


def _canonical(method, supplied):
    lookup = {}
    for name, parameter in method.parameters.items():
        lookup[name] = name
        lookup.update({alias: name for alias in parameter.aliases})
    given = {}
    for key, value in supplied.items():
        if key not in lookup:
            known = ", ".join(sorted(method.parameters)) or "none"
            raise MergeError(f"unknown parameter '{key}' for method {method.name} (its parameters: {known})")
        if lookup[key] in given:
            raise MergeError(f"parameter '{lookup[key]}' of method {method.name} is given more than once")
        given[lookup[key]] = value
    return given


def _convert(method, name, parameter, value, num_models):
    if not parameter.per_model:
        if isinstance(value, (list, tuple)) and len(value) == 1:
            value = value[0]
        return _checked(method, name, parameter, value)
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",")]
    if not isinstance(value, (list, tuple)):
        value = [value] * num_models
    if len(value) == 1 and num_models > 1:
        value = list(value) * num_models
    if len(value) != num_models:
        raise MergeError(f"parameter '{name}' of method {method.name} needs one value per model ({num_models}), got {len(value)}")
    return [_checked(method, name, parameter, v) for v in value]


def _checked(method, name, parameter, value):
    value = _scalar(method, name, parameter.type, value)
    problem = None if value is None else parameter.problem(value)
    if problem:
        raise MergeError(f"parameter '{name}' of method {method.name} {problem}, got {value!r}")
    return value


def _scalar(method, name, kind, value):
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        return None
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if kind in (int, float) and isinstance(value, bool):
            raise ValueError(value)  # YAML's true is no number: float(True) would silently be 1.0
        if kind is int and isinstance(value, float):
            if not value.is_integer():
                raise ValueError(value)
            return int(value)
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        raise MergeError(
            f"parameter '{name}' of method {method.name}: cannot read {value!r} as {getattr(kind, '__name__', kind)}"
        ) from None

