"""Flan-T5-base fine-tuned on GLUE tasks and merged, as FusionBench's text-to-text suite (Tang et al., 2024):
each task model answers with the class word ("positive", "entailment", ...), its accuracy is the exact match
of the greedy decoding; the task models are merged with every method of the library at each setting of its
grid, the one best on the validation splits reported, and every model is evaluated on every task (report
under output/t5_tasks/report/).

Presets (`T5_TASKS_PRESET`, else `offline`):
- `full`: google/flan-t5-base on eight GLUE tasks from the Hub, a GPU per job;
- `offline`: a small random T5 with a word tokenizer and four synthetic GLUE-format tasks made by a job
  (each sentence holds one keyword of the task's own lexicon, the answer is its class word), on 2 CPU
  cores: θ_0 is the random T5 trained on a fifth task of that kind, so that the task models fine-tuned
  from it share a starting point, as Flan-T5's do; a multitask model is the upper reference.

    sis --config config/t5_tasks.py m
"""
from sisyphus import tk

from model_merging.catalogue import suite_methods
from model_merging.families import (CPU, FULL_SCALING_FACTORS, GPU, OFFLINE_SCALING_FACTORS, OfflineSuiteJob,
                                    build_suite, select)

# task: (Hub dataset, input template (the row's columns), class words): FusionBench's GLUE prompts
GLUE = {
    "cola": ("nyu-mll/glue:cola", "cola sentence: {sentence}", ["unacceptable", "acceptable"]),
    "mnli": ("nyu-mll/glue:mnli", "mnli hypothesis: {hypothesis} premise: {premise}", ["entailment", "neutral", "contradiction"]),
    "mrpc": ("nyu-mll/glue:mrpc", "mrpc sentence1: {sentence1} sentence2: {sentence2}", ["not_equivalent", "equivalent"]),
    "qnli": ("nyu-mll/glue:qnli", "qnli question: {question} sentence: {sentence}", ["entailment", "not_entailment"]),
    "qqp": ("nyu-mll/glue:qqp", "qqp question1: {question1} question2: {question2}", ["not_duplicate", "duplicate"]),
    "rte": ("nyu-mll/glue:rte", "rte sentence1: {sentence1} sentence2: {sentence2}", ["entailment", "not_entailment"]),
    "sst2": ("nyu-mll/glue:sst2", "sst2 sentence: {sentence}", ["negative", "positive"]),
    "stsb": ("nyu-mll/glue:stsb", "stsb sentence1: {sentence1} sentence2: {sentence2}", None),
}
OFFLINE_TASKS = ("alpha", "beta", "gamma", "delta")  # and the pretraining task of θ_0 (code/modelmerge/offline.py)
OFFLINE_PRETRAINING = "base"


def full_preset():
    tasks = {task: {"dataset": hub, "template": template, "class_words": words,
                    "splits": {"train": "train", "validation": "validation[:50%]", "test": "validation[50%:]",
                               "statistics": "train[:1024]"}, "dataset_size": 10000}
             for task, (hub, template, words) in GLUE.items() if words is not None}
    return {
        "name": "full", "title": "Flan-T5-base, GLUE: exact match", "task_type": "seq2seq", "model": "google/flan-t5-base",
        "tasks": tasks, "num_epochs": 1,
        "training": {"learning_rate": 1e-4, "warmup_steps": 0, "per_device_train_batch_size": 16, "max_length": 256,
                     "lr_scheduler_type": "constant"},
        "statistics": {"batch_size": 16, "max_length": 256}, "evaluation": {"batch_size": 64, "max_new_tokens": 8},
        "methods": suite_methods(0.3, [10000] * len(tasks), 10000, FULL_SCALING_FACTORS),
        "rqmt": {kind: GPU for kind in ("train", "statistics", "merge", "evaluation")} | {"download": CPU},
    }


def offline_preset():
    suite = OfflineSuiteJob("t5_text_tasks", (*OFFLINE_TASKS, OFFLINE_PRETRAINING))
    splits = {"train": "train", "validation": "validation", "test": "test", "statistics": "train[:64]"}
    tasks = {task: {"dataset": suite.out_data[task], "splits": splits, "dataset_size": 800} for task in OFFLINE_TASKS}
    return {
        "name": "offline", "title": "small T5, 4 synthetic GLUE-format lexicon tasks: exact match",
        "task_type": "seq2seq", "model": suite.out_model, "tasks": tasks, "num_epochs": 3, "multitask": True,
        # θ_0: the random T5 trained first on a task of the same kind with a lexicon of its own (3,200 rows)
        "pretraining": {"dataset": suite.out_data[OFFLINE_PRETRAINING], "splits": splits, "num_epochs": 3,
                        "training": {"learning_rate": 3e-3}},
        "training": {"learning_rate": 1e-3, "warmup_steps": 0, "per_device_train_batch_size": 16, "max_length": 16,
                     "per_device_eval_batch_size": 64, "lr_scheduler_type": "constant", "logging_steps": 25},
        "statistics": {"batch_size": 16, "max_length": 16},
        "evaluation": {"batch_size": 100, "max_length": 16, "max_new_tokens": 4},
        "methods": suite_methods(0.3, [800] * len(tasks), 3200, OFFLINE_SCALING_FACTORS, points=3),
        "rqmt": {kind: CPU for kind in ("train", "statistics", "merge", "evaluation", "download")},
    }


def py():
    preset = select("T5_TASKS_PRESET", {"full": full_preset, "offline": offline_preset})
    results, report = build_suite(preset)
    for label, by_task in results.items():
        for task, metrics in by_task.items():
            tk.register_output(f"t5_tasks/metrics/{label.replace(' ', '_')}/{task}.json", metrics)
    tk.register_output("t5_tasks/report", report.out_dir)
