"""The trimmed task vector of TIES (Yadav et al., "TIES-Merging", NeurIPS 2023) as a statistic:

    python code/trim.py --model M --ancestor P --density D --output OUT

writes OUT/trimmed.safetensors with the model's tensor names: for every floating-point tensor,
τ = θ − θ_0 with all but its top-`density` fraction of entries by magnitude set to 0 (ties at the
threshold are kept), in float32 (float64 for float64 models); and OUT/stats.json. `merge.py --merge ties
--aux_data OUT ...` then uses these instead of trimming again. M and P are anything the merge programs
read (model folders, bare .safetensors/.pt files). Tensors are read, trimmed and written one at a time;
OUT appears only once complete.
"""
import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from modelmerge.atomic import atomic_dir
from modelmerge.checkpoint import SafetensorsStreamWriter, TensorInfo, open_checkpoint
from modelmerge.merge_driver import RELEASE_EVERY_BYTES, MergeError, check_same_tensors, peak_rss_bytes, run_program
from modelmerge.methods.ties import trim_by_magnitude

logger = logging.getLogger("trim")

OUTPUT_FILE = "trimmed.safetensors"


@dataclass
class TrimSummary:
    trimmed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0

    def line(self):
        return (f"trimmed {self.trimmed} tensors, skipped {self.skipped} (not floating point), "
                f"{self.seconds:.1f} s, peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB")


def density_fraction(text):
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"the density must lie in (0, 1], got {text}")
    return value


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the fine-tuned model θ")
    parser.add_argument("--ancestor", required=True, help="the model θ_0 it was fine-tuned from")
    parser.add_argument("--density", type=density_fraction, required=True, help="fraction of entries kept per tensor")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--device", default="cpu", help="where the arithmetic runs: cpu or cuda")
    return parser.parse_args(argv)


def read_finite(checkpoint, name):
    tensor = checkpoint.get(name)
    if not bool(torch.isfinite(tensor).all()):
        raise MergeError(f"tensor {name} in {checkpoint.file_of(name)} holds NaN or infinite values")
    return tensor


def trim_checkpoint(model, ancestor, density, path, device="cpu"):
    """Stream the trimmed task vectors of every floating-point tensor of `model` into the safetensors file `path`."""
    summary = TrimSummary()
    start = time.perf_counter()
    names = [name for name in model.names if model.info(name).dtype.is_floating_point]
    summary.skipped = len(model.names) - len(names)
    entries = [(name, TensorInfo(model.info(name).shape, torch.promote_types(model.info(name).dtype, torch.float32)))
               for name in names]
    writer = SafetensorsStreamWriter(path, entries, metadata={"density": str(density)})
    read_since_release = 0
    try:
        for name, info in tqdm(entries, desc="trimming", unit="tensor", file=sys.stderr):
            theta, theta_0 = read_finite(model, name), read_finite(ancestor, name)
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


def main(argv):
    args = parse_args(argv)
    logger.info("trimming %s against %s to density %s into %s", args.model, args.ancestor, args.density, args.output)
    model, ancestor = open_checkpoint(args.model), open_checkpoint(args.ancestor)
    check_same_tensors([model, ancestor], "model and the ancestor")
    with atomic_dir(args.output) as tmp:
        summary = trim_checkpoint(model, ancestor, args.density, os.path.join(tmp, OUTPUT_FILE), args.device)
        with open(os.path.join(tmp, "stats.json"), "w") as f:
            json.dump({"model": args.model, "ancestor": args.ancestor, "density": args.density,
                       "num_tensors": summary.trimmed}, f, indent=2)
    return summary


if __name__ == "__main__":
    run_program(main)
