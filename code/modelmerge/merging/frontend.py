"""The whole merge as `MergeOptions` describe it: open the inputs, plan, execute into the output."""
import os

import torch

from modelmerge.io.reading import open_checkpoint, open_statistics
from modelmerge.lora_merge import output_adapter_config
from modelmerge.merging.execute import execute, output_entries, run_tasks
from modelmerge.merging.lora import lora_inputs, name_lora_outputs
from modelmerge.merging.options import MergeError, MergeOptions
from modelmerge.merging.parameters import load_method, resolve_parameters, split_driver_options
from modelmerge.merging.plan import model_count_problem, plan_merge
from modelmerge.merging.provenance import check_statistics_pairing
from modelmerge.merging.shards import assign_parts, whole_merge_reason, write_part
from modelmerge.methods.lines import layer_scales


def merge(options: MergeOptions):
    """Merge `options.models` with `options.method` into `options.output`; return the execution Summary.

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
    if options.output.endswith(".safetensors") and options.shard is None:  # a part: the join's output decides
        layout = "file"
    tasks = plan_merge(method, params, checkpoints, ancestor, statistics, ancestor_statistics, initial, options.include,
                       options.exclude)
    if lora_rank is not None:
        name_lora_outputs(tasks, checkpoints[0], lora_rank)
    if wrappers["knots"]:
        use_shared_basis(tasks)
    if options.shard is not None:
        whole = whole_merge_reason(method, wrappers["lines_beta"] is not None and wrappers["lines_alpha"] is None)
        parts = assign_parts(method, params, tasks, options.shard.count, whole)
    if wrappers["lines_beta"] is not None and (options.shard is None or options.shard.index in parts):
        scale_layers(method, tasks, len(options.models), wrappers["lines_alpha"], wrappers["lines_beta"],
                     dtype=options.dtype, device=options.device, progress=options.progress, threads=options.threads)
    if options.shard is not None:
        return write_part(method, tasks, parts, options.shard, options.output, layout, _identity(options, params),
                          files_from=files_from and os.path.abspath(files_from), json_updates=json_updates,
                          max_shard_bytes=options.max_shard_bytes, whole_reason=whole, dtype=options.dtype,
                          device=options.device, progress=options.progress, overwrite=options.overwrite,
                          threads=options.threads)
    return run_tasks(method, tasks, options.output, layout, files_from=files_from, json_updates=json_updates,
                     dtype=options.dtype, device=options.device, max_shard_bytes=options.max_shard_bytes,
                     progress=options.progress, inputs=options.inputs, overwrite=options.overwrite,
                     threads=options.threads)


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


def check_wrappers(options: MergeOptions, wrappers):
    """A MergeError where KnOTS or LiNeS (split_driver_options) cannot wrap the merge asked for."""
    if wrappers["knots"]:
        if options.ancestor is None and not options.lora:
            raise MergeError("KnOTS (knots) merges task updates θ_t − θ_0: it needs an --ancestor or a lora- merge")
        if options.statistics or options.ancestor_statistics or options.initial:
            raise MergeError("KnOTS (knots) merges coordinates in a new basis: statistics and --initial describe the weights")
    if wrappers["lines_beta"] is not None and (options.ancestor is None or options.lora):
        raise MergeError("LiNeS (lines_beta) scales task vectors θ − θ_0: it needs an --ancestor and no lora- merge")


def use_shared_basis(tasks):
    """KnOTS: every merged 2-D tensor merged in the shared SVD basis of its task updates (methods/knots.py)."""
    for task in tasks:
        if task.merge and len(task.models[0].info().shape) == 2:
            task.shared_basis = True


def scale_layers(method, tasks, num_models, alpha, beta, *, dtype, device, progress, threads=None):
    """LiNeS: every merged tensor's task vector scaled by α + β · (its layer's depth) (methods/lines.py); α None:
    the paper's ‖Σ_t τ_t‖₁ / (T·‖τ‖₁) of the `num_models` models, from one merge of every tensor that is not written."""
    if alpha is None:
        norms = _L1Norms(tasks)
        execute(method, tasks, norms, output_entries(tasks, dtype), dtype, device, progress, threads)
        if norms.merged == 0:
            raise MergeError("LiNeS: the merged task vector is zero, so the paper's α is undefined; give lines_alpha")
        alpha = norms.summed / (num_models * norms.merged)
    scales = layer_scales([task.name for task in tasks], alpha, beta)
    for task in tasks:
        if task.merge:
            task.task_vector_scale = scales[task.name]


class _L1Norms:
    """A writer that keeps only ‖Σ_t τ_t‖₁ and ‖θ − θ_0‖₁ of the merged tensors written to it (blocks of rows
    arrive in order)."""

    def __init__(self, tasks):
        self.tasks = {task.name: task for task in tasks}
        self.next_row = {}
        self.summed = self.merged = 0.0

    def write(self, name, tensor):
        task = self.tasks[name]
        if not task.merge:
            return
        start = self.next_row.get(name, 0)
        rows = None if tensor.dim() == 0 else slice(start, start + tensor.shape[0])
        self.next_row[name] = start + (tensor.shape[0] if tensor.dim() else 1)
        def read(source):
            whole = source.read()
            return (whole if rows is None else whole[rows]).to(torch.float64)

        base = read(task.ancestor)
        self.summed += float(sum(read(model) - base for model in task.models).abs().sum())
        self.merged += float((tensor.to(torch.float64) - base).abs().sum())


def _files_source(base, checkpoints):
    for checkpoint in [base] + checkpoints:
        if checkpoint is not None and checkpoint.folder is not None:
            return checkpoint.folder
    return None
