"""Planning a merge: one `TensorTask` per output tensor, naming where its inputs live (`Source`: a
checkpoint and a tensor name, so mergekit slices can rename layers) and the method's resolved parameters.

Planning reads only file headers, so inconsistent inputs (names, shapes, missing statistics, counts) fail
before any work is done.
"""
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from modelmerge.io.formats import CheckpointError, TensorInfo
from modelmerge.merging.execute import run_tasks, scale_layers
from modelmerge.merging.options import MergeError, MergeOptions
from modelmerge.merging.shards import assign_parts, whole_merge_reason, write_part
from modelmerge.methods.base import GRAM_KINDS


@dataclass(frozen=True)
class Source:
    """One tensor of one input: a checkpoint (or a view of one) and the tensor's name in it."""

    checkpoint: Any
    name: str

    def info(self) -> TensorInfo:
        return self.checkpoint.info(self.name)

    def read(self) -> torch.Tensor:
        return self.checkpoint.get(self.name)

    def where(self):
        return f"{self.name} in {self.checkpoint.file_of(self.name)}"


@dataclass(frozen=True)
class LoraOutput:
    """Write a merged weight change as the LoRA pair (A, B) of rank `rank` (see lora_merge.factorize)."""

    a_name: str
    b_name: str
    rank: int
    fan_in_fan_out: bool = False


@dataclass
class TensorTask:
    """One output tensor: its inputs, the statistics describing them and the method's parameters."""

    name: str
    models: list[Source]
    ancestor: Source | None = None
    statistics: list[dict[str, Source]] = field(default_factory=list)
    ancestor_statistics: dict[str, Source] = field(default_factory=dict)
    initial: Source | None = None
    params: dict[str, Any] = field(default_factory=dict)
    merge: bool = True  # False: copied from the base (else the first model), e.g. excluded by a regex
    lora_output: LoraOutput | None = None
    stored_in_out: bool = False  # a linear weight stored [in, out] (GPT-2's Conv1D), as its Gram statistics say
    task_vector_scale: float | None = None  # LiNeS: the merged θ becomes θ_0 + scale·(θ − θ_0) (methods/lines.py)
    shared_basis: bool = False  # KnOTS: merged in the shared SVD basis of the task updates (methods/knots.py)

    def sources(self) -> list[Source]:
        """Every input this task reads."""
        sources = list(self.models) + [self.ancestor, self.initial] + list(self.ancestor_statistics.values())
        sources += [source for stats in self.statistics for source in stats.values()]
        return [source for source in sources if source is not None]


@dataclass
class MergePlan:
    """One merge, planned from file headers by either front end (merging.frontend.plan): its tasks and how
    its output is laid out; `run` executes it."""

    method: Any
    tasks: list[TensorTask]
    layout: str  # "model" or "adapter" (an output path ending in .safetensors is written as one "file")
    params: dict = field(default_factory=dict)  # the method's resolved parameters (their cost balances shards)
    files_from: str | None = None  # the folder whose non-weight files the output carries
    extra_files: dict = field(default_factory=dict)  # file name -> path, copied into the output folder too
    json_updates: dict = field(default_factory=dict)  # file name -> keys set in the copied JSON file
    dtype: Any = None  # working precision (None: the widest input's, at least float32)
    out_dtype: Any = None  # output precision of floating-point tensors (None: execute.output_entries's rule)
    inputs: list = field(default_factory=list)  # every path the merge reads
    lines: tuple | None = None  # LiNeS's (α, β) when asked for (methods/lines.py): applied once the device is known
    identity: dict | None = None  # the merge asked for, as the parts of a sharded merge record it

    def run(self, options: MergeOptions):
        """Execute the plan as `options` say: into `options.output` (or its part `options.shard`), on
        `options.device` with `options.threads`."""
        shard, parts, whole = options.shard, None, None
        if shard is not None:
            whole = whole_merge_reason(self.method, self.lines is not None and self.lines[0] is None)
            parts = assign_parts(self.method, self.params, self.tasks, shard.count, whole)
        if self.lines is not None and (shard is None or shard.index in parts):
            scale_layers(self.method, self.tasks, len(self.tasks[0].models), *self.lines, dtype=self.dtype,
                         device=options.device, progress=options.progress, threads=options.threads)
        if shard is not None:
            return write_part(self.method, self.tasks, parts, shard, options.output, self.layout, self.identity,
                              files_from=self.files_from and os.path.abspath(self.files_from),
                              json_updates=self.json_updates, max_shard_bytes=options.max_shard_bytes,
                              whole_reason=whole, dtype=self.dtype, device=options.device, progress=options.progress,
                              overwrite=options.overwrite, threads=options.threads)
        layout = "file" if options.output.endswith(".safetensors") else self.layout
        return run_tasks(self.method, self.tasks, options.output, layout, files_from=self.files_from,
                         extra_files=self.extra_files, json_updates=self.json_updates, dtype=self.dtype,
                         out_dtype=self.out_dtype, device=options.device, max_shard_bytes=options.max_shard_bytes,
                         progress=options.progress, inputs=self.inputs, overwrite=options.overwrite,
                         threads=options.threads)


