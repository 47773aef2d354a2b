"""Evaluation of a model on a dataset split (`code/predict.py`)."""
import json

from recipe.program_job import ProgramJob


class PredictJob(ProgramJob):
    """Runs `code/predict.py` with `method` on one model and one dataset split."""

    program_name = "predict.py"
    method = None

    def __init__(self, model, dataset_name, split, config=None, *, time_rqmt=1, mem_rqmt=4, cpu_rqmt=1, gpu_rqmt=0):
        super().__init__(time_rqmt=time_rqmt, mem_rqmt=mem_rqmt, cpu_rqmt=cpu_rqmt, gpu_rqmt=gpu_rqmt)
        self.model = model
        self.dataset_name = dataset_name
        self.split = split
        self.extra_config = dict(config or {})
        self.out_dir = self.output_path(self.output_name)
        self.declare_outputs()

    def declare_outputs(self):
        """Subclasses declare their outputs besides `out_dir` here (keeping `__init__`, and so the hash
        arguments, the same for every predict job)."""

    def config(self):
        return {"method": self.method, **self.extra_config, "model_name_or_path": self.model,
                "dataset_name": self.dataset_name, "split": self.split, "output_dir": self.out_dir}


class HuggingfaceSearchJob(PredictJob):
    """Accuracy, macro-F1 and per-example predictions of `model` on `dataset_name`/`split`.

    Outputs: `out_metric_file` (metrics.json), `out_predictions` (predictions.jsonl) and the variable
    `out_accuracy`, which async configs await to choose hyperparameters.
    """

    config_name = "search_config.json"
    output_name = "search"
    method = "sequence_classification"

    def declare_outputs(self):
        self.out_metric_file = self.output_path("search/metrics.json")
        self.out_predictions = self.output_path("search/predictions.jsonl")
        self.out_accuracy = self.output_var("accuracy")

    def run(self):
        super().run()
        with open(self.out_metric_file.get_path()) as f:
            self.out_accuracy.set(json.load(f)["accuracy"])
