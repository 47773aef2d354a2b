"""Checkpoints read lazily, one tensor at a time, and written incrementally.

Reading: a `Checkpoint` is whatever a user may name as a model or as statistics: a Hugging Face model
folder (`model.safetensors`, sharded `model-*.safetensors` with `model.safetensors.index.json`,
`pytorch_model.bin` or its sharded index), a PEFT adapter folder (`adapter_model.safetensors` /
`adapter_model.bin` with `adapter_config.json`), or a bare `.safetensors` / `.pt` / `.bin` state dict.
Safetensors files are memory-mapped with `safe_open`; `.bin`/`.pt` files are loaded with
`torch.load(weights_only=True, mmap=True)`, so nothing is unpickled beyond plain tensors.

Pages of a memory-mapped file count towards the resident memory of the process for as long as the
mapping is open, so every source can `release()` its mapping (it reopens on the next read); the merge
driver releases all sources after every 64 MB read, which bounds the memory a merge needs.

Writing: `SafetensorsStreamWriter` writes a safetensors file whose header (names, dtypes, shapes) is
known before the first tensor exists, appending each tensor's bytes as soon as it is computed.
`safetensors.torch.save_file` needs every tensor of a file in memory at once, which would make a merge's
memory grow with the model. `open_output` lays such files out as a loadable model or adapter folder.
"""
import json
import os
import re
import shutil
import struct
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from safetensors import safe_open

from modelmerge.atomic import MARKER, atomic_dir, atomic_file

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFE_WEIGHTS = "adapter_model.safetensors"
ADAPTER_TORCH_WEIGHTS = "adapter_model.bin"
TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors", ".h5", ".msgpack", ".gguf") + TORCH_SUFFIXES

# Statistics folders (docs/programs.md): kind -> file name.
STATISTIC_FILES = {
    "fisher": "fisher.safetensors",
    "gram": "gram.safetensors",
    "output_grad_gram": "output_grad_gram.safetensors",
    "trimmed": "trimmed.safetensors",
}
# Metadata key of the Gram files: a JSON list of the weights stored [in, out] (GPT-2's Conv1D) rather than as
# nn.Linear's [out, in]. Files without it (written before the layout was recorded) describe [out, in] weights.
IN_OUT_WEIGHTS_KEY = "weights_stored_in_out"

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
SAFETENSORS_DTYPE_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}


class CheckpointError(ValueError):
    """Unreadable or inconsistent input; the message names the file and the cause."""


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self):
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * self.dtype.itemsize


class SafetensorsFile:
    """One safetensors file, memory-mapped on first read."""

    def __init__(self, path):
        self.path = path
        try:
            with safe_open(path, framework="pt") as handle:
                self.infos = {name: _slice_info(path, name, handle.get_slice(name)) for name in handle.keys()}
                self.metadata = handle.metadata() or {}
        except CheckpointError:
            raise
        except Exception as error:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None
        self._handle = None

    def get(self, name):
        if self._handle is None:
            self._handle = safe_open(self.path, framework="pt")
        return self._handle.get_tensor(name)

    def release(self):
        self._handle = None  # tensors still in use keep their pages mapped until they are freed


def _slice_info(path, name, tensor_slice):
    dtype_name = tensor_slice.get_dtype()
    if dtype_name not in _SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {dtype_name}")
    return TensorInfo(tuple(tensor_slice.get_shape()), _SAFETENSORS_DTYPES[dtype_name])


class TorchFile:
    """One `torch.save`d state dict, loaded with weights_only=True and memory-mapped where the format allows."""

    def __init__(self, path):
        self.path = path
        self._state = None
        self.infos = {name: TensorInfo(tuple(t.shape), t.dtype) for name, t in self._load().items()}
        self.metadata = {}

    def _load(self):
        if self._state is None:
            try:
                try:
                    state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as error:
                    if "mmap" not in str(error):
                        raise
                    state = torch.load(self.path, map_location="cpu", weights_only=True)  # legacy format
            except Exception as error:
                raise CheckpointError(f"{self.path}: {_load_failure(error)}") from None
            if isinstance(state, dict) and set(state) == {"state_dict"}:
                state = state["state_dict"]
            if not isinstance(state, dict) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
            ):
                raise CheckpointError(f"{self.path}: expected a dict of tensor name -> tensor")
            self._state = state
        return self._state

    def get(self, name):
        return self._load()[name]

    def release(self):
        self._state = None


