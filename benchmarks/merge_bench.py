"""Merge speed and memory on BERT-base-sized checkpoints, against the I/O floor, FusionBench and mergekit.

Writes into a temporary folder (a few GB at full size) an ancestor and four fine-tuned checkpoints with
BERT-base shapes (~110M parameters, float32 safetensors, random values) and a diagonal Fisher for each,
then for task arithmetic, TIES, uncertainty-based gradient matching and the methods of issues 9 and 19 (NEW_METHODS;
their target: a merge loop within 3x task arithmetic's, WUDI's per 100 iterations) measures

- our merge: `python code/merge.py ...` in a fresh process; the time of its merge loop (from its summary
  line: reading, checking, merging and writing every tensor), its whole wall time (with interpreter start,
  imports and planning), and its peak resident memory;
- the I/O floor: reading every input file the merge reads (plain sequential reads) and writing a file the
  size of the output (also in a fresh process, so both run with the same cache state);
- FusionBench 0.2.33's own algorithm class for the same method (benchmarks/fusion_bench_merge.py: a program that
  loads every model into its model pool as FusionBench's configurations do, runs the algorithm and saves the
  result; FusionBench's folder on its path): wall time and peak resident memory, and the largest absolute
  difference of its merged tensors from ours where the definitions match;
- mergekit (`mergekit-yaml`, when installed) on the same merge: wall time and peak resident memory.

Ours, FusionBench's and mergekit's processes run interleaved (floor, ours, FusionBench, mergekit, floor, ...).
The peers' targets (issue 18): our whole process at most 0.5x FusionBench's time and 1/3 of its peak memory,
and at most mergekit's time.

The targets: merge loop within 1.5x the I/O floor, faster than mergekit, peak memory below the size of two
checkpoints; the table ends with each target, met or not. A new method whose loop misses 3x task arithmetic's
gets its arithmetic lower bound printed: the floating-point operations of the exact decompositions and
products its definition needs (SVDs counted as Golub & Van Loan count them), or the entries it must sort
and draw on top of task arithmetic's own loop (DELLA reads, checks, combines and writes as it does), at the
rates a quick matmul, sort and draw reach on this machine with the same threads. Inputs are read from the
page cache when memory allows (every file is read once before the measurements). Our merge runs with each of `--threads` torch
threads (OMP_NUM_THREADS; default 1, as merge.py itself runs), `--repeats` times, alternating with the
floor so that other processes on the machine (which make the figures noisy) slow both alike; medians are
reported. mergekit runs with the largest thread count; FusionBench with each.

    python benchmarks/merge_bench.py              # full size (~110M parameters per checkpoint), ~8 min
    python benchmarks/merge_bench.py --threads 1 2 --repeats 1 --no_mergekit   # one thread against two
    python benchmarks/merge_bench.py --scale 0.25 --repeats 1 --no_mergekit  # a quick small run
    python benchmarks/merge_bench.py --methods tsv_m iso_c --device cuda  # all three on the GPU
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from statistics import median

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertForSequenceClassification

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATALOGUE = os.path.join(REPO, "recipe", "model_merging", "catalogue.json")
FUSION_BENCH_DRIVER = os.path.join(REPO, "benchmarks", "fusion_bench_merge.py")
FUSION_BENCH = os.environ.get("FUSION_BENCH_DIR", os.path.expanduser("~/.cache/modelmerge/fusion_bench-0.2.33"))
TIES_DENSITY = 0.2


def bert_config(scale):
    """BERT-base (hidden 768, 12 layers, vocabulary 30522) with width and vocabulary multiplied by `scale`."""
    hidden = max(64, int(768 * scale) // 64 * 64)
    return BertConfig(vocab_size=max(1000, int(30522 * scale)), hidden_size=hidden, num_hidden_layers=12,
                      num_attention_heads=hidden // 64, intermediate_size=4 * hidden, num_labels=2,
                      architectures=["BertForSequenceClassification"])


def shapes_of(config):
    with torch.device("meta"):
        model = BertForSequenceClassification(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def write_checkpoint(folder, config, shapes, seed, like=None, fisher=False):
    """A model folder (config.json + model.safetensors) with random weights: `like` plus small noise when
    given (a fine-tune), or a statistics folder with a positive random fisher.safetensors."""
    os.makedirs(folder, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        if fisher:
            tensors[name] = torch.rand(shape, generator=generator) * 1e-3
        elif like is None:
            tensors[name] = torch.randn(shape, generator=generator) * 0.02
        else:
            tensors[name] = like[name] + torch.randn(shape, generator=generator) * 1e-3
    if fisher:
        save_file(tensors, os.path.join(folder, "fisher.safetensors"))
    else:
        save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(folder)
    return tensors


def make_inputs(root, scale, fishers=True):
    """θ_0 (`base`), four fine-tunes (`ft1`..`ft4`) and, with `fishers`, a Fisher of each (`fisher0`..`fisher4`);
    returns the tensors' shapes."""
    config = bert_config(scale)
    shapes = shapes_of(config)
    base = write_checkpoint(os.path.join(root, "base"), config, shapes, seed=0)
    for t in range(1, 5):
        write_checkpoint(os.path.join(root, f"ft{t}"), config, shapes, seed=t, like=base)
    for t in range(5 if fishers else 0):
        write_checkpoint(os.path.join(root, f"fisher{t}"), config, shapes, seed=100 + t, fisher=True)
    return shapes


