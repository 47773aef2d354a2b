"""The SVD methods with 1 and with N torch threads (`--threads`, as a Job's cpu_rqmt sets it): one BERT-base
encoder layer's matrices (4 × 768x768 attention, 3072x768 and 768x3072 feed-forward, float32) of an ancestor and
four fine-tuned models, merged by the library as code/merge.py merges them (modelmerge.merging.merge, the
merge loop timed, loading included), alternately with each thread count `--repeats` times. Prints the median and
the fastest time per count, the speedup, and the load average: other processes on the cores slow the run with
more threads most, so the load says how far the figures are from an idle machine's.

    python benchmarks/threads_bench.py                                  # TSV-M and Iso-C, 1 vs 2 threads
    python benchmarks/threads_bench.py --methods tsv_m iso_cts cart --threads 1 2 4 --repeats 5

Measured here (2 cores shared with other sessions, 1-minute load 6-9), medians of 3: TSV-M 9.84 s with 1 thread,
84.2 s with 2; Iso-C 2.48 s and 14.4 s. With OMP_WAIT_POLICY=PASSIVE in the environment (load 8.4): TSV-M 11.9 s
and 13.6 s, Iso-C 2.95 s and 3.25 s. On busy cores a second thread cannot gain and OpenMP's spinning makes it
cost; the gain of more threads is only to be had on cores a job holds alone (docs/programs.md, "Torch threads").
"""
import argparse
import os
import sys
import tempfile
import time
from statistics import median

import torch
from safetensors.torch import save_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "code"))

from modelmerge.merging import MergeOptions, merge  # noqa: E402

SHAPES = {**{f"attention.{name}.weight": (768, 768) for name in ("query", "key", "value", "output")},
          "intermediate.weight": (3072, 768), "output.weight": (768, 3072)}


def write_models(folder, tasks, seed=0):
    """An ancestor and `tasks` fine-tuned copies (ancestor + small noise) as bare .safetensors files."""
    generator = torch.Generator().manual_seed(seed)
    base = {name: torch.randn(shape, generator=generator) * 0.02 for name, shape in SHAPES.items()}
    save_file(base, os.path.join(folder, "base.safetensors"))
    paths = []
    for task in range(tasks):
        model = {name: tensor + 0.002 * torch.randn(tensor.shape, generator=generator) for name, tensor in base.items()}
        paths.append(os.path.join(folder, f"task{task}.safetensors"))
        save_file(model, paths[-1])
    return os.path.join(folder, "base.safetensors"), paths


def merge_seconds(method, base, models, output, threads):
    start = time.perf_counter()
    merge(MergeOptions(method, models, output, ancestor=base, threads=threads, progress=False, overwrite=True))
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["tsv_m", "iso_c"])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        base, models = write_models(folder, args.tasks)
        output = os.path.join(folder, "merged.safetensors")
        load = os.getloadavg()[0]
        for method in args.methods:
            merge_seconds(method, base, models, output, args.threads[0])  # warm the page cache and the kernels
            times = {threads: [] for threads in args.threads}
            for _ in range(args.repeats):
                for threads in args.threads:
                    times[threads].append(merge_seconds(method, base, models, output, threads))
            one = median(times[args.threads[0]])
            for threads, seconds in times.items():
                print(f"{method:8} threads={threads}: median {median(seconds):6.2f} s, fastest {min(seconds):6.2f} s, "
                      f"speedup {one / median(seconds):.2f}x")
        print(f"load average (1 min) before / after: {load:.2f} / {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
