"""The MergePlan of a mergekit configuration: one TensorTask per output tensor, its inputs chosen by the base
model's role in the method (mergekit's, declared by our class: methods.base.Mergekit), its parameters resolved
in their scopes; and mergekit's method names (`MERGEKIT_METHODS`)."""
from modelmerge.merging.mergekit.references import References, model_references, outside_layers, slices
from modelmerge.merging.mergekit.schema import config_dtype
from modelmerge.merging.mergekit.scopes import ParameterScopes, driver_options
from modelmerge.merging.mergekit.tokenizer import tokenizer_files, tokenizer_source
from modelmerge.merging.options import MergeError
from modelmerge.merging.parameters import load_method
from modelmerge.merging.plan import MergePlan, Source, TensorTask, model_count_problem, use_shared_basis
from modelmerge.methods import MERGE_METHODS
from modelmerge.methods.base import Mergekit

# mergekit's methods, by its names (ours too): each declared by the class of ours that computes it (its `mergekit`).
MERGEKIT_METHODS = {cls.name: cls.mergekit for cls in dict.fromkeys(MERGE_METHODS.values()) if cls.mergekit}


def plan_config(config):
    """A MergePlan for the parsed YAML `config` (schema.read_config; see the package docstring)."""
    name = config["merge_method"]
    method = load_method(name)  # one of ours, or a MergeError listing the known names
    mapping = MERGEKIT_METHODS.get(name) or Mergekit("ancestor" if method.needs_base else "input")
    if method.stats or method.base_stats:
        raise MergeError(f"merge_method {name}: needs statistics, which mergekit configurations cannot name; "
                         "give the method and its statistics directly")
    references = References()
    base_ref = config.get("base_model")
    tokenizer = None
    if config.get("tokenizer_source") == "union":
        tokenizer = references.unify(model_references(config), base_ref)
    parts = slices(config, references, base_ref)
    top, wrappers = driver_options(method, config)
    tasks = _plan_tasks(method, mapping, parts, ParameterScopes(method, mapping), {**config, "parameters": top})
    if (wrappers["knots"] or wrappers["lines_beta"] is not None) and any(t.merge and t.ancestor is None for t in tasks):
        raise MergeError(f"merge_method {name}: KnOTS (knots) and LiNeS (lines_beta) act on task vectors θ_t − θ_0: "
                         "they need base_model as the ancestor")
    if wrappers["knots"]:
        use_shared_basis(tasks)
    lines = None if wrappers["lines_beta"] is None else (wrappers["lines_alpha"], wrappers["lines_beta"])
    donor = references.get(base_ref) if base_ref else parts[0].sources[0].checkpoint
    json_updates = {}
    if "slices" in config:
        json_updates["config.json"] = {"num_hidden_layers": sum(len(s) for s in parts)}
    dtype, out_dtype = config_dtype(config, "dtype"), config_dtype(config, "out_dtype")  # config.json's: run_tasks
    if tokenizer is not None:
        json_updates.setdefault("config.json", {})["vocab_size"] = len(tokenizer)
    tokenizer_from = tokenizer_source(config.get("tokenizer_source"), references, donor, tokenizer)
    return MergePlan(method, tasks, "model", files_from=donor.folder, extra_files=tokenizer_files(tokenizer_from),
                     json_updates=json_updates, dtype=dtype, out_dtype=out_dtype or dtype,
                     inputs=references.paths() + ([tokenizer_from] if tokenizer_from else []), lines=lines)


def _plan_tasks(method, mapping, parts, scopes, config):
    top = scopes.canonical(config.get("parameters"), "parameters")
    tasks = []
    first, last = parts[0], parts[-1]
    pre, post = outside_layers(first.sources[0])
    for name in pre:
        tasks.append(_task(method, mapping, first, [name] * len(first.sources), name, 0.0, scopes, top))
    out_index = 0
    for slice_ in parts:
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
