"""Graph of a merging suite of any model family (`task_type`, docs families.md): one pretrained model θ_0
fine-tuned on every task, Fisher and Gram statistics of each task model (and the Fisher of θ_0, and TATR's
gradient magnitude of θ_0 on each task's data), every merge method of the library on the task models at each
setting of its grid, each merge evaluated on every task's validation and test splits (θ_0 and the task models
on the test splits), and a report of every method at its setting best on validation, as
config/merging_methods.py chooses.
config/vit_tasks.py and config/t5_tasks.py are its two users.

A suite preset holds: `name`, `task_type`, `model` (θ_0: a model id, a path or a tk.Path), `tasks` ({task:
{"dataset": name or tk.Path, "columns": {...} or None, "splits": {"train", "validation", "test", "statistics"},
"dataset_size": int}}), `training`, `statistics`, `evaluation` (program keys), `methods` ({label: a catalogue
entry with its "settings" and "parameters"}: `suite_methods`, model_merging.catalogue), `rqmt`;
optionally `pretraining` ({"dataset", "splits": {"train", "validation", "statistics"}, "num_epochs", "training":
keys over `training`}: θ_0 is `model` trained on it first, and H_0 is taken on its statistics split) and
`multitask` (True: a model trained on the union of the tasks' training splits is evaluated too, the usual
upper reference of merging) and `shards` ({"statistics": N, "evaluation": N}: each Fisher / Gram or evaluation job
split into N parallel shards over its examples, joined into the same outputs; default 1). A per-task method
(EMR-Merging, TALL masks) gives each task its own model, evaluated on that task only. `select` picks a family
config's preset by an environment variable; `CPU` and `GPU` are the resources of one job of each kind.
"""
import os

from sisyphus import tk

from model_merging.data import DownloadDatasetJob
from model_merging.pipeline import PerTaskModels, merge_method
from model_merging.program_job import ProgramJob
from model_merging.report import ReportJob
from model_merging.search import MultiTaskSearchJob
from model_merging.selection import setting_label
from model_merging.statistics import FisherJob, GradientMagnitudeJob, GramJob
from model_merging.training import HuggingfaceTrainingJob


CPU = {"time_rqmt": 1, "mem_rqmt": 4, "cpu_rqmt": 1, "gpu_rqmt": 0}
GPU = {"time_rqmt": 8, "mem_rqmt": 32, "cpu_rqmt": 4, "gpu_rqmt": 1}
# The α grids of the presets (catalogue.suite_methods), each with the α 0.3 the suites merged at before they chose
# on validation. Offline, on 2 CPU cores, three values (and three of each catalogue grid, points=3); 1.0 for the
# methods whose α is about one (TSV-M, Iso-C).
FULL_SCALING_FACTORS = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5)
OFFLINE_SCALING_FACTORS = (0.3, 0.6, 1.0)


def select(variable, presets, default="offline"):
    """The preset `presets[name]()` named by the environment variable `variable` (else `default`)."""
    name = os.environ.get(variable, default)
    if name not in presets:
        raise ValueError(f"{variable}={name!r}: expected one of {', '.join(presets)}")
    return presets[name]()


class OfflineSuiteJob(ProgramJob):
    """A small random model and synthetic tasks made on the spot (`code/make_offline_suite.py`): `out_model`
    (a model folder with its tokenizer / image processor) and `out_data[task]` (dataset folders)."""

    program_name = "make_offline_suite.py"
    config_name = "suite_config.json"
    threads_key = None  # a random initialisation and text rows: nothing worth threads

    def __init__(self, suite, tasks, *, seed=0, width=64, layers=2, time_rqmt=0.5, mem_rqmt=2, cpu_rqmt=1, gpu_rqmt=0):
        super().__init__(time_rqmt=time_rqmt, mem_rqmt=mem_rqmt, cpu_rqmt=cpu_rqmt, gpu_rqmt=gpu_rqmt)
        self.suite, self.seed, self.width, self.layers = suite, seed, width, layers
        self.out_dir = self.output_path("suite")
        self.out_model = self.output_path("suite/model")
        self.out_data = {task: self.output_path(f"suite/data/{task}") for task in tasks}

    def config(self):
        return {"suite": self.suite, "output_dir": self.out_dir, "seed": self.seed, "width": self.width,
                "layers": self.layers}


def family_keys(preset):
    return {"task_type": preset["task_type"]}


def download(preset):
    """task → dataset folder: Hub datasets are materialised (images included); folders made by a job are used as they are."""
    data = {}
    for task, spec in preset["tasks"].items():
        if isinstance(spec["dataset"], tk.Path):
            data[task] = spec["dataset"]
            continue
        splits = sorted({spec["splits"][k] for k in ("train", "validation", "test")})
        data[task] = DownloadDatasetJob(spec["dataset"], splits, task_type=preset["task_type"],
                                        columns=spec.get("columns"), input_template=spec.get("template"),
                                        class_words=spec.get("class_words"), **preset["rqmt"]["download"]).out_dir
    return data


