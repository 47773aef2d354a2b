"""What the checkpoint layouts are made of: file names, weight suffixes, statistics kinds, safetensors dtypes,
the description of one tensor (`TensorInfo`) and the error for unreadable input (`CheckpointError`)."""
from dataclasses import dataclass

import torch

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
    "gradient_magnitude": "gradient_magnitude.safetensors",
}
# Metadata key of the Gram files: a JSON list of the weights stored [in, out] (GPT-2's Conv1D) rather than as
# nn.Linear's [out, in]. Files without it (written before the layout was recorded) describe [out, in] weights.
IN_OUT_WEIGHTS_KEY = "weights_stored_in_out"

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
SAFETENSORS_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


class CheckpointError(ValueError):
    """Unreadable or inconsistent input; the message names the file and the cause."""


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of one stored tensor, known without reading its data."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self):
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * self.dtype.itemsize
