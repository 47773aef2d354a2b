"""Sharded merges: the tensors of one merge split into N parts, each merged by its own process (a task of a
Sisyphus job, a node of a SLURM array), then joined into the checkpoint the unsharded merge writes, byte for
byte (same tensors in the same order, same safetensors metadata, shard files, index and other files).

    merge.py --merge M --models ... --shard I/N --output PART_I     (for I = 1..N, in any order, anywhere)
    merge.py --join PART_1 ... PART_N --output OUT

Every part plans the whole merge (file headers only) and assigns the tensors to parts by the method's
`cost` (largest first, each to the least loaded part), so the N processes agree on the split without
talking. A part is one safetensors file of its tensors, already in their output dtype, written atomically
(a killed part leaves only a temporary, and rerunning that part alone completes it); its metadata holds a
manifest: the part's number and tensors, every output entry, how the output is laid out, and a digest of
all of that and of the merge asked for. The join reads every part's manifest and header first, and
refuses (one line) parts of different merges, a missing or repeated part, or a part whose file does not
hold exactly its planned tensors, before it writes anything.

A merge whose tensors depend on each other (`MergeMethod.needs_every_tensor`, LiNeS's default α) runs
whole in part 1, saying so in the log; the other parts are empty.
"""
import hashlib
import json
import logging
import os
import time

from modelmerge.io.formats import SAFETENSORS_DTYPE_NAMES, CheckpointError, TensorInfo
from modelmerge.io.reading import open_checkpoint
from modelmerge.io.writing import open_output
from modelmerge.merging.execute import (OUTPUT_KIND, RELEASE_EVERY_BYTES, Summary, execute, output_entries,
                                       output_json_updates, peak_rss_bytes)
from modelmerge.merging.options import MergeError
from modelmerge.methods.lines import GLOBAL_ALPHA

logger = logging.getLogger(__name__)

PART_KIND = "merge part"  # what a part file records as the program that wrote it
MANIFEST_KEY = "merge_part"  # the safetensors metadata key of a part's manifest
MANIFEST_VERSION = 1
_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPE_NAMES.items()}


def whole_merge_reason(method, lines_alpha_needed):
    """Why the merge cannot be sharded (None: it can)."""
    return method.needs_every_tensor or (GLOBAL_ALPHA if lines_alpha_needed else None)


def assign_parts(method, params, tasks, count, whole_reason=None):
    """The part (1-based) of every task: by the method's cost, largest first, each to the part with the least
    cost so far (the lower part where equal); every task in part 1 when `whole_reason`."""
    if whole_reason:
        return [1] * len(tasks)
    costs = [_task_cost(method, params, task) for task in tasks]
    loads, parts = [0.0] * count, [0] * len(tasks)
    for index in sorted(range(len(tasks)), key=lambda i: (-costs[i], i)):
        part = min(range(count), key=lambda p: (loads[p], p))
        parts[index] = part + 1
        loads[part] += costs[index]
    return parts


def _task_cost(method, params, task):
    shape = task.models[0].info().shape
    if not task.merge:
        return float(task.models[0].info().nbytes)
    return float(method.cost(task.name, tuple(shape), len(task.models), params))


def write_part(method, tasks, parts, shard, output, layout, identity, *, files_from=None, json_updates=None,
               max_shard_bytes=5 * 10**9, whole_reason=None, dtype=None, device="cpu", progress=True, overwrite=False,
               threads=None):
    """Merge the tasks of part `shard` (parts[i]: the part of tasks[i]) into the part file `output`; the
    joined output is laid out as execute.run_tasks lays out the unsharded one (`layout`, `files_from`,
    `json_updates`, `max_shard_bytes`). `identity` (JSON-ready) names the merge asked for, its `inputs` too."""
    entries = output_entries(tasks, dtype)
    layout = {"layout": layout, "files_from": files_from, "max_shard_bytes": max_shard_bytes,
              "json_updates": output_json_updates(entries, layout, files_from, json_updates)}
    mine = [task for task, part in zip(tasks, parts) if part == shard.index]
    if whole_reason:
        logger.warning("%s: the whole merge runs in part 1 of %d, part %d %s", whole_reason, shard.count, shard.index,
                       "merges every tensor" if shard.index == 1 else "is empty")
    part_entries = output_entries(mine, dtype)
    manifest = _manifest(entries, parts, tasks, shard, layout, identity, [name for name, _ in part_entries])
    logger.info("part %d of %d: %d of %d tensors", shard.index, shard.count, len(mine), len(tasks))
    with open_output(output, part_entries, "file", kind=PART_KIND, inputs=identity["inputs"], overwrite=overwrite,
                     metadata={MANIFEST_KEY: json.dumps(manifest, sort_keys=True)}) as writer:
        summary = execute(method, mine, writer, part_entries, dtype, device, progress, threads)
    logger.info("wrote part %d of %d: %s", shard.index, shard.count, output)
    return summary


