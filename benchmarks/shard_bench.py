"""A sharded merge against the same merge in one process, whole job, and the scaling law for N nodes.

Writes an ancestor and four fine-tuned checkpoints with BERT-base shapes (~110M parameters, float32, as
benchmarks/merge_bench.py writes them), then, alternately `--repeats` times, runs what MergeJob runs:

- shards=1: `code/merge.py --merge METHOD ... --threads 1 --output OUT`, one process;
- shards=N: the N processes `code/merge.py ... --shard I/N --threads 1 --output PART_I` at once (the N task
  ids of one job, on N cores here, N nodes on a cluster), then `code/merge.py --join PART... --output OUT`;
- for reference, shards=1 with `--threads N` (the same cores given to one process).

It prints the wall time of each, every part's wall time and merge loop, the join's, the speedup (shards=1 over
shards=N, whole job: the slowest part plus the join) and the load average around the measurements: other
processes on the machine slow the parallel parts more than the single process, so the figures are noisy and
the load says how much. The outputs are checked to be byte-identical.

The scaling law: T(N) = S + W · L(N) + J, with S a part's fixed cost (interpreter, imports, planning, its
share of reading headers: a part's wall time minus its loop), W the merge loop's total work (the sum of the
parts' loops), L(N) the share of the costliest of N parts as the planner splits the tensors (by each method's
cost, merging/shards.py; never below the costliest tensor's share) and J the join (reading the parts and
writing the checkpoint: I/O, independent of N). The figure for 64 nodes is read off it, as are the others.

    python benchmarks/shard_bench.py                           # TSV-M, 2 shards, full size, ~5 min
    python benchmarks/shard_bench.py --scale 0.25 --repeats 1  # a quick small run
    python benchmarks/shard_bench.py --method iso_c --shards 2 --repeats 3
"""
import argparse
import filecmp
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from statistics import median

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(REPO, "code"), os.path.join(REPO, "benchmarks")]
MERGE = os.path.join(REPO, "code", "merge.py")
NODES = (1, 2, 4, 8, 16, 32, 64)

from merge_bench import make_inputs  # noqa: E402  (the same checkpoints)


def load():
    return os.getloadavg()[0]


