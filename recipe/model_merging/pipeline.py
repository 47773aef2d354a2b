"""Graph pieces the configs share: data, the pretrained model θ_0 and the task models θ_t with their
Fishers, the multitask model, any method of the catalogue merged (`merge_method`), and evaluation. Calling them
twice builds the same jobs (Sisyphus job singletons), so configs compose freely and a sweep reuses every earlier
job. A preset's optional `shards` ({"statistics": N, "evaluation": N}, default 1) runs each Fisher or evaluation
job as N shards over its examples."""
from dataclasses import dataclass

from sisyphus import tk

from model_merging.data import DownloadDatasetJob
from model_merging.merge import (MergeJob, TaskArithmeticJob, TaskDataMergeJob, UncertaintyBasedGradientMatchingJob,
                                 per_task_models)
from model_merging.search import MultiTaskSearchJob
from model_merging.statistics import FisherJob
from model_merging.training import HuggingfaceTrainingJob


@dataclass
class Experiment:
    preset: dict
    data: dict  # task -> dataset folder (tk.Path)
    pretrained: tk.Path  # θ_0
    pretrained_fisher: tk.Path  # H_0 (statistics folder: a FisherJob's, or θ_0's IVON posterior)
    models: dict  # task -> θ_t
    fishers: dict  # task -> H_t (as H_0)
    multitask: tk.Path


def all_tasks(preset):
    return [preset["pretraining"]["task"]] + list(preset["tasks"])


def download_data(preset):
    return {task: DownloadDatasetJob(task, data_dir=preset["data_dir"]).out_dir for task in all_tasks(preset)}


def train(preset, model, datasets, train_splits, validation_splits, learning_rate, alias, training=None):
    """The best model of `training_job`."""
    return training_job(preset, model, datasets, train_splits, validation_splits, learning_rate, alias,
                        training).out_best_model


def training_job(preset, model, datasets, train_splits, validation_splits, learning_rate, alias, training=None):
    """Fine-tune `model` on the mixture of `datasets` (one entry: a single task) with the preset's training keys,
    `training` (e.g. another optimizer's) over them."""
    config = {**preset["training"], **(training or {}), "model_name_or_path": model, "learning_rate": learning_rate,
              "dataset_name": datasets, "train_split": train_splits, "validation_split": validation_splits}
    job = HuggingfaceTrainingJob(config, num_epochs=preset["num_epochs"], **preset["rqmt"]["train"])
    job.add_alias(alias)
    return job


def fisher(preset, model, dataset, split, alias):
    job = FisherJob(model, dataset, split, preset["fisher"], shards=preset.get("shards", {}).get("statistics", 1),
                    **preset["rqmt"]["statistics"])
    job.add_alias(alias)
    return job.out_dir


def build_experiment(preset):
    """θ_0 and H_0 on the pretraining task; θ_t (fine-tuned from θ_0) and H_t per task; the multitask model."""
    return _build(preset, None)


def build_variational_experiment(preset):
    """As build_experiment, with every model trained by IVON (modelmerge.variational) as `preset["ivon"]` says
    (`training`: train.py's keys over the preset's; `pretraining_learning_rate`, `finetuning_learning_rate`),
    and each model's own posterior as its Hessian H_0 or H_t: no Fisher job."""
    return _build(preset, preset["ivon"])


def _build(preset, ivon):
    data = download_data(preset)
    pre = preset["pretraining"]
    validation = preset["validation_splits"]
    if ivon is None:
        learning_rates, training, prefix = (pre["learning_rate"], preset["finetuning_learning_rate"]), None, ""
    else:
        learning_rates = (ivon["pretraining_learning_rate"], ivon["finetuning_learning_rate"])
        training, prefix = ivon["training"], "ivon/"

    def model_and_hessian(model, tasks, train_splits, validation_splits, learning_rate, name, fisher_split=None):
        job = training_job(preset, model, [data[t] for t in tasks], train_splits, validation_splits, learning_rate,
                           f"{prefix}models/{name}", training)
        if fisher_split is None:
            return job.out_best_model, None
        if ivon is not None:
            return job.out_best_model, job.out_posterior
        return job.out_best_model, fisher(preset, job.out_best_model, data[tasks[0]], fisher_split, f"fishers/{name}")

    pretrained, pretrained_hessian = model_and_hessian(preset["model"], [pre["task"]], [pre["train_split"]],
                                                       [pre["validation_split"]], learning_rates[0], "pretrained",
                                                       pre["fisher_split"])
    models, hessians = {}, {}
    for task, spec in preset["tasks"].items():
        models[task], hessians[task] = model_and_hessian(pretrained, [task], [spec["train_split"]], [validation[task]],
                                                         learning_rates[1], task, spec["fisher_split"])
    tasks = list(preset["tasks"])
    multitask, _ = model_and_hessian(pretrained, tasks, [preset["tasks"][t]["train_split"] for t in tasks],
                                     [validation[t] for t in tasks], learning_rates[1], "multitask")
    return Experiment(preset, data, pretrained, pretrained_hessian, models, hessians, multitask)


