"""Executing a planned merge: for each task, read one tensor (or, for elementwise methods, one block of
rows at a time) from every input, check it (finite; statistics non-negative where they must be), copy it
through when every input agrees (or when it is not floating point, or excluded), else hand a
`TensorGroup` to the method, and append the result to the output files. The output appears only when
every tensor was written (see modelmerge.atomic).
"""
import collections
import functools
import logging
import math
import os
import resource
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from modelmerge.io.formats import TensorInfo
from modelmerge.io.json_files import read_json_object
from modelmerge.io.reading import Checkpoint
from modelmerge.io.writing import open_output
from modelmerge.lora_merge import factorize
from modelmerge.merging.options import MergeError
from modelmerge.methods.base import GRAM_KINDS, TensorBlocks, TensorGroup
from modelmerge.methods.knots import merge_in_shared_basis
from modelmerge.methods.lines import layer_scales, scaled_task_vector
from modelmerge.threads import torch_threads

logger = logging.getLogger(__name__)

# Memory-mapped pages read count as resident memory until their mapping closes: close all after this many bytes.
RELEASE_EVERY_BYTES = 64 * 2**20
# Elementwise methods see tensors in blocks of rows of about this many bytes per input: small enough that a
# method's temporaries stay in the CPU caches, large enough that the work per block dwarfs its overhead.
BLOCK_BYTES = 512 * 2**10
NON_NEGATIVE_STATISTICS = ("fisher",)  # diagonal Fisher / squared-gradient Hessian estimates
OUTPUT_KIND = "merge"  # what a merge's output folder (or file) records as the program that wrote it


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
    """(name, TensorInfo) of every output tensor, in writing order. The one rule for floating-point outputs:
    `dtype` if given, else the ancestor's tensor's dtype, else (no ancestor) the first model's; so the order
    of the models matters only without an ancestor."""
    entries = []
    for task in tasks:
        info = task.models[0].info()
        out_dtype = info.dtype
        if info.dtype.is_floating_point:
            out_dtype = dtype or (task.ancestor or task.models[0]).info().dtype
        lora = task.lora_output
        if lora is None:
            entries.append((task.name, TensorInfo(info.shape, out_dtype)))
            continue
        out_features, in_features = info.shape[::-1] if lora.fan_in_fan_out else info.shape
        entries.append((lora.a_name, TensorInfo((lora.rank, in_features), out_dtype)))
        entries.append((lora.b_name, TensorInfo((out_features, lora.rank), out_dtype)))
    return entries


