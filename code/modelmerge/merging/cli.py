"""What the merge programs under code/ share: one-line errors with exit status 2, argument types, the
`--threads` argument, the `--x:NAME VALUE` method parameters, the paper scripts' common arguments, the
task-data arguments of the data-aware merges, and the method list for --help."""
import argparse
import logging
import os
import sys

from modelmerge.atomic import OutputError, release_outputs
from modelmerge.io.formats import CheckpointError
from modelmerge.io.shards import parse_size
from modelmerge.merging.options import MergeError, Shard, check_device
from modelmerge.catalogue import methods_help  # noqa: F401  (the method list of the programs' --help)
from modelmerge.threads import check_threads


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (`error: ...`, exit status 2) instead of usage + error."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message}\n")


def run_cli(main, argv=None):
    """Run a merge program's `main(argv)` (which returns a summary with a `line()`): log to stderr, print
    the summary line; bad input becomes one message and exit status 2, and no output is left behind."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        summary = main(sys.argv[1:] if argv is None else argv)
    except (MergeError, CheckpointError, OutputError, OSError) as error:  # OSError: e.g. an output folder that cannot be written
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    finally:
        release_outputs()
    print(summary.line())
    return summary


def device_argument(text):
    """An argparse type: a torch device that exists here (cpu, cuda, cuda:N)."""
    try:
        return check_device(text)
    except MergeError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def shard_argument(text):
    """An argparse type: part I of N of a sharded merge, 'I/N'."""
    try:
        return Shard.parse(text)
    except MergeError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def threads_argument(text):
    """An argparse type: a number of torch threads, a whole number of at least 1."""
    try:
        return check_threads(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a whole number of at least 1, got {text!r}") from None


# The default of --threads where the program leaves torch's own: OpenMP's, which reads $OMP_NUM_THREADS.
TORCH_DEFAULT_THREADS = "$OMP_NUM_THREADS (as the Jobs set it), else one per core"
# The default of --threads in the programs that merge through modelmerge.merging.execute.
MERGE_DEFAULT_THREADS = "one, or $OMP_NUM_THREADS where set"


def add_threads_argument(parser, default):
    """--threads N: the torch threads on the CPU (modelmerge.threads); `default` says what None means."""
    parser.add_argument("--threads", type=threads_argument, metavar="N",
                        help=f"torch threads on the CPU, e.g. the cores the job was given (default: {default})")


def size_argument(text):
    """An argparse type: a size in bytes such as 5GB or 500MB."""
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def split_method_parameters(argv):
    """(the other arguments, {NAME: value or list of values}) from `--x:NAME VALUE...` / `--x:NAME=VALUE`."""
    rest, params, index = [], {}, 0
    while index < len(argv):
        token = argv[index]
        index += 1
        if not token.startswith("--x:"):
            rest.append(token)
            continue
        name, _, value = token[len("--x:"):].partition("=")
        values = [value] if value else []
        while not value and index < len(argv) and not argv[index].startswith("--"):
            values.append(argv[index])
            index += 1
        if not name or not values:
            raise MergeError(f"{token}: expected --x:NAME VALUE or --x:NAME=VALUE")
        if name in params:
            raise MergeError(f"--x:{name} is given more than once")
        params[name] = values[0] if len(values) == 1 else values
    return rest, params


def comma_list(text):
    """An argparse type: 'a,b,c' -> ['a', 'b', 'c'] (the released scripts' way of passing lists)."""
    return [item for item in text.split(",") if item]


def paper_script_parser(description):
    """The arguments both of the paper's released merge scripts take, with their names and defaults."""
    parser = ArgumentParser(description=description)
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="θ_0")
    parser.add_argument("--ft_model_name_or_paths", type=comma_list, required=True, help="θ_t, comma-separated")
    parser.add_argument("--out_model_path", required=True, help="output model folder")
    parser.add_argument("--scaling_factor", type=float, default=1.0, help="α")
    # The released scripts' model classes; the merge itself is the same for any.
    parser.add_argument("--task_type", default="SEQ_CLS", choices=("SEQ_CLS",))
    parser.add_argument("--device", default="cpu", help="where the arithmetic runs: cpu or cuda")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output not written by a merge")
    add_threads_argument(parser, MERGE_DEFAULT_THREADS)
    return parser


def add_task_data_arguments(parser, *, split, num_examples):
    """The arguments of the merges that run each task model on its own data set (RegMean++, AdaMerging):
    --datasets (one per model), --split (one for all, or one per data set), how much of each is used and
    how it is batched. `check_task_data_arguments` checks them after parsing."""
    parser.add_argument("--datasets", nargs="+", required=True, help="each task model's data set, same order")
    parser.add_argument("--split", nargs="+", default=[split], help="the split of each data set (one for all, or one per data set)")
    parser.add_argument("--num_examples", type=int, default=num_examples, help="first examples of each data set used")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--data_dir", default=os.environ.get("MERGE_DATA_DIR"), help="where the data sets are (default $MERGE_DATA_DIR)")


def check_task_data_arguments(parser, args):
    """Usage errors for the arguments of `add_task_data_arguments`; one --split becomes one per data set."""
    if len(args.split) not in (1, len(args.datasets)):
        parser.error(f"--split: give one split for all data sets or one per data set ({len(args.datasets)})")
    args.split = args.split * len(args.datasets) if len(args.split) == 1 else args.split
    if len(args.datasets) != len(args.models):
        parser.error(f"--datasets: got {len(args.datasets)} for {len(args.models)} models (one per model, same order)")
    if min(args.num_examples, args.batch_size, args.max_length) < 1:
        parser.error("--num_examples, --batch_size and --max_length must be at least 1")
