"""One FusionBench 0.2.33 merge as its own program: load the models into a model pool as its configurations
do (`transformers.AutoModelForSequenceClassification.from_pretrained` for each folder), run the method's
algorithm class, save what it returns. merge_bench.py times this program against code/merge.py.

Runs with FusionBench's folder on the path (PYTHONPATH=$FUSION_BENCH_DIR) and imports nothing of this
project, so FusionBench's pins never meet ours.

    PYTHONPATH=~/.cache/modelmerge/fusion_bench-0.2.33 python benchmarks/fusion_bench_merge.py tsv_m \
        --pretrained BASE --models FT1 FT2 FT3 FT4 --output OUT [--device cuda] [--set iter_num=100]

The output: the merged model's folder (save_pretrained), or for the modulated methods one folder per task
(TALL masks: its retrieved models) or the modulated model's tensors (EMR: backbone and unified task
vector, masks and rescalers) in OUT/model.safetensors.
"""
import argparse
import json
import os
import time

# method -> (FusionBench's algorithm class, its arguments); merge_bench.py gives ours the same definitions
ALGORITHMS = {
    "task_arithmetic": ("fusion_bench.method.TaskArithmeticAlgorithm", {"scaling_factor": 0.5}),
    "ties": ("fusion_bench.method.TiesMergingAlgorithm",
             {"scaling_factor": 1.0, "threshold": 20, "remove_keys": [], "merge_func": "sum"}),
    "dare": ("fusion_bench.method.DareTaskArithmetic",
             {"scaling_factor": 1.0, "sparsity_ratio": 0.5, "only_on_linear_weights": False, "rescale": True}),
    "tsv_m": ("fusion_bench.method.TaskSingularVectorMerging", {}),
    "iso_c": ("fusion_bench.method.IsotropicMergingInCommonSubspace", {"scaling_factor": 1.0}),
    "iso_cts": ("fusion_bench.method.IsotropicMergingInCommonAndTaskSubspace",
                {"scaling_factor": 1.0, "common_space_fraction": 0.8}),
    "wudi": ("fusion_bench.method.WUDIMerging", {"iter_num": 100}),
    "magmax": ("fusion_bench.method.MagMaxAlgorithm", {"scaling_factor": 1.0}),
    "model_stock": ("fusion_bench.method.ModelStock", {}),
    "emr": ("fusion_bench.method.emr_merging.emr_merging.EMRMerging", {}),
    "tall_masks": ("fusion_bench.method.TallMaskTaskArithmeticAlgorithm", {"tall_mask_lambda": 0.6}),
    # its data-free form (zero_shot: |τ_i| for the gradients); its quantile is over the whole model, ours per tensor
    "tatr": ("fusion_bench.method.trust_region.clip_task_arithmetic.TaskArithmeticWithTrustRegionForCLIP",
             {"scaling_factor": 0.3, "threshold_quantile": 0.99, "max_samples": 1, "batch_size": 1, "zero_shot": True}),
}
# FusionBench 0.2.33 has no algorithm for consensus merging (only tall_mask.utils.construct_consensus_mask, which
# reads TALL masks saved by the authors' own repository, and no algorithm calls it) nor for PCB.


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("method", choices=sorted(ALGORITHMS))
    parser.add_argument("--pretrained", required=True)
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where the models are loaded and the algorithm's "
                                                        "Lightning Fabric runs")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON", help="override an algorithm argument")
    return parser.parse_args()


def model_pool(pretrained, models, device):
    from fusion_bench.modelpool import BaseModelPool

    def config(path):
        placed = {} if device == "cpu" else {"device_map": device}  # FusionBench's configurations load on the CPU
        return {"_target_": "transformers.AutoModelForSequenceClassification.from_pretrained",
                "pretrained_model_name_or_path": path, **placed}

    return BaseModelPool({"_pretrained_": config(pretrained),
                          **{f"model_{i + 1}": config(path) for i, path in enumerate(models)}})


def algorithm(method, device, overrides):
    import importlib

    import lightning

    where, arguments = ALGORITHMS[method]
    module, name = where.rsplit(".", 1)
    instance = getattr(importlib.import_module(module), name)(**{**arguments, **overrides})
    if hasattr(type(instance), "fabric"):  # the SVD and WUDI methods put their arithmetic on fabric.device
        instance.fabric = lightning.Fabric(accelerator=device, devices=1)
        instance.fabric.launch()
    return instance


def save(result, output):
    from safetensors.torch import save_file

    if isinstance(result, dict):  # TALL masks: {"models": {task: model}, "metadata": ...}
        for name, model in result["models"].items():
            model.save_pretrained(os.path.join(output, name))
    elif hasattr(result, "save_pretrained"):
        result.save_pretrained(output)
    else:  # EMR's modulated model: backbone, unified task vector, each task's masks and rescaler
        os.makedirs(output, exist_ok=True)
        tensors = {k: v.detach().cpu().clone() for k, v in result.state_dict().items()}  # some share storage
        save_file(tensors, os.path.join(output, "model.safetensors"))

def main():
    args = parse_args()
    start = time.perf_counter()
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    pool = model_pool(args.pretrained, args.models, args.device)
    result = algorithm(args.method, args.device, overrides).run(pool)
    save(result, args.output)
    print(f"fusion_bench {args.method}: {time.perf_counter() - start:.2f} s after imports of torch")


if __name__ == "__main__":
    main()