def start(arguments, threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    return subprocess.Popen([sys.executable, MERGE, *arguments, "--threads", str(threads), "--no_progress"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process):
    """(loop seconds from the summary line, the process's stdout) of a started merge, once it ends."""
    stdout, stderr = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(process.args)} failed:\n{stderr[-3000:]}")
    return float(re.search(r", ([0-9.]+) s, peak RSS", stdout).group(1))


def timed(processes):
    """Start `processes` (callables returning a Popen) at once; (wall seconds, [(part wall, loop)])."""
    begin = time.perf_counter()
    running = [make() for make in processes]
    results = []
    for process in running:
        loop = finish(process)
        results.append((time.perf_counter() - begin, loop))
    return time.perf_counter() - begin, results


def merge_arguments(root, method):
    return ["--merge", method, "--models", *[os.path.join(root, f"ft{t}") for t in range(1, 5)],
            "--ancestor", os.path.join(root, "base")]


def run_once(root, method, shards):
    """One round: shards=1 on one thread, shards=N (parts at once, then the join), shards=1 on N threads."""
    arguments = merge_arguments(root, method)
    single = os.path.join(root, "single")
    one, _ = timed([lambda: start(arguments + ["--output", single], 1)])
    parts = [os.path.join(root, f"part{i}.safetensors") for i in range(1, shards + 1)]
    wall_parts, results = timed([lambda i=i: start(arguments + ["--shard", f"{i}/{shards}", "--output", parts[i - 1]], 1)
                                 for i in range(1, shards + 1)])
    joined = os.path.join(root, "joined")
    join_begin = time.perf_counter()
    finish(start(["--join", *parts, "--output", joined], 1))
    join = time.perf_counter() - join_begin
    same = not filecmp.dircmp(single, joined).diff_files and sorted(os.listdir(single)) == sorted(os.listdir(joined))
    same = same and all(filecmp.cmp(os.path.join(single, n), os.path.join(joined, n), shallow=False) for n in os.listdir(single))
    threaded, _ = timed([lambda: start(arguments + ["--output", os.path.join(root, "threaded")], shards)])
    for path in (single, joined, os.path.join(root, "threaded"), *parts):
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return {"shards1": one, "parts_wall": wall_parts, "parts": results, "join": join, "sharded": wall_parts + join,
            "threaded": threaded, "identical": same, "load": load()}


def largest_part_share(method_name, shapes, nodes):
    """L(N): the costliest part's share of the total cost, as the planner splits BERT-base's tensors for N parts."""
    from modelmerge.merging.parameters import load_method, resolve_parameters
    from modelmerge.merging.shards import assign_parts
    from modelmerge.io.formats import TensorInfo
    from modelmerge.merging.plan import Source, TensorTask
    import torch

    method = load_method(method_name)
    params = resolve_parameters(method, {}, 4)

    class Header:
        def __init__(self, shape):
            self.shape = shape

        def info(self, _):
            return TensorInfo(self.shape, torch.float32)

    tasks = [TensorTask(name, [Source(Header(shape), name)] * 4, ancestor=Source(Header(shape), name), params=params)
             for name, shape in shapes.items()]
    costs = [method.cost(task.name, tuple(shapes[task.name]), 4, params) for task in tasks]
    parts = assign_parts(method, params, tasks, nodes)
    loads = [sum(c for c, p in zip(costs, parts) if p == part) for part in range(1, nodes + 1)]
    return max(loads) / sum(costs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="tsv_m", help="merge method (default tsv_m)")
    parser.add_argument("--shards", type=int, default=2, help="parts run at once (default 2: this machine's cores)")
    parser.add_argument("--scale", type=float, default=1.0, help="width and vocabulary relative to BERT-base")
    parser.add_argument("--repeats", type=int, default=2, help="rounds, alternating the three runs (medians reported)")
    parser.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp folder)")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="shard_bench-", dir=args.workdir)
    try:
        begin = time.perf_counter()
        shapes = make_inputs(root, args.scale, fishers=False)  # TSV-M and the other data-free methods need none
        parameters = sum(math.prod(s) for s in shapes.values())
        print(f"inputs: θ_0 + 4 fine-tunes of {parameters / 1e6:.1f}M parameters, written in "
              f"{time.perf_counter() - begin:.0f} s to {root}")
        print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()} before the measurements")
        rounds = []
        for _ in range(args.repeats):
            rounds.append(run_once(root, args.method, args.shards))
            print(json.dumps(rounds[-1]))
        report(rounds, args, shapes)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def report(rounds, args, shapes):
    def med(key):
        return median(r[key] for r in rounds)

    n = args.shards
    part_walls = [median(r["parts"][i][0] for r in rounds) for i in range(n)]
    part_loops = [median(r["parts"][i][1] for r in rounds) for i in range(n)]
    print(f"\n{args.method}, {n} shards, median of {len(rounds)} rounds; load average (1 min) after each round: "
          f"{', '.join('%.1f' % r['load'] for r in rounds)} on {os.cpu_count()} CPUs")
    print(f"  shards=1, 1 thread            {med('shards1'):7.1f} s")
    for i in range(n):
        print(f"  part {i + 1}/{n}, 1 thread          {part_walls[i]:7.1f} s wall, {part_loops[i]:6.1f} s merge loop")
    print(f"  join                          {med('join'):7.1f} s")
    print(f"  shards={n}, whole job          {med('sharded'):7.1f} s   (slowest part + join)")
    print(f"  shards=1, {n} threads           {med('threaded'):7.1f} s   (reference: the same cores in one process)")
    speedup = med("shards1") / med("sharded")
    print(f"  speedup shards=1 / shards={n}: {speedup:.2f}x (target 1.7x: {'met' if speedup >= 1.7 else 'missed'}); "
          f"outputs byte-identical: {all(r['identical'] for r in rounds)}")
    fixed = median(w - l for w, l in zip(part_walls, part_loops))
    work = sum(part_loops)
    join = med("join")
    print(f"\nscaling law T(N) = S + W·L(N) + J with S = {fixed:.1f} s (a part's wall minus its loop), "
          f"W = {work:.1f} s (the parts' loops summed), J = {join:.1f} s (the join):")
    print("  N      L(N)    T(N)   speedup over shards=1")
    for nodes in NODES:
        share = largest_part_share(args.method, shapes, nodes)
        total = fixed + work * share + (join if nodes > 1 else 0)
        print(f"  {nodes:<4} {share:7.4f} {total:7.1f} s {med('shards1') / total:6.1f}x")


if __name__ == "__main__":
    main()
