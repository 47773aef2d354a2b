"""Checkpoints read lazily, one tensor at a time.

A `Checkpoint` is whatever a user may name as a model or as statistics: a Hugging Face model folder
(`model.safetensors`, sharded `model-*.safetensors` with `model.safetensors.index.json`, `pytorch_model.bin`
or its sharded index), a PEFT adapter folder (`adapter_model.safetensors` / `adapter_model.bin` with
`adapter_config.json`), or a bare `.safetensors` / `.pt` / `.bin` state dict. Safetensors files are
memory-mapped with `safe_open`; `.bin`/`.pt` files are loaded with `torch.load(weights_only=True, mmap=True)`,
so nothing is unpickled beyond plain tensors. `open_statistics` opens a statistics folder by kind.

Pages of a memory-mapped file count towards the resident memory of the process for as long as the
mapping is open, so every source can `release()` its mapping (it reopens on the next read); the merge
driver releases all sources after every 64 MB read, which bounds the memory a merge needs.
"""
import json
import os
import re
import struct

import torch
from safetensors import safe_open

from modelmerge.io.formats import (ADAPTER_CONFIG, ADAPTER_SAFE_WEIGHTS, ADAPTER_TORCH_WEIGHTS, IN_OUT_WEIGHTS_KEY,
                                   SAFE_INDEX, SAFE_WEIGHTS, SAFETENSORS_DTYPES, STATISTIC_FILES, TORCH_INDEX,
                                   TORCH_SUFFIXES, TORCH_WEIGHTS, WEIGHT_SUFFIXES, CheckpointError, TensorInfo)
from modelmerge.io.json_files import read_json_object
from modelmerge.io.shards import read_shard_files


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
    if dtype_name not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {dtype_name}")
    return TensorInfo(tuple(tensor_slice.get_shape()), SAFETENSORS_DTYPES[dtype_name])


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
            return Checkpoint(path, [_open_file(p) for p in read_shard_files(path, index)], kind, folder=path)
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
