"""Reading and writing checkpoints, one concern a module:

- `formats`: the file names of each layout, the safetensors dtypes, `TensorInfo` and `CheckpointError`;
- `reading`: `open_checkpoint` (model, adapter or bare state dict, read lazily) and `open_statistics`;
- `writing`: `open_output` (a model folder, adapter folder or bare file written tensor by tensor) and the
  streamed safetensors writer beneath it;
- `shards`: the shards of a model folder (its index, how tensors are split into files, `parse_size`);
- `json_files`: JSON objects in files (program configs, config.json, adapter_config.json), read and updated.
"""