def execute(method, tasks, writer, entries, dtype=None, device="cpu", progress=True, threads=None,
            extra_outputs=None):
    """Run `tasks` in order, writing every result through `writer` as planned in `entries`.

    `extra_outputs(task, group, result)`, if given, is called after each merged tensor with its inputs and its
    result, for what a merge writes besides the merged model (the per-task masks of EMR and TALL:
    modelmerge.modulated). It sees every tensor whole, and every task with `merge` set merged, even when all
    inputs agree, so that it gets the inputs of every tensor.

    Methods that declare `elementwise = True` (each output entry depends only on the same entry of every
    input, and on what their `prepare` computes from the whole tensor) see tensors in blocks of rows of
    about BLOCK_BYTES, so the memory a merge needs does not grow with the largest tensor and the method's
    temporaries stay in the CPU caches; results are the same as for whole tensors (WUDI's to rounding:
    its Gram matrices are sums over the blocks).

    On the CPU the merge runs with `threads` torch threads; by default (None) with one unless OMP_NUM_THREADS
    is set (as a job's cpu requirement sets it: the SVDs and eigendecompositions use them): with more, the threads
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
    cpu_threads = threads or (None if "OMP_NUM_THREADS" in os.environ else 1)
    with torch_threads(cpu_threads if device.type == "cpu" else None):
        for task in tqdm(tasks, desc=f"merging ({method.name})", unit="tensor", disable=not progress, file=sys.stderr):
            merged = _execute_task(method, task, reader, writer, planned, dtype, device, extra_outputs)
            summary.merged += merged
            summary.copied += not merged
    summary.seconds = time.perf_counter() - start
    summary.peak_rss_bytes = peak_rss_bytes()
    return summary


def _execute_task(method, task, reader, writer, planned, dtype, device, extra_outputs=None):
    """Write the output of one task; whether the method ran (else an input was copied through)."""
    reader.next_tensor()
    blocks = [None] if extra_outputs else _row_blocks(method, task)
    if not task.merge or (extra_outputs is None and _inputs_identical(task, blocks, reader)):
        source = task.models[0] if task.merge else task.ancestor or task.models[0]
        for rows in blocks:
            _write(writer, task, planned, reader.read(source, "tensor", rows))
        return False
    tensor = TensorBlocks(task.name, task.models[0].info().shape,
                          lambda rows: _read_group(task, rows, reader, dtype, device), blocks)
    prepared = _run_method(method, task, None, method.prepare, tensor) if len(blocks) > 1 else None
    for rows, group in zip(blocks, tensor):
        group.prepared = prepared
        result = _run_method(method, task, rows, _in_shared_basis(method) if task.shared_basis else method.merge, group)
        if tuple(result.shape) != tuple(group.tensors[0].shape):
            raise MergeError(f"{method.name} returned shape {list(result.shape)} for tensor {task.name} "
                             f"of shape {list(group.tensors[0].shape)}")
        if task.task_vector_scale is not None:
            result = scaled_task_vector(group.ancestor, result, task.task_vector_scale)
        if not all_finite(result):
            raise MergeError(f"{method.name} produced NaN or infinite values for tensor {task.name}")
        _write(writer, task, planned, result)
        if extra_outputs is not None:
            extra_outputs(task, group, result)
    return True


def _in_shared_basis(method):
    """The method's merge applied to the coordinates of a group's task updates in their shared basis (KnOTS)."""
    def merge(group, **params):
        return merge_in_shared_basis(group, lambda coordinates: method.merge(coordinates, **params))
    return merge


def _row_blocks(method, task):
    """[None] (the whole tensor at once) or the row ranges (slices) of about BLOCK_BYTES each to merge in turn.

    Blocks need every input in a file (memory-mapped: a block reads only its rows; a LoRA view computes
    whole tensors) and statistics shaped like the tensor."""
    info = task.models[0].info()
    sources = task.sources()
    blockwise = (
        (not task.merge or method.elementwise) and task.lora_output is None and not task.shared_basis
        and all(isinstance(source.checkpoint, Checkpoint) for source in sources)
        and all(source.info().shape == info.shape for source in sources)
    )
    if not blockwise or not info.shape or info.nbytes <= BLOCK_BYTES:
        return [None]
    step = max(1, BLOCK_BYTES // (info.nbytes // info.shape[0]))
    return [slice(start, min(start + step, info.shape[0])) for start in range(0, info.shape[0], step)]


def _inputs_identical(task, blocks, reader):
    """Whether every model and the ancestor hold the same values (then merging is copying); most often the
    first block already differs."""
    for rows in blocks:
        first, *others = [reader.read(source, "tensor", rows, check=False)
                          for source in task.models + ([task.ancestor] if task.ancestor is not None else [])]
        if not all(torch.equal(first, other) for other in others):
            return False
    return True


def _read_group(task, rows, reader, dtype, device):
    """The TensorGroup of rows `rows` (None: all, a slice or an index tensor) of one task's inputs."""
    tensors = [reader.read(source, "tensor", rows) for source in task.models]
    # at least float32, and the widest input's precision whatever the order of the inputs
    inputs = [t.dtype for t in tensors] + ([task.ancestor.info().dtype] if task.ancestor is not None else [])
    work_dtype = dtype or functools.reduce(torch.promote_types, inputs, torch.float32)

    def working(source, what):
        tensor = reader.read(source, what, rows)
        return tensor.to(device=device, dtype=work_dtype)

    def statistic(kind, source, what):  # statistics keep a higher precision of their own (Gram matrices are float64)
        tensor = reader.read(source, what, rows)
        check_statistic(kind, tensor, source, what)
        return tensor.to(device=device, dtype=torch.promote_types(tensor.dtype, work_dtype))

    return TensorGroup(
        name=task.name,
        tensors=[t.to(device=device, dtype=work_dtype) for t in tensors],
        ancestor=working(task.ancestor, "ancestor tensor") if task.ancestor is not None else None,
        statistics=[{kind: statistic(kind, source, f"statistic '{kind}'") for kind, source in stats.items()}
               for stats in task.statistics],
        ancestor_statistics={kind: statistic(kind, source, f"ancestor statistic '{kind}'")
                    for kind, source in task.ancestor_statistics.items()},
        initial=working(task.initial, "initial tensor") if task.initial is not None else None,
        first_row=rows.start if isinstance(rows, slice) else 0,
        stored_in_out=task.stored_in_out,
    )


