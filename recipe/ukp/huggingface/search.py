"""`HuggingfaceSearchJob(code_root, model_path, config, search_data_config, ...)` as the authors' configs call
it: evaluation, or a statistic such as the squared-gradient Fisher, by `config['method']`."""
from model_merging.program_job import ProgramJob
from ukp.huggingface import AuthorsSignature, gpus


class HuggingfaceSearchJob(AuthorsSignature, ProgramJob):
    """Runs `code_root/predict.py` on `model_path` with `config` and `search_data_config` (`dataset_name`,
    `dataset_config_name`, `dataset_test_split`) together as one config, in the authors' key names.

    Outputs: `out_checkpoints_dir` (the program's output folder; a Fisher method writes the statistics folder
    the merge jobs take there), `out_metric_file` (metrics.json of an evaluation), `out_prediction_file`.
    """

    program_name = "predict.py"
    config_name = "search_config.json"

    def __init__(self, code_root, model_path, config, search_data_config, *, time_rqmt=1, mem_rqmt=4, cpu_rqmt=1,
                 gpu_rqmt=None, gpumem=None, dummy=None):
        super().__init__(time_rqmt=time_rqmt, mem_rqmt=mem_rqmt, cpu_rqmt=cpu_rqmt, gpu_rqmt=gpus(gpu_rqmt, gpumem))
        self.code_root = code_root
        self.model_path = model_path
        self.search_config = {**config, **search_data_config}
        self.out_checkpoints_dir = self.output_path("search")
        self.out_metric_file = self.output_path("search/metrics.json")
        self.out_prediction_file = self.output_path("search/predictions.jsonl")

    def config(self):
        return {**self.search_config, "model_name_or_path": self.model_path, "output_dir": self.out_checkpoints_dir}
