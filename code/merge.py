"""Merge models, adapters or state dicts tensor by tensor with any method of modelmerge.methods.

    python code/merge.py --merge METHOD --models A B C [--aux_data a b c] [--ancestor P]
        [--ancestor_aux_data p] [--initial M] [--x:NAME VALUE ...] [--include REGEX] [--exclude REGEX]
        [--dtype float32] [--device cuda] [--threads N] [--allow_statistics_mismatch] --output OUT
    python code/merge.py --options merge.json [--output OUT]   (the same merge as JSON: what MergeJob writes)
    python code/merge.py --config merge.yml OUT        (mergekit's YAML format)
    python code/merge.py --merge METHOD ... --shard I/N --output PART_I    (part I of N, for I = 1..N)
    python code/merge.py --join PART_1 ... PART_N --output OUT   (the parts joined: the same OUT as unsharded)

Method parameters follow git-theta-merge-cli: `--x:merge_lambda 0.3` or `--x:merge_lambda=0.3`; a
per-model parameter takes one value per model (`--x:weight 0.2 0.8` or `--x:weight 0.2,0.8`) or one for all.
Every way builds one `MergeOptions` (modelmerge.merging.options: the JSON file holds its fields, `--aux_data`
is its `statistics`, `--ancestor_aux_data` its `ancestor_statistics`); --output, --shard, --device, --threads,
--no_progress, --overwrite and --max_shard_size given with --options replace the file's values.
`--merge lora-METHOD` merges LoRA adapters as weight changes B·A (see modelmerge.merging.frontend).
OUT ending in .safetensors is written as one bare file, else as a model (or adapter) folder. An existing
OUT is replaced only if a merge wrote it (or with --overwrite), never if it is or holds an input. A sharded
merge (modelmerge.merging.shards) splits the tensors into N parts balanced by the method's cost, each merged by
its own process into a part file; the join writes the checkpoint the unsharded merge writes, byte for byte.
See docs/merging.md for the methods and docs/programs.md for the files.
"""
import argparse

from modelmerge.merging import DTYPES, MergeOptions, join_parts, merge
from modelmerge.merging.cli import (MERGE_DEFAULT_THREADS, ArgumentParser, add_threads_argument, methods_help, run_cli,
                                    shard_argument, size_argument, split_method_parameters)

# The flags that say what is merged (a --config or --options file says it all), and those that say how and where.
MERGE_FLAGS = ("merge", "models", "aux_data", "ancestor", "ancestor_aux_data", "initial", "include", "exclude", "dtype",
               "lora_rank", "allow_statistics_mismatch")
RUN_FLAGS = {"output": "output", "shard": "shard", "device": "device", "threads": "threads",
             "max_shard_size": "max_shard_bytes", "overwrite": "overwrite"}


def parse_args(argv):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog="methods (--merge NAME) and their parameters (--x:NAME VALUE):\n" + methods_help()
                            + "\n\nmerges that run data through the models: code/regmean_plusplus.py (RegMean++), "
                              "code/adamerging.py (AdaMerging);\nEMR's and TALL's per-task masks and rescalers: "
                              "code/modulated_merge.py")
    parser.add_argument("--merge", help="merge method (a name from modelmerge.methods, or lora-NAME)")
    parser.add_argument("--models", nargs="+", help="models, adapters or state dicts to merge")
    parser.add_argument("--aux_data", nargs="+", help="statistics of each model, same order as --models")
    parser.add_argument("--ancestor", help="θ_0, the model the others were fine-tuned from")
    parser.add_argument("--ancestor_aux_data", help="statistics of the ancestor (e.g. H_0 for UBGM)")
    parser.add_argument("--initial", help="a model to start iterative methods from (MaTS)")
    parser.add_argument("--output", help="output folder, or a .safetensors file")
    parser.add_argument("--include", help="merge only tensors whose name matches this regex (re.search)")
    parser.add_argument("--exclude", help="copy tensors whose name matches this regex from the ancestor/first model")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="working and output precision (default: output in the ancestor's dtype, else the first "
                                                           "model's; arithmetic in the widest input's, at least float32)")
    parser.add_argument("--device", help="where the arithmetic runs: cpu (the default), cuda or cuda:N")
    add_threads_argument(parser, MERGE_DEFAULT_THREADS)
    parser.add_argument("--shard", type=shard_argument, metavar="I/N",
                        help="merge only part I of N of the tensors (balanced by the method's cost) into the part file --output")
    parser.add_argument("--join", nargs="+", metavar="PART", help="join the part files of a sharded merge into --output")
    parser.add_argument("--max_shard_size", type=size_argument, help="largest output shard, e.g. 2GB (default 5GB)")
    parser.add_argument("--lora_rank", type=int, help="rank of the adapter a lora- merge writes (default: largest input rank)")
    parser.add_argument("--config", help="a mergekit YAML configuration (then give OUT as the positional argument)")
    parser.add_argument("--options", metavar="JSON", help="the merge's options as a JSON file (as MergeJob writes it)")
    parser.add_argument("out", nargs="?", help="output path of a --config merge")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output that a merge did not write")
    parser.add_argument("--allow_statistics_mismatch", action="store_true",
                        help="merge statistics that record another model than the one they are paired with")
    rest, params = split_method_parameters(argv)
    args = parser.parse_args(rest)
    args.output = args.output or args.out
    if not (args.output or args.options):
        parser.error("give the output path (--output OUT, or OUT after --config)")
    for source, also in (("join", ("config", "options", "shard")), ("config", ("options", "shard")), ("options", ())):
        if getattr(args, source):
            conflicting = [flag for flag in MERGE_FLAGS + also if getattr(args, flag)]
            if conflicting or params:
                whence = {"join": "the parts", "config": "the YAML file", "options": "the JSON file"}[source]
                parser.error(f"--{source} takes everything from {whence}; drop --{', --'.join(conflicting) or 'x:...'}")
            break
    else:
        if not (args.merge and args.models):
            parser.error("give --merge METHOD and --models, or --config merge.yml, or --options merge.json")
    return args, params


def merge_options(args, params) -> MergeOptions:
    """The one MergeOptions of the command line: read from --options (the run flags given replacing the
    file's values), or built from the flags."""
    run = {field: getattr(args, flag) for flag, field in RUN_FLAGS.items() if getattr(args, flag)}
    if args.no_progress:
        run["progress"] = False
    if args.options:
        return MergeOptions.read(args.options, **run)
    return MergeOptions(
        args.merge, args.models, statistics=args.aux_data, ancestor=args.ancestor,
        ancestor_statistics=args.ancestor_aux_data, initial=args.initial, params=params, include=args.include,
        exclude=args.exclude, dtype=args.dtype and DTYPES[args.dtype], lora_rank=args.lora_rank,
        allow_statistics_mismatch=args.allow_statistics_mismatch, config=args.config, **run,
    )


def main(argv):
    args, params = parse_args(argv)
    if args.join:
        return join_parts(args.join, args.output, overwrite=args.overwrite)
    return merge(merge_options(args, params))


if __name__ == "__main__":
    run_cli(main)
