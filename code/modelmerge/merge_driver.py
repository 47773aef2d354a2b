"""The merge driver: everything about a merge except the arithmetic of its method.

A merge is planned as a list of `TensorTask`s, one per output tensor, each naming where its inputs live
(`Source`: a checkpoint and a tensor name, so mergekit slices can rename layers) and the method's resolved
parameters for that tensor. Planning reads only file headers, so inconsistent inputs (names, shapes,
missing statistics, counts, unknown parameters) fail before any work is done. `execute` then streams:
for each task it reads one tensor (or, for elementwise methods, one block of rows at a time) from every
input, checks it is finite, copies it through when every input agrees (or when it is not floating point,
or excluded), else hands a `TensorGroup` to the method, and appends the result to the output files. The
output appears only when every tensor was written.
"""
import argparse
import logging
import math
import os
import re
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from modelmerge.checkpoint import (Checkpoint, CheckpointError, TensorInfo, open_checkpoint, open_output, open_statistics,
                                  parse_size)
from modelmerge.lora_merge import LoraDeltaView, ZeroView, adapter_name, factorize, output_adapter_config
from modelmerge.methods import get_method
from modelmerge.methods.base import TensorBlocks, TensorGroup

logger = logging.getLogger(__name__)

LORA_PREFIX = "lora-"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
# Memory-mapped pages read count as resident memory until their mapping closes: close all after this many bytes.
RELEASE_EVERY_BYTES = 64 * 2**20
# Elementwise methods see tensors in blocks of rows of about this many bytes per input: small enough that a
# method's temporaries stay in the CPU caches, large enough that the work per block dwarfs its overhead.
BLOCK_BYTES = 512 * 2**10


class MergeError(ValueError):
    """A merge that cannot be done as asked; the message names the argument, file or tensor and the cause."""


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
    base: Source | None = None
    stats: list[dict[str, Source]] = field(default_factory=list)
    base_stats: dict[str, Source] = field(default_factory=dict)
    initial: Source | None = None
    params: dict[str, Any] = field(default_factory=dict)
    merge: bool = True  # False: copied from the base (else the first model), e.g. excluded by a regex
    lora_output: LoraOutput | None = None


# ---------------------------------------------------------------------------------------------------
# Methods and their parameters


def load_method(name):
    """The method registered under `name`, or a MergeError listing the known names."""
    try:
        return get_method(name)()
    except ValueError as error:
        raise MergeError(str(error)) from None


def resolve_parameters(method, supplied, num_models):
    """Method parameters from `supplied` (name or alias -> value; CLI strings or YAML values): defaults
    filled in, per-model values made lists of `num_models`, values converted to the declared types."""
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


def _convert(method, name, parameter, value, num_models):
    if not parameter.per_model:
        if isinstance(value, (list, tuple)) and len(value) == 1:
            value = value[0]
        return _scalar(method, name, parameter.type, value)
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",")]
    if not isinstance(value, (list, tuple)):
        value = [value] * num_models
    if len(value) == 1 and num_models > 1:
        value = list(value) * num_models
    if len(value) != num_models:
        raise MergeError(f"parameter '{name}' of method {method.name} needs one value per model ({num_models}), got {len(value)}")
    return [_scalar(method, name, parameter.type, v) for v in value]


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
        if kind is int and isinstance(value, float):
            if not value.is_integer():
                raise ValueError(value)
            return int(value)
        return kind(value)
    except (TypeError, ValueError):
        raise MergeError(
            f"parameter '{name}' of method {method.name}: cannot read {value!r} as {getattr(kind, '__name__', kind)}"
        ) from None


def statistic_kinds(method):
    """(required kinds, optional kinds, the kind an unlabelled statistics file provides)."""
    ordered = list(method.stats) + list(method.optional_stats) + list(method.base_stats)
    return tuple(method.stats), tuple(method.optional_stats), (ordered[0] if ordered else None)


def expected_statistic_shape(kind, shape):
    """Shape statistic `kind` has for a tensor of `shape`; None where the kind does not apply."""
    if kind == "gram":
        return (shape[1], shape[1]) if len(shape) == 2 else None
    if kind == "output_grad_gram":
        return (shape[0], shape[0]) if len(shape) == 2 else None
    return tuple(shape)


# ---------------------------------------------------------------------------------------------------
# Planning


