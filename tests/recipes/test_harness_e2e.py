"""A causal-LM merge evaluated by lm-evaluation-harness end to end through `sis m -r`: a tiny GPT-2 fine-tuned on two
word-lookup tasks ("is w" -> the next word of a list after w, "the w" -> the third after it), the two merged by task arithmetic, every model scored by LmEvalJob
on a local multiple-choice task of each, and a ReportJob over the harness's metrics."""
import csv
import json
import random

import pytest
from sis_util import make_setup, run_sis
from tiny import WORDS, make_tiny_gpt2, write_jsonl

CHOICES = WORDS[:10]
TASKS = {"next": ("is", 1), "third": ("the", 3)}  # task: (prompt word, offset in CHOICES of the answer)


def example(task, word):
    prompt, offset = TASKS[task]
    return f"{prompt} {word}", CHOICES[(CHOICES.index(word) + offset) % len(CHOICES)]

CONFIG = '''
from sisyphus import tk

from model_merging.merge import MergeJob
from model_merging.report import ReportJob
from model_merging.search import LmEvalJob
from model_merging.training import HuggingfaceTrainingJob

SETUP = {setup!r}
TASKS = {tasks!r}


def py():
    base = tk.Path(SETUP + "/base")
    models = {{"pretrained": base}}
    for task in TASKS:
        config = {{"model_name_or_path": base, "task_type": "causal_lm", "dataset_name": SETUP + "/data/" + task,
                  "learning_rate": 1e-2, "per_device_train_batch_size": 8, "max_length": 16, "warmup_steps": 0,
                  "lr_scheduler_type": "constant"}}
        models["fine-tuned " + task] = HuggingfaceTrainingJob(config, num_epochs=8, cpu_rqmt=1, mem_rqmt=1).out_best_model
    models["task arithmetic"] = MergeJob("task_arithmetic", [models["fine-tuned " + t] for t in TASKS], ancestor=base,
                                         parameters={{"merge_lambda": 1.0}}, mem_rqmt=1).out_model
    tasks = [tk.Path(SETUP + "/tasks/" + task + "_choice.yaml") for task in TASKS]
    results = {{label: LmEvalJob(model, tasks, num_fewshot=0, batch_size=16, mem_rqmt=1).out_metric_files
               for label, model in models.items()}}
    report = ReportJob(results, title="GPT-2 merge, lm-eval", held_in={{"task arithmetic": [t + "_choice" for t in TASKS]}},
                       own_models={{t + "_choice": "fine-tuned " + t for t in TASKS}})
    tk.register_output("harness/report", report.out_dir)
    for label, by_task in results.items():
        for task, metrics in by_task.items():
            tk.register_output("harness/metrics/" + label.replace(" ", "_") + "/" + task + ".json", metrics)
'''
TASK_YAML = """task: {task}_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {task}_choice.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{input}}}}"
doc_to_choice: {choices}
doc_to_target: label
metric_list:
  - metric: acc
"""


def write_setup(root):
    make_tiny_gpt2(str(root / "base"), seed=0, n_embd=32)
    rng = random.Random(0)
    for task in TASKS:
        rows = [example(task, rng.choice(CHOICES)) for _ in range(176)]
        for split, part in (("train", rows[:160]), ("validation", rows[160:])):
            write_jsonl(str(root / "data" / task / f"{split}.jsonl"), [{"input": i, "target": t} for i, t in part])
        write_jsonl(str(root / "tasks" / f"{task}_choice.jsonl"),
                    [{"input": i, "label": CHOICES.index(t)} for i, t in (example(task, w) for w in CHOICES * 2)])
        (root / "tasks" / f"{task}_choice.yaml").write_text(TASK_YAML.format(task=task, choices=json.dumps(CHOICES)))
    make_setup(root, configs={"harness_merge": CONFIG.format(setup=str(root), tasks=list(TASKS))}, cpu=2, mem=4,
               project_recipes=True)


@pytest.mark.slow
def test_gpt2_merge_evaluated_by_the_harness_through_sis(tmp_path):
    write_setup(tmp_path)
    run = run_sis(tmp_path, "--config", "config/harness_merge.py", "m", "-r", timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    report = tmp_path / "output" / "harness" / "report"
    rows = {row["model"]: row for row in csv.DictReader(open(report / "results.csv"))}
    assert list(rows) == ["pretrained", "fine-tuned next", "fine-tuned third", "task arithmetic"]
    metrics = {label: {t: json.loads((tmp_path / "output" / "harness" / "metrics" / label.replace(" ", "_") /
                                      f"{t}_choice.json").read_text()) for t in TASKS} for label in rows}
    assert len(metrics) == 4
    for label, row in rows.items():  # the report reads the harness's accuracies
        assert [float(row[f"{t}_choice"]) for t in TASKS] == pytest.approx([metrics[label][t]["accuracy"] for t in TASKS])
        assert all(metrics[label][t]["num_examples"] == 20 for t in TASKS)
    for task in TASKS:  # each fine-tuned model learnt its task (the random θ_0 is at chance, 1 in 10)
        own = float(rows[f"fine-tuned {task}"][f"{task}_choice"])
        assert own >= 0.8 > float(rows["pretrained"][f"{task}_choice"])
    normalized = {row["model"]: row for row in csv.DictReader(open(report / "normalized.csv"))}
    assert float(normalized["task arithmetic"]["next_choice"]) == pytest.approx(
        float(rows["task arithmetic"]["next_choice"]) / float(rows["fine-tuned next"]["next_choice"]), abs=1e-5)
