"""Table 1 of Daheim et al., "Model Merging by Uncertainty-Based Gradient Matching" (ICLR 2024).

θ_0 and its Fisher H_0 on the pretraining task; four task models θ_t fine-tuned from θ_0 and their
Fishers H_t; a multitask model; task arithmetic (α = 1) and uncertainty-based gradient matching; every
model evaluated on every task; a report (results.md / results.csv / accuracy.png under
output/example/report/). The model, tasks, splits and sizes come from the preset (recipe/model_merging/presets.py).

    sis --config config/example.py m
"""
from sisyphus import tk

from model_merging import pipeline, presets
from model_merging.report import ReportJob


def py():
    preset = presets.select()
    experiment = pipeline.build_experiment(preset)
    task_arithmetic, gradient_matching = pipeline.paper_merges(experiment, preset["gradient_matching"]["scaling_factor"])

    models = {"pretrained": experiment.pretrained}
    models.update({f"finetuned {task}": model for task, model in experiment.models.items()})
    models.update({"multitask": experiment.multitask, "task arithmetic": task_arithmetic,
                   "gradient matching": gradient_matching})
    results = pipeline.evaluate(experiment, models, {t: preset["test_splits"][t] for t in pipeline.all_tasks(preset)})

    for label, by_task in results.items():
        for task, metrics in by_task.items():
            tk.register_output(f"example/metrics/{label.replace(' ', '_')}/{task}.json", metrics)
    tk.register_output("example/models/task_arithmetic", task_arithmetic)
    tk.register_output("example/models/gradient_matching", gradient_matching)
    report = ReportJob(results, title=f"Table 1 ({preset['name']} preset): test accuracy")
    tk.register_output("example/report", report.out_dir)
