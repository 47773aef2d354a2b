"""Task arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023) with the command line
of the released script of Daheim et al. (ICLR 2024):

    python code/task_arithmetic.py --pretrained_model_name_or_path P --ft_model_name_or_paths A,B \
        --scaling_factor 1.0 --task_type SEQ_CLS --out_model_path OUT [--threads N]

    θ = θ_0 + α Σ_t (θ_t − θ_0)

Streamed tensor by tensor by modelmerge.merging; OUT is a model folder with θ_0's config and tokenizer.
"""
from modelmerge.merging import MergeOptions, merge
from modelmerge.merging.cli import paper_script_parser, run_cli


def parse_args(argv):
    return paper_script_parser(__doc__.split("\n\n")[0]).parse_args(argv)


def main(argv):
    args = parse_args(argv)
    return merge(MergeOptions("task_arithmetic", args.ft_model_name_or_paths, args.out_model_path,
                              ancestor=args.pretrained_model_name_or_path, device=args.device,
                              params={"merge_lambda": args.scaling_factor}, overwrite=args.overwrite,
                              threads=args.threads))


if __name__ == "__main__":
    run_cli(main)
