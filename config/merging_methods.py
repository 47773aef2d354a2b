"""Every method of the merge library on the same trained models and statistics.

For each method, a grid over its main hyperparameter is merged and evaluated on every task's
validation split; the setting with the best average validation accuracy is evaluated on the test
splits and reported (output/merging_methods/report/). Task arithmetic and uncertainty-based gradient
matching are also evaluated on the test splits over the whole α grid: the robustness plot
(report/sweep.png). The trained models and statistics are those of config/example.py, so running both
configs trains nothing twice. The methods and their grids are the catalogue's sweep entries (each method
declares its own `sweeps`: recipe/model_merging/catalogue.py, docs/methods.md), so adding a method computes only
that method's jobs.

EMR-Merging and TALL masks are per-task methods: they store a unified model plus one mask (and rescaler) per
task, and, as in their papers, task t is evaluated on its own model materialised from them (labels end in
"(per-task)"; T masks are stored besides the model), and TALL's λ_t is chosen for each task on its validation
split. The pretraining task, which has no mask, is evaluated on the unified model.

slerp and nuslerp (two models), nearswap and arcee_fusion (one model into θ_0) and passthrough (layer slices)
do not combine four task models and are not run here.

Held-in against held-out, as in config/example.py: task arithmetic and gradient matching at their chosen α are
also merged without the last task's model ("... (without amazon)"), for which that task is held out; the
fine-tuned models are evaluated too (the same jobs as config/example.py's), for normalized accuracy.

    sis --config config/merging_methods.py m
"""
from sisyphus import tk

from model_merging import pipeline, presets, selection
from model_merging.catalogue import SWEEPS, grid, parameters
from model_merging.report import ReportJob
from model_merging.statistics import GradientMagnitudeJob, GramJob

ROBUSTNESS = ("task arithmetic", "gradient matching")  # drawn against α on the test data; pipeline.paper_merges' order


def statistics(experiment, kind):
    """{task: statistics folder of kind 'fisher', 'gram' or 'gradient_magnitude'} of the task models; TATR's
    gradient magnitude of task t is taken at θ_0 on task t's data (methods/trust_region.py)."""
    preset = experiment.preset
    if kind == "fisher":
        return experiment.fishers
    job, at_ancestor = {"gram": (GramJob, False), "gradient_magnitude": (GradientMagnitudeJob, True)}[kind]
    return {task: job(experiment.pretrained if at_ancestor else model, experiment.data[task],
                      preset["tasks"][task]["fisher_split"], preset["fisher"], **preset["rqmt"]["statistics"]).out_dir
            for task, model in experiment.models.items()}


def merge(experiment, label, value, initial_models):
    """The model merged by sweep `label` with its parameter at `value` (pipeline.PerTaskModels for a per-task one)."""
    entry, preset = SWEEPS[label], experiment.preset
    if label in ROBUSTNESS:  # the paper's own command lines, shared with config/example.py at α = 1
        task_arithmetic, gradient_matching = pipeline.paper_merges(experiment, value)
        return task_arithmetic if label == "task arithmetic" else gradient_matching
    tasks = list(preset["tasks"])
    sizes = [preset["tasks"][t]["dataset_size"] for t in tasks]
    splits = {"statistics": {t: preset["tasks"][t]["fisher_split"] for t in tasks}, "validation": preset["validation_splits"]}
    return pipeline.merge_method(
        entry, parameters(entry, value, preset["pretraining"]["dataset_size"], sizes), experiment.models,
        experiment.pretrained, statistics=entry["statistics"] and statistics(experiment, entry["statistics"]),
        ancestor_statistics=experiment.pretrained_fisher, initial=initial_models.get(entry["initial"]),
        task_data=entry["task_data"] and {t: (experiment.data[t], splits[entry["task_data"]][t]) for t in tasks},
        rqmt=preset["rqmt"])


def best_setting(label, by_value, candidates):
    """(report label, model, average validation accuracy) of sweep `label` at its setting best on the
    validation splits (model_merging.selection): one setting for all tasks, or for a per-task method each task's
    own; `by_value`: {value: {task: accuracy variable}}, `candidates`: {value: model}."""
    sweep = SWEEPS[label]["parameter"]
    accuracies = values_of(by_value)
    value = selection.best_value(accuracies)
    if value is None or SWEEPS[label]["kind"] != "per-task":
        return selection.setting_label(label, sweep, value), candidates[value], selection.average(accuracies[value])
    chosen = selection.best_per_task(accuracies, accuracies[value])
    own = candidates[value].by_task  # the tasks with a mask; the others are evaluated on the unified model
    model = pipeline.PerTaskModels(candidates[value].unified, {task: candidates[chosen[task]].model(task) for task in own})
    accuracy = sum(accuracies[v][task] for task, v in chosen.items()) / len(chosen)
    return selection.per_task_label(label, sweep, {task: chosen[task] for task in own}), model, accuracy


def values_of(by_value):
    """{value: {task: accuracy}} of {value: {task: tk.Variable}}."""
    return {value: {task: variable.get() for task, variable in by_task.items()} for value, by_task in by_value.items()}


async def py():
    preset = presets.select()
    experiment = pipeline.build_experiment(preset)
    tasks = pipeline.all_tasks(preset)
    validation = {t: preset["validation_splits"][t] for t in tasks}
    test = {t: preset["test_splits"][t] for t in tasks}

    # Task arithmetic with λ = 1 is the starting point of MaTS (Tam et al., 2024).
    initial_models = {"task arithmetic": merge(experiment, "task arithmetic", 1.0, {})}
    candidates = {label: {value: merge(experiment, label, value, initial_models)
                          for value in grid(entry, preset["scaling_factors"])}
                  for label, entry in SWEEPS.items()}
    validation_accuracy = {label: {value: pipeline.evaluate_accuracy(experiment, model, validation)
                                   for value, model in by_value.items()}
                           for label, by_value in candidates.items()}
    await tk.async_run(validation_accuracy)

    models = {"pretrained": experiment.pretrained, "multitask": experiment.multitask}
    models.update({f"finetuned {task}": model for task, model in experiment.models.items()})
    held_in, held_out = {}, pipeline.held_out_task(preset)
    merged_tasks = pipeline.without(preset, held_out)
    for label, by_value in validation_accuracy.items():
        name, models[name], accuracy = best_setting(label, by_value, candidates[label])
        held_in[name] = pipeline.held_in(preset, preset["tasks"])
        print(f"merging_methods: {name}: validation accuracy {100 * accuracy:.1f}")
        if label in ROBUSTNESS:  # at the chosen α, without the held-out task's model
            chosen = selection.best_value(values_of(by_value))
            without = pipeline.paper_merges(experiment, chosen, merged_tasks)[ROBUSTNESS.index(label)]
            models[f"{name} (without {held_out})"] = without
            held_in[f"{name} (without {held_out})"] = pipeline.held_in(preset, merged_tasks)
    results = pipeline.evaluate(experiment, models, test)
    sweeps = {label: pipeline.evaluate(experiment, candidates[label], test) for label in ROBUSTNESS}

    report = ReportJob(results, sweeps=sweeps, title=f"Merging methods ({preset['name']} preset): test accuracy, "
                                                     "best setting on validation",
                       own_models=pipeline.own_models(preset, "finetuned {task}"), multitask="multitask", held_in=held_in)
    tk.register_output("merging_methods/report", report.out_dir)
