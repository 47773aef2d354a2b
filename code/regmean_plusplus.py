"""RegMean++: merge task models layer by layer with Gram matrices taken from the partly merged model
(modelmerge.regmean_plusplus), running each task's data through the model as it merges.

    python code/regmean_plusplus.py --models A B C --datasets sst2 rotten_tomatoes imdb --split train \
        [--num_examples 256] [--alpha 0.5] [--batch_size 16] [--max_length 128] [--data_dir DIR] \
        [--task_type T] [--threads N] --output OUT
"""
import time
from dataclasses import dataclass

import torch

from modelmerge.atomic import atomic_dir, claim_output
from modelmerge.catalogue import add_parameter_arguments, check_parameter_arguments
from modelmerge.data import load_split
from modelmerge.merging import MergeError
from modelmerge.merging.cli import (TORCH_DEFAULT_THREADS, ArgumentParser, add_task_data_arguments,
                                    add_threads_argument, check_task_data_arguments, device_argument, run_cli)
from modelmerge.prediction.loading import check_model_path, load_for_task
from modelmerge.regmean_plusplus import RegMeanPlusPlus, regmean_plusplus
from modelmerge.threads import set_torch_threads


OUTPUT_KIND = "regmean_plusplus"


@dataclass
class Done:
    models: int
    seconds: float

    def line(self):
        return f"RegMean++ of {self.models} models, {self.seconds:.2f} s"


def parse_args(argv):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", required=True, help="the task models θ_t")
    add_task_data_arguments(parser, split="train", num_examples=256)
    add_parameter_arguments(parser, RegMeanPlusPlus)  # --alpha
    parser.add_argument("--task_type", default="sequence_classification")
    parser.add_argument("--output", required=True, help="the merged model folder")
    parser.add_argument("--device", type=device_argument, default="cpu", help="where the models run: cpu or cuda")
    parser.add_argument("--no_progress", action="store_true")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output another program wrote")
    add_threads_argument(parser, TORCH_DEFAULT_THREADS)
    args = parser.parse_args(argv)
    check_task_data_arguments(parser, args)
    check_parameter_arguments(parser, RegMeanPlusPlus, args)
    return args


def main(argv):
    args = parse_args(argv)
    set_torch_threads(args.threads)
    start = time.perf_counter()
    inputs = [*args.models, *args.datasets]
    claim_output(args.output, OUTPUT_KIND, inputs=inputs, overwrite=args.overwrite)  # before any work
    try:
        for path in args.models:
            check_model_path(path, "--models")
        datasets = [load_split(name, split, args.data_dir, args.task_type) for name, split in zip(args.datasets, args.split)]
        loaded = [load_for_task(path, args.task_type) for path in args.models]
    except ValueError as error:
        raise MergeError(str(error)) from None
    models, tokenizer = [model.to(args.device) for model, _ in loaded], loaded[0][1]
    shapes = [{n: tuple(p.shape) for n, p in m.named_parameters()} for m in models]
    for path, other in zip(args.models[1:], shapes[1:]):
        if other != shapes[0]:
            raise MergeError(f"--models: {path} has other parameters or shapes than {args.models[0]}")
    torch.manual_seed(0)
    regmean_plusplus(models, tokenizer, datasets, alpha=args.alpha, progress=not args.no_progress,
                     batch_size=args.batch_size, max_length=args.max_length, num_examples=args.num_examples,
                     task_type=args.task_type)
    with atomic_dir(args.output, OUTPUT_KIND, inputs=inputs, overwrite=args.overwrite) as tmp:
        models[0].save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Done(len(models), time.perf_counter() - start)


if __name__ == "__main__":
    run_cli(main)