def _load_failure(error):
    """One line saying why torch.load (weights only) refused a file: a pickle naming something other than
    tensors is refused on purpose, as loading it could run any code."""
    message = str(error)
    blocked = re.search(r"unsupported GLOBAL (\S+)|Unsupported global: GLOBAL (\S+)", message)
    if blocked:
        name = blocked.group(1) or blocked.group(2)
        return (f"refused: a pickle checkpoint that names {name}, not only tensors (loading it could run code); "
                "save the state dict with torch.save(model.state_dict()) or as safetensors")
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in message.splitlines() if line.strip() and not line.startswith(boilerplate)]
    return f"not a loadable state dict ({(lines[0] if lines else type(error).__name__)[:200]})"


def _open_file(path):
    if path.endswith(".safetensors"):
        return SafetensorsFile(path)
    if path.endswith(TORCH_SUFFIXES):
        return TorchFile(path)
    raise CheckpointError(f"{path}: unknown checkpoint format (expected .safetensors, .bin, .pt, .pth or .ckpt)")


class Checkpoint:
    """The tensors of one model, adapter or statistics file, by name, read lazily from one or more files.

    `kind` is 'model' (a model folder), 'adapter' (a PEFT adapter folder) or 'file' (a bare state dict);
    `folder` is the folder whose other files (config, tokenizer) belong with the weights, if any.
    """

    def __init__(self, path, files, kind, folder=None):
        self.path = path
        self.kind = kind
        self.folder = folder
        self._files = files
        self._where = {}
        self._in_out = {}  # file path -> the names its metadata records as stored [in, out]
        for file in files:
            for name in file.infos:
                if name in self._where:
                    raise CheckpointError(f"{path}: tensor {name} is stored twice ({self._where[name].path}, {file.path})")
                self._where[name] = file
        self.names = sorted(self._where)

    def __contains__(self, name):
        return name in self._where

    def info(self, name) -> TensorInfo:
        return self._where[name].infos[name]

    def get(self, name) -> torch.Tensor:
        return self._where[name].get(name)

    def file_of(self, name):
        return self._where[name].path

    def stored_in_out(self, name) -> bool:
        """Whether the (Gram statistics) file holding `name` records its weight as stored [in, out]."""
        file = self._where[name]
        if file.path not in self._in_out:
            listed = file.metadata.get(IN_OUT_WEIGHTS_KEY, "[]")
            try:
                names = json.loads(listed)
            except ValueError:
                names = None
            if not isinstance(names, list):
                raise CheckpointError(f"{file.path}: metadata {IN_OUT_WEIGHTS_KEY} is not a JSON list of tensor names")
            self._in_out[file.path] = set(names)
        return name in self._in_out[file.path]

    def metadata(self) -> dict:
        """The safetensors metadata of its files (one file for statistics), merged."""
        return {key: value for file in self._files for key, value in file.metadata.items()}

    def release(self):
        for file in self._files:
            file.release()

    @property
    def adapter_config(self):
        if self.kind != "adapter":
            return None
        return read_json_object(os.path.join(self.folder, ADAPTER_CONFIG))

    def __repr__(self):
        return f"Checkpoint({self.path!r}, kind={self.kind!r})"


