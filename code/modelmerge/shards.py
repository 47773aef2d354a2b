"""Sharded runs of `code/predict.py` (docs/programs.md): the examples split into N contiguous slices, each run by
itself, and the parts joined into what one unsharded run writes.

- `shard: "I/N"` runs the I-th slice (1-based; the first ones one example longer) and writes a part into
  `output_dir`: part.json (which shard, its slice, what was computed) with the slice's statistic
  (part.safetensors) or predictions (predictions.jsonl);
- `join: [PART, ...]` checks that the parts are the N slices of the same computation, in order, and writes the
  outputs of the unsharded run from them.

A part is written atomically (the part folder appears whole, part.json inside), so a join never reads a partial
one: a folder without part.json is refused.
"""
import dataclasses
import json
import os
import re

import torch
from safetensors.torch import load_file, save_file

PART_INFO = "part.json"
PART_TENSORS = "part.safetensors"
# Config keys that change what a run computes: every part of a join must agree with the join's config on them.
IDENTITY_KEYS = ("mode", "task_type", "model_name_or_path", "dataset_name", "split", "evaluations", "num_examples",
                 "seed", "empirical", "max_length", "class_names", "text_column", "input_column", "target_column",
                 "image_column", "label_column")


def parse_shard(text):
    """(I, N) of a shard spelled "I/N", 1 <= I <= N; ValueError otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    index, count = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
    if not 1 <= index <= count:
        raise ValueError(f"shard must be 'I/N' with 1 <= I <= N (e.g. '1/4'), got {text!r}")
    return index, count


def shard_range(num_examples, index, count):
    """The positions of shard `index` (1-based) of `count`: consecutive slices, the first ones one longer."""
    size, longer = divmod(num_examples, count)
    start = (index - 1) * size + min(index - 1, longer)
    return range(start, start + size + (1 if index <= longer else 0))


def identity(config):
    return {key: getattr(config, key) for key in IDENTITY_KEYS}


def write_part_info(folder, shard, identity_, slices):
    """part.json: the shard (I, N), what the run computed and, per evaluation name ("" for the one dataset),
    its slice {"first", "num_examples", "of"}."""
    with open(os.path.join(folder, PART_INFO), "w") as f:
        json.dump({"shard": list(shard), "identity": identity_, "slices": slices}, f, indent=2)
        f.write("\n")


def slice_info(examples, total):
    return {"first": examples.start, "num_examples": len(examples), "of": total}


def read_parts(folders, identity_, totals):
    """The part.json contents of `folders` after checking that they are the shards 1..N, in that order, of the
    computation `identity_`, together covering `totals` ({name: examples}) in consecutive slices; ValueError
    naming the first part that is not."""
    infos = []
    for position, folder in enumerate(folders, 1):
        path = os.path.join(folder, PART_INFO)
        if not os.path.isfile(path):
            raise ValueError(f"{folder} is not a finished part of a sharded run (no {PART_INFO})")
        with open(path) as f:
            info = json.load(f)
        if info["shard"] != [position, len(folders)]:
            raise ValueError(f"{folder} is shard {info['shard'][0]}/{info['shard'][1]}, expected shard "
                             f"{position}/{len(folders)} (give the parts in order, all of them)")
        different = sorted(key for key in identity_ if info["identity"].get(key) != identity_[key])
        if different:
            key = different[0]
            raise ValueError(f"{folder} is a part of another computation: its {key} is {info['identity'].get(key)!r}, "
                             f"not {identity_[key]!r}")
        infos.append(info)
    for name, total in totals.items():
        end = 0
        for folder, info in zip(folders, infos):
            part = info["slices"].get(name)
            if part is None or part["first"] != end or part["of"] != total:
                raise ValueError(f"{folder} does not hold the slice after example {end} of the {total} examples"
                                 + (f" of {name}" if name else ""))
            end += part["num_examples"]
        if end != total:
            raise ValueError(f"the parts cover {end} of the {total} examples" + (f" of {name}" if name else ""))
    return infos


def save_result(result, folder):
    """Write the dataclass `result` (a FisherResult or GramResult) into `folder`: its dicts of tensors in
    part.safetensors (as FIELD/NAME), every other field in result.json."""
    tensors, values = {}, {}
    for field in dataclasses.fields(result):
        value = getattr(result, field.name)
        if isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
            tensors.update({f"{field.name}/{name}": tensor.contiguous() for name, tensor in value.items()})
        elif isinstance(value, torch.Tensor):
            values[field.name] = value.tolist()
        elif isinstance(value, (set, frozenset)):
            values[field.name] = sorted(value)
        else:
            values[field.name] = value
    save_file(tensors, os.path.join(folder, PART_TENSORS))
    with open(os.path.join(folder, "result.json"), "w") as f:
        json.dump(values, f)


def load_result(cls, folder):
    """The `cls` instance `save_result` wrote into `folder` (lists stay lists, sets become frozensets)."""
    with open(os.path.join(folder, "result.json")) as f:
        values = json.load(f)
    for key, tensor in load_file(os.path.join(folder, PART_TENSORS)).items():
        field, name = key.split("/", 1)
        values.setdefault(field, {})[name] = tensor
    return cls(**{field.name: frozenset(values[field.name]) if isinstance(field.default, frozenset)
                  else values[field.name] for field in dataclasses.fields(cls) if field.name in values})