def build_suite(preset):
    """({label: {task: metrics.json on the test splits}} of θ_0, every task model and every merge at each of its
    settings (labelled as model_merging.selection.setting_label), the report job): each method is merged at every
    value of its "settings", each evaluated on the validation and test splits, and the report shows each method
    at its setting best on validation (ReportJob's `choices`)."""
    data = download(preset)
    tasks = list(preset["tasks"])
    keys = family_keys(preset)
    pretrained, pretrained_stats = pretrain(preset, data)
    shards = preset.get("shards", {})
    statistics_options = {"shards": shards.get("statistics", 1), **preset["rqmt"]["statistics"]}
    models, fishers, grams, magnitudes = {}, {}, {}, {}
    for task in tasks:
        splits = preset["tasks"][task]["splits"]
        models[task] = train(preset, pretrained, [data[task]], [splits["train"]], [splits["validation"]], task)
        statistics = {**preset["statistics"], **keys}
        fishers[task] = FisherJob(models[task], data[task], splits["statistics"], statistics, **statistics_options).out_dir
        grams[task] = GramJob(models[task], data[task], splits["statistics"], statistics, **statistics_options).out_dir
        # TATR's gradient magnitude of task t: at θ_0, on task t's data
        magnitudes[task] = GradientMagnitudeJob(pretrained, data[task], splits["statistics"], statistics,
                                                **statistics_options).out_dir
    pretrained_fisher = FisherJob(pretrained, *pretrained_stats, {**preset["statistics"], **keys},
                                  **statistics_options).out_dir

    methods = preset["methods"]

    def merge(entry, parameters):
        initial = entry["initial"] and merge(methods[entry["initial"]], methods[entry["initial"]]["parameters"])
        return merge_method(entry, parameters, models, pretrained,
                            statistics={"fisher": fishers, "gram": grams,
                                        "gradient_magnitude": magnitudes}.get(entry["statistics"]),
                            ancestor_statistics=pretrained_fisher, initial=initial, rqmt=preset["rqmt"])

    evaluated = {"pretrained": pretrained, **{f"fine-tuned {t}": models[t] for t in tasks}}
    if preset.get("multitask"):
        evaluated["multitask"] = train(preset, pretrained, [data[t] for t in tasks],
                                       [preset["tasks"][t]["splits"]["train"] for t in tasks],
                                       [preset["tasks"][t]["splits"]["validation"] for t in tasks], "multitask")
    splits = {name: {task: (data[task], preset["tasks"][task]["splits"][name]) for task in tasks}
              for name in ("validation", "test")}

    def evaluate(model, split):
        """{task: metrics.json} of `model` (PerTaskModels: each task on its own model) on each task's `split`."""
        def search(model, datasets):
            return MultiTaskSearchJob(model, datasets, {**preset["evaluation"], **keys},
                                      shards=shards.get("evaluation", 1), **preset["rqmt"]["evaluation"])
        if isinstance(model, PerTaskModels):
            return {task: search(model.model(task), {task: splits[split][task]}).out_metric_files[task]
                    for task in tasks}
        return dict(search(model, splits[split]).out_metric_files)

    results = {label: evaluate(model, "test") for label, model in evaluated.items()}
    choices = {}
    for label, entry in methods.items():
        settings = {value: merge(entry, parameters) for value, parameters in entry["settings"].items()}
        choices[label] = {"parameter": entry["parameter"], "per_task": entry["kind"] == "per-task",
                          "test": {value: evaluate(model, "test") for value, model in settings.items()},
                          "validation": {value: evaluate(model, "validation") for value, model in settings.items()}
                          if len(settings) > 1 else {}}
        results.update({setting_label(label, entry["parameter"], value): by_task
                        for value, by_task in choices[label]["test"].items()})
    report = ReportJob({label: results[label] for label in evaluated}, choices=choices,
                       title=f"{preset['title']} ({preset['name']} preset)",
                       own_models={task: f"fine-tuned {task}" for task in tasks},
                       multitask="multitask" if preset.get("multitask") else None,
                       held_in={label: list(tasks) for label in methods})  # of every task's model: every task held in
    return results, report


def train(preset, model, datasets, train_splits, validation_splits, alias, *, training=None, num_epochs=None):
    """The best model of fine-tuning `model` on the datasets (several: their mixture) with the preset's keys."""
    config = {**preset["training"], **(training or {}), **family_keys(preset), "model_name_or_path": model,
              "dataset_name": datasets[0] if len(datasets) == 1 else list(datasets),
              "train_split": train_splits[0] if len(datasets) == 1 else list(train_splits),
              "validation_split": validation_splits[0] if len(datasets) == 1 else list(validation_splits)}
    job = HuggingfaceTrainingJob(config, num_epochs=num_epochs or preset["num_epochs"], **preset["rqmt"]["train"])
    job.add_alias(f"{preset['name']}/models/{alias}")
    return job.out_best_model


def pretrain(preset, data):
    """(θ_0, (dataset, split) of H_0): `model` trained on the preset's pretraining task if it has one, else
    `model` itself with the first task's statistics split."""
    spec = preset.get("pretraining")
    if spec is None:
        first = next(iter(preset["tasks"]))
        return preset["model"], (data[first], preset["tasks"][first]["splits"]["statistics"])
    splits = spec["splits"]
    model = train(preset, preset["model"], [spec["dataset"]], [splits["train"]], [splits["validation"]], "pretrained",
                  training=spec.get("training"), num_epochs=spec.get("num_epochs"))
    return model, (spec["dataset"], splits["statistics"])
