"""The trimmed task vector of TIES as a statistic (Yadav et al., "TIES-Merging", NeurIPS 2023): for every
floating-point tensor, τ = θ − θ_0 with all but its top-`density` fraction of entries by magnitude set to 0
(ties at the threshold are kept), in float32 (float64 for float64 models), streamed tensor by tensor into
`trimmed.safetensors` with the model's tensor names, beside `stats.json`. `merge --merge ties --aux_data
OUT` then uses these instead of trimming again.
"""
import json
import logging
import os
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from modelmerge.atomic import atomic_dir
from modelmerge.io.formats import TensorInfo
from modelmerge.io.reading import open_checkpoint
from modelmerge.io.writing import SafetensorsStreamWriter
from modelmerge.merging.execute import RELEASE_EVERY_BYTES, all_finite, peak_rss_bytes
from modelmerge.merging.options import MergeError, check_device
from modelmerge.merging.plan import check_same_tensors
from modelmerge.methods.sparsify import trim_by_magnitude
from modelmerge.merging.provenance import model_provenance

logger = logging.getLogger(__name__)

OUTPUT_FILE = "trimmed.safetensors"
DENSITY_RANGE = "(0, 1]"
OUTPUT_KIND = "trimmed task vector"


@dataclass
class TrimSummary:
    trimmed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0

    def line(self):
        return (f"trimmed {self.trimmed} tensors, skipped {self.skipped} (not floating point), "
                f"{self.seconds:.1f} s, peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB")


def write_trimmed(model: str, ancestor: str, density: float, output: str, device="cpu", overwrite=False,
                  progress=True) -> TrimSummary:
    """Write the trimmed task vector of the checkpoint `model` against `ancestor` into the folder `output`."""
    if not 0 < density <= 1:
        raise MergeError(f"the density must lie in {DENSITY_RANGE}, got {density}")
    device = check_device(device)
    logger.info("trimming %s against %s to density %s into %s", model, ancestor, density, output)
    theta, theta_0 = open_checkpoint(model), open_checkpoint(ancestor)
    check_same_tensors([theta, theta_0], "model and the ancestor")
    with atomic_dir(output, OUTPUT_KIND, inputs=[model, ancestor], overwrite=overwrite) as tmp:
        provenance = {**model_provenance(model), **model_provenance(ancestor, "ancestor")}
        summary = trim_checkpoint(theta, theta_0, density, os.path.join(tmp, OUTPUT_FILE), device, progress, provenance)
        with open(os.path.join(tmp, "stats.json"), "w") as f:
            json.dump({"model": model, "ancestor": ancestor, "density": density, "num_tensors": summary.trimmed},
                      f, indent=2)
    return summary


def trim_checkpoint(model, ancestor, density, path, device="cpu", progress=True, provenance=None) -> TrimSummary:
    """Stream the trimmed task vectors of every floating-point tensor of `model` into the safetensors file `path`,
    its metadata recording the density and `provenance` (modelmerge.merging.provenance)."""
    summary = TrimSummary()
    start = time.perf_counter()
    names = [name for name in model.names if model.info(name).dtype.is_floating_point]
    summary.skipped = len(model.names) - len(names)
    entries = [(name, TensorInfo(model.info(name).shape, torch.promote_types(model.info(name).dtype, torch.float32)))
               for name in names]
    writer = SafetensorsStreamWriter(path, entries, metadata={**(provenance or {}), "density": str(density)})
    read_since_release = 0
    try:
        for name, info in tqdm(entries, desc="trimming", unit="tensor", disable=not progress, file=sys.stderr):
            theta, theta_0 = _read_finite(model, name), _read_finite(ancestor, name)
            delta = theta.to(device, info.dtype) - theta_0.to(device, info.dtype)
            writer.write(name, trim_by_magnitude(delta, density).cpu())
            summary.trimmed += 1
            read_since_release += theta.nbytes + theta_0.nbytes
            if read_since_release > RELEASE_EVERY_BYTES:  # bound the resident pages of the memory maps
                model.release()
                ancestor.release()
                read_since_release = 0
    finally:
        writer.close()
    summary.seconds = time.perf_counter() - start
    summary.peak_rss_bytes = peak_rss_bytes()
    return summary


def _read_finite(checkpoint, name):
    tensor = checkpoint.get(name)
    if not all_finite(tensor):
        raise MergeError(f"tensor {name} in {checkpoint.file_of(name)} holds NaN or infinite values")
    return tensor
