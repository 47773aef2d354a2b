"""README's "Adding a model family", followed literally on a copy of the repository's code: its shell block run as it
stands on a tiny Llama (an architecture no other test uses) built here, with the two tasks it names; then each task
model fits its task better than θ_0, the merge is the Fisher-weighted average of the files the block wrote, and the
evaluation's loss is the NLL per completion token computed here from families.md's definition. The section's suite
config builds its graph: every task model, statistic, merge method and evaluation of a causal LM."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from sis_util import REPO, jobs_below
from tiny import word_tasks, word_tokenizer, write_jsonl

SECTION = "## Adding a model family"
TASKS = ("copy", "reverse")
sys.path[:0] = [REPO, os.path.join(REPO, "recipe")]  # the recipes, as configs import them


def section():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    text = readme[readme.index(SECTION):]
    return text[:text.find("\n## ", 1)] if "\n## " in text[1:] else text


def block(language):
    return re.search(rf"```{language}\n(.*?)\n```", section(), re.S).group(1) + "\n"


def make_tiny_llama(path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = word_tokenizer("gpt2")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, bos_token_id=0,
                         eos_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def the_inputs_the_section_names(root):
    """tiny-llama/ and the task folders copy/ and reverse/ of {train,validation,test}.jsonl."""
    make_tiny_llama(str(root / "tiny-llama"))
    for task in TASKS:
        for split, size, seed in (("train", 64, 0), ("validation", 16, 1), ("test", 16, 2)):
            write_jsonl(str(root / task / f"{split}.jsonl"), word_tasks(size, seed=seed, kind=task))


def nll_per_completion_token(path, rows):
    """families.md's causal LM: the tokens of the prompt, of " " + completion and eos; the completion and eos scored."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            prompt = tokenizer(row["input"])["input_ids"]
            completion = tokenizer(" " + row["target"], add_special_tokens=False)["input_ids"]
            completion = completion + [tokenizer.eos_token_id]
            ids = torch.tensor([prompt + completion])
            log_probs = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
            for position in range(len(prompt), ids.shape[1]):
                total -= float(log_probs[position - 1, ids[0, position]])
                count += 1
    return total / count


@pytest.mark.slow
def test_the_shell_block_trains_computes_fishers_merges_and_evaluates_a_new_architecture(tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(os.path.join(REPO, "code"), root / "code", ignore=shutil.ignore_patterns("__pycache__"))
    the_inputs_the_section_names(root)
    bin_dir = tmp_path / "bin"  # `python` in the block is this interpreter
    bin_dir.mkdir()
    os.symlink(sys.executable, bin_dir / "python")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(["bash", "-e", "-c", block("bash")], cwd=root, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    rows = {task: [json.loads(line) for line in (root / task / "test.jsonl").read_text().splitlines()]
            for task in TASKS}
    for task in TASKS:  # fine-tuning taught each model its task
        trained = nll_per_completion_token(str(root / f"llama-{task}" / "best"), rows[task])
        assert trained < 0.8 * nll_per_completion_token(str(root / "tiny-llama"), rows[task])

    models = [load_file(str(root / f"llama-{task}" / "best" / "model.safetensors")) for task in TASKS]
    fishers = [load_file(str(root / f"fisher-{task}" / "fisher.safetensors")) for task in TASKS]
    merged = load_file(str(root / "llama-merged" / "model.safetensors"))
    assert set(merged) == set(models[0]) and all(set(fisher) <= set(models[0]) for fisher in fishers)
    for name, value in merged.items():  # Σ F_t θ_t / Σ F_t, dividing by 1 where Σ F_t = 0
        if name not in fishers[0]:
            continue
        mass = fishers[0][name].double() + fishers[1][name].double()
        weighted = sum(f[name].double() * m[name].double() for f, m in zip(fishers, models))
        torch.testing.assert_close(value.double(), weighted / torch.where(mass == 0, torch.ones_like(mass), mass),
                                   rtol=1e-5, atol=1e-7)
    assert any(bool((fishers[0][name] > 0).any()) for name in fishers[0])
    for task in TASKS:
        assert json.loads((root / f"fisher-{task}" / "stats.json").read_text())["num_examples"] == 64

    metrics = json.loads((root / "evaluation" / "metrics.json").read_text())
    assert metrics["num_examples"] == 16
    expected = nll_per_completion_token(str(root / "llama-merged"), rows["copy"])
    assert metrics["loss"] == pytest.approx(expected, rel=1e-4)
    assert 0.0 <= metrics["exact_match"] <= 1.0


def test_the_suite_config_builds_the_graph_of_a_causal_lm_family(monkeypatch):
    from sisyphus import tk

    from model_merging.catalogue import SWEEPS
    from model_merging.statistics import FisherJob, GramJob
    from model_merging.training import HuggingfaceTrainingJob

    registered = {}
    monkeypatch.setattr(tk, "register_output", lambda name, value, *a, **k: registered.setdefault(name, value))
    config = {}
    exec(compile(block("python"), "config/llama_tasks.py", "exec"), config)
    config["py"]()
    report = registered["llama_tasks/report"].creator
    methods = [label for label, entry in SWEEPS.items() if entry["kind"] != "data-aware"]
    assert set(report.results) == {"pretrained", "fine-tuned copy", "fine-tuned reverse"}
    assert set(report.choices) == set(methods)
    assert all(set(by_task) == set(TASKS) for by_task in report.results.values())
    assert all(set(by_task) == set(TASKS) for choice in report.choices.values() for by_task in choice["test"].values())
    jobs = jobs_below(report)
    trainings = [job for job in jobs if isinstance(job, HuggingfaceTrainingJob)]
    assert sorted(os.path.basename(str(job.train_config["dataset_name"])) for job in trainings) == list(TASKS)
    assert all(job.train_config["task_type"] == "causal_lm" for job in trainings)
    statistics = [job for job in jobs if isinstance(job, (FisherJob, GramJob))]
    assert len(statistics) == 5  # a Fisher and a Gram of each task model, θ_0's Fisher
    assert all(job.extra_config["task_type"] == "causal_lm" for job in statistics)
