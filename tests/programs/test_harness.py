"""code/harness_eval.py: lm-evaluation-harness on a tiny GPT-2 with local task files; its multiple-choice accuracy
against one computed here from summed log-likelihoods, and its refusals."""
import glob
import json
import os
import random
import subprocess
import sys

import pytest
import torch
from sis_util import REPO
from tiny import WORDS, make_tiny_bert, make_tiny_gpt2, write_jsonl

SHIPPED_TASKS = os.path.join(REPO, "data", "lm_eval_tasks")
CHOICES = ["yes", "no", "cat"]
TASK_YAML = """task: word_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: rows.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{text}}"
doc_to_choice: ["yes", "no", "cat"]
doc_to_target: label
metric_list:
  - metric: acc
"""


def harness(tmp_path, **config):
    path = tmp_path / "harness_config.json"
    path.write_text(json.dumps({"output_dir": str(tmp_path / "out"), "batch_size": 4, "num_threads": 1, **config}))
    env = dict(os.environ)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(name, None)  # the program itself must go offline for local tasks
    return subprocess.run([sys.executable, os.path.join(REPO, "code", "harness_eval.py"), str(path)],
                          capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return make_tiny_gpt2(str(tmp_path_factory.mktemp("gpt2") / "model"), seed=3)


def word_task(folder, count=12, seed=0):
    """A task file over words the tiny tokenizer knows (a relative data file beside it) and its rows."""
    rng = random.Random(seed)
    words = [w for w in WORDS if w not in CHOICES]
    rows = [{"text": " ".join(rng.choice(words) for _ in range(rng.randint(2, 6))), "label": rng.randrange(3)}
            for _ in range(count)]
    os.makedirs(folder, exist_ok=True)
    write_jsonl(os.path.join(folder, "rows.jsonl"), rows)
    with open(os.path.join(folder, "word_choice.yaml"), "w") as f:
        f.write(TASK_YAML)
    return os.path.join(folder, "word_choice.yaml"), rows


@torch.no_grad()
def summed_log_likelihoods(model, tokenizer, context, choices):
    """log p(" " + choice | context) of a causal LM, summed over the choice's tokens, for each choice."""
    scores = []
    for choice in choices:
        context_ids = tokenizer(context)["input_ids"]
        ids = tokenizer(context + " " + choice)["input_ids"]
        log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
        scores.append(sum(log_probs[i - 1, ids[i]].item() for i in range(len(context_ids), len(ids))))
    return scores


def test_harness_accuracy_is_the_argmax_of_summed_log_likelihoods(tmp_path, gpt2):
    task, rows = word_task(str(tmp_path / "tasks"))
    shipped = os.path.join(SHIPPED_TASKS, "sentiment_amazon.yaml")
    run = harness(tmp_path, model_name_or_path=gpt2, tasks=[task, shipped], limit=5, log_samples=True)
    assert run.returncode == 0, run.stderr[-3000:]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = rows[:5]
    model, tokenizer = AutoModelForCausalLM.from_pretrained(gpt2), AutoTokenizer.from_pretrained(gpt2)
    scores = [summed_log_likelihoods(model, tokenizer, row["text"], CHOICES) for row in rows]
    expected = sum(max(range(3), key=s.__getitem__) == row["label"] for s, row in zip(scores, rows)) / len(rows)
    assert 0 < expected < 1  # neither all right nor all wrong: the comparison can tell
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics" / "word_choice.json").read_text())
    assert metrics["accuracy"] == pytest.approx(expected) and metrics["acc"] == metrics["accuracy"]
    assert metrics["num_examples"] == 5
    # the harness scored each choice as computed here, example by example
    (samples,) = glob.glob(str(out / "harness" / "*" / "samples_word_choice_*.jsonl"))
    logged = sorted((json.loads(line) for line in open(samples)), key=lambda s: s["doc_id"])
    assert [[float(r[0]) for r in s["filtered_resps"]] for s in logged] == [pytest.approx(s, abs=1e-4) for s in scores]

    # the shipped sentiment task ran on the project's data, offline; the run's metrics.json averages both tasks
    amazon = json.loads((out / "metrics" / "sentiment_amazon.json").read_text())
    assert amazon["num_examples"] == 5 and 0 <= amazon["accuracy"] <= 1
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["accuracy"] == pytest.approx((expected + amazon["accuracy"]) / 2)
    assert set(summary["tasks"]) == {"word_choice", "sentiment_amazon"}
    (results,) = glob.glob(str(out / "harness" / "*" / "results_*.json"))  # as the harness writes it
    results = json.loads(open(results).read())
    assert results["results"]["word_choice"]["acc,none"] == pytest.approx(expected)
    assert results["lm_eval_version"] == "0.4.13"

    sys.path.insert(0, os.path.join(REPO, "code"))
    from modelmerge.report import read_accuracy
    assert read_accuracy(out / "metrics" / "word_choice.json") == pytest.approx(expected)  # as any other metric


def test_harness_refuses_bad_input_and_writes_nothing(tmp_path, gpt2):
    task, _ = word_task(str(tmp_path / "tasks"))
    bert = make_tiny_bert(str(tmp_path / "bert"))
    renamed = tmp_path / "tasks" / "other_name.yaml"
    renamed.write_text(open(task).read())
    cases = [
        (dict(model_name_or_path=bert, tasks=[task]), "is a BertForSequenceClassification, not a causal language model"),
        (dict(model_name_or_path=gpt2, tasks=[str(tmp_path / "missing.yaml")]), "missing.yaml does not exist"),
        (dict(model_name_or_path=gpt2, tasks=[str(renamed)]), "defines task 'word_choice'"),
        (dict(model_name_or_path=gpt2, tasks=[task], limit=0), "limit must be at least 1"),
    ]
    for config, message in cases:
        run = harness(tmp_path, **config)
        last = run.stderr.strip().splitlines()[-1]
        assert run.returncode == 2 and message in last and "Traceback" not in run.stderr, run.stderr[-2000:]
        assert not (tmp_path / "out").exists() and not glob.glob(str(tmp_path / ".out*"))


def test_harness_refuses_an_unknown_task_name(tmp_path, gpt2):
    run = harness(tmp_path, model_name_or_path=gpt2, tasks=["no_such_harness_task"])
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert "'no_such_harness_task' is neither a task of lm-eval 0.4.13 nor a task YAML file" in run.stderr
    assert not (tmp_path / "out").exists()