def _manifest(entries, parts, tasks, shard, layout, identity, names):
    planned = {
        "version": MANIFEST_VERSION,
        "parts": shard.count,
        "entries": [[name, list(info.shape), SAFETENSORS_DTYPE_NAMES[info.dtype]] for name, info in entries],
        "assignment": [[_task_outputs(task), part] for task, part in zip(tasks, parts)],
        "layout": layout,
        "merge": identity,
    }
    digest = hashlib.sha256(json.dumps(planned, sort_keys=True, default=repr).encode()).hexdigest()
    return {**planned, "plan": digest, "part": shard.index, "tensors": names}


def _task_outputs(task):
    lora = task.lora_output
    return task.name if lora is None else [lora.a_name, lora.b_name]


def join_parts(paths, output, *, overwrite=False, progress=True):
    """Join the part files `paths` (any order) into `output`, as the unsharded merge writes it."""
    parts = [_read_part(path) for path in paths]
    manifest = _check_parts(parts)
    entries = [(name, TensorInfo(tuple(shape), _DTYPES[dtype])) for name, shape, dtype in manifest["entries"]]
    source = {name: checkpoint for path, checkpoint, part in parts for name in part["tensors"]}
    layout = manifest["layout"]
    if output.endswith(".safetensors"):  # one bare file, as the unsharded merge writes there
        layout = {**layout, "layout": "file"}
    summary, start = Summary(), time.perf_counter()
    inputs = [*paths, *manifest["merge"]["inputs"]]
    with open_output(output, entries, layout["layout"], layout["files_from"], layout["json_updates"],
                     layout["max_shard_bytes"], kind=OUTPUT_KIND, inputs=inputs, overwrite=overwrite) as writer:
        since_release = 0
        for name, info in entries:
            writer.write(name, source[name].get(name))
            since_release += info.nbytes
            if since_release > RELEASE_EVERY_BYTES:  # each tensor is read once: let its pages go
                for _, checkpoint, _ in parts:
                    checkpoint.release()
                since_release = 0
            summary.copied += 1
    summary.seconds, summary.peak_rss_bytes = time.perf_counter() - start, peak_rss_bytes()
    logger.info("joined %d parts into %s", len(parts), output)
    return summary


def _read_part(path):
    """(path, Checkpoint, manifest) of one part file, or a MergeError saying why it is not a complete part."""
    if not os.path.isfile(path):
        raise MergeError(f"part {path} does not exist (a part still being written, or killed, is not there yet)")
    try:
        checkpoint = open_checkpoint(path)
    except CheckpointError as error:
        raise MergeError(f"part {path} is not a merge part: {error}") from None
    try:
        manifest = json.loads(checkpoint.metadata()[MANIFEST_KEY])
    except (KeyError, ValueError):
        raise MergeError(f"{path} is not a merge part (no {MANIFEST_KEY} manifest in its metadata)") from None
    if manifest.get("version") != MANIFEST_VERSION:
        raise MergeError(f"part {path} has manifest version {manifest.get('version')}, expected {MANIFEST_VERSION}")
    planned = {name: (shape, dtype) for name, shape, dtype in manifest["entries"]}
    held = {name: (list(checkpoint.info(name).shape), SAFETENSORS_DTYPE_NAMES[checkpoint.info(name).dtype])
            for name in checkpoint.names}
    expected = {name: planned.get(name) for name in manifest["tensors"]}
    if held != expected:
        raise MergeError(f"part {path} does not hold the tensors its manifest plans "
                         f"({len(held)} held, {len(expected)} planned)")
    size = os.path.getsize(path)
    data = sum(TensorInfo(tuple(shape), _DTYPES[dtype]).nbytes for shape, dtype in held.values())
    if size < data:
        raise MergeError(f"part {path} is truncated ({size} bytes, its tensors alone take {data})")
    return path, checkpoint, manifest


def _check_parts(parts):
    """The shared manifest of `parts`, or a MergeError: parts of different merges, missing or repeated parts."""
    first_path, _, first = parts[0]
    for path, _, manifest in parts[1:]:
        if manifest["plan"] != first["plan"]:
            raise MergeError(f"parts {first_path} and {path} are parts of different merges (plans "
                             f"{first['plan'][:12]} and {manifest['plan'][:12]})")
    for path, _, manifest in parts:
        planned = [name for outputs, part in manifest["assignment"] if part == manifest["part"]
                   for name in (outputs if isinstance(outputs, list) else [outputs])]
        if manifest["tensors"] != planned:
            raise MergeError(f"part {path} lists other tensors than its plan assigns to part {manifest['part']}")
    numbers = sorted(manifest["part"] for _, _, manifest in parts)
    expected = list(range(1, first["parts"] + 1))
    if numbers != expected:
        missing = sorted(set(expected) - set(numbers))
        repeated = sorted({n for n in numbers if numbers.count(n) > 1})
        raise MergeError(f"the join needs parts 1..{first['parts']} once each: "
                         + "; ".join(f"{what} {', '.join(map(str, which))}"
                                     for what, which in (("missing", missing), ("repeated", repeated)) if which))
    return first
