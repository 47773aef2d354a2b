"""Sharded model folders: the index that maps each tensor to its shard file (read and written), how the
tensors of an output are split into shards of at most a number of bytes, and sizes spelled '5GB'."""
import json
import os
import re

from modelmerge.io.formats import SAFE_INDEX, SAFE_WEIGHTS, CheckpointError


def read_shard_files(folder, index_name):
    """The shard file paths that the index `index_name` of `folder` names, sorted; all must exist."""
    index_path = os.path.join(folder, index_name)
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{index_path}: not a readable shard index ({error!r})") from None
    paths = []
    for shard in sorted(set(weight_map.values())):
        shard_path = os.path.join(folder, shard)
        if not os.path.isfile(shard_path):
            raise CheckpointError(f"{index_path}: shard {shard} is missing")
        paths.append(shard_path)
    return paths


def split_shards(entries, max_bytes):
    """The (name, TensorInfo) `entries` cut, in order, into groups of at most `max_bytes` (a larger tensor alone)."""
    groups, current, size = [], [], 0
    for name, info in entries:
        if current and size + info.nbytes > max_bytes:
            groups.append(current)
            current, size = [], 0
        current.append((name, info))
        size += info.nbytes
    groups.append(current)
    return groups


def shard_file_names(count):
    """The weight file names of a model folder of `count` shards (Hugging Face's naming)."""
    if count == 1:
        return [SAFE_WEIGHTS]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def write_shard_index(folder, shards):
    """Write `model.safetensors.index.json` into `folder` for `shards`: [(file path, [(name, TensorInfo)])]."""
    weight_map = {name: os.path.basename(path) for path, group in shards for name, _ in group}
    total = sum(info.nbytes for _, group in shards for _, info in group)
    with open(os.path.join(folder, SAFE_INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def parse_size(text):
    """'5GB', '500MB', '2GiB' or a plain number of bytes -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*(?:([KMGT])(i?)B?)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 5GB, 500MB, 2GiB, 1000000)")
    number, prefix, binary = match.groups()
    power = "KMGT".index(prefix.upper()) + 1 if prefix else 0
    return int(float(number) * (1024 if binary else 1000) ** power)