IO_FLOOR = r"""
import sys, time
inputs, output, size = sys.argv[1:-2], sys.argv[-2], int(sys.argv[-1])
start = time.perf_counter()
buffer = bytearray(16 * 2**20)
for path in inputs:
    with open(path, 'rb', buffering=0) as f:
        while f.readinto(buffer):
            pass
with open(output, 'wb') as f:
    remaining = size
    while remaining > 0:
        chunk = min(remaining, len(buffer))
        f.write(memoryview(buffer)[:chunk])
        remaining -= chunk
print(time.perf_counter() - start)
"""

PEAK_RSS = r"""
import resource, subprocess, sys, time
start = time.perf_counter()
done = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
wall = time.perf_counter() - start
sys.stdout.write(done.stdout)
sys.stderr.write(done.stderr)
print(f"@@ wall={wall} rss={resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}")
sys.exit(done.returncode)
"""


def measure(command, cwd, threads, pythonpath=None):
    """(wall seconds, peak RSS bytes, stdout) of `command` run alone under a small parent process."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), **({"PYTHONPATH": pythonpath} if pythonpath else {}))
    done = subprocess.run([sys.executable, "-c", PEAK_RSS, *command], cwd=cwd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    match = re.search(r"@@ wall=(\S+) rss=(\d+)", done.stdout)
    return float(match.group(1)), int(match.group(2)), done.stdout


def io_floor(reads, root, output_bytes):
    """Seconds to read `reads` and write `output_bytes`, in a fresh process."""
    out = os.path.join(root, "floor.bin")
    seconds = float(subprocess.run([sys.executable, "-c", IO_FLOOR, *reads, out, str(output_bytes)],
                                   capture_output=True, text=True, check=True).stdout)
    os.remove(out)
    return seconds


def merge_program(method):
    """The program that computes `method`, as the methods' catalogue declares it (merge.py, modulated_merge.py)."""
    with open(CATALOGUE, encoding="utf-8") as file:
        return json.load(file)["methods"][method]["program"]


def our_merge(arguments, root, name, threads, device="cpu", keep=False):
    """(merge loop seconds, whole wall seconds, peak RSS bytes, output folder or None) of code/merge.py (the
    modulated methods: code/modulated_merge.py), its arithmetic on `device`; the output is kept if `keep`."""
    out = os.path.join(root, f"out-{name}")
    program = os.path.join(REPO, "code", merge_program(arguments[1]))
    command = [sys.executable, program, *arguments, "--device", device, "--output", out, "--no_progress"]
    wall, rss, stdout = measure(command, REPO, threads)
    loop = float(re.search(r"^(?:merged|modulated merge) .*, ([0-9.]+) s", stdout, re.MULTILINE).group(1))
    if not keep:
        shutil.rmtree(out)
    return loop, wall, rss, out if keep else None