def statistic_kinds(method):
    """(required kinds, optional kinds, the kind an unlabelled statistics file provides)."""
    ordered = list(method.stats) + list(method.optional_stats) + list(method.base_stats)
    return tuple(method.stats), tuple(method.optional_stats), (ordered[0] if ordered else None)


def expected_statistic_shape(kind, shape, stored_in_out=False):
    """Shape statistic `kind` has for a tensor of `shape` (a linear weight [out, in], or [in, out] when
    `stored_in_out`); None where the kind does not apply."""
    if kind in GRAM_KINDS:
        if len(shape) != 2:
            return None
        out_features, in_features = shape[::-1] if stored_in_out else shape
        size = in_features if kind == "gram" else out_features
        return size, size
    return tuple(shape)


def check_same_tensors(checkpoints, what="models"):
    """MergeError unless every checkpoint holds the same tensor names with the same shapes."""
    reference = checkpoints[0]
    for other in checkpoints[1:]:
        only_ref = sorted(set(reference.names) - set(other.names))
        only_other = sorted(set(other.names) - set(reference.names))
        if only_ref or only_other:
            raise MergeError(
                f"the {what} hold different tensors: {listing(only_ref)} only in {reference.path}; "
                f"{listing(only_other)} only in {other.path}"
            )
        for name in reference.names:
            if reference.info(name).shape != other.info(name).shape:
                raise MergeError(
                    f"tensor {name} has shape {list(reference.info(name).shape)} in {reference.path} "
                    f"but {list(other.info(name).shape)} in {other.path}"
                )


def listing(names, limit=5):
    """A short, readable list of names."""
    if not names:
        return "nothing"
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def model_count_problem(method, count):
    """Why `method` cannot merge `count` models, or None."""
    if count >= method.min_models and (method.max_models is None or count <= method.max_models):
        return None
    if method.min_models == method.max_models:
        expected = f"exactly {method.min_models}"
    else:
        expected = f"at least {method.min_models}" + (f" and at most {method.max_models}" if method.max_models else "")
    return f"method {method.name} merges {expected} models, got {count}"


def plan_merge(method, params, models, ancestor=None, statistics=None, ancestor_statistics=None, initial=None,
               include=None, exclude=None):
    """Tasks merging the same-named tensors of `models` (checkpoints or views) with `method`.

    `statistics` holds one `Statistics` per model (or None), `ancestor_statistics` those of `ancestor`; `include`/`exclude`
    are regular expressions (re.search) choosing which tensors are merged; the others are copied from
    `ancestor`, else from the first model. A selection that merges no tensor is an error.
    """
    check_same_tensors(list(models) + ([ancestor] if ancestor is not None else []),
                       "models" if ancestor is None else "models and the ancestor")
    if initial is not None:
        check_same_tensors([models[0], initial], "models and the initial model")
    required, optional, primary = statistic_kinds(method)
    include_re, exclude_re = _compile(include, "include"), _compile(exclude, "exclude")
    tasks = []
    for name in models[0].names:
        info = models[0].info(name)
        chosen = (include_re is None or include_re.search(name)) and not (exclude_re and exclude_re.search(name))
        task = TensorTask(name, [Source(m, name) for m in models], params=params,
                          merge=bool(chosen) and info.dtype.is_floating_point)
        if ancestor is not None:
            task.ancestor = Source(ancestor, name)
        if task.merge:
            if statistics is not None:
                task.statistics = [_model_statistics(s, name, info.shape, required, optional, primary)
                                   for s in statistics]
                _check_optional_consistent(task, optional, statistics)
                task.stored_in_out = _stored_in_out(task)
            if method.base_stats:
                task.ancestor_statistics = _model_statistics(ancestor_statistics, name, info.shape, method.base_stats,
                                                             (), primary)
            if initial is not None:
                task.initial = Source(initial, name)
        tasks.append(task)
    if (include or exclude) and not any(task.merge for task in tasks):
        chosen = " and ".join(f"{what} {pattern!r}" for what, pattern in (("include", include), ("exclude", exclude))
                              if pattern)
        raise MergeError(f"{chosen} select no floating-point tensor of {models[0].path} to merge")
    if statistics is not None and (required or optional):
        _check_statistics_used(method, tasks, statistics, required + optional)
    return tasks


