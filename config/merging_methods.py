"""Every method of the merge library on the same trained models and statistics.

For each method, a grid over its main hyperparameter is merged and evaluated on every task's
validation split; the setting with the best average validation accuracy is evaluated on the test
splits and reported (output/merging_methods/report/). Task arithmetic and uncertainty-based gradient
matching are also evaluated on the test splits over the whole α grid: the robustness plot
(report/sweep.png). The trained models and statistics are those of config/example.py, so running both
configs trains nothing twice, and adding a method to MERGE_GRIDS computes only that method's jobs.

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
from dataclasses import dataclass

from sisyphus import tk

from model_merging import pipeline, presets
from model_merging.merge import AdaMergingJob, MergeJob, RegMeanPlusPlusJob, per_task_models
from model_merging.report import ReportJob
from model_merging.statistics import GramJob

# label: merge method, the hyperparameter swept (None: no sweep), its grid, fixed parameters, the
# statistics each model needs ('fisher' or 'gram'), and whether θ_0's Fisher is needed.
MERGE_GRIDS = {
    "average": dict(method="linear"),
    "task arithmetic": dict(method="task_arithmetic", sweep="merge_lambda", grid="scaling_factors"),
    "ties": dict(method="ties", sweep="density", grid=[0.1, 0.2, 0.3, 0.5], fixed={"merge_lambda": 1.0}),
    "dare linear": dict(method="dare_linear", sweep="dropout_probability", grid=[0.1, 0.3, 0.5, 0.7], fixed={"seed": 0}),
    "dare ties": dict(method="dare_ties", sweep="dropout_probability", grid=[0.1, 0.3, 0.5, 0.7], fixed={"seed": 0}),
    "breadcrumbs": dict(method="breadcrumbs", sweep="density", grid=[0.5, 0.7, 0.9], fixed={"gamma": 0.01}),
    "mlerp": dict(method="mlerp"),
    "fisher": dict(method="fisher", stats="fisher"),
    "regmean": dict(method="regmean", sweep="alpha", grid=[0.1, 0.5, 0.9], stats="gram"),
    "mats (regmean)": dict(method="mats", sweep="iterations", grid=[5, 20, 50], fixed={"objective": "regmean", "alpha": 0.9},
                           stats="gram", initial="task arithmetic"),
    "mats (blockwise fisher)": dict(method="mats", sweep="iterations", grid=[5, 20, 50],
                                    fixed={"objective": "blockwise_fisher", "alpha": 0.9}, stats="gram",
                                    initial="task arithmetic"),
    "gradient matching": dict(method="uncertainty_based_gradient_matching", sweep="scaling_factor", grid="scaling_factors",
                              stats="fisher", ancestor_stats=True),
    # mergekit 0.1.5's newer methods
    "model stock": dict(method="model_stock"),
    "della": dict(method="della", sweep="density", grid=[0.3, 0.5, 0.7], fixed={"epsilon": 0.1, "seed": 0}),
    "della linear": dict(method="della_linear", sweep="density", grid=[0.3, 0.5, 0.7], fixed={"epsilon": 0.1, "seed": 0}),
    "sce": dict(method="sce", sweep="select_topk", grid=[0.1, 0.3, 0.5, 1.0]),
    "multislerp": dict(method="multislerp"),
    "karcher": dict(method="karcher"),
    "ram": dict(method="ram"),
    "ram+ (tensor-local)": dict(method="ramplus_tl"),
    # data-free methods of the current field
    "tsv-m": dict(method="tsv_m", sweep="merge_lambda", grid="scaling_factors"),
    "iso-c": dict(method="iso_c", sweep="merge_lambda", grid="scaling_factors"),
    "iso-cts": dict(method="iso_cts", sweep="merge_lambda", grid="scaling_factors", fixed={"common_space_fraction": 0.8}),
    "wudi": dict(method="wudi", fixed={"iterations": 300}),
    "magmax": dict(method="magmax", sweep="merge_lambda", grid="scaling_factors"),
    "consensus (ta)": dict(method="consensus", sweep="k", grid=[1, 2, 3], fixed={"tall_mask_lambda": 0.6}),
    "cart": dict(method="cart", sweep="rank_ratio", grid=[0.04, 0.08, 0.16, 0.32], fixed={"merge_lambda": 2.0}),
    "pcb": dict(method="pcb", sweep="pcb_ratio", grid=[0.05, 0.1, 0.2, 0.3], fixed={"merge_lambda": 1.2}),
    "tatr": dict(method="tatr", sweep="merge_lambda", grid="scaling_factors", fixed={"threshold_quantile": 0.99}),
    # LOT Merging: the least-squares task vector of every linear layer on each task's Gram statistics (no hyperparameter)
    "lot": dict(method="lot", stats="gram"),
    # LiNeS: the task vector of layer ℓ of L scaled by α + β·ℓ/(L−1), α the paper's ‖Σ τ_t‖₁ / (T·‖τ‖₁)
    "task arithmetic + lines": dict(method="task_arithmetic", sweep="lines_beta", grid=[0.2, 0.4, 0.6, 1.0]),
    "ties + lines": dict(method="ties", sweep="lines_beta", grid=[0.2, 0.4, 0.6, 1.0], fixed={"density": 0.2, "merge_lambda": 1.0}),
    "consensus + lines": dict(method="consensus", sweep="lines_beta", grid=[0.2, 0.4, 0.6, 1.0],
                              fixed={"k": 2, "tall_mask_lambda": 0.6}),
    # KnOTS: TIES on the coordinates of the task vectors in their shared SVD basis (every 2-D tensor)
    "ties + knots": dict(method="ties", sweep="density", grid=[0.1, 0.2, 0.3, 0.5], fixed={"merge_lambda": 1.0, "knots": True}),
    # per-task (PER_TASK): each task evaluated on its own model, materialised from the T masks they store
    "tall masks (per-task)": dict(method="tall_masks", sweep="tall_mask_lambda", grid=[0.2, 0.4, 0.6]),
    "emr (per-task)": dict(method="emr"),
    # data-aware: their own programs (DATA_AWARE), on each task's data
    "regmean++": dict(method="regmean_plusplus", sweep="alpha", grid=[0.1, 0.5, 0.9]),
    "adamerging": dict(method="adamerging", sweep="iterations", grid=[50, 200]),
}
ROBUSTNESS = ("task arithmetic", "gradient matching")  # drawn against α on the test data; pipeline.paper_merges' order


def grid(spec, preset):
    if "sweep" not in spec:
        return [None]
    return preset["scaling_factors"] if spec["grid"] == "scaling_factors" else spec["grid"]


def statistics(experiment, kind):
    preset = experiment.preset
    if kind == "fisher":
        return experiment.fishers
    return {task: GramJob(model, experiment.data[task], preset["tasks"][task]["fisher_split"], preset["fisher"],
                          **preset["rqmt"]["statistics"]).out_dir
            for task, model in experiment.models.items()}


def fixed_parameters(spec, preset):
    parameters = dict(spec.get("fixed", {}))
    if spec["method"] == "uncertainty_based_gradient_matching":
        parameters.update(scaling_factor_pt=preset["pretraining"]["dataset_size"],
                          scaling_factors_ft=[preset["tasks"][t]["dataset_size"] for t in preset["tasks"]],
                          delta_0=preset["gradient_matching"]["delta_0"])
    return parameters


def data_aware_merge(experiment, method, value):
    """RegMean++ (Grams on each task's statistics split) or AdaMerging (entropy on its validation inputs)."""
    preset = experiment.preset
    tasks = list(preset["tasks"])
    models, data = [experiment.models[t] for t in tasks], [experiment.data[t] for t in tasks]
    if method == "regmean_plusplus":
        split = [preset["tasks"][t]["fisher_split"] for t in tasks]
        return RegMeanPlusPlusJob(models, data, split, alpha=value, **preset["rqmt"]["statistics"]).out_model
    split = [preset["validation_splits"][t] for t in tasks]
    return AdaMergingJob(experiment.pretrained, models, data, split, iterations=value, **preset["rqmt"]["statistics"]).out_model


DATA_AWARE = ("regmean_plusplus", "adamerging")
PER_TASK = ("emr", "tall_masks")  # a unified model plus each task's own model


@dataclass(frozen=True)
class PerTaskModels:
    """A per-task method's models: each task evaluated on its own, tasks without one on the unified model."""
    unified: tk.Path
    by_task: dict

    def model(self, task):
        return self.by_task.get(task, self.unified)


def evaluate_accuracy(experiment, candidate, splits):
    """{task: accuracy variable} of a merged model, or of a per-task method with each task on its own model."""
    if isinstance(candidate, PerTaskModels):
        return {task: pipeline.evaluate_accuracy(experiment, candidate.model(task), {task: split})[task]
                for task, split in splits.items()}
    return pipeline.evaluate_accuracy(experiment, candidate, splits)


def evaluate(experiment, candidates, splits):
    """{label: {task: metrics.json}} of merged models and per-task methods (see evaluate_accuracy)."""
    results = {}
    for label, candidate in candidates.items():
        if isinstance(candidate, PerTaskModels):
            results[label] = {task: pipeline.evaluate(experiment, {label: candidate.model(task)}, {task: split})[label][task]
                              for task, split in splits.items()}
        else:
            results[label] = pipeline.evaluate(experiment, {label: candidate}, splits)[label]
    return results


def merge(experiment, label, value, initial_models):
    """The model merged by method `label` with its swept hyperparameter at `value` (PerTaskModels for PER_TASK)."""
    spec, preset = MERGE_GRIDS[label], experiment.preset
    if spec["method"] in DATA_AWARE:
        return data_aware_merge(experiment, spec["method"], value)
    if label in ROBUSTNESS:  # the paper's own command lines, shared with config/example.py at α = 1
        task_arithmetic, gradient_matching = pipeline.paper_merges(experiment, value)
        return task_arithmetic if label == "task arithmetic" else gradient_matching
    tasks = list(preset["tasks"])
    parameters = fixed_parameters(spec, preset)
    if value is not None:
        parameters[spec["sweep"]] = value
    if spec["method"] in PER_TASK:
        unified, own = per_task_models(spec["method"], [experiment.models[t] for t in tasks], experiment.pretrained,
                                       parameters, **preset["rqmt"]["merge"])
        return PerTaskModels(unified, dict(zip(tasks, own)))
    aux_data = None
    if "stats" in spec:
        aux_data = [statistics(experiment, spec["stats"])[t] for t in tasks]
    job = MergeJob(
        spec["method"], [experiment.models[t] for t in tasks], ancestor=experiment.pretrained, aux_data=aux_data,
        ancestor_aux_data=experiment.pretrained_fisher if spec.get("ancestor_stats") else None,
        initial=initial_models.get(spec.get("initial")), parameters=parameters, **preset["rqmt"]["merge"],
    )
    return job.out_model


def best_setting(label, by_value, candidates):
    """(report label, model, average validation accuracy) of method `label` at its setting best on the
    validation splits: one setting for all tasks, or for a per-task method each task's own (as TALL masks
    choose each task's λ_t, Wang et al. 2024); `by_value`: {value: {task: accuracy}}, `candidates`: {value: model}."""
    sweep = MERGE_GRIDS[label].get("sweep")
    value = best_value(by_value)
    if value is None:
        return label, candidates[value], average_accuracy(by_value[value])
    if MERGE_GRIDS[label]["method"] not in PER_TASK:
        return f"{label} ({sweep}={value})", candidates[value], average_accuracy(by_value[value])
    chosen = {task: max(by_value, key=lambda v: by_value[v][task].get()) for task in by_value[value]}
    own = candidates[value].by_task  # the tasks with a mask; the others are evaluated on the unified model
    model = PerTaskModels(candidates[value].unified, {task: candidates[chosen[task]].model(task) for task in own})
    accuracy = sum(by_value[v][task].get() for task, v in chosen.items()) / len(chosen)
    return f"{label} ({sweep} per task={'/'.join(str(chosen[task]) for task in own)})", model, accuracy


def best_value(by_value):
    """The setting with the best average validation accuracy; `by_value`: {value: {task: accuracy}}."""
    return max(by_value, key=lambda v: average_accuracy(by_value[v]))


def average_accuracy(variables):
    values = [v.get() for v in variables.values()]
    return sum(values) / len(values)


async def py():
    preset = presets.select()
    experiment = pipeline.build_experiment(preset)
    tasks = pipeline.all_tasks(preset)
    validation = {t: preset["validation_splits"][t] for t in tasks}
    test = {t: preset["test_splits"][t] for t in tasks}

    # Task arithmetic with λ = 1 is the starting point of MaTS (Tam et al., 2024).
    initial_models = {"task arithmetic": merge(experiment, "task arithmetic", 1.0, {})}
    candidates = {label: {value: merge(experiment, label, value, initial_models) for value in grid(spec, preset)}
                  for label, spec in MERGE_GRIDS.items()}
    validation_accuracy = {label: {value: evaluate_accuracy(experiment, model, validation)
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
            without = pipeline.paper_merges(experiment, best_value(by_value), merged_tasks)[ROBUSTNESS.index(label)]
            models[f"{name} (without {held_out})"] = without
            held_in[f"{name} (without {held_out})"] = pipeline.held_in(preset, merged_tasks)
    results = evaluate(experiment, models, test)
    sweeps = {label: pipeline.evaluate(experiment, candidates[label], test) for label in ROBUSTNESS}

    report = ReportJob(results, sweeps=sweeps, title=f"Merging methods ({preset['name']} preset): test accuracy, "
                                                     "best setting on validation",
                       own_models=pipeline.own_models(preset, "finetuned {task}"), multitask="multitask", held_in=held_in)
    tk.register_output("merging_methods/report", report.out_dir)