def check_same_tensors(checkpoints, what="models"):
    """MergeError unless every checkpoint holds the same tensor names with the same shapes."""
    reference = checkpoints[0]
    for other in checkpoints[1:]:
        only_ref = sorted(set(reference.names) - set(other.names))
        only_other = sorted(set(other.names) - set(reference.names))
        if only_ref or only_other:
            raise MergeError(
                f"the {what} hold different tensors: {_listing(only_ref)} only in {reference.path}; "
                f"{_listing(only_other)} only in {other.path}"
            )
        for name in reference.names:
            if reference.info(name).shape != other.info(name).shape:
                raise MergeError(
                    f"tensor {name} has shape {list(reference.info(name).shape)} in {reference.path} "
                    f"but {list(other.info(name).shape)} in {other.path}"
                )


def _listing(names, limit=5):
    if not names:
        return "nothing"
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def plan_merge(method, params, models, base=None, stats=None, base_stats=None, initial=None,
               include=None, exclude=None):
    """Tasks merging the same-named tensors of `models` (checkpoints or views) with `method`.

    `stats` holds one `Statistics` per model (or None), `base_stats` those of `base`; `include`/`exclude`
    are regular expressions (re.search) choosing which tensors are merged; the others are copied from
    `base`, else from the first model.
    """
    check_same_tensors(list(models) + ([base] if base is not None else []), "models and the ancestor")
    if initial is not None:
        check_same_tensors([models[0], initial], "models and the initial model")
    required, optional, primary = statistic_kinds(method)
    include_re = _compile(include, "--include")
    exclude_re = _compile(exclude, "--exclude")
    tasks = []
    for name in models[0].names:
        info = models[0].info(name)
        chosen = (include_re is None or include_re.search(name)) and not (exclude_re and exclude_re.search(name))
        task = TensorTask(name, [Source(m, name) for m in models], params=params,
                          merge=bool(chosen) and info.dtype.is_floating_point)
        if base is not None:
            task.base = Source(base, name)
        if task.merge:
            if stats is not None:
                task.stats = [_model_statistics(s, name, info.shape, required, optional, primary) for s in stats]
                _check_optional_consistent(task, optional, stats)
            if method.base_stats:
                task.base_stats = _model_statistics(base_stats, name, info.shape, method.base_stats, (), primary)
            if initial is not None:
                task.initial = Source(initial, name)
        tasks.append(task)
    return tasks


def _compile(pattern, argument):
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as error:
        raise MergeError(f"{argument}: not a regular expression: {pattern!r} ({error})") from None


def _model_statistics(statistics, name, shape, required, optional, primary):
    found = {}
    for kind in list(required) + list(optional):
        expected = expected_statistic_shape(kind, shape)
        checkpoint = statistics.get(kind, primary)
        present = checkpoint is not None and name in checkpoint and expected is not None
        if not present:
            if kind in required:
                raise MergeError(
                    f"statistics {statistics.path} ({statistics.describe()}) have no '{kind}' for tensor {name}"
                )
            continue
        actual = checkpoint.info(name).shape
        if tuple(actual) != expected:
            raise MergeError(
                f"statistic '{kind}' of tensor {name} in {checkpoint.file_of(name)} has shape {list(actual)}, "
                f"expected {list(expected)}"
            )
        found[kind] = Source(checkpoint, name)
    return found


def _check_optional_consistent(task, optional, stats):
    for kind in optional:
        have = [kind in s for s in task.stats]
        if any(have) and not all(have):
            missing = [stats[i].path for i, h in enumerate(have) if not h]
            raise MergeError(f"statistic '{kind}' of tensor {task.name} is missing from {', '.join(missing)}")


# ---------------------------------------------------------------------------------------------------
# Execution


@dataclass
class Summary:
    merged: int = 0
    copied: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0

    def line(self):
        return (f"merged {self.merged} tensors, copied {self.copied}, {self.seconds:.2f} s, "
                f"peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB")


