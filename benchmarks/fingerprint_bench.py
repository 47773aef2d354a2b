"""The cost of a statistics file's model fingerprint (modelmerge.merging.provenance) against a full SHA-256 of
the weight files, both with the page cache warm. Default checkpoints: the offline all-MiniLM-L6-v2 folder and a
random 400 MB one-tensor file made in a temporary folder.

    python benchmarks/fingerprint_bench.py [CHECKPOINT ...]

Measured (2 shared cores, loaded, two runs): MiniLM (104 tensors, 87 MiB) 21-31 ms against 0.30-0.45 s; the
391 MiB tensor 0.2-0.4 ms against 1.0-1.3 s.
"""
import hashlib
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "code"))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from modelmerge.io.reading import open_checkpoint  # noqa: E402
from modelmerge.merging.provenance import fingerprint  # noqa: E402
from modelmerge.offline import offline_model_path  # noqa: E402


def full_hash_seconds(checkpoint):
    start = time.perf_counter()
    for path in sorted({checkpoint.file_of(name) for name in checkpoint.names}):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return time.perf_counter() - start


def main(paths):
    with tempfile.TemporaryDirectory() as folder:
        if not paths:
            paths = [offline_model_path(), os.path.join(folder, "big.safetensors")]
            save_file({"w": torch.randn(25000, 4096)}, paths[-1])
        for path in paths:
            checkpoint = open_checkpoint(path)
            full = full_hash_seconds(checkpoint)  # also brings the pages into the cache
            fingerprint(checkpoint)
            start = time.perf_counter()
            fingerprint(checkpoint)
            seconds = time.perf_counter() - start
            size = sum(checkpoint.info(name).nbytes for name in checkpoint.names)
            print(f"{path}: {len(checkpoint.names)} tensors, {size / 2**20:.0f} MiB: fingerprint "
                  f"{seconds * 1000:.1f} ms, full SHA-256 {full * 1000:.0f} ms")


if __name__ == "__main__":
    main(sys.argv[1:])
