"""Task arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023) with the command line
of the released script of Daheim et al. (ICLR 2024):

    python code/task_arithmetic.py --pretrained_model_name_or_path P --ft_model_name_or_paths A,B \
        --scaling_factor 1.0 --task_type SEQ_CLS --out_model_path OUT

    θ = θ_0 + α Σ_t (θ_t − θ_0)

Streamed tensor by tensor by modelmerge.merge_driver; OUT is a model folder with θ_0's config and tokenizer.
"""
import argparse

from modelmerge.merge_driver import merge, run_program

TASK_TYPES = ("SEQ_CLS",)  # the released script's model classes; the merge itself is the same for any


def comma_list(text):
    return [item for item in text.split(",") if item]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="θ_0")
    parser.add_argument("--ft_model_name_or_paths", type=comma_list, required=True, help="θ_t, comma-separated")
    parser.add_argument("--out_model_path", required=True, help="output model folder")
    parser.add_argument("--scaling_factor", type=float, default=1.0, help="α")
    parser.add_argument("--task_type", default="SEQ_CLS", choices=TASK_TYPES)
    parser.add_argument("--device", default="cpu", help="where the arithmetic runs: cpu or cuda")
    return parser.parse_args(argv)


def main(argv):
    args = parse_args(argv)
    return merge("task_arithmetic", args.ft_model_name_or_paths, args.out_model_path,
                 ancestor=args.pretrained_model_name_or_path, device=args.device,
                 params={"merge_lambda": args.scaling_factor})


if __name__ == "__main__":
    run_program(main)