def peak_rss_bytes():
    """The process's peak resident set size so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def output_entries(tasks, dtype=None):
    """(name, TensorInfo) of every output tensor, in writing order; floating-point ones in `dtype` if given."""
    entries = []
    for task in tasks:
        info = task.models[0].info()
        out_dtype = dtype if (dtype is not None and info.dtype.is_floating_point) else info.dtype
        lora = task.lora_output
        if lora is None:
            entries.append((task.name, TensorInfo(info.shape, out_dtype)))
            continue
        out_features, in_features = info.shape[::-1] if lora.fan_in_fan_out else info.shape
        entries.append((lora.a_name, TensorInfo((lora.rank, in_features), out_dtype)))
        entries.append((lora.b_name, TensorInfo((out_features, lora.rank), out_dtype)))
    return entries


def check_device(device):
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise MergeError(f"--device {device}: no CUDA device is available")
    return torch.device(device)


def execute(method, tasks, writer, entries, dtype=None, device="cpu", progress=True):
    """Run `tasks` in order, writing every result through `writer` as planned in `entries`.

    Methods that declare `elementwise = True` (each output entry depends only on the same entry of every
    input, and on what their `prepare` computes from the whole tensor) see tensors in blocks of rows of
    about BLOCK_BYTES, so the memory a merge needs does not grow with the largest tensor and the method's
    temporaries stay in the CPU caches; results are the same as for whole tensors.

    On the CPU the merge runs with one torch thread unless OMP_NUM_THREADS is set: with more, the threads
    meet at the end of every operation, and operations on cache-sized blocks are short, so while other
    processes keep the cores busy most of the time goes to waiting for a descheduled thread (task
    arithmetic of four BERT-base checkpoints, benchmarks/merge_bench.py, load 2.5 on 2 cores: 1.3 s with
    one thread, 26 s with two).
    """
    device = torch.device(device)
    planned = dict(entries)
    summary = Summary()
    start = time.perf_counter()
    reader = _Reader(tasks)
    threads = torch.get_num_threads()
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    try:
        for task in tqdm(tasks, desc=f"merging ({method.name})", unit="tensor", disable=not progress, file=sys.stderr):
            merged = _execute_task(method, task, reader, writer, planned, dtype, device)
            summary.merged += merged
            summary.copied += not merged
    finally:
        torch.set_num_threads(threads)
    summary.seconds = time.perf_counter() - start
    summary.peak_rss_bytes = peak_rss_bytes()
    return summary


def _execute_task(method, task, reader, writer, planned, dtype, device):
    """Write the output of one task; whether the method ran (else an input was copied through)."""
    reader.next_tensor()
    blocks = _row_blocks(method, task)
    if not task.merge or _inputs_identical(task, blocks, reader):
        source = task.models[0] if task.merge else task.base or task.models[0]
        for rows in blocks:
            _write(writer, task, planned, reader.read(source, "tensor", rows))
        return False
    tensor = TensorBlocks(task.name, task.models[0].info().shape,
                          lambda rows: _read_group(task, rows, reader, dtype, device), blocks)
    prepared = _run_method(method, task, None, method.prepare, tensor) if len(blocks) > 1 else None
    for rows, group in zip(blocks, tensor):
        group.prepared = prepared
        result = _run_method(method, task, rows, method.merge, group)
        if tuple(result.shape) != tuple(group.tensors[0].shape):
            raise MergeError(f"{method.name} returned shape {list(result.shape)} for tensor {task.name} "
                             f"of shape {list(group.tensors[0].shape)}")
        if not all_finite(result):
            raise MergeError(f"{method.name} produced NaN or infinite values for tensor {task.name}")
        _write(writer, task, planned, result)
    return True


def _row_blocks(method, task):
    """[None] (the whole tensor at once) or the row ranges (slices) of about BLOCK_BYTES each to merge in turn.

    Blocks need every input in a file (memory-mapped: a block reads only its rows; a LoRA view computes
    whole tensors) and statistics shaped like the tensor."""
    info = task.models[0].info()
    sources = _sources(task)
    blockwise = (
        (not task.merge or method.elementwise) and task.lora_output is None
        and all(isinstance(source.checkpoint, Checkpoint) for source in sources)
        and all(source.info().shape == info.shape for source in sources)
    )
    if not blockwise or not info.shape or info.nbytes <= BLOCK_BYTES:
        return [None]
    step = max(1, BLOCK_BYTES // (info.nbytes // info.shape[0]))
    return [slice(start, min(start + step, info.shape[0])) for start in range(0, info.shape[0], step)]


def _sources(task):
    sources = list(task.models) + [task.base, task.initial] + list(task.base_stats.values())
    sources += [source for stats in task.stats for source in stats.values()]
    return [source for source in sources if source is not None]


def _inputs_identical(task, blocks, reader):
    """Whether every model and the ancestor hold the same values (then merging is copying); most often the
    first block already differs."""
    for rows in blocks:
        first, *others = [reader.read(source, "tensor", rows, check=False)
                          for source in task.models + ([task.base] if task.base is not None else [])]
        if not all(torch.equal(first, other) for other in others):
            return False
    return True


def _read_group(task, rows, reader, dtype, device):
    """The TensorGroup of rows `rows` (None: all, a slice or an index tensor) of one task's inputs."""
    tensors = [reader.read(source, "tensor", rows) for source in task.models]
    work_dtype = dtype or torch.promote_types(tensors[0].dtype, torch.float32)

    def working(source, what):
        tensor = reader.read(source, what, rows)
        return tensor.to(device=device, dtype=work_dtype)

    def statistic(source, what):  # statistics keep a higher precision of their own (Gram matrices are float64)
        tensor = reader.read(source, what, rows)
        return tensor.to(device=device, dtype=torch.promote_types(tensor.dtype, work_dtype))

    return TensorGroup(
        name=task.name,
        tensors=[t.to(device=device, dtype=work_dtype) for t in tensors],
        base=working(task.base, "ancestor tensor") if task.base is not None else None,
        stats=[{kind: statistic(source, f"statistic '{kind}'") for kind, source in stats.items()} for stats in task.stats],
        base_stats={kind: statistic(source, f"ancestor statistic '{kind}'") for kind, source in task.base_stats.items()},
        initial=working(task.initial, "initial tensor") if task.initial is not None else None,
    )


