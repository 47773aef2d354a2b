"""The whole merge as `MergeOptions` describe it: one planner (`plan`) for both front ends, the command
line's and mergekit's YAML, whose `MergePlan` the executor runs (`MergePlan.run`)."""
import os

from modelmerge.io.reading import open_checkpoint, open_statistics
from modelmerge.lora_merge import output_adapter_config
from modelmerge.merging.lora import lora_inputs, name_lora_outputs
from modelmerge.merging.mergekit import plan_config, read_config
from modelmerge.merging.options import MergeError, MergeOptions
from modelmerge.merging.parameters import load_method, resolve_parameters, split_driver_options
from modelmerge.merging.plan import MergePlan, model_count_problem, plan_merge, use_shared_basis
from modelmerge.merging.provenance import check_statistics_pairing


def merge(options: MergeOptions):
    """The merge `options` ask for (the whole of it, or the part `options.shard`), planned by `plan` and run
    by `MergePlan.run`; return the execution Summary."""
    return plan(options).run(options)


def plan(options: MergeOptions) -> MergePlan:
    """The one planner of both front ends: the merge of a mergekit YAML file (`options.config`,
    merging.mergekit) or of the method, models and statistics `options` name (`plan_options`)."""
    if options.config is not None:
        return plan_config(read_config(options.config))
    return plan_options(options)


def plan_options(options: MergeOptions) -> MergePlan:
    """The MergePlan of `options.models` merged with `options.method`.

    A `lora-` method merges PEFT LoRA adapters as weight changes s·B·A: with an ancestor (the base model)
    the output is the base model with the merged change added, without one it is an adapter of rank
    `lora_rank` (default: the largest input rank) approximating the merged change by truncated SVD. Other
    methods merge adapters tensor by tensor (A and B independently) into an adapter. Output: a bare file
    when `output` ends with .safetensors, else a model or adapter folder carrying the non-weight files of
    the ancestor's folder (else the first model's).
    """
    method = load_method(options.method_name)
    check_counts(method, options)
    supplied, wrappers = split_driver_options(method, options.params)
    check_wrappers(options, wrappers)
    params = resolve_parameters(method, supplied, len(options.models))
    checkpoints = [open_checkpoint(path) for path in options.models]
    ancestor = open_checkpoint(options.ancestor) if options.ancestor else None
    statistics = [open_statistics(path) for path in options.statistics] if options.statistics else None
    ancestor_statistics = open_statistics(options.ancestor_statistics) if options.ancestor_statistics else None
    initial = open_checkpoint(options.initial) if options.initial else None
    check_statistics_kinds(method, statistics, ancestor_statistics)
    check_statistics_pairing(checkpoints, statistics, ancestor, ancestor_statistics, options.allow_statistics_mismatch)
    files_from = _files_source(ancestor, checkpoints)
    json_updates, lora_rank = {}, None
    if options.lora:
        checkpoints, ancestor, lora_rank = lora_inputs(method, checkpoints, ancestor, options.lora_rank)
        layout = "model" if lora_rank is None else "adapter"
        if lora_rank is not None:
            files_from = checkpoints[0].folder
            json_updates["adapter_config.json"] = output_adapter_config(lora_rank)
    else:
        layout = "adapter" if checkpoints[0].kind == "adapter" else "model"
    tasks = plan_merge(method, params, checkpoints, ancestor, statistics, ancestor_statistics, initial,
                       options.include, options.exclude)
    if lora_rank is not None:
        name_lora_outputs(tasks, checkpoints[0], lora_rank)
    if wrappers["knots"]:
        use_shared_basis(tasks)
    lines = None if wrappers["lines_beta"] is None else (wrappers["lines_alpha"], wrappers["lines_beta"])
    return MergePlan(method, tasks, layout, params=params, files_from=files_from, json_updates=json_updates,
                     dtype=options.dtype, inputs=options.inputs, lines=lines, identity=_identity(options, params))


def _identity(options: MergeOptions, params):
    """The merge asked for, as a sharded merge's parts record it (JSON-ready; every part must agree on it)."""
    return {"method": options.method, "params": {name: repr(value) for name, value in sorted(params.items())},
            "models": list(options.models), "statistics": options.statistics and list(options.statistics),
            "ancestor": options.ancestor, "ancestor_statistics": options.ancestor_statistics, "initial": options.initial,
            "include": options.include, "exclude": options.exclude, "dtype": str(options.dtype),
            "device": str(options.device), "lora_rank": options.lora_rank,
            "inputs": [os.path.abspath(path) for path in options.inputs]}


def check_counts(method, options: MergeOptions):
    """A MergeError where the inputs do not fit the method: number of models, ancestor, statistics."""
    count = len(options.models)
    problem = model_count_problem(method, count)
    if problem:
        raise MergeError(problem)
    if method.needs_base and not options.ancestor and not options.lora:  # a lora- merge without one starts from no change
        raise MergeError(f"method {method.name} needs the ancestor θ_0 (the model the others were fine-tuned from)")
    if options.statistics is not None and len(options.statistics) != count:
        raise MergeError(f"got {len(options.statistics)} statistics for {count} models (one per model, same order)")
    if method.stats and not options.statistics:
        raise MergeError(f"method {method.name} needs statistics ({', '.join(method.stats)}) of every model")
    if method.base_stats and not options.ancestor_statistics:
        raise MergeError(f"method {method.name} needs statistics ({', '.join(method.base_stats)}) of the ancestor")
    # statistics a method does not read would be ignored without a word: a mix-up (another method meant)
    if options.statistics and not (method.stats or method.optional_stats):
        raise MergeError(f"method {method.name} uses no statistics of the models; drop --aux_data")
    if options.ancestor_statistics and not method.base_stats:
        raise MergeError(f"method {method.name} uses no statistics of the ancestor; drop --ancestor_aux_data")


def check_statistics_kinds(method, statistics, ancestor_statistics):
    """A MergeError where a statistics folder holds none of the kinds the method reads (a Fisher given to
    tatr_gradient, a gradient magnitude to fisher): the method would find nothing of its own in it."""
    given = ((statistics or [], method.stats + method.optional_stats),
             ([ancestor_statistics] if ancestor_statistics else [], method.base_stats))
    for folders, kinds in given:
        for folder in folders:
            if folder.by_kind and not set(folder.by_kind) & set(kinds):
                raise MergeError(f"method {method.name} reads statistics {', '.join(kinds)}; {folder.path} holds "
                                 f"{folder.describe()}")


def check_wrappers(options: MergeOptions, wrappers):
    """A MergeError where KnOTS or LiNeS (split_driver_options) cannot wrap the merge asked for."""
    if wrappers["knots"]:
        if options.ancestor is None and not options.lora:
            raise MergeError("KnOTS (knots) merges task updates θ_t − θ_0: it needs an --ancestor or a lora- merge")
        if options.statistics or options.ancestor_statistics or options.initial:
            raise MergeError("KnOTS (knots) merges coordinates in a new basis: statistics and --initial describe the weights")
    if wrappers["lines_beta"] is not None and (options.ancestor is None or options.lora):
        raise MergeError("LiNeS (lines_beta) scales task vectors θ − θ_0: it needs an --ancestor and no lora- merge")


def _files_source(base, checkpoints):
    for checkpoint in [base] + checkpoints:
        if checkpoint is not None and checkpoint.folder is not None:
            return checkpoint.folder
    return None
