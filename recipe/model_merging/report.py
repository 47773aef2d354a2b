"""Tables and plots comparing models (`code/report.py`)."""
from sisyphus import Task

from model_merging.program_job import ProgramJob


class ReportJob(ProgramJob):
    """Accuracy table (Markdown, CSV) and plots (PNG) of evaluated models.

    results: {model label: {task: metrics.json Path}} — e.g. EvaluationJob.out_metric_file;
    sweeps: optional {method label: {scaling factor: {task: metrics.json Path}}}, drawn as average accuracy
    against the scaling factor;
    own_models: optional {task: label of the task's own fine-tuned model}: normalized accuracy (normalized.csv/png);
    multitask: optional label of the multitask model: each model's gap to it;
    held_in: optional {label of a merged model: [tasks the models that went into the merge were trained on]}:
    the other tasks are its held-out tasks (averages apart, generalization.png).
    The three are left out of the job id while None, so reports made without them keep their ids.
    """
    __sis_hash_exclude__ = {"own_models": None, "multitask": None, "held_in": None}

    program_name = "report.py"
    config_name = "report_config.json"
    threads_key = None  # tables and plots: no torch arithmetic

    def __init__(self, results, sweeps=None, title=None, *, own_models=None, multitask=None, held_in=None,
                 time_rqmt=0.1, mem_rqmt=1, cpu_rqmt=1, gpu_rqmt=0):
        super().__init__(time_rqmt=time_rqmt, mem_rqmt=mem_rqmt, cpu_rqmt=cpu_rqmt, gpu_rqmt=gpu_rqmt)
        self.results = results
        self.sweeps = sweeps
        self.title = title
        self.own_models, self.multitask, self.held_in = own_models, multitask, held_in
        self.out_dir = self.output_path("report")
        self.out_table_md = self.output_path("report/results.md")
        self.out_table_csv = self.output_path("report/results.csv")
        self.out_plot = self.output_path("report/accuracy.png")
        if own_models:
            self.out_normalized_csv = self.output_path("report/normalized.csv")
            self.out_normalized_plot = self.output_path("report/normalized.png")
        if any(set(results[label]) - set(tasks) for label, tasks in (held_in or {}).items()):
            self.out_generalization_plot = self.output_path("report/generalization.png")
        if sweeps:
            self.out_sweep_csv = self.output_path("report/sweep.csv")
            self.out_sweep_plot = self.output_path("report/sweep.png")

    def config(self):
        sweeps = None
        if self.sweeps:
            sweeps = {method: {str(factor): by_task for factor, by_task in by_factor.items()}
                      for method, by_factor in self.sweeps.items()}
        return {"results": self.results, "sweeps": sweeps, "title": self.title, "output_dir": self.out_dir,
                "own_models": self.own_models, "multitask": self.multitask,
                "held_in": {label: list(tasks) for label, tasks in self.held_in.items()} if self.held_in else None}

    def tasks(self):
        yield Task("create_files", mini_task=True)
        yield Task("run", mini_task=True)
