"""Graph pieces the configs share: data, the pretrained model θ_0 and the task models θ_t with their
Fishers, the multitask model, and evaluation. Calling them twice builds the same jobs (Sisyphus job
singletons), so configs compose freely and a sweep reuses every earlier job."""
from dataclasses import dataclass

from sisyphus import tk

from model_merging.data import DownloadDatasetJob
from model_merging.merge import TaskArithmeticJob, UncertaintyBasedGradientMatchingJob
from model_merging.search import MultiTaskSearchJob
from model_merging.statistics import FisherJob
from model_merging.training import HuggingfaceTrainingJob


@dataclass
class Experiment:
    preset: dict
    data: dict  # task -> dataset folder (tk.Path)
    pretrained: tk.Path  # θ_0
    pretrained_fisher: tk.Path  # H_0 (statistics folder)
    models: dict  # task -> θ_t
    fishers: dict  # task -> H_t
    multitask: tk.Path


def all_tasks(preset):
    return [preset["pretraining"]["task"]] + list(preset["tasks"])


def download_data(preset):
    return {task: DownloadDatasetJob(task, data_dir=preset["data_dir"]).out_dir for task in all_tasks(preset)}


def train(preset, model, datasets, train_splits, validation_splits, learning_rate, alias):
    """Fine-tune `model` on the mixture of `datasets` (one entry: a single task)."""
    config = {**preset["training"], "model_name_or_path": model, "learning_rate": learning_rate,
              "dataset_name": datasets, "train_split": train_splits, "validation_split": validation_splits}
    job = HuggingfaceTrainingJob(config, num_epochs=preset["num_epochs"], **preset["rqmt"]["train"])
    job.add_alias(alias)
    return job.out_best_model


def fisher(preset, model, dataset, split, alias):
    job = FisherJob(model, dataset, split, preset["fisher"], **preset["rqmt"]["statistics"])
    job.add_alias(alias)
    return job.out_dir


def build_experiment(preset):
    """θ_0 and H_0 on the pretraining task; θ_t (fine-tuned from θ_0) and H_t per task; the multitask model."""
    data = download_data(preset)
    pre = preset["pretraining"]
    task = pre["task"]
    pretrained = train(preset, preset["model"], [data[task]], [pre["train_split"]], [pre["validation_split"]],
                       pre["learning_rate"], "models/pretrained")
    pretrained_fisher = fisher(preset, pretrained, data[task], pre["fisher_split"], "fishers/pretrained")

    lr = preset["finetuning_learning_rate"]
    validation = preset["validation_splits"]
    models, fishers = {}, {}
    for task, spec in preset["tasks"].items():
        models[task] = train(preset, pretrained, [data[task]], [spec["train_split"]], [validation[task]], lr, f"models/{task}")
        fishers[task] = fisher(preset, models[task], data[task], spec["fisher_split"], f"fishers/{task}")

    tasks = list(preset["tasks"])
    multitask = train(preset, pretrained, [data[t] for t in tasks], [preset["tasks"][t]["train_split"] for t in tasks],
                      [validation[t] for t in tasks], lr, "models/multitask")
    return Experiment(preset, data, pretrained, pretrained_fisher, models, fishers, multitask)


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
    return MultiTaskSearchJob(model, datasets, preset["evaluation"], **preset["rqmt"]["evaluation"])


def evaluate(experiment, models, splits):
    """Accuracy of every model on every task: {label: {task: metrics.json}}; `splits`: task -> split."""
    return {label: dict(_search(experiment, model, splits).out_metric_files) for label, model in models.items()}


def evaluate_accuracy(experiment, model, splits):
    """The accuracy variables of `model` on each task's split, for configs that choose on them."""
    return dict(_search(experiment, model, splits).out_accuracies)
