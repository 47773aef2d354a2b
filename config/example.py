"""Table 1 of Daheim et al., "Model Merging by Uncertainty-Based Gradient Matching" (ICLR 2024).

θ_0 and its Fisher H_0 on the pretraining task; four task models θ_t fine-tuned from θ_0 and their
Fishers H_t; a multitask model; task arithmetic (α = 1) and uncertainty-based gradient matching; every
model evaluated on every task; a report (results.md / results.csv / accuracy.png under
output/example/report/). The model, tasks, splits and sizes come from the preset (recipe/model_merging/presets.py).

Held-in against held-out (Tam et al., "Realistic Evaluation of Model Merging for Compositional
Generalization", 2024): both merges are also made without the last task's model ("... (without amazon)" in
the offline and paper presets); that task is held out for them, as neither θ_0 nor any model merged into them
was trained on it, and the report compares them there with the pretrained model, the multitask model and the
merges that include it. Every other task, θ_0's own (sst2 offline) included, is held in: θ_0 goes into every
merge. The report also gives normalized accuracy (over each task's own fine-tuned model; θ_0 for its task)
and each model's gap to the multitask model.

    sis --config config/example.py m
"""
from sisyphus import tk

from model_merging import pipeline, presets
from model_merging.report import ReportJob

MERGES = ("task arithmetic", "gradient matching")  # as pipeline.paper_merges returns them


def py():
    preset = presets.select()
    experiment = pipeline.build_experiment(preset)
    scaling_factor = preset["gradient_matching"]["scaling_factor"]
    task_arithmetic, gradient_matching = pipeline.paper_merges(experiment, scaling_factor)
    held_out = pipeline.held_out_task(preset)
    merged_tasks = pipeline.without(preset, held_out)
    without = pipeline.paper_merges(experiment, scaling_factor, merged_tasks)

    models = {"pretrained": experiment.pretrained}
    models.update({f"finetuned {task}": model for task, model in experiment.models.items()})
    models.update({"multitask": experiment.multitask, "task arithmetic": task_arithmetic,
                   "gradient matching": gradient_matching})
    models.update({f"{label} (without {held_out})": model for label, model in zip(MERGES, without)})
    held_in = {label: pipeline.held_in(preset, preset["tasks"]) for label in MERGES}
    held_in.update({f"{label} (without {held_out})": pipeline.held_in(preset, merged_tasks) for label in MERGES})
    results = pipeline.evaluate(experiment, models, {t: preset["test_splits"][t] for t in pipeline.all_tasks(preset)})

    for label, by_task in results.items():
        for task, metrics in by_task.items():
            tk.register_output(f"example/metrics/{label.replace(' ', '_')}/{task}.json", metrics)
    tk.register_output("example/models/task_arithmetic", task_arithmetic)
    tk.register_output("example/models/gradient_matching", gradient_matching)
    report = ReportJob(results, title=f"Table 1 ({preset['name']} preset): test accuracy",
                       own_models=pipeline.own_models(preset, "finetuned {task}"), multitask="multitask", held_in=held_in)
    tk.register_output("example/report", report.out_dir)
