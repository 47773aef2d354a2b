"""`HuggingfaceTrainingJob(code_root, config, train_data_config, *, num_epochs, ...)` as the authors' configs call it."""
from model_merging import training
from ukp.huggingface import AuthorsSignature, gpus


class HuggingfaceTrainingJob(AuthorsSignature, training.HuggingfaceTrainingJob):
    """Fine-tunes with `code_root/train.py` on one JSON config: `config` (model, `method`, hyperparameters)
    and `train_data_config` (`dataset_name`, `dataset_config_name`, `dataset_train_split`,
    `dataset_val_split`) together, in the authors' key names (docs/programs.md). Outputs as
    `model_merging.training.HuggingfaceTrainingJob`: `out_best_model`, `out_models`, `out_checkpoints`.
    """

    def __init__(self, code_root, config, train_data_config, *, num_epochs=1, time_rqmt=4, mem_rqmt=8, cpu_rqmt=2,
                 gpu_rqmt=None, gpumem=None, dummy=None):
        super().__init__({**config, **train_data_config}, num_epochs=num_epochs, time_rqmt=time_rqmt,
                         mem_rqmt=mem_rqmt, cpu_rqmt=cpu_rqmt, gpu_rqmt=gpus(gpu_rqmt, gpumem))
        self.code_root = code_root
