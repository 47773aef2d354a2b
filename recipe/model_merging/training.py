"""Fine-tuning with the Hugging Face Trainer (`code/train.py`)."""
from model_merging.program_job import ProgramJob
from model_merging.util import instantiate

MIXTURE_KEYS = ("dataset_name", "train_split", "validation_split")


class HuggingfaceTrainingJob(ProgramJob):
    """Fine-tunes `config['model_name_or_path']` as a model of the family `config['task_type']` (default
    sequence classification; modelmerge.families).

    `config` holds the keys of `code/train.py` (docs/programs.md): model, data, hyperparameters, `peft`;
    the job adds `output_dir` and `num_train_epochs`. Outputs: `out_checkpoints` (the folder of the Trainer's
    `checkpoint-<step>` folders, so an interrupted run resumes: `out_dir` itself, Hugging Face's layout),
    `out_models[k]` (model folder after epoch k), `out_best_model` (the epoch best on the validation
    metric), `out_trainer_state`; with `optimizer_name: "IVON"` also `out_posterior`, the posterior of
    out_best_model as a Fisher statistics folder (modelmerge.variational): a merge takes it where it takes a
    FisherJob's `out_dir`.
    """

    program_name = "train.py"
    config_name = "train_config.json"

    def __init__(self, config, *, num_epochs=1, time_rqmt=4, mem_rqmt=8, cpu_rqmt=2, gpu_rqmt=0):
        super().__init__(time_rqmt=time_rqmt, mem_rqmt=mem_rqmt, cpu_rqmt=cpu_rqmt, gpu_rqmt=gpu_rqmt)
        self.train_config = dict(config)
        self.num_epochs = num_epochs
        self.out_dir = self.output_path("training")
        self.out_checkpoints = self.out_dir
        self.out_models = {k: self.output_path(f"training/epoch-{k}") for k in range(1, num_epochs + 1)}
        self.out_best_model = self.output_path("training/best")
        self.out_trainer_state = self.output_path("training/trainer_state.json")
        if config.get("optimizer_name") == "IVON":
            self.out_posterior = self.output_path("training/posterior")

    def config(self):
        config = {**self.train_config, "output_dir": self.out_dir, "num_train_epochs": self.num_epochs}
        for key in MIXTURE_KEYS:  # a list of datasets (and of their splits) is a mixture: 'a;b;c'
            if isinstance(config.get(key), (list, tuple)):
                config[key] = ";".join(str(part) for part in instantiate(config[key]))
        return config
