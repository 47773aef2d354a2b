"""Materialise a dataset to disk, so later jobs read it from the job folder instead of a hub or a
shared data folder."""
from model_merging.program_job import ProgramJob


class DownloadDatasetJob(ProgramJob):
    """Writes `out_dir/<split>.jsonl` (`text`, `label`) for each split of `dataset_name`.

    `out_dir` is itself a dataset name the other programs accept (a folder of `<split>.jsonl`).
    """

    program_name = "download_data.py"
    config_name = "download_config.json"

    def __init__(self, dataset_name, splits=("train", "validation", "test"), data_dir=None, *,
                 time_rqmt=1, mem_rqmt=2, cpu_rqmt=1, gpu_rqmt=0):
        super().__init__(time_rqmt=time_rqmt, mem_rqmt=mem_rqmt, cpu_rqmt=cpu_rqmt, gpu_rqmt=gpu_rqmt)
        self.dataset_name = dataset_name
        self.splits = list(splits)
        self.data_dir = data_dir
        self.out_dir = self.output_path("data")

    def config(self):
        return {"dataset_name": self.dataset_name, "splits": self.splits, "data_dir": self.data_dir,
                "output_dir": self.out_dir}