def open_checkpoint(path):
    """Open the model, adapter or state dict at `path` (see the module docstring for the layouts)."""
    if os.path.isfile(path):
        return Checkpoint(path, [_open_file(path)], "file")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such file or folder (only local checkpoints can be merged)")
    for index, kind in ((SAFE_INDEX, "model"), (TORCH_INDEX, "model")):
        if os.path.isfile(os.path.join(path, index)):
            return Checkpoint(path, _sharded_files(path, index), kind, folder=path)
    for weights in (SAFE_WEIGHTS, TORCH_WEIGHTS):
        if os.path.isfile(os.path.join(path, weights)):
            return Checkpoint(path, [_open_file(os.path.join(path, weights))], "model", folder=path)
    if os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
        for weights in (ADAPTER_SAFE_WEIGHTS, ADAPTER_TORCH_WEIGHTS):
            if os.path.isfile(os.path.join(path, weights)):
                return Checkpoint(path, [_open_file(os.path.join(path, weights))], "adapter", folder=path)
        raise CheckpointError(f"{path}: adapter folder without {ADAPTER_SAFE_WEIGHTS} or {ADAPTER_TORCH_WEIGHTS}")
    raise CheckpointError(
        f"{path}: no weights found (looked for {SAFE_INDEX}, {SAFE_WEIGHTS}, {TORCH_INDEX}, {TORCH_WEIGHTS}, "
        f"{ADAPTER_SAFE_WEIGHTS})"
    )


def _sharded_files(folder, index_name):
    index_path = os.path.join(folder, index_name)
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{index_path}: not a readable shard index ({error!r})") from None
    files = []
    for shard in sorted(set(weight_map.values())):
        shard_path = os.path.join(folder, shard)
        if not os.path.isfile(shard_path):
            raise CheckpointError(f"{index_path}: shard {shard} is missing")
        files.append(_open_file(shard_path))
    return files


class Statistics:
    """Statistics of one model by kind ('fisher', 'gram', 'output_grad_gram', 'trimmed').

    A statistics folder names its kinds by file (docs/programs.md). A model-shaped folder (such as the
    Fisher folder's `hessian/`) or a bare file has no kind of its own: it serves the one kind the method
    asks for first (`primary`).
    """

    def __init__(self, path, by_kind, unlabelled=None):
        self.path = path
        self.by_kind = by_kind
        self.unlabelled = unlabelled

    def get(self, kind, primary) -> Checkpoint | None:
        if kind in self.by_kind:
            return self.by_kind[kind]
        return self.unlabelled if kind == primary else None

    def describe(self):
        return ", ".join(sorted(self.by_kind)) or "unlabelled (model-shaped) statistics"

    def release(self):
        for checkpoint in self.checkpoints():
            checkpoint.release()

    def checkpoints(self):
        return list(self.by_kind.values()) + ([self.unlabelled] if self.unlabelled else [])


def open_statistics(path):
    """Open the statistics at `path`: a statistics folder, its `hessian/` subfolder, or any checkpoint."""
    if os.path.isdir(path):
        by_kind = {
            kind: Checkpoint(path, [SafetensorsFile(os.path.join(path, name))], "file", folder=None)
            for kind, name in STATISTIC_FILES.items()
            if os.path.isfile(os.path.join(path, name))
        }
        if by_kind:
            return Statistics(path, by_kind)
        hessian = os.path.join(path, "hessian")
        if os.path.isdir(hessian) and not _has_weights(path):
            return Statistics(path, {"fisher": open_checkpoint(hessian)})
    return Statistics(path, {}, unlabelled=open_checkpoint(path))


def _has_weights(folder):
    return any(name.endswith(WEIGHT_SUFFIXES) for name in os.listdir(folder))


# ---------------------------------------------------------------------------------------------------
# Writing


def _safetensors_header(entries, metadata):
    """The header bytes (length prefix included) of a safetensors file holding `entries` in this order."""
    header, offset = {}, 0
    for name, info in entries:
        header[name] = {
            "dtype": SAFETENSORS_DTYPE_NAMES[info.dtype],
            "shape": list(info.shape),
            "data_offsets": [offset, offset + info.nbytes],
        }
        offset += info.nbytes
    if metadata:
        header["__metadata__"] = metadata
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format allows trailing spaces; 8-byte alignment of the data
    return struct.pack("<Q", len(encoded)) + encoded


