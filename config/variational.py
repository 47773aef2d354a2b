"""Table 1 of Daheim et al. (ICLR 2024) with variational learning: θ_0 and the task models θ_t trained by IVON
(Shen et al., "Variational Learning is Effective for Large Deep Networks", ICML 2024) and merged by
uncertainty-based gradient matching with their own posteriors as H_0 and H_t (modelmerge.variational) — no
Fisher pass over the data — beside config/example.py's Adam-trained models merged with their squared-gradient
Fishers, in one report (output/variational/report/). IVON's settings are the preset's `ivon` entry
(recipe/model_merging/presets.py); the multitask reference and the normalisation are the Adam models'.

    python -m sisyphus --config config/variational.py m
"""
import re

from sisyphus import tk

from model_merging import pipeline, presets
from model_merging.report import ReportJob

# label suffix -> how its experiment is built
VERSIONS = {"Adam + Fisher": pipeline.build_experiment, "IVON": pipeline.build_variational_experiment}


def build(preset):
    """({label: {task: metrics.json}}, the ReportJob) of both versions."""
    scaling_factor = preset["gradient_matching"]["scaling_factor"]
    models, experiments = {}, {}
    for version, build_experiment in VERSIONS.items():
        experiment = experiments[version] = build_experiment(preset)
        task_arithmetic, gradient_matching = pipeline.paper_merges(experiment, scaling_factor)
        models[f"pretrained ({version})"] = experiment.pretrained
        models.update({f"finetuned {task} ({version})": model for task, model in experiment.models.items()})
        models[f"task arithmetic ({version})"] = task_arithmetic
        models[f"gradient matching ({version})"] = gradient_matching
    reference = experiments["Adam + Fisher"]
    models["multitask"] = reference.multitask
    results = pipeline.evaluate(reference, models, {t: preset["test_splits"][t] for t in pipeline.all_tasks(preset)})
    own_models = {**pipeline.own_models(preset, "finetuned {task} (Adam + Fisher)"),
                  preset["pretraining"]["task"]: "pretrained (Adam + Fisher)"}
    held_in = {f"{merge} ({version})": pipeline.held_in(preset, preset["tasks"])
               for merge in ("task arithmetic", "gradient matching") for version in VERSIONS}
    report = ReportJob(results, title=f"Table 1 ({preset['name']} preset), Adam + Fisher and IVON: test accuracy",
                       own_models=own_models, multitask="multitask", held_in=held_in)
    return results, report


def _slug(label):
    return re.sub(r"\W+", "_", label).strip("_")  # "pretrained (Adam + Fisher)" -> "pretrained_Adam_Fisher"


def py():
    results, report = build(presets.select())
    for label, by_task in results.items():
        for task, metrics in by_task.items():
            tk.register_output(f"variational/metrics/{_slug(label)}/{task}.json", metrics)
    tk.register_output("variational/report", report.out_dir)
