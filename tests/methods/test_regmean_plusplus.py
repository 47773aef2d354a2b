"""RegMean++ (code/regmean_plusplus.py) against the paper's procedure written out here: stage by stage,
each task's linear-layer inputs captured by hooks on the model whose earlier stages are the merged ones,
then RegMean's closed form; everything else averaged."""
import os

import numpy as np
import pytest
import regmean_plusplus as program
import torch
from safetensors.torch import load_file
from tiny import make_tiny_bert, perturbed_copy, read_jsonl, tiny_data_dir
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from modelmerge.merging.cli import run_cli

ALPHA, EXAMPLES, MAX_LENGTH = 0.7, 8, 24
TASKS = ("sst2", "rotten_tomatoes")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("regmean_pp")
    base = make_tiny_bert(str(root / "base"), seed=0)
    models = [perturbed_copy(base, str(root / f"ft{i}"), seed=i, scale=0.05) for i in (1, 2)]
    return models, tiny_data_dir(root / "data", tasks=TASKS)


def captured_grams(model, tokenizer, texts, linear_names):
    """Σ xᵀx of each named linear layer's input: non-padding tokens of [batch, tokens, features] inputs,
    one row per example otherwise."""
    grams, handles = {}, []
    batch = tokenizer(texts, truncation=True, max_length=MAX_LENGTH, padding=True, return_tensors="pt")
    mask = batch["attention_mask"].bool()
    modules = dict(model.named_modules())

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0]
            rows = x[mask] if x.dim() == 3 else x
            grams[name] = grams.get(name, 0) + rows.double().T @ rows.double()
        return record

    for name in linear_names:
        handles.append(modules[name].register_forward_hook(hook(name)))
    with torch.no_grad():
        model.eval()(**batch)
    for handle in handles:
        handle.remove()
    return grams


def reference(model_paths, data_dir, partly_merged=True):
    models = [AutoModelForSequenceClassification.from_pretrained(p) for p in model_paths]
    tokenizer = AutoTokenizer.from_pretrained(model_paths[0])
    texts = [[row["text"] for row in read_jsonl(os.path.join(data_dir, task, "train.jsonl"), EXAMPLES)] for task in TASKS]
    names = [n for n, _ in models[0].named_parameters()]
    stages = [[n for n in names if "encoder.layer" not in n and not n.startswith(("bert.pooler", "classifier"))]]
    stages += [[n for n in names if f"encoder.layer.{i}." in n] for i in range(2)]
    stages += [[n for n in names if n.startswith(("bert.pooler", "classifier"))]]
    assert sum(map(len, stages)) == len(names)
    merged = {}
    for stage in stages:
        linears = [n[: -len(".weight")] for n in stage if n.endswith(".weight") and n[: -len(".weight")] + ".bias" in stage
                   and dict(models[0].named_parameters())[n].dim() == 2 and "embeddings" not in n]
        grams = [captured_grams(m, tokenizer, t, linears) for m, t in zip(models, texts)]
        params = [dict(m.named_parameters()) for m in models]
        for name in stage:
            layer = name[: -len(".weight")]
            if layer in linears:
                lhs = sum(ALPHA * g[layer] + (1 - ALPHA) * torch.diag(torch.diag(g[layer])) for g in grams)
                rhs = sum((ALPHA * g[layer] + (1 - ALPHA) * torch.diag(torch.diag(g[layer]))) @ p[name].double().T
                          for g, p in zip(grams, params))
                merged[name] = torch.from_numpy(np.linalg.solve(lhs.numpy(), rhs.detach().numpy()).T).float()
            else:
                merged[name] = sum(p[name].detach() for p in params) / len(params)
        with torch.no_grad():
            for p in params if partly_merged else []:
                for name in stage:
                    p[name].copy_(merged[name])
    return merged


def test_regmean_plusplus_follows_the_papers_procedure(setup, tmp_path):
    model_paths, data_dir = setup
    out = tmp_path / "merged"
    run_cli(program.main, ["--models", *model_paths, "--datasets", *TASKS, "--data_dir", data_dir,
                           "--num_examples", str(EXAMPLES), "--max_length", str(MAX_LENGTH), "--batch_size", "3",
                           "--alpha", str(ALPHA), "--output", str(out), "--no_progress"])
    ours = load_file(out / "model.safetensors")
    expected = reference(model_paths, data_dir)
    for name, tensor in expected.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    assert AutoModelForSequenceClassification.from_pretrained(out) is not None
    plain_regmean = reference(model_paths, data_dir, partly_merged=False)  # Grams of the task models alone
    name = "bert.encoder.layer.1.attention.self.query.weight"
    assert not torch.allclose(plain_regmean[name], ours[name], rtol=1e-3, atol=1e-4)


def test_bad_requests_are_one_line(setup, tmp_path, capsys):
    model_paths, data_dir = setup
    with pytest.raises(SystemExit) as exit_info:
        run_cli(program.main, ["--models", *model_paths, "--datasets", "sst2", "--data_dir", data_dir,
                               "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "one per model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
