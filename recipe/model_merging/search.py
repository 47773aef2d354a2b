"""Evaluation of a model on a dataset split (`code/predict.py`), and lm-evaluation-harness tasks on a causal LM
(`code/harness_eval.py`)."""
import json
import os

from sisyphus import Task, gs

from model_merging.program_job import ProgramJob
from model_merging.util import run_command, write_json, write_run_script


def read_accuracy(metrics_file):
    """The accuracy in `metrics_file` (predict.py's metrics.json)."""
    with open(metrics_file.get_path()) as f:
        return json.load(f)["accuracy"]


def set_accuracy(variable, metrics_file):
    """Store the accuracy in `metrics_file` (predict.py's metrics.json) in the tk.Variable `variable`."""
    variable.set(read_accuracy(metrics_file))


class PredictJob(ProgramJob):
    """Runs `code/predict.py` in its `mode` (evaluate, or a statistic) on one model and one dataset split.

    With `shards=N` (> 1) the examples are split into N consecutive slices, run as the N parallel task ids of the
    task `run_shard` (one array job on SLURM), each writing its part into work/part.<I>; the task `run` then joins
    the parts into the outputs the unsharded job writes (modelmerge.shards). A killed shard reruns alone.
    `shards` enters the job id only when it is not 1, so the ids of unsharded jobs stay as they were.
    """

    program_name = "predict.py"
    mode = None  # predict.py's mode, set by each subclass
    __sis_hash_exclude__ = {"shards": 1}

    def __init__(self, model, dataset_name, split, config=None, *, shards=1, time_rqmt=1, mem_rqmt=4, cpu_rqmt=1,
                 gpu_rqmt=0):
        super().__init__(time_rqmt=time_rqmt, mem_rqmt=mem_rqmt, cpu_rqmt=cpu_rqmt, gpu_rqmt=gpu_rqmt)
        if not isinstance(shards, int) or isinstance(shards, bool) or shards < 1:
            raise ValueError(f"shards must be a positive int, got {shards!r}")
        self.model = model
        self.dataset_name = dataset_name
        self.split = split
        self.extra_config = dict(config or {})
        self.shards = shards
        self.out_dir = self.output_path(self.output_name)
        self.declare_outputs()

    def tasks(self):
        if self.shards == 1:
            yield from super().tasks()
            return
        yield Task("create_files", mini_task=True)
        yield Task("run_shard", resume="run_shard", rqmt=self.rqmt, args=list(range(1, self.shards + 1)))
        yield Task("run", resume="run", rqmt=self.rqmt)

    def part_dir(self, index):
        return self._sis_path(os.path.join(gs.JOB_WORK_DIR, f"part.{index}"), abspath=True)

    def shard_config_file(self, index):
        return self._sis_path(os.path.join(gs.JOB_WORK_DIR, f"shard.{index}.json"), abspath=True)

    def shard_command(self, index):
        return [*self.program_command(self.program_name), self.shard_config_file(index)]

    def create_files(self):
        """Unsharded: the config and run.sh. Sharded: each shard's config (work/shard.<I>.json), as
        output/<config_name> the join of their parts, and run.sh running the shards, then the join."""
        if self.shards == 1:
            super().create_files()
            return
        parts = [self.part_dir(index) for index in range(1, self.shards + 1)]
        for index, part in enumerate(parts, 1):
            write_json(self.shard_config_file(index), {**self.program_config(), "output_dir": part,
                                                       "shard": f"{index}/{self.shards}"})
        write_json(self.out_config_file, {**self.program_config(), "join": parts})
        write_run_script(*(self.shard_command(index) for index in range(1, self.shards + 1)), self.command())

    def run_shard(self, index):
        run_command(self.shard_command(index), cpu=self.rqmt["cpu"])

    def declare_outputs(self):
        """Subclasses declare their outputs besides `out_dir` here (keeping `__init__`, and so the hash
        arguments, the same for every predict job)."""

    def config(self):
        return {"mode": self.mode, **self.extra_config, "model_name_or_path": self.model,
                "dataset_name": self.dataset_name, "split": self.split, "output_dir": self.out_dir}


class EvaluationJob(PredictJob):
    """The metrics (a classifier's accuracy and macro-F1; a sequence model's exact match, loss and perplexity) and
    per-example predictions of `model` on `dataset_name`/`split` (predict.py's mode `evaluate`). Named
    HuggingfaceSearchJob before 2026-12 (that name is now only the authors' signature, ukp.huggingface.search);
    its ids changed with the name (scripts/migrate_job_ids.py moves folders of the layout before
    recipe/model_merging/).

    Outputs: `out_metric_file` (metrics.json), `out_predictions` (predictions.jsonl) and the variable
    `out_accuracy`, which async configs await to choose hyperparameters.
    """

    config_name = "search_config.json"
    output_name = "search"
    mode = "evaluate"

    def declare_outputs(self):
        self.out_metric_file = self.output_path("search/metrics.json")
        self.out_predictions = self.output_path("search/predictions.jsonl")
        self.out_accuracy = self.output_var("accuracy")

    def run(self):
        super().run()
        set_accuracy(self.out_accuracy, self.out_metric_file)