def last_exception(stderr):
    """The last exception's message in a traceback (plain or Rich's, whose message wraps over several lines)."""
    lines = stderr.strip().splitlines()
    starts = [i for i, line in enumerate(lines) if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b.*:", line)]
    return " ".join(line.strip() for line in lines[starts[-1] if starts else -1:])


def fusion_bench_merge(method, root, name, threads, device="cpu", keep=False):
    """(wall seconds, peak RSS bytes, output folder or None) of FusionBench's algorithm for `method` as a program
    (fusion_bench_merge.py, FusionBench's folder on the path), or None if it fails (the reason printed)."""
    out = os.path.join(root, f"fusion_bench-{name}")
    command = [sys.executable, FUSION_BENCH_DRIVER, method, "--pretrained", os.path.join(root, "base"),
               "--models", *[os.path.join(root, f"ft{t}") for t in range(1, 5)], "--output", out, "--device", device]
    try:
        wall, rss, _ = measure(command, REPO, threads, pythonpath=FUSION_BENCH)
    except RuntimeError as error:
        print(f"FusionBench {method} fails: {last_exception(str(error))}")
        return None
    finally:
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
    return wall, rss, out if keep else None


def mergekit_merge(yaml_text, root, name, threads, device="cpu"):
    """(wall seconds, peak RSS bytes) of mergekit-yaml on the same merge."""
    config = os.path.join(root, f"{name}.yml")
    with open(config, "w") as f:
        f.write(yaml_text)
    out = os.path.join(root, f"mergekit-{name}")
    wall, rss, _ = measure(["mergekit-yaml", config, out, "--quiet", *(["--cuda"] if device == "cuda" else [])],
                           REPO, threads)
    shutil.rmtree(out)
    return wall, rss


def max_abs_difference(ours, theirs, method):
    """max |ours − FusionBench's| over the merged tensors (EMR: the unified model θ_0 + τ_uni and the rescalers)."""
    from safetensors.torch import load_file

    if method == "emr":
        mine = load_file(os.path.join(ours, "unified", "model.safetensors"))
        their = load_file(os.path.join(theirs, "model.safetensors"))
        worst = max(float((mine[k] - (their[f"backbone.{k}"] + their[f"unified_task_vector.{k}"])).abs().max())
                    for k in mine)
        with open(os.path.join(ours, "modulators.json")) as f:
            rescalers = json.load(f)["rescalers"]
        return max(worst, *(abs(r - float(their[f"modulators.model_{t + 1}.rescaler"])) for t, r in enumerate(rescalers)))
    mine, their = load_file(os.path.join(ours, "model.safetensors")), load_file(os.path.join(theirs, "model.safetensors"))
    return max(float((mine[k].double() - their[k].double()).abs().max()) for k in mine)


def load():
    return os.getloadavg()[0]


def weight_files(root, names, kind):
    file = "model.safetensors" if kind == "model" else "fisher.safetensors"
    return [os.path.join(root, name, file) for name in names]


def warm(paths):
    buffer = bytearray(16 * 2**20)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def merges(root):
    """name -> (our merge.py arguments, files the merge reads, mergekit YAML or None)."""
    models = [os.path.join(root, f"ft{t}") for t in range(1, 5)]
    base = os.path.join(root, "base")
    reads = weight_files(root, ["base", "ft1", "ft2", "ft3", "ft4"], "model")
    yaml_models = "\n".join(f"  - model: {m}\n    parameters: {{weight: 1.0, density: {TIES_DENSITY}}}" for m in models)
    return {
        "task_arithmetic": (["--merge", "task_arithmetic", "--models", *models, "--ancestor", base, "--x:merge_lambda", "0.5"],
                            reads, f"merge_method: task_arithmetic\nbase_model: {base}\nparameters: {{lambda: 0.5}}\nmodels:\n"
                                   + yaml_models.replace(f", density: {TIES_DENSITY}", "")),
        "ties": (["--merge", "ties", "--models", *models, "--ancestor", base, "--x:density", str(TIES_DENSITY)],
                 reads, f"merge_method: ties\nbase_model: {base}\nmodels:\n" + yaml_models),
        "uncertainty_based_gradient_matching": (
            ["--merge", "uncertainty_based_gradient_matching", "--models", *models, "--ancestor", base,
             "--aux_data", *[os.path.join(root, f"fisher{t}") for t in range(1, 5)],
             "--ancestor_aux_data", os.path.join(root, "fisher0"), "--x:scaling_factors_ft", "112000,8530,67349,180000",
             "--x:scaling_factor_pt", "25000", "--x:delta_0", "1e-12"],
            reads + weight_files(root, [f"fisher{t}" for t in range(5)], "fisher"), None),
        **new_method_merges(models, base, reads),
    }


# The methods of issues 9 and 19: (our --x: parameters, mergekit's top-level parameters or None where mergekit
# lacks the method, how many of the four models it merges). WUDI runs 100 iterations: its target is per 100.
# FusionBench's algorithm for a method is benchmarks/fusion_bench_merge.py's ALGORITHMS entry of that name,
# with the same definition's parameters (task arithmetic λ 0.5, TIES 20 %, DARE p 0.5, the rest their defaults).
NEW_METHODS = {
    "model_stock": ([], {}, 4),
    "della": (["--x:density", "0.5", "--x:epsilon", "0.1"], {"density": 0.5, "epsilon": 0.1}, 4),
    "della_linear": (["--x:density", "0.5", "--x:epsilon", "0.1"], {"density": 0.5, "epsilon": 0.1}, 4),
    "sce": (["--x:select_topk", "0.5"], {"select_topk": 0.5}, 4),
    "dare_linear": (["--x:density", "0.5"], {"density": 0.5}, 4),
    "nuslerp": ([], {}, 2),
    "multislerp": ([], {}, 4),
    "karcher": ([], {}, 4),
    "nearswap": (["--x:t", "0.001"], {"t": 0.001}, 1),
    "arcee_fusion": ([], {}, 1),
    "ram": ([], {}, 4),
    "ramplus_tl": ([], {}, 4),
    "tsv_m": ([], None, 4),
    "iso_c": ([], None, 4),
    "iso_cts": ([], None, 4),
    "wudi": (["--x:iterations", "100"], None, 4),
    "magmax": ([], None, 4),
    "consensus": ([], None, 4),
    "emr": ([], None, 4),  # modulated merges: code/modulated_merge.py (unified model, masks, rescalers)
    "tall_masks": ([], None, 4),
    # issue 19 (FusionBench has no CART or PCB, and its KnOTS is only an alignment function for LoRA adapters, which
    # these full checkpoints are not; its TATR is CLIP's, run here in its data-free form)
    "cart": ([], None, 4),
    "pcb": ([], None, 4),
    "tatr": ([], None, 4),
    "lines_task_arithmetic": (["--x:lines_beta", "0.5"], None, 4),  # task arithmetic with LiNeS' layer scaling
}
# FusionBench's algorithm (fusion_bench_merge.py) where it computes the same merge; the max abs difference of the
# results is checked where the definitions match (TIES: FusionBench trims each task vector over the whole
# model at once, we per tensor as the paper and mergekit; TATR: FusionBench takes the conflict's quantile over the
# whole model, we per tensor; DARE draws its own random masks). FusionBench 0.2.33 has no consensus merging or PCB.
FUSION_BENCH_METHODS = {"task_arithmetic": "task_arithmetic", "ties": "ties", "dare_linear": "dare", "tsv_m": "tsv_m",
                        "iso_c": "iso_c", "iso_cts": "iso_cts", "wudi": "wudi", "magmax": "magmax",
                        "model_stock": "model_stock", "emr": "emr", "tall_masks": "tall_masks", "tatr": "tatr"}
DEFINITIONS_DIFFER = {"ties": "FB trims globally", "dare_linear": "random masks", "tatr": "global quantile"}
NO_BASE = ("karcher",)  # mergekit merges a base model as one more input there


def new_method_merges(models, base, reads):
    merges = {}
    for name, (parameters, mergekit_parameters, count) in NEW_METHODS.items():
        chosen = models[:count]
        ancestor = [] if name in NO_BASE else ["--ancestor", base]
        method = "task_arithmetic" if name == "lines_task_arithmetic" else name
        arguments = ["--merge", method, "--models", *chosen, *ancestor, *parameters]
        yaml_text = None
        if mergekit_parameters is not None:
            weight = ("\n    parameters: {weight: 1.0}"
                      if name in ("della", "della_linear", "dare_linear", "nuslerp", "multislerp") else "")
            yaml_text = (f"merge_method: {name}\n" + ("" if name in NO_BASE else f"base_model: {base}\n")
                         + f"parameters: {json.dumps(mergekit_parameters)}\nmodels:\n"
                         + "".join(f"  - model: {m}{weight}\n" for m in chosen))
        merges[name] = (arguments, reads if name not in NO_BASE else reads[1:], yaml_text)
    return merges


# Floating-point operations of a thin SVD of an m x n matrix with its singular vectors (Σ, U1, V), the cheaper
# of Golub-Reinsch's and R-SVD's counts (Golub & Van Loan, Matrix Computations, section 8.6).
def svd_flops(m, n):
    a, b = max(m, n), min(m, n)
    return min(14 * a * b * b + 8 * b ** 3, 6 * a * b * b + 20 * b ** 3)


def decomposition_flops(method, m, n, tasks=4, iterations=100, common_space_fraction=0.8):
    """What the exact definition of `method` (docs/merging.md) computes on one m x n matrix, at the
    least: its SVDs (task vectors, sums, and the polar factors of the stacked singular vectors) and the
    matrix products of its reconstruction; WUDI: one product with an n x n matrix per Adam step."""
    width = min(m, n)
    polar = svd_flops(m, width) + svd_flops(width, n)  # of the stacked U (m x width) and Vᵀ (width x n)
    if method == "iso_c":
        return svd_flops(m, n) + 2 * m * n * width
    if method == "tsv_m":
        return tasks * svd_flops(m, n) + polar + 2 * m * width * n
    if method == "iso_cts":
        common = int(common_space_fraction * width)
        return (tasks + 1) * svd_flops(m, n) + tasks * 4 * m * n * common + polar + 2 * m * width * n
    if method == "wudi":  # the Gram matrices once, then per step τG (or, if cheaper, (τ − τ_t)τ_tᵀτ_t per task)
        return tasks * m * n * n + iterations * 2 * m * n * min(n, 2 * tasks * m)
    return None


SORTING = ("della", "della_linear")  # rank every task-vector entry within its row, draw its keep decision


def matmul_rate(threads, size=2048):
    """Floating-point operations per second of a float32 matmul with `threads` torch threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(size, size)
        return 2 * size ** 3 / fastest(lambda: torch.mm(a, a))
    finally:
        torch.set_num_threads(previous)


def sort_rate(row=768, rows=2048):
    """Entries per second of sorting the rows of a matrix (NumPy's sort of 64-bit keys, as DELLA ranks)."""
    keys = np.random.default_rng(0).integers(0, 2 ** 62, size=(rows, row))
    return keys.size / fastest(lambda: np.sort(keys, axis=1))


def fastest(run, repeats=5):
    """The shortest of `repeats` timed runs (after one untimed): the rate the machine reaches when other
    processes leave it alone."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def lower_bound(method, shapes, threads, tasks):
    """(seconds, what) of the arithmetic `method` cannot do without on these tensors, or None."""
    if method in SORTING:  # and drawing a uniform number for each, from the seeded generator
        entries = tasks * sum(torch.Size(shape).numel() for shape in shapes.values())
        generator, size = torch.Generator().manual_seed(0), 1 << 22
        sorted_rate, drawn_rate = sort_rate(), size / fastest(lambda: torch.rand(size, generator=generator))
        return entries / sorted_rate + entries / drawn_rate, (
            f"sorting {entries / 1e6:.0f}M task-vector entries within their rows at {sorted_rate / 1e6:.0f}M/s and "
            f"drawing as many uniform numbers at {drawn_rate / 1e6:.0f}M/s")
    matrices = [shape for shape in shapes.values() if len(shape) == 2]
    if decomposition_flops(method, 2, 2) is None:
        return None
    flops = sum(decomposition_flops(method, m, n, tasks) for m, n in matrices)
    rate = matmul_rate(threads)
    return flops / rate, (f"{flops / 1e9:.0f} GFLOP of exact SVDs and matrix products on {len(matrices)} matrices at "
                          f"{rate / 1e9:.0f} GFLOP/s (float32 matmul, {threads} thread(s))")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="width and vocabulary relative to BERT-base")
    parser.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    parser.add_argument("--no_mergekit", action="store_true")
    parser.add_argument("--no_fusion_bench", action="store_true", help="leave out FusionBench's algorithms")
    parser.add_argument("--threads", type=int, nargs="+", default=[1],
                        help="torch thread counts (OMP_NUM_THREADS) to measure our merge with; mergekit runs with the largest")
    parser.add_argument("--repeats", type=int, default=3,
                        help="floor and merge measured alternately this many times per thread count (medians reported)")
    parser.add_argument("--methods", nargs="+",
                        choices=["task_arithmetic", "ties", "uncertainty_based_gradient_matching", *NEW_METHODS],
                        help="only these merges (default: all)")
    parser.add_argument("--device", default="cpu",
                        help="where the merges do their arithmetic (cpu or cuda), ours, FusionBench's (models loaded "
                             "there, its Lightning Fabric on it) and mergekit's (--cuda); the lower bounds stay the CPU's")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="merge_bench-", dir=args.workdir)
    try:
        start = time.perf_counter()
        shapes = make_inputs(root, args.scale)
        parameters = sum(torch.Size(s).numel() for s in shapes.values())
        checkpoint_bytes = os.path.getsize(os.path.join(root, "base", "model.safetensors"))
        print(f"inputs: 5 checkpoints + 5 Fishers of {parameters / 1e6:.1f}M parameters "
              f"({checkpoint_bytes / 2**20:.0f} MiB each), written in {time.perf_counter() - start:.0f} s to {root}")
        print(f"{os.cpu_count()} CPUs, load average {load():.1f} before the measurements")
        have_mergekit = shutil.which("mergekit-yaml") is not None and not args.no_mergekit
        have_fusion_bench = os.path.isdir(os.path.join(FUSION_BENCH, "fusion_bench")) and not args.no_fusion_bench
        rows = []
        for name, (arguments, reads, yaml_text) in merges(root).items():
            if args.methods and name not in args.methods:
                continue
            warm(reads)
            fusion_bench = FUSION_BENCH_METHODS.get(name) if have_fusion_bench else None
            for threads in args.threads:
                floors, ours, theirs, mergekit, loads, difference = [], [], [], [], [], None
                for repeat in range(args.repeats):  # alternately, so that changes in the load hit all alike
                    floors.append(io_floor(reads, root, checkpoint_bytes))
                    ours.append(our_merge(arguments, root, name, threads, args.device, keep=fusion_bench and repeat == 0))
                    if fusion_bench:
                        theirs.append(fusion_bench_merge(fusion_bench, root, name, threads, args.device, keep=repeat == 0))
                        if repeat == 0 and theirs[0] is not None and name not in DEFINITIONS_DIFFER:
                            difference = max_abs_difference(ours[0][3], theirs[0][2], name)
                        shutil.rmtree(ours[-1][3] or "-", ignore_errors=True)
                        if theirs[-1] is None:  # it fails: once is enough
                            fusion_bench = None
                        else:
                            shutil.rmtree(theirs[-1][2] or "-", ignore_errors=True)
                    if have_mergekit and yaml_text and threads == max(args.threads):
                        mergekit.append(mergekit_merge(yaml_text, root, name, threads, args.device))
                    loads.append(load())
                theirs = [t for t in theirs if t is not None]
                row = dict(method=name, threads=threads, floor=median(floors), loop=median(o[0] for o in ours),
                           wall=median(o[1] for o in ours), rss=max(o[2] for o in ours),
                           fb_wall=median(t[0] for t in theirs) if theirs else None,
                           fb_rss=max(t[1] for t in theirs) if theirs else None,
                           fb_failed=FUSION_BENCH_METHODS.get(name) is not None and have_fusion_bench and not theirs,
                           mk_wall=median(m[0] for m in mergekit) if mergekit else None,
                           mk_rss=max(m[1] for m in mergekit) if mergekit else None, difference=difference,
                           load=median(loads), floors=floors, loops=[o[0] for o in ours], walls=[o[1] for o in ours],
                           fb_walls=[t[0] for t in theirs], mk_walls=[m[0] for m in mergekit])
                rows.append(row)
                print(json.dumps(row))
        print_table(rows, checkpoint_bytes, max(args.threads), shapes)
        print_peer_table(rows)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def verdict(met):
    return "met" if met else "NOT MET"


def print_table(rows, checkpoint_bytes, mergekit_threads, shapes):
    mib, limit = 2**20, 2 * checkpoint_bytes
    print()
    print(f"{'method':<36} {'thr':>3} {'loop s':>7} {'floor s':>8} {'loop/floor':>10} {'wall s':>7} {'mergekit s':>10} "
          f"{'RSS MiB':>8} {'mergekit RSS':>12} {'load':>5}")
    for r in rows:
        mk_wall = f"{r['mk_wall']:.1f}" if r["mk_wall"] else "n/a"
        mk_rss = f"{r['mk_rss'] / mib:.0f}" if r["mk_rss"] else "n/a"
        print(f"{r['method']:<36} {r['threads']:>3} {r['loop']:>7.2f} {r['floor']:>8.2f} {r['loop'] / r['floor']:>10.2f} "
              f"{r['wall']:>7.1f} {mk_wall:>10} {r['rss'] / mib:>8.0f} {mk_rss:>12} {r['load']:>5.1f}")
    print(f"\nloop: our merge loop (read, check, merge, write every tensor); wall: the whole program, start-up and "
          f"imports included;\nfloor: reading the same inputs and writing an output-sized file; medians of alternate "
          f"runs; RSS: the largest;\nmergekit: with {mergekit_threads} thread(s); load: the 1-minute load average "
          f"(other processes share the CPUs).\n")
    print("targets:")
    for r in rows:
        where = f"{r['method']} ({r['threads']} thread{'s' if r['threads'] > 1 else ''})"
        print(f"  {where:<52} loop {r['loop'] / r['floor']:.2f}x floor (<= 1.5x): {verdict(r['loop'] <= 1.5 * r['floor']):<8}"
              f"  wall {r['wall']:.1f} s vs mergekit "
              + (f"{r['mk_wall']:.1f} s: {verdict(r['wall'] < r['mk_wall']):<8}" if r["mk_wall"] else "n/a: n/a     ")
              + f"  RSS {r['rss'] / mib:.0f} MiB vs 2 checkpoints {limit / mib:.0f} MiB: {verdict(r['rss'] < limit)}")
    task_arithmetic = {r["threads"]: r for r in rows if r["method"] == "task_arithmetic"}
    for r in rows:
        if r["method"] in NEW_METHODS and r["threads"] in task_arithmetic:
            reference = task_arithmetic[r["threads"]]
            ratio, wall_ratio = r["loop"] / reference["loop"], r["wall"] / reference["wall"]
            print(f"  {r['method']:<52} loop {ratio:.1f}x task arithmetic's (<= 3x): {verdict(ratio <= 3):<8}"
                  f"  whole program {wall_ratio:.1f}x task arithmetic's (<= 3x): {verdict(wall_ratio <= 3)}")
            if ratio > 3:
                print_lower_bound(r, reference["loop"], shapes)


def shown(value, digits, missing="n/a"):
    return missing if value is None else f"{value:.{digits}f}"


def ratio(numerator, denominator):
    return f"{numerator / denominator:.2f}" if numerator and denominator else "n/a"


def print_peer_table(rows):
    """Ours against FusionBench's algorithm and mergekit, whole processes; with the targets of issue 18."""
    mib = 2**20
    print(f"\n{'method':<24} {'thr':>3} {'ours s':>7} {'FB s':>7} {'ratio':>6} {'ours MiB':>8} {'FB MiB':>7} {'ratio':>6} "
          f"{'mergekit s':>10} {'mk MiB':>7} {'max |diff|':>17} {'load':>5}")
    for r in rows:
        fb = "fails" if r["fb_failed"] else "n/a"
        difference = (f"{r['difference']:.1e}" if r["difference"] is not None
                      else DEFINITIONS_DIFFER.get(r["method"], "n/a") if r["fb_wall"] else "n/a")
        fb_wall = shown(r["fb_wall"], 1, fb)
        fb_rss, mk_rss = shown(r["fb_rss"] and r["fb_rss"] / mib, 0, fb), shown(r["mk_rss"] and r["mk_rss"] / mib, 0)
        print(f"{r['method']:<24} {r['threads']:>3} {r['wall']:>7.1f} {fb_wall:>7} {ratio(r['wall'], r['fb_wall']):>6} "
              f"{r['rss'] / mib:>8.0f} {fb_rss:>7} {ratio(r['rss'], r['fb_rss']):>6} {shown(r['mk_wall'], 1):>10} "
              f"{mk_rss:>7} {difference:>17} {r['load']:>5.1f}")
    print("\nwhole processes (start-up, loading, merging, writing), medians of interleaved runs (ours, FusionBench, "
          "mergekit, ...);\nMiB: peak resident memory (the child's rusage); max |diff|: the largest absolute "
          "difference of our merged tensors and FusionBench's.\ntargets: ours <= 0.5x FusionBench's time and <= 1/3 of "
          "its peak memory; ours <= mergekit's time")
    for r in rows:
        verdicts = []
        if r["fb_wall"]:
            verdicts += [f"time {r['wall'] / r['fb_wall']:.2f}x FB (<= 0.5x): {verdict(r['wall'] <= 0.5 * r['fb_wall'])}",
                         f"memory {r['rss'] / r['fb_rss']:.2f}x FB (<= 0.33x): {verdict(3 * r['rss'] <= r['fb_rss'])}"]
        if r["mk_wall"]:
            verdicts.append(f"time {r['wall'] / r['mk_wall']:.2f}x mergekit (<= 1x): {verdict(r['wall'] <= r['mk_wall'])}")
        if verdicts:
            print(f"  {r['method']:<24} " + "; ".join(verdicts))


def print_lower_bound(row, task_arithmetic_loop, shapes):
    """Why a method misses 3x task arithmetic: the time its arithmetic takes at this machine's rates."""
    method, tasks = row["method"], NEW_METHODS[row["method"]][2]
    target = 3 * task_arithmetic_loop
    if method == "sce":
        print(f"    {'':<50} three passes over every tensor (variance selection, float64 energies of the selected "
              f"entries, sign-agreeing merge), task arithmetic one")
        return
    bound = lower_bound(method, shapes, row["threads"], tasks)
    if bound is None:
        print(f"    {'':<50} no arithmetic lower bound above the target known: the loop itself is slow")
        return
    seconds, what = bound
    if method in SORTING:  # it also reads, checks, combines and writes every tensor, as task arithmetic does
        seconds += task_arithmetic_loop
        what += f", on top of task arithmetic's own loop ({task_arithmetic_loop:.1f} s)"
    print(f"    {'':<50} lower bound {seconds:.1f} s (3x task arithmetic: {target:.1f} s): {what}")


if __name__ == "__main__":
    main()
