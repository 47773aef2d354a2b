"""Uncertainty-based gradient matching (Daheim et al., "Model Merging by Uncertainty-Based Gradient
Matching", ICLR 2024) with the command line of the authors' released script:

    python code/uncertainty_based_gradient_matching.py --pretrained_model_name_or_path P \
        --pretrained_hessian_path H0 --ft_model_name_or_paths A,B --ft_hessian_paths HA,HB \
        --scaling_factors_ft 112000,8530 --scaling_factor_pt 25000 --scaling_factor 1.0 --delta_0 1e-12 \
        --task_type SEQ_CLS --out_model_path OUT [--threads N]

    θ = θ_0 + α Σ_t P ⊙ (c_t H_t + δ_0 + c_0 H_0) ⊙ (θ_t − θ_0),  P = 1 / (Σ_t α c_t H_t + c_0 H_0 + δ_0)

A Hessian path is a Fisher statistics folder (code/predict.py), its `hessian/` subfolder, or any checkpoint
with the model's tensor names. Defaults are the released script's (δ_0 = 0, c_0 = α = 1). The merge is
streamed tensor by tensor by modelmerge.merging; OUT is a model folder with θ_0's config and tokenizer.
"""
from modelmerge.merging import MergeError, MergeOptions, merge
from modelmerge.merging.cli import comma_list, paper_script_parser, run_cli


def parse_args(argv):
    parser = paper_script_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained_hessian_path", required=True, help="H_0: Fisher folder or its hessian/ subfolder")
    parser.add_argument("--ft_hessian_paths", type=comma_list, required=True, help="H_t, comma-separated, same order")
    parser.add_argument("--scaling_factors_ft", type=comma_list, required=True, help="c_t, comma-separated, same order")
    parser.add_argument("--delta_0", type=float, default=0.0, help="δ_0")
    parser.add_argument("--scaling_factor_pt", type=float, default=1.0, help="c_0")
    parser.add_argument("--allow_statistics_mismatch", action="store_true",
                        help="merge Hessians that record another model than the one they are paired with")
    return parser.parse_args(argv)


def main(argv):
    args = parse_args(argv)
    count = len(args.ft_model_name_or_paths)
    if len(args.ft_hessian_paths) != count:
        raise MergeError(f"--ft_hessian_paths: {len(args.ft_hessian_paths)} paths for {count} models in --ft_model_name_or_paths")
    if len(args.scaling_factors_ft) != count:
        raise MergeError(f"--scaling_factors_ft: {len(args.scaling_factors_ft)} values for {count} models in --ft_model_name_or_paths")
    return merge(MergeOptions(
        "uncertainty_based_gradient_matching", args.ft_model_name_or_paths, args.out_model_path,
        statistics=args.ft_hessian_paths, ancestor=args.pretrained_model_name_or_path,
        ancestor_statistics=args.pretrained_hessian_path, device=args.device,
        params={"scaling_factors_ft": args.scaling_factors_ft, "scaling_factor_pt": args.scaling_factor_pt,
                "scaling_factor": args.scaling_factor, "delta_0": args.delta_0},
        overwrite=args.overwrite, allow_statistics_mismatch=args.allow_statistics_mismatch, threads=args.threads,
    ))


if __name__ == "__main__":
    run_cli(main)
