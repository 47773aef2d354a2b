"""CLIP ViT-B/32 on the eight image classification tasks of task arithmetic (Ilharco et al., ICLR 2023):
SUN397, Stanford Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST, DTD. The vision tower is fine-tuned on each
task (the text tower gives the zero-shot head "a photo of a {class}." and stays frozen), the eight models are
merged with every method of the library at each setting of its grid (the one best on the validation splits
reported), and every model is evaluated on every task (report under output/vit_tasks/report/).

Presets (`VIT_TASKS_PRESET`, else `offline`):
- `full`: openai/clip-vit-base-patch32 and the Hub copies of the eight data sets FusionBench uses
  (tanganke/*), a GPU per job. FusionBench's published averages for reference: task arithmetic 68.0,
  TIES 72.2, TSV-M 83.1 (Tang et al., "FusionBench", 2024; Gargiulo et al., "Task Singular Vectors", CVPR 2025).
- `offline`: a small random CLIP and eight synthetic image tasks made by a job (no network), on 2 CPU cores.

    sis --config config/vit_tasks.py m
"""
from sisyphus import tk

from model_merging.catalogue import suite_methods
from model_merging.families import (CPU, FULL_SCALING_FACTORS, GPU, OFFLINE_SCALING_FACTORS, OfflineSuiteJob,
                                    build_suite, select)

TASK_ARITHMETIC_TASKS = {  # task: Hub dataset (FusionBench's copies: columns image, label)
    "sun397": "tanganke/sun397", "cars": "tanganke/stanford_cars", "resisc45": "tanganke/resisc45",
    "eurosat": "tanganke/eurosat", "svhn": "tanganke/svhn", "gtsrb": "tanganke/gtsrb", "mnist": "mnist",
    "dtd": "tanganke/dtd",
}
OFFLINE_TASKS = ("colour", "brightness", "stripes", "shape", "border", "size", "checker", "diagonal")


def full_preset():
    tasks = {task: {"dataset": hub, "columns": {"image": "image", "label": "label"},
                    "splits": {"train": "train", "validation": "test[:10%]", "test": "test", "statistics": "train[:2048]"},
                    "dataset_size": 10000} for task, hub in TASK_ARITHMETIC_TASKS.items()}
    return {
        "name": "full", "title": "CLIP ViT-B/32, 8 tasks: test accuracy", "task_type": "image_classification",
        "model": "openai/clip-vit-base-patch32", "tasks": tasks, "num_epochs": 2,
        "training": {"learning_rate": 1e-5, "warmup_steps": 500, "weight_decay": 0.1, "per_device_train_batch_size": 128,
                     "per_device_eval_batch_size": 256, "lr_scheduler_type": "cosine"},
        "statistics": {"batch_size": 64}, "evaluation": {"batch_size": 256},
        "methods": suite_methods(0.3, [10000] * len(tasks), 10000, FULL_SCALING_FACTORS),
        "rqmt": {kind: GPU for kind in ("train", "statistics", "merge", "evaluation")} | {"download": CPU},
    }


def offline_preset():
    suite = OfflineSuiteJob("clip_image_tasks", OFFLINE_TASKS)
    splits = {"train": "train", "validation": "validation", "test": "test", "statistics": "train[:64]"}
    tasks = {task: {"dataset": suite.out_data[task], "splits": splits, "dataset_size": 256} for task in OFFLINE_TASKS}
    return {
        "name": "offline", "title": "small CLIP, 8 synthetic image tasks: test accuracy",
        "task_type": "image_classification", "model": suite.out_model, "tasks": tasks, "num_epochs": 4,
        "training": {"learning_rate": 1e-3, "warmup_steps": 0, "per_device_train_batch_size": 16,
                     "per_device_eval_batch_size": 64, "lr_scheduler_type": "constant", "logging_steps": 10},
        "statistics": {"batch_size": 16}, "evaluation": {"batch_size": 64},
        "methods": suite_methods(0.3, [256] * len(tasks), 256, OFFLINE_SCALING_FACTORS, points=3),
        "rqmt": {kind: CPU for kind in ("train", "statistics", "merge", "evaluation", "download")},
    }


PRESETS = {"full": full_preset, "offline": offline_preset}


def py():
    preset = select("VIT_TASKS_PRESET", PRESETS)
    results, report = build_suite(preset)
    for label, by_task in results.items():
        for task, metrics in by_task.items():
            tk.register_output(f"vit_tasks/metrics/{label.replace(' ', '_')}/{task}.json", metrics)
    tk.register_output("vit_tasks/report", report.out_dir)
