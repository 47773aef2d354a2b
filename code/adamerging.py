"""AdaMerging (Yang et al., ICLR 2024): learn layer-wise merge coefficients by entropy minimisation on
unlabelled inputs of each task, then write the merged model and the coefficients (modelmerge.adamerging).

    python code/adamerging.py --ancestor P --models A B C --datasets sst2 rotten_tomatoes imdb --split validation \
        [--num_examples 64] [--iterations 100] [--learning_rate 1e-3] [--prior 0.3] [--batch_size 16] [--threads N] --output OUT

OUT is a model folder (θ(λ)) with adamerging.json: the coefficients per task and tensor, the entropy per step.
Labels of the data are not read. Sequence classification models.
"""
import json
import os
import time
from dataclasses import dataclass

import torch

from modelmerge.adamerging import AdaMerging, learn_coefficients, merged_state
from modelmerge.atomic import atomic_dir, claim_output
from modelmerge.catalogue import add_parameter_arguments, check_parameter_arguments
from modelmerge.data import load_split
from modelmerge.merging import MergeError
from modelmerge.merging.cli import (TORCH_DEFAULT_THREADS, ArgumentParser, add_task_data_arguments,
                                    add_threads_argument, check_task_data_arguments, device_argument, run_cli)
from modelmerge.prediction.loading import check_model_path, load_for_task
from modelmerge.threads import set_torch_threads


OUTPUT_KIND = "adamerging"


@dataclass
class Done:
    models: int
    first: float
    last: float
    seconds: float

    def line(self):
        return f"AdaMerging of {self.models} models: entropy {self.first:.4f} -> {self.last:.4f}, {self.seconds:.2f} s"


def parse_args(argv):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ancestor", required=True, help="θ_0")
    parser.add_argument("--models", nargs="+", required=True, help="the task models θ_t")
    add_task_data_arguments(parser, split="validation", num_examples=64)
    add_parameter_arguments(parser, AdaMerging)  # --iterations, --learning_rate, --prior
    parser.add_argument("--device", type=device_argument, default="cpu")
    parser.add_argument("--output", required=True, help="the merged model folder")
    parser.add_argument("--no_progress", action="store_true")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output another program wrote")
    add_threads_argument(parser, TORCH_DEFAULT_THREADS)
    args = parser.parse_args(argv)
    check_task_data_arguments(parser, args)
    check_parameter_arguments(parser, AdaMerging, args)
    return args


def input_batches(tokenizer, texts, batch_size, max_length, device):
    return [{k: v.to(device) for k, v in tokenizer(texts[i:i + batch_size], truncation=True, max_length=max_length,
                                                  padding=True, return_tensors="pt").items()}
            for i in range(0, len(texts), batch_size)]


def main(argv):
    args = parse_args(argv)
    set_torch_threads(args.threads)
    start = time.perf_counter()
    inputs = [args.ancestor, *args.models, *args.datasets]
    claim_output(args.output, OUTPUT_KIND, inputs=inputs, overwrite=args.overwrite)  # before any work
    try:
        for path in [args.ancestor, *args.models]:
            check_model_path(path, "--models/--ancestor")
        texts = [load_split(name, split, args.data_dir)["text"][: args.num_examples]
                 for name, split in zip(args.datasets, args.split)]
        model, tokenizer = load_for_task(args.ancestor)
    except ValueError as error:
        raise MergeError(str(error)) from None
    model.to(args.device)
    base = {n: p.detach() for n, p in model.named_parameters()}
    tasks = []
    for path in args.models:
        task_model, _ = load_for_task(path)
        params = {n: p.detach().to(args.device) for n, p in task_model.named_parameters()}
        if {n: p.shape for n, p in params.items()} != {n: p.shape for n, p in base.items()}:
            raise MergeError(f"--models: {path} has other parameters or shapes than the ancestor {args.ancestor}")
        tasks.append(params)
    batches = [input_batches(tokenizer, t, args.batch_size, args.max_length, args.device) for t in texts]
    torch.manual_seed(0)
    result = learn_coefficients(model, base, tasks, batches, iterations=args.iterations,
                                learning_rate=args.learning_rate, prior=args.prior, progress=not args.no_progress)
    state = merged_state(base, tasks, result)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            parameter.copy_(state[name])
    coefficients = {name: result.coefficients[:, k].tolist() for k, name in enumerate(result.names)}
    with atomic_dir(args.output, OUTPUT_KIND, inputs=inputs, overwrite=args.overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "adamerging.json"), "w") as f:
            json.dump({"models": args.models, "coefficients": coefficients, "entropy": result.entropy}, f, indent=2)
    return Done(len(args.models), result.entropy[0], result.entropy[-1], time.perf_counter() - start)


if __name__ == "__main__":
    run_cli(main)
