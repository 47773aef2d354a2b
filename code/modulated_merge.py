"""Modulated merges (EMR-Merging, TALL masks): a unified model plus per-task masks and rescalers, and any
task's own model materialised from them (see modelmerge.modulated for the formulas and the files). Each takes
[--device cuda] [--threads N].

    python code/modulated_merge.py --merge emr --models A B C --ancestor P [--x:merge_lambda 1.0] --output OUT
    python code/modulated_merge.py --merge tall_masks --models A B C --ancestor P [--x:tall_mask_lambda 0.4,0.6,0.5] --output OUT
    python code/modulated_merge.py --materialise OUT --task 2 --ancestor P --output MODEL
"""
import argparse
import time
from dataclasses import dataclass

from modelmerge import modulated
from modelmerge.merging import MergeError, check_same_tensors
from modelmerge.merging.cli import (TORCH_DEFAULT_THREADS, ArgumentParser, add_threads_argument, device_argument,
                                    run_cli, split_method_parameters)
from modelmerge.merging.parameters import load_method, resolve_parameters
from modelmerge.threads import set_torch_threads


@dataclass
class Done:
    what: str
    seconds: float

    def line(self):
        return f"{self.what}, {self.seconds:.2f} s"


def parse_args(argv):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--merge", choices=modulated.MODULATED_METHODS, help="the modulated merge to write")
    parser.add_argument("--models", nargs="+", help="the task models θ_t (task t is the t-th, from 1)")
    parser.add_argument("--ancestor", required=True, help="θ_0")
    parser.add_argument("--materialise", metavar="MODULATED", help="a modulated merge folder to take one task's model from")
    parser.add_argument("--task", type=int, help="with --materialise: the task, 1..T")
    parser.add_argument("--output", required=True, help="the modulated merge folder, or the task's model folder")
    parser.add_argument("--device", type=device_argument, default="cpu", help="where the arithmetic runs: cpu or cuda")
    parser.add_argument("--no_progress", action="store_true")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output another program wrote")
    add_threads_argument(parser, TORCH_DEFAULT_THREADS)
    rest, params = split_method_parameters(argv)
    args = parser.parse_args(rest)
    if bool(args.merge) == bool(args.materialise):
        parser.error("give either --merge METHOD --models ... or --materialise MODULATED --task T")
    if args.merge and not args.models:
        parser.error("--merge needs --models")
    if args.materialise and (args.task is None or params):
        parser.error("--materialise needs --task and takes no --x: parameters")
    return args, params


def main(argv):
    args, params = parse_args(argv)
    set_torch_threads(args.threads)
    start = time.perf_counter()
    try:
        if args.materialise:
            modulated.materialise(args.materialise, args.ancestor, args.task, args.output, args.device,
                                  overwrite=args.overwrite)
            return Done(f"materialised task {args.task}", time.perf_counter() - start)
        method = load_method(args.merge)
        resolved = resolve_parameters(method, params, len(args.models))
        modulated.write(args.merge, args.models, args.ancestor, args.output, resolved, args.device,
                        progress=not args.no_progress, check=lambda c: check_same_tensors(c, "models and the ancestor"),
                        overwrite=args.overwrite)
    except ValueError as error:
        raise MergeError(str(error)) from None
    return Done(f"modulated merge ({args.merge}) of {len(args.models)} models", time.perf_counter() - start)


if __name__ == "__main__":
    run_cli(main)
