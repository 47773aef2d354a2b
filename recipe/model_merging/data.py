"""Materialise a dataset to disk, so later jobs read it from the job folder instead of a hub or a
shared data folder."""
from model_merging.program_job import ProgramJob


class DownloadDatasetJob(ProgramJob):
    """Writes `out_dir/<split>.jsonl` (the columns of `task_type`: `text`/`label` by default) for each split of
    `dataset_name`; `columns` maps a column of the task type to the data set's name for it. Images are copied
    into `out_dir/images/`, class names into `out_dir/class_names.json`.

    `out_dir` is itself a dataset name the other programs accept (a folder of `<split>.jsonl`).
    """

    # The task type and columns were added later: at their defaults they leave the job ids as they were.
    __sis_hash_exclude__ = {"task_type": "sequence_classification", "columns": None, "input_template": None,
                            "class_words": None}

    program_name = "download_data.py"
    config_name = "download_config.json"
    threads_key = None  # writes rows and copies images: no torch arithmetic

    def __init__(self, dataset_name, splits=("train", "validation", "test"), data_dir=None, *,
                 task_type="sequence_classification", columns=None, input_template=None, class_words=None,
                 time_rqmt=1, mem_rqmt=2, cpu_rqmt=1, gpu_rqmt=0):
        super().__init__(time_rqmt=time_rqmt, mem_rqmt=mem_rqmt, cpu_rqmt=cpu_rqmt, gpu_rqmt=gpu_rqmt)
        self.dataset_name = dataset_name
        self.task_type = task_type
        self.columns = columns
        self.input_template = input_template
        self.class_words = class_words
        self.splits = list(splits)
        self.data_dir = data_dir
        self.out_dir = self.output_path("data")

    def config(self):
        return {"dataset_name": self.dataset_name, "splits": self.splits, "data_dir": self.data_dir,
                "task_type": self.task_type, "columns": self.columns, "input_template": self.input_template,
                "class_words": self.class_words, "output_dir": self.out_dir}