def _run_method(method, task, rows, function, argument):
    """`function(argument, **task.params)` (the method's prepare or merge); bad input it finds becomes a
    MergeError naming the tensor (and the rows of a block); anything else is a bug and propagates."""
    try:
        return function(argument, **task.params)
    except (ValueError, ArithmeticError) as error:
        where = task.name if not isinstance(rows, slice) else f"{task.name} (rows {rows.start}-{rows.stop - 1})"
        raise MergeError(f"{method.name} failed on tensor {where}: {error}") from None


def _write(writer, task, planned, result):
    if task.lora_output is None:
        writer.write(task.name, result.to("cpu", planned[task.name].dtype))
        return
    lora = task.lora_output
    a, b = factorize(result, lora.rank, lora.fan_in_fan_out)
    writer.write(lora.a_name, a.to("cpu", planned[lora.a_name].dtype))
    writer.write(lora.b_name, b.to("cpu", planned[lora.b_name].dtype))


class _Reader:
    """Reads (blocks of) input tensors, checks them, and closes every file mapping after each
    RELEASE_EVERY_BYTES read, so pages read long ago stop counting as resident memory (tensors still in
    use keep theirs until they are freed)."""

    def __init__(self, tasks):
        seen = {}
        for task in tasks:
            for source in _sources(task):
                seen[id(source.checkpoint)] = source.checkpoint
        self.checkpoints = list(seen.values())
        self.since_release = 0
        self._opened = {}  # (checkpoint, name) -> the whole tensor, memory-mapped: blocks are views of it
        self._checked = set()  # (checkpoint, name, first row) of the blocks of this tensor found finite
        self._mapped = set()  # those of the blocks read since the last release, and (checkpoint, name) of tensors

    def read(self, source, what, rows=None, check=True):
        """Rows `rows` (None: all, a slice, or an index tensor) of a source's tensor, found finite (each block
        is checked once per tensor)."""
        self.release_if_due()
        key = (id(source.checkpoint), source.name)
        if key not in self._opened:
            self._opened[key] = source.read()
        whole = self._opened[key]
        tensor = whole if rows is None else whole[rows]  # only these rows' pages are read (and some around them)
        block = key + (rows.start,) if isinstance(rows, slice) else key
        if check and tensor.dtype.is_floating_point and block not in self._checked:
            if not all_finite(tensor):
                raise MergeError(f"{what} {source.where()} holds NaN or infinite values")
            if block != key:
                self._checked.add(block)
        if block not in self._mapped and key not in self._mapped:  # else its pages are mapped already
            self._mapped.add(block)
            # Rows picked by an index (a sample) are spread over the tensor, and the kernel maps pages in
            # runs around each: such a read counts as the whole tensor.
            self.since_release += tensor.nbytes if block != key else whole.nbytes
        return tensor

    def next_tensor(self):
        self._checked.clear()

    def release_if_due(self):
        if self.since_release > RELEASE_EVERY_BYTES:
            self._opened.clear()
            self._mapped.clear()
            for checkpoint in self.checkpoints:
                checkpoint.release()
            self.since_release = 0


