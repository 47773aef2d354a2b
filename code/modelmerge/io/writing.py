"""Checkpoints written incrementally.

`SafetensorsStreamWriter` writes a safetensors file whose header (names, dtypes, shapes) is known before the
first tensor exists, appending each tensor's bytes as soon as it is computed. `safetensors.torch.save_file`
needs every tensor of a file in memory at once, which would make a merge's memory grow with the model.
`open_output` lays such files out as a loadable model folder (sharded if large), adapter folder or bare file,
atomically (modelmerge.atomic).
"""
import json
import os
import shutil
import struct
from contextlib import contextmanager

import torch

from modelmerge.atomic import MARKER, atomic_dir, atomic_file
from modelmerge.io.formats import ADAPTER_SAFE_WEIGHTS, SAFETENSORS_DTYPE_NAMES, WEIGHT_SUFFIXES
from modelmerge.io.json_files import update_json_object
from modelmerge.io.reading import safetensors_written_by
from modelmerge.io.shards import shard_file_names, split_shards, write_shard_index


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
                update_json_object(os.path.join(tmp, file_name), updates, os.path.join(files_from or "", file_name))


class TensorWriter:
    """The files of one output: tensors are appended in the planned order, one shard file open at a time."""

    def __init__(self, tmp, entries, layout, max_shard_bytes, written_by=None, metadata=None):
        if layout == "file":
            self.shards = [(tmp, list(entries))]
        elif layout == "adapter":
            self.shards = [(os.path.join(tmp, ADAPTER_SAFE_WEIGHTS), list(entries))]
        else:
            groups = split_shards(entries, max_shard_bytes)
            self.shards = [(os.path.join(tmp, name), group) for name, group in zip(shard_file_names(len(groups)), groups)]
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
        write_shard_index(self.folder, self.shards)


def copy_non_weight_files(source, destination):
    """Copy the files of folder `source` that are not weights, shard indices or the mark of the program
    that wrote it (config, tokenizer, ...)."""
    for name in sorted(os.listdir(source)):
        path = os.path.join(source, name)
        if not os.path.isfile(path) or name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json") or name == MARKER:
            continue
        shutil.copy(path, os.path.join(destination, name))