class MultiTaskSearchJob(PredictJob):
    """The metrics of `model` on several datasets in one run (the model loaded once), as EvaluationJob's:
    `datasets` = {name: (dataset_name, split)}.

    Outputs per name: `out_metric_files[name]` (metrics.json), `out_predictions[name]`, and the variable
    `out_accuracies[name]`.
    """

    config_name = "search_config.json"
    output_name = "search"
    mode = "evaluate"

    def __init__(self, model, datasets, config=None, *, shards=1, time_rqmt=1, mem_rqmt=4, cpu_rqmt=1, gpu_rqmt=0):
        self.datasets = {name: tuple(spec) for name, spec in datasets.items()}
        super().__init__(model, None, None, config, shards=shards, time_rqmt=time_rqmt, mem_rqmt=mem_rqmt,
                         cpu_rqmt=cpu_rqmt, gpu_rqmt=gpu_rqmt)

    def declare_outputs(self):
        self.out_metric_files = {name: self.output_path(f"search/{name}/metrics.json") for name in self.datasets}
        self.out_predictions = {name: self.output_path(f"search/{name}/predictions.jsonl") for name in self.datasets}
        self.out_accuracies = {name: self.output_var(f"accuracy.{name}") for name in self.datasets}

    def config(self):
        evaluations = {name: {"dataset_name": dataset_name, "split": split}
                       for name, (dataset_name, split) in self.datasets.items()}
        return {"mode": self.mode, **self.extra_config, "model_name_or_path": self.model,
                "evaluations": evaluations, "output_dir": self.out_dir}

    def run(self):
        super().run()
        for name, metrics_file in self.out_metric_files.items():
            set_accuracy(self.out_accuracies[name], metrics_file)


class LmEvalJob(ProgramJob):
    """EleutherAI's lm-evaluation-harness on a causal LM (`code/harness_eval.py`): `tasks` are harness task names
    (their data from the Hub) or local task YAML files (str or tk.Path; a file's task is named as the file, without
    `.yaml`); the run is offline when every task is a file.

    Outputs: `out_dir`, `out_harness_dir` (the harness's results_<date>.json, as its --output_path writes it),
    `out_metric_file` (metrics.json: the mean accuracy over the tasks), per task `out_metric_files[task]`
    (metrics.json with `accuracy`, as predict.py's, for ReportJob) and the variable `out_accuracies[task]`.
    """

    program_name = "harness_eval.py"
    config_name = "harness_config.json"

    def __init__(self, model, tasks, num_fewshot=None, limit=None, batch_size=8, *, time_rqmt=1, mem_rqmt=4,
                 cpu_rqmt=1, gpu_rqmt=0):
        super().__init__(time_rqmt=time_rqmt, mem_rqmt=mem_rqmt, cpu_rqmt=cpu_rqmt, gpu_rqmt=gpu_rqmt)
        self.model, self.harness_tasks = model, list(tasks)  # not `tasks`: Job.tasks() lists the job's steps
        self.num_fewshot, self.limit, self.batch_size = num_fewshot, limit, batch_size
        self.out_dir = self.output_path("harness_eval")
        self.out_harness_dir = self.output_path("harness_eval/harness")
        self.out_metric_file = self.output_path("harness_eval/metrics.json")
        names = [self.task_name(task) for task in self.harness_tasks]
        self.out_metric_files = {name: self.output_path(f"harness_eval/metrics/{name}.json") for name in names}
        self.out_accuracies = {name: self.output_var(f"accuracy.{name}") for name in names}

    @staticmethod
    def task_name(task):
        """A harness task's name: a task file's name without .yaml, else the name itself."""
        path = task if isinstance(task, str) else task.get_path()
        name = os.path.basename(path)
        return os.path.splitext(name)[0] if name.endswith((".yaml", ".yml")) else path

    def config(self):
        return {"model_name_or_path": self.model, "tasks": self.harness_tasks, "num_fewshot": self.num_fewshot,
                "limit": self.limit, "batch_size": self.batch_size, "output_dir": self.out_dir}

    def run(self):
        super().run()
        for name, metrics_file in self.out_metric_files.items():
            set_accuracy(self.out_accuracies[name], metrics_file)