class SafetensorsStreamWriter:
    """Write one safetensors file tensor by tensor, in the order fixed at construction (format:
    https://github.com/huggingface/safetensors#format — little-endian u64 header size, JSON header, data)."""

    def __init__(self, path, entries, metadata=None):
        self.path = path
        self._expected = list(entries)
        self._next = 0
        self._rows_written = 0  # of the tensor being written in blocks of rows
        self._file = open(path, "wb")
        self._file.write(_safetensors_header(self._expected, metadata))

    def write(self, name, tensor):
        """Append `tensor`, the next planned one, or the next block of its rows (its first dimension)."""
        expected_name, info = self._expected[self._next]
        whole = tuple(tensor.shape) == info.shape and self._rows_written == 0
        block = (tensor.dim() == len(info.shape) > 0 and tuple(tensor.shape[1:]) == info.shape[1:]
                 and self._rows_written + tensor.shape[0] <= info.shape[0])
        if name != expected_name or tensor.dtype != info.dtype or not (whole or block):
            raise RuntimeError(
                f"{self.path}: expected tensor {expected_name} {info.shape} {info.dtype} "
                f"(from row {self._rows_written}), got {name} {tuple(tensor.shape)} {tensor.dtype}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._file.write(data.numpy().data)
        self._rows_written = 0 if whole else self._rows_written + tensor.shape[0]
        if whole or self._rows_written == info.shape[0]:
            self._next, self._rows_written = self._next + 1, 0

    @property
    def complete(self):
        return self._next == len(self._expected)

    def close(self):
        self._file.close()


def safetensors_written_by(path):
    """The `written_by` entry of a safetensors file's metadata, or None (not safetensors, or none there)."""
    try:
        with open(path, "rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            if size > 100 * 2**20:
                return None
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error):
        return None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata.get("written_by") if isinstance(metadata, dict) else None


def parse_size(text):
    """'5GB', '500MB', '2GiB' or a plain number of bytes -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*(?:([KMGT])(i?)B?)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ValueError(f"not a size: {text!r} (examples: 5GB, 500MB, 2GiB, 1000000)")
    number, prefix, binary = match.groups()
    power = "KMGT".index(prefix.upper()) + 1 if prefix else 0
    return int(float(number) * (1024 if binary else 1000) ** power)


@contextmanager
def open_output(target, entries, layout, files_from=None, json_updates=None, max_shard_bytes=5 * 10**9,
                extra_files=None, *, kind=None, inputs=(), overwrite=False, metadata=None):
    """Yield a `TensorWriter` for the merge result at `target`; it appears there only if the block ends
    without error and every tensor of `entries` (name, TensorInfo), in that order, was written.

    `layout` is 'model' (a Hugging Face model folder: `model.safetensors`, or shards of at most
    `max_shard_bytes` with `model.safetensors.index.json`), 'adapter' (a PEFT adapter folder:
    `adapter_model.safetensors`) or 'file' (one bare safetensors file). Folders get the non-weight files
    of folder `files_from` (config, tokenizer, adapter_config.json, ...), then `extra_files` (file name ->
    path of a file to copy under that name), then `json_updates` (file name -> keys to set, e.g.
    {"config.json": {"num_hidden_layers": 6}}).

    `kind`, `inputs` and `overwrite` say which existing `target` may be replaced (see modelmerge.atomic);
    a bare file records its kind in the safetensors metadata (`written_by`); `metadata` (str -> str) is added
    to every file's.
    """
    if layout not in ("model", "adapter", "file"):
        raise ValueError(f"unknown output layout {layout!r}")
    guard = dict(kind=kind, inputs=inputs, overwrite=overwrite)
    with (atomic_file(target, written_by=safetensors_written_by, **guard) if layout == "file"
          else atomic_dir(target, **guard)) as tmp:
        writer = TensorWriter(tmp, entries, layout, max_shard_bytes, kind if layout == "file" else None, metadata)
        try:
            yield writer
        finally:
            writer.close()
        writer.check_complete()
        if layout != "file":
            if files_from:
                copy_non_weight_files(files_from, tmp)
            for name, path in (extra_files or {}).items():
                shutil.copy(path, os.path.join(tmp, name))
            writer.write_index()
            for file_name, updates in (json_updates or {}).items():
                _update_json(os.path.join(tmp, file_name), updates, os.path.join(files_from or "", file_name))


class TensorWriter:
    """The files of one output: tensors are appended in the planned order, one shard file open at a time."""

    def __init__(self, tmp, entries, layout, max_shard_bytes, written_by=None, metadata=None):
        if layout == "file":
            self.shards = [(tmp, list(entries))]
        elif layout == "adapter":
            self.shards = [(os.path.join(tmp, ADAPTER_SAFE_WEIGHTS), list(entries))]
        else:
            groups = _split_shards(entries, max_shard_bytes)
            names = [SAFE_WEIGHTS] if len(groups) == 1 else [
                f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))
            ]
            self.shards = [(os.path.join(tmp, name), group) for name, group in zip(names, groups)]
        self.folder = None if layout == "file" else tmp
        self._shard_of = {name: i for i, (_, group) in enumerate(self.shards) for name, _ in group}
        self._open_index, self._open, self._finished = None, None, 0
        self.metadata = {"format": "pt", **({"written_by": written_by} if written_by else {}), **(metadata or {})}

    def write(self, name, tensor):
        """Append `tensor`, already cast to its planned dtype, to its file."""
        index = self._shard_of[name]
        if index != self._open_index:
            self._close_open()
            self._open_index = index
            self._open = SafetensorsStreamWriter(*self.shards[index], metadata=self.metadata)
        self._open.write(name, tensor)

    def _close_open(self):
        if self._open is not None:
            self._open.close()
            self._finished += self._open.complete
            self._open = None

    def close(self):
        self._close_open()
        for path, group in self.shards:
            if not group:  # nothing to write (an empty part of a sharded merge): the header alone
                SafetensorsStreamWriter(path, group, self.metadata).close()
                self._finished += 1

    def check_complete(self):
        if self._finished != len(self.shards):
            raise RuntimeError("the merge ended before every output tensor was written")

    def write_index(self):
        if len(self.shards) == 1:
            return
        weight_map = {name: os.path.basename(path) for path, group in self.shards for name, _ in group}
        total = sum(info.nbytes for _, group in self.shards for _, info in group)
        with open(os.path.join(self.folder, SAFE_INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def read_json_object(path, shown_as=None):
    """The JSON object in the file `path`, or a CheckpointError naming it (as `shown_as`, if given)."""
    try:
        with open(path) as f:
            content = json.load(f)
    except ValueError as error:
        raise CheckpointError(f"{shown_as or path}: not valid JSON ({error})") from None
    if not isinstance(content, dict):
        raise CheckpointError(f"{shown_as or path}: expected a JSON object, found {type(content).__name__}")
    return content


def _update_json(path, updates, shown_as):
    content = read_json_object(path, shown_as) if os.path.isfile(path) else {}
    content.update(updates)
    with open(path, "w") as f:
        json.dump(content, f, indent=2)
        f.write("\n")


def _split_shards(entries, max_bytes):
    groups, current, size = [], [], 0
    for name, info in entries:
        if current and size + info.nbytes > max_bytes:
            groups.append(current)
            current, size = [], 0
        current.append((name, info))
        size += info.nbytes
    groups.append(current)
    return groups


def copy_non_weight_files(source, destination):
    """Copy the files of folder `source` that are not weights, shard indices or the mark of the program
    that wrote it (config, tokenizer, ...)."""
    for name in sorted(os.listdir(source)):
        path = os.path.join(source, name)
        if not os.path.isfile(path) or name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json") or name == MARKER:
            continue
        shutil.copy(path, os.path.join(destination, name))
