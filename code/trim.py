"""The trimmed task vector of TIES (Yadav et al., "TIES-Merging", NeurIPS 2023) as a statistic:

    python code/trim.py --model M --ancestor P --density D --output OUT [--device cuda] [--threads N] [--overwrite]

writes OUT/trimmed.safetensors with the model's tensor names: for every floating-point tensor,
τ = θ − θ_0 with all but its top-`density` fraction of entries by magnitude set to 0 (ties at the
threshold are kept), in float32 (float64 for float64 models); and OUT/stats.json. `merge.py --merge ties
--aux_data OUT ...` then uses these instead of trimming again. M and P are anything the merge programs
read (model folders, bare .safetensors/.pt files). Tensors are read, trimmed and written one at a time;
OUT appears only once complete (see modelmerge.merging.trim).
"""
import argparse

from modelmerge.merging.cli import TORCH_DEFAULT_THREADS, ArgumentParser, add_threads_argument, device_argument, run_cli
from modelmerge.merging.trim import DENSITY_RANGE, write_trimmed
from modelmerge.threads import set_torch_threads


def density_fraction(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"the density must lie in {DENSITY_RANGE}, got {text}")
    return value


def parse_args(argv):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the fine-tuned model θ")
    parser.add_argument("--ancestor", required=True, help="the model θ_0 it was fine-tuned from")
    parser.add_argument("--density", type=density_fraction, required=True, help=f"fraction of entries kept per tensor, in {DENSITY_RANGE}")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--device", type=device_argument, default="cpu", help="where the arithmetic runs: cpu or cuda")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output not written by this program")
    add_threads_argument(parser, TORCH_DEFAULT_THREADS)
    return parser.parse_args(argv)


def main(argv):
    args = parse_args(argv)
    set_torch_threads(args.threads)
    return write_trimmed(args.model, args.ancestor, args.density, args.output, args.device, args.overwrite)


if __name__ == "__main__":
    run_cli(main)