def check_statistic(kind, tensor, source, what):
    """A MergeError where a statistic that cannot be negative is: a diagonal Fisher (a mean of squared
    gradients) anywhere, a Gram matrix (XᵀX) on its diagonal."""
    if kind in NON_NEGATIVE_STATISTICS:
        values = tensor
    elif kind in GRAM_KINDS and tensor.dim() == 2:
        values = tensor.diagonal()
    else:
        return
    if values.numel() and float(values.min()) < 0:
        raise MergeError(f"{what} {source.where()} holds negative entries (min {float(values.min()):.3g}); "
                         f"a {kind} statistic is non-negative")


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
            for source in task.sources():
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


def run_tasks(method, tasks, output, layout, *, files_from=None, extra_files=None, json_updates=None, dtype=None,
              out_dtype=None, device="cpu", max_shard_bytes=5 * 10**9, progress=True, inputs=(), overwrite=False,
              threads=None):
    """Execute planned tasks into `output` (see modelmerge.io.writing.open_output): arithmetic in `dtype` (default:
    the widest input's, at least float32) on `device`, floating-point outputs in `out_dtype` (default `dtype`,
    else the ancestor's, else the first model's: output_entries), as config.json then says. An existing
    `output` is replaced only if a merge wrote it (or with `overwrite`), never if it is, holds or lies inside
    one of the `inputs` paths (modelmerge.atomic)."""
    entries = output_entries(tasks, out_dtype or dtype)
    json_updates = output_json_updates(entries, layout, files_from, json_updates)
    with open_output(output, entries, layout, files_from, json_updates, max_shard_bytes, extra_files,
                     kind=OUTPUT_KIND, inputs=inputs, overwrite=overwrite) as writer:
        if layout == "model" and not _copies_config(files_from):
            logger.warning("no input folder with a config.json: %s will hold weights only", output)
        summary = execute(method, tasks, writer, entries, dtype, device, progress, threads)
    logger.info("wrote %s", output)
    return summary


def output_json_updates(entries, layout, files_from, json_updates):
    """`json_updates` (file name -> keys to set) with config.json's dtype keys as `entries` say, where a model
    folder copies a config.json."""
    if layout != "model" or not _copies_config(files_from):
        return json_updates
    config = (json_updates or {}).get("config.json", {})
    return {**(json_updates or {}), "config.json": {**config, **_config_dtype(entries, files_from)}}


def _copies_config(files_from):
    return bool(files_from) and os.path.isfile(os.path.join(files_from, "config.json"))


def _config_dtype(entries, files_from):
    """config.json's keys saying the dtype the output's weights have (that of most floating-point values): `dtype`,
    and the older `torch_dtype` where the copied config.json has it."""
    sizes = collections.Counter()
    for _, info in entries:
        if info.dtype.is_floating_point:
            sizes[info.dtype] += info.nbytes // info.dtype.itemsize
    if not sizes:
        return {}
    name = str(sizes.most_common(1)[0][0]).removeprefix("torch.")
    older = "torch_dtype" in read_json_object(os.path.join(files_from, "config.json"))
    return dict.fromkeys(("dtype", "torch_dtype") if older else ("dtype",), name)


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