def paper_merges(experiment, scaling_factor, tasks=None):
    """Task arithmetic and uncertainty-based gradient matching of the task models (of `tasks`, else of every
    task), both with α = `scaling_factor`, as the paper's own command lines compute them."""
    preset = experiment.preset
    tasks = list(tasks or preset["tasks"])
    finetuned = [experiment.models[t] for t in tasks]
    task_arithmetic = TaskArithmeticJob(experiment.pretrained, finetuned, scaling_factor, **preset["rqmt"]["merge"])
    gradient_matching = UncertaintyBasedGradientMatchingJob(
        experiment.pretrained, finetuned, experiment.pretrained_fisher, [experiment.fishers[t] for t in tasks],
        preset["gradient_matching"]["delta_0"],
        scaling_factor=scaling_factor,
        scaling_factor_pretrained=preset["pretraining"]["dataset_size"],
        scaling_factors_finetuned=[preset["tasks"][t]["dataset_size"] for t in tasks],
        **preset["rqmt"]["merge"],
    )
    return task_arithmetic.out_model_path, gradient_matching.out_model_path


@dataclass(frozen=True)
class PerTaskModels:
    """A per-task method's models: each task evaluated on its own, tasks without one on the unified model."""
    unified: tk.Path
    by_task: dict

    def model(self, task):
        return self.by_task.get(task, self.unified)


def merge_method(entry, parameters, models, ancestor, *, statistics=None, ancestor_statistics=None, initial=None,
                 task_data=None, rqmt):
    """The merge of `models` ({task: θ_t}) about `ancestor` (θ_0) by the catalogue entry `entry`
    (model_merging.catalogue.SWEEPS) with the method `parameters`; `rqmt`: the preset's resources by job kind
    (a data-aware merge runs the models over data, as a statistics job does; the others are merge jobs):
    - a data-aware method: the out_model of its Job (the TaskDataMergeJob that names it) on `task_data`
      ({task: (dataset, split)}, the split its entry's "task_data" names);
    - a per-task method: PerTaskModels, each task's own model materialised from the unified merge;
    - any other: a MergeJob's out_model, each model given its folder of `statistics` ({task: folder} of the
      kind the entry names), θ_0 its `ancestor_statistics` (where the entry names them), from `initial` (MaTS)."""
    tasks = list(models)
    if entry["kind"] == "data-aware":
        job = {cls.method: cls for cls in TaskDataMergeJob.__subclasses__()}[entry["method"]]
        ancestor_argument = {"ancestor": ancestor} if entry["needs_ancestor"] else {}
        return job(**ancestor_argument, models=[models[t] for t in tasks], datasets=[task_data[t][0] for t in tasks],
                   split=[task_data[t][1] for t in tasks], **parameters, **rqmt["statistics"]).out_model
    rqmt = rqmt["merge"]
    if entry["kind"] == "per-task":
        unified, own = per_task_models(entry["method"], [models[t] for t in tasks], ancestor, parameters, **rqmt)
        return PerTaskModels(unified, dict(zip(tasks, own)))
    return MergeJob(
        entry["method"], [models[t] for t in tasks], ancestor=ancestor,
        aux_data=[statistics[t] for t in tasks] if entry["statistics"] else None,
        ancestor_aux_data=ancestor_statistics if entry["ancestor_statistics"] else None,
        initial=initial, parameters=parameters, **rqmt,
    ).out_model


def held_out_task(preset):
    """The task the leave-one-out merges leave out (the preset's last): held out for them, since neither θ_0
    (trained on the pretraining task) nor any task model that goes into them was trained on it."""
    return list(preset["tasks"])[-1]


def without(preset, task):
    return [t for t in preset["tasks"] if t != task]


def held_in(preset, merged_tasks):
    """The tasks a merge of θ_0 and the task models of `merged_tasks` has seen in training: θ_0's and theirs."""
    return [preset["pretraining"]["task"], *merged_tasks]


def own_models(preset, finetuned_label):
    """{task: the label of its own fine-tuned model}: θ_0 ("pretrained") for the pretraining task, for each
    other task `finetuned_label.format(task=task)`."""
    return {preset["pretraining"]["task"]: "pretrained",
            **{task: finetuned_label.format(task=task) for task in preset["tasks"]}}


def _search(experiment, model, splits):
    preset = experiment.preset
    datasets = {task: (experiment.data[task], split) for task, split in splits.items()}
    shards = preset.get("shards", {}).get("evaluation", 1)
    return MultiTaskSearchJob(model, datasets, preset["evaluation"], shards=shards, **preset["rqmt"]["evaluation"])


def evaluate(experiment, models, splits):
    """Accuracy of every model on every task: {label: {task: metrics.json}}; `splits`: task -> split. A per-task
    method's models (PerTaskModels): each task on its own model."""
    results = {}
    for label, model in models.items():
        if isinstance(model, PerTaskModels):
            results[label] = {task: _search(experiment, model.model(task), {task: split}).out_metric_files[task]
                              for task, split in splits.items()}
        else:
            results[label] = dict(_search(experiment, model, splits).out_metric_files)
    return results


def evaluate_accuracy(experiment, model, splits):
    """The accuracy variables of `model` (or of PerTaskModels, each task on its own) on each task's split, for
    configs that choose on them."""
    if isinstance(model, PerTaskModels):
        return {task: _search(experiment, model.model(task), {task: split}).out_accuracies[task]
                for task, split in splits.items()}
    return dict(_search(experiment, model, splits).out_accuracies)