def _check_statistics_used(method, tasks, stats, kinds):
    """MergeError where the statistics give none of the merged tensors a statistic the method uses (e.g. a
    LoRA adapter's Grams, keyed by its lora_A/lora_B weights, in a lora- merge of the weight changes, or a
    Fisher given to TIES): merging on would silently fall back to the method's statistic-free rule."""
    if any(any(task.statistics) for task in tasks if task.merge):
        return
    merged = [task.name for task in tasks if task.merge]
    raise MergeError(
        f"the statistics {stats[0].path} ({stats[0].describe()}) give method {method.name} no "
        f"{' or '.join(repr(kind) for kind in kinds)} statistic for any merged tensor ({listing(merged)})"
    )


def _compile(pattern, what):
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as error:
        raise MergeError(f"{what} pattern {pattern!r} is not a regular expression ({error})") from None


def _model_statistics(statistics, name, shape, required, optional, primary):
    found = {}
    for kind in list(required) + list(optional):
        checkpoint = statistics.get(kind, primary)
        present = checkpoint is not None and name in checkpoint and expected_statistic_shape(kind, shape) is not None
        if not present:
            if kind in required:
                raise MergeError(
                    f"statistics {statistics.path} ({statistics.describe()}) have no '{kind}' for tensor {name}"
                )
            continue
        in_out = kind in GRAM_KINDS and _recorded_in_out(checkpoint, name)
        expected = expected_statistic_shape(kind, shape, in_out)
        actual = tuple(checkpoint.info(name).shape)
        if actual != expected:
            hint = ""
            if kind in GRAM_KINDS and not in_out and actual == expected_statistic_shape(kind, shape, True):
                hint = ("; it fits a weight stored [in, out] (GPT-2's Conv1D), which Gram files written before "
                        "the layout was recorded do not say: compute them again with predict.py")
            raise MergeError(
                f"statistic '{kind}' of tensor {name} in {checkpoint.file_of(name)} has shape {list(actual)}, "
                f"expected {list(expected)}{hint}"
            )
        found[kind] = Source(checkpoint, name)
    return found


def _recorded_in_out(checkpoint, name):
    try:
        return checkpoint.stored_in_out(name)
    except CheckpointError as error:
        raise MergeError(str(error)) from None


def _stored_in_out(task):
    """Whether the task's tensor is a weight stored [in, out], as every Gram statistic of it must agree."""
    layouts = {source.checkpoint.file_of(source.name): source.checkpoint.stored_in_out(source.name)
               for stats in task.statistics for kind, source in stats.items() if kind in GRAM_KINDS}
    if len(set(layouts.values())) > 1:
        in_out = [path for path, flag in layouts.items() if flag]
        out_in = [path for path, flag in layouts.items() if not flag]
        raise MergeError(f"the Gram statistics of tensor {task.name} disagree on its layout: [in, out] in "
                         f"{listing(in_out)}, [out, in] in {listing(out_in)}")
    return any(layouts.values())


def _check_optional_consistent(task, optional, stats):
    for kind in optional:
        have = [kind in s for s in task.statistics]
        if any(have) and not all(have):
            missing = [stats[i].path for i, h in enumerate(have) if not h]
            raise MergeError(f"statistic '{kind}' of tensor {task.name} is missing from {', '.join(missing)}")


def use_shared_basis(tasks):
    """KnOTS: every merged 2-D tensor merged in the shared SVD basis of its task updates (methods/knots.py)."""
    for task in tasks:
        if task.merge and len(task.models[0].info().shape) == 2:
            task.shared_basis = True
