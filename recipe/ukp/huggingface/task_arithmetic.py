"""`TaskArithmeticJob(code_root, pretrained_model, finetuned_models, scaling_factor, ...)` and
`UncertaintyBasedGradientMatchingJob(code_root, pretrained_model, finetuned_models, pretrained_fisher,
finetuned_fishers, delta_0, ...)` as the authors' configs call them: the paper's own command lines
(`code_root/task_arithmetic.py`, `code_root/uncertainty_based_gradient_matching.py`). Output: `out_model_path`."""
from model_merging import merge
from ukp.huggingface import AuthorsSignature, gpus


class TaskArithmeticJob(AuthorsSignature, merge.TaskArithmeticJob):
    def __init__(self, code_root, pretrained_model, finetuned_models, scaling_factor=1.0, task_type="SEQ_CLS", *,
                 time_rqmt=1, mem_rqmt=4, cpu_rqmt=1, gpu_rqmt=None, gpumem=None, dummy=None):
        super().__init__(pretrained_model, finetuned_models, scaling_factor, task_type, time_rqmt=time_rqmt,
                         mem_rqmt=mem_rqmt, cpu_rqmt=cpu_rqmt, gpu_rqmt=gpus(gpu_rqmt, gpumem))
        self.code_root = code_root


class UncertaintyBasedGradientMatchingJob(AuthorsSignature, merge.UncertaintyBasedGradientMatchingJob):
    """Fishers are statistics folders (HuggingfaceSearchJob.out_checkpoints_dir of a Fisher method)."""

    def __init__(self, code_root, pretrained_model, finetuned_models, pretrained_fisher, finetuned_fishers, delta_0,
                 task_type="SEQ_CLS", scaling_factor=1.0, scaling_factor_pretrained=1.0, scaling_factors_finetuned=(),
                 *, time_rqmt=1, mem_rqmt=4, cpu_rqmt=1, gpu_rqmt=None, gpumem=None, dummy=None):
        super().__init__(pretrained_model, finetuned_models, pretrained_fisher, finetuned_fishers, delta_0, task_type,
                         scaling_factor, scaling_factor_pretrained, scaling_factors_finetuned, time_rqmt=time_rqmt,
                         mem_rqmt=mem_rqmt, cpu_rqmt=cpu_rqmt, gpu_rqmt=gpus(gpu_rqmt, gpumem))
        self.code_root = code_root