def all_finite(tensor):
    """Whether `tensor` holds no NaN or infinity. A sum is NaN or infinite when any entry is, and costs one
    pass without allocating; only a non-finite sum (possibly a mere overflow) is checked entry by entry."""
    total = tensor.sum(dtype=torch.float64 if tensor.dtype == torch.float64 else torch.float32)
    return math.isfinite(total.item()) or bool(torch.isfinite(tensor).all())


# ---------------------------------------------------------------------------------------------------
# The whole merge, as the command lines ask for it


def merge(method_name, models, output, *, aux_data=None, ancestor=None, ancestor_aux_data=None, initial=None,
          params=None, include=None, exclude=None, dtype=None, device="cpu", max_shard_size="5GB",
          lora_rank=None, progress=True):
    """Merge the checkpoints at paths `models` with method `method_name` into `output`; return a Summary.

    `method_name` with the prefix `lora-` merges PEFT LoRA adapters as weight changes s·B·A: with an
    `ancestor` (the base model) the output is the base model with the merged change added, without one it
    is an adapter of rank `lora_rank` (default: the largest input rank) approximating the merged change by
    truncated SVD. Other methods merge adapters tensor by tensor (A and B independently) into an adapter.
    Output: a bare file when `output` ends with .safetensors, else a model or adapter folder carrying the
    non-weight files of the ancestor's folder (else the first model's).
    """
    lora = method_name.startswith(LORA_PREFIX)
    method = load_method(method_name[len(LORA_PREFIX):] if lora else method_name)
    dtype = _parse_dtype(dtype)
    check_device(device)
    max_shard_bytes = _parse_size_argument(max_shard_size)
    _check_counts(method, models, aux_data, ancestor, ancestor_aux_data, lora)
    params = resolve_parameters(method, params or {}, len(models))
    checkpoints = [open_checkpoint(path) for path in models]
    base = open_checkpoint(ancestor) if ancestor else None
    stats = [open_statistics(path) for path in aux_data] if aux_data else None
    base_stats = open_statistics(ancestor_aux_data) if ancestor_aux_data else None
    start_from = open_checkpoint(initial) if initial else None
    files_from = _files_source(base, checkpoints)
    json_updates, lora_rank_out = {}, None
    if lora:
        checkpoints, base, lora_rank_out = _lora_inputs(method, checkpoints, base, lora_rank)
        layout = "model" if lora_rank_out is None else "adapter"
        if lora_rank_out is not None:
            files_from = checkpoints[0].folder
            json_updates["adapter_config.json"] = output_adapter_config(lora_rank_out)
    else:
        layout = "adapter" if checkpoints[0].kind == "adapter" else "model"
    if output.endswith(".safetensors"):
        layout = "file"
    tasks = plan_merge(method, params, checkpoints, base, stats, base_stats, start_from, include, exclude)
    if lora_rank_out is not None:
        _lora_output_names(tasks, checkpoints[0], lora_rank_out)
    if dtype is not None and layout == "model":
        json_updates["config.json"] = {"dtype": _dtype_name(dtype)}
    return run_tasks(method, tasks, output, layout, files_from=files_from, json_updates=json_updates, dtype=dtype,
                     device=device, max_shard_bytes=max_shard_bytes, progress=progress)


def run_tasks(method, tasks, output, layout, *, files_from=None, extra_files=None, json_updates=None, dtype=None,
              out_dtype=None, device="cpu", max_shard_bytes=5 * 10**9, progress=True):
    """Execute planned tasks into `output` (see checkpoint.open_output): arithmetic in `dtype` (default:
    each tensor's own, at least float32) on `device`, floating-point outputs in `out_dtype` (default `dtype`,
    else each input's own)."""
    device = check_device(device)
    entries = output_entries(tasks, out_dtype or dtype)
    if layout == "model" and not (files_from and os.path.isfile(os.path.join(files_from, "config.json"))):
        logger.warning("no input folder with a config.json: %s will hold weights only", output)
    with open_output(output, entries, layout, files_from, json_updates, max_shard_bytes, extra_files) as writer:
        summary = execute(method, tasks, writer, entries, dtype, device, progress)
    logger.info("wrote %s", output)
    return summary


def model_count_problem(method, count):
    """Why `method` cannot merge `count` models, or None."""
    if count >= method.min_models and (method.max_models is None or count <= method.max_models):
        return None
    if method.min_models == method.max_models:
        expected = f"exactly {method.min_models}"
    else:
        expected = f"at least {method.min_models}" + (f" and at most {method.max_models}" if method.max_models else "")
    return f"method {method.name} merges {expected} models, got {count}"


