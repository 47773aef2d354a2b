"""mergekit's parameter settings resolved per output tensor: scopes in its precedence (model > slice > top
level), gradients over the layers of a slice, `{filter, value}` entries; and the options of the whole merge
(LiNeS, KnOTS), which only the top-level parameters may give."""
from modelmerge.merging.options import MergeError
from modelmerge.merging.parameters import DRIVER_PARAMETERS, resolve_parameters, split_driver_options


class ParameterScopes:
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
                raise MergeError(f"{where}: unknown parameter '{key}' for method {self.method.name} "
                                 f"(its parameters: {known})")
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


def driver_options(method, config):
    """(the top-level parameters without LiNeS's and KnOTS's options, those options checked): they act on the
    whole merge (merging.frontend), so they are read from the top-level parameters only, as single values."""
    scopes = [(f"models[{i}].parameters", entry.get("parameters"))
              for i, entry in enumerate(config.get("models") or [])]
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
