"""Tables and plots comparing models (`code/report.py`)."""
from sisyphus import Task

from model_merging import selection
from model_merging.program_job import ProgramJob
from model_merging.search import read_accuracy


class ReportJob(ProgramJob):
    """Accuracy table (Markdown, CSV) and plots (PNG) of evaluated models.

    results: {model label: {task: metrics.json Path}} — e.g. EvaluationJob.out_metric_file;
    sweeps: optional {method label: {scaling factor: {task: metrics.json Path}}}, drawn as average accuracy
    against the scaling factor;
    own_models: optional {task: label of the task's own fine-tuned model}: normalized accuracy (normalized.csv/png);
    multitask: optional label of the multitask model: each model's gap to it;
    held_in: optional {label of a merged model: [tasks the models that went into the merge were trained on]}:
    the other tasks are its held-out tasks (averages apart, generalization.png);
    choices: optional {method label: {"parameter": name or None, "per_task": bool, "test": {value: {task:
    metrics.json}}, "validation": {value: {task: metrics.json}} (empty for one value)}}: each method is reported
    at its setting best on validation (model_merging.selection; a per-task method at each task's own), labelled
    with it; `held_in` may name the method by its label.
    The four are left out of the job id while None, so reports made without them keep their ids.
    """
    __sis_hash_exclude__ = {"own_models": None, "multitask": None, "held_in": None, "choices": None}

    program_name = "report.py"
    config_name = "report_config.json"
    threads_key = None  # tables and plots: no torch arithmetic

    def __init__(self, results, sweeps=None, title=None, *, own_models=None, multitask=None, held_in=None,
                 choices=None, time_rqmt=0.1, mem_rqmt=1, cpu_rqmt=1, gpu_rqmt=0):
        super().__init__(time_rqmt=time_rqmt, mem_rqmt=mem_rqmt, cpu_rqmt=cpu_rqmt, gpu_rqmt=gpu_rqmt)
        self.results = results
        self.sweeps = sweeps
        self.title = title
        self.own_models, self.multitask, self.held_in = own_models, multitask, held_in
        self.choices = choices
        self.out_dir = self.output_path("report")
        self.out_table_md = self.output_path("report/results.md")
        self.out_table_csv = self.output_path("report/results.csv")
        self.out_plot = self.output_path("report/accuracy.png")
        if own_models:
            self.out_normalized_csv = self.output_path("report/normalized.csv")
            self.out_normalized_plot = self.output_path("report/normalized.png")
        if any(set(self.tasks_of(label)) - set(tasks) for label, tasks in (held_in or {}).items()):
            self.out_generalization_plot = self.output_path("report/generalization.png")
        if sweeps:
            self.out_sweep_csv = self.output_path("report/sweep.csv")
            self.out_sweep_plot = self.output_path("report/sweep.png")

    def tasks_of(self, label):
        """The tasks model or method `label` is evaluated on."""
        if label in self.results:
            return list(self.results[label])
        return list(next(iter(self.choices[label]["test"].values())))

    def config(self):
        results, names = dict(self.results), {}
        for label, choice in (self.choices or {}).items():
            names[label], results[names[label]] = chosen_setting(label, choice)
        held_in = None
        if self.held_in:
            held_in = {names.get(label, label): list(tasks) for label, tasks in self.held_in.items()}
        sweeps = None
        if self.sweeps:
            sweeps = {method: {str(factor): by_task for factor, by_task in by_factor.items()}
                      for method, by_factor in self.sweeps.items()}
        return {"results": results, "sweeps": sweeps, "title": self.title, "output_dir": self.out_dir,
                "own_models": self.own_models, "multitask": self.multitask, "held_in": held_in}

    def tasks(self):
        yield Task("create_files", mini_task=True)
        yield Task("run", mini_task=True)


def chosen_setting(label, choice):
    """(report label, {task: test metrics.json}) of method `label` at its setting best on the validation
    metrics of `choice` (an entry of ReportJob's `choices`)."""
    test, parameter = choice["test"], choice["parameter"]
    if len(test) == 1:
        (value, by_task), = test.items()
        return selection.setting_label(label, parameter, value), by_task
    accuracies = {value: {task: read_accuracy(metrics) for task, metrics in by_task.items()}
                  for value, by_task in choice["validation"].items()}
    if not choice["per_task"]:
        value = selection.best_value(accuracies)
        return selection.setting_label(label, parameter, value), test[value]
    chosen = selection.best_per_task(accuracies, next(iter(test.values())))
    by_task = {task: test[value][task] for task, value in chosen.items()}
    return selection.per_task_label(label, parameter, chosen), by_task