def _check_counts(method, models, aux_data, ancestor, ancestor_aux_data, lora=False):
    count = len(models)
    problem = model_count_problem(method, count)
    if problem:
        raise MergeError(f"--models: {problem}")
    if method.needs_base and not ancestor and not lora:  # a lora- merge without one starts from no change
        raise MergeError(f"--ancestor: method {method.name} needs the ancestor θ_0 (the model the others were fine-tuned from)")
    if aux_data is not None and len(aux_data) != count:
        raise MergeError(f"--aux_data: got {len(aux_data)} statistics paths for {count} models (one per model, same order)")
    if method.stats and not aux_data:
        raise MergeError(f"--aux_data: method {method.name} needs statistics ({', '.join(method.stats)}) for every model")
    if method.base_stats and not ancestor_aux_data:
        raise MergeError(f"--ancestor_aux_data: method {method.name} needs statistics ({', '.join(method.base_stats)}) of the ancestor")


def _parse_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise MergeError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _dtype_name(dtype):
    return next(name for name, value in DTYPES.items() if value == dtype)


def _parse_size_argument(size):
    try:
        return parse_size(size)
    except ValueError as error:
        raise MergeError(f"--max_shard_size: {error}") from None


def _files_source(base, checkpoints):
    for checkpoint in [base] + checkpoints:
        if checkpoint is not None and checkpoint.folder is not None:
            return checkpoint.folder
    return None


def _lora_inputs(method, adapters, base, lora_rank):
    """(views, base, rank of the output adapter or None when the changes go into `base`) of a lora- merge."""
    if base is not None and base.kind == "adapter":
        raise MergeError(f"--ancestor: a lora- merge needs the base model as ancestor, {base.path} is an adapter")
    try:
        views = [LoraDeltaView(adapter, base) for adapter in adapters]
    except CheckpointError as error:
        raise MergeError(str(error)) from None
    fan_in_fan_out = {view.fan_in_fan_out for view in views}
    if len(fan_in_fan_out) > 1:
        raise MergeError("--models: the adapters disagree on fan_in_fan_out")
    if base is not None:
        return views, base, None
    for view in views[1:]:
        if set(view.pairs) != set(views[0].pairs):
            raise MergeError(f"--models: {views[0].path} and {view.path} adapt different layers")
    zero = None
    if method.needs_base:
        full = sorted(views[0].others)
        if full:
            raise MergeError(
                f"method {method.name} needs an ancestor, and the adapters also hold full tensors ({_listing(full)}) "
                "whose ancestor is unknown: give --ancestor BASE_MODEL"
            )
        zero = ZeroView(views[0])  # the ancestor of a weight change is no change
    return views, zero, lora_rank or _largest_rank(views)


def _largest_rank(views):
    return max(view.adapter.info(a_name).shape[0] for view in views for a_name, _, _ in view.pairs.values())


def _lora_output_names(tasks, view, rank):
    for task in tasks:
        if task.name in view.pairs:
            module = adapter_name(task.name[: -len(".weight")])
            task.lora_output = LoraOutput(f"{module}.lora_A.weight", f"{module}.lora_B.weight", rank, view.fan_in_fan_out)
        else:
            task.name = adapter_name(task.name)


def comma_list(text):
    """An argparse type: 'a,b,c' -> ['a', 'b', 'c'] (the released scripts' way of passing lists)."""
    return [item for item in text.split(",") if item]


def paper_script_parser(description):
    """The arguments both of the paper's released merge scripts take, with their names and defaults."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="θ_0")
    parser.add_argument("--ft_model_name_or_paths", type=comma_list, required=True, help="θ_t, comma-separated")
    parser.add_argument("--out_model_path", required=True, help="output model folder")
    parser.add_argument("--scaling_factor", type=float, default=1.0, help="α")
    # The released scripts' model classes; the merge itself is the same for any.
    parser.add_argument("--task_type", default="SEQ_CLS", choices=("SEQ_CLS",))
    parser.add_argument("--device", default="cpu", help="where the arithmetic runs: cpu or cuda")
    return parser


def run_program(main, argv=None):
    """Run a merge program's `main(argv)`: log to stderr, print the summary line, turn bad input into one
    clear message and exit status 2 (the output is then never created)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        summary = main(sys.argv[1:] if argv is None else argv)
    except (MergeError, CheckpointError, OSError) as error:  # OSError: e.g. an output folder that cannot be written
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(summary.line())
    return summary
