"""code/trim.py: the trimmed task vectors of a tiny BERT, their use by TIES, and bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertForSequenceClassification

import trim
from modelmerge.methods import TensorGroup
from test_methods import run_method
from sis_util import REPO
from tiny import tiny_bert_config


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny BERT as a model folder (θ_0) and a bare safetensors fine-tune of it (θ)."""
    root = tmp_path_factory.mktemp("trim")
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config())
    model.save_pretrained(root / "ancestor")
    ancestor = load_file(root / "ancestor" / "model.safetensors")
    ancestor["bert.embeddings.position_ids"] = torch.arange(128).unsqueeze(0)  # a buffer: not trimmed
    save_file(ancestor, root / "ancestor" / "model.safetensors", metadata={"format": "pt"})
    generator = torch.Generator().manual_seed(1)
    tuned = {n: t + 0.01 * torch.randn(t.shape, generator=generator) if t.is_floating_point() else t
             for n, t in ancestor.items()}
    save_file(tuned, root / "tuned.safetensors")
    return root, ancestor, tuned


def top_k_by_sorting(delta, density):
    flat = delta.ravel()
    k = max(1, int(density * flat.size))
    kept = np.zeros_like(flat)
    order = np.argsort(-np.abs(flat))[:k]
    kept[order] = flat[order]
    return kept.reshape(delta.shape)


def test_trimmed_task_vectors_keep_the_largest_entries_under_the_model_names(pair, tmp_path):
    root, ancestor, tuned = pair
    out = tmp_path / "trimmed"
    summary = trim.main(["--model", str(root / "tuned.safetensors"), "--ancestor", str(root / "ancestor"),
                         "--density", "0.2", "--output", str(out)])
    trimmed = load_file(out / "trimmed.safetensors")
    floats = {n for n, t in tuned.items() if t.is_floating_point()}
    assert set(trimmed) == floats and summary.trimmed == len(floats)
    assert summary.skipped == len(tuned) - len(floats) == 1
    for name in floats:
        delta = (tuned[name] - ancestor[name]).numpy()
        np.testing.assert_array_equal(trimmed[name].numpy(), top_k_by_sorting(delta, 0.2))
    assert json.loads((out / "stats.json").read_text())["density"] == 0.2


def test_ties_with_the_trimmed_statistic_equals_ties_trimming_itself(pair, tmp_path):
    root, ancestor, tuned = pair
    out = tmp_path / "trimmed"
    trim.main(["--model", str(root / "tuned.safetensors"), "--ancestor", str(root / "ancestor"),
               "--density", "0.3", "--output", str(out)])
    trimmed = load_file(out / "trimmed.safetensors")
    other = {n: 2 * t - ancestor[n] for n, t in tuned.items() if t.is_floating_point()}  # a second fine-tune
    other_trimmed = {n: (t - ancestor[n]) for n, t in other.items()}
    name = "bert.encoder.layer.0.attention.self.query.weight"
    plain = TensorGroup(name, [tuned[name], other[name]], ancestor=ancestor[name])
    from_stats = TensorGroup(name, [tuned[name], other[name]], ancestor=ancestor[name],
                             statistics=[{"trimmed": trimmed[name]}, {"trimmed": other_trimmed[name]}])
    torch.testing.assert_close(run_method("ties", from_stats), run_method("ties", plain, density=[0.3, 1.0]))


def test_bad_inputs_end_with_an_error_naming_the_tensor_and_leave_no_output(pair, tmp_path):
    root, ancestor, tuned = pair
    name = "bert.encoder.layer.1.output.dense.weight"
    broken = dict(tuned, **{name: tuned[name].clone()})
    broken[name][3, 4] = float("nan")
    save_file(broken, tmp_path / "nan.safetensors")
    reshaped = dict(tuned, **{name: tuned[name].T.contiguous()})
    save_file(reshaped, tmp_path / "reshaped.safetensors")
    for bad_model, message in (("nan.safetensors", f"{name} in .*nan.safetensors holds NaN"),
                               ("reshaped.safetensors", f"tensor {name} has shape")):
        out = tmp_path / "out"
        with pytest.raises(ValueError, match=message):
            trim.main(["--model", str(tmp_path / bad_model), "--ancestor", str(root / "ancestor"),
                       "--density", "0.5", "--output", str(out)])
        assert not out.exists()
        assert not [p for p in os.listdir(tmp_path) if p.startswith(".out")]  # no temporary folder either


def test_command_line_prints_the_summary_and_rejects_a_bad_density(pair, tmp_path):
    root, _, tuned = pair
    command = [sys.executable, os.path.join(REPO, "code", "trim.py"), "--model", str(root / "tuned.safetensors"),
               "--ancestor", str(root / "ancestor"), "--output", str(tmp_path / "out")]
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "code"))
    done = subprocess.run(command + ["--density", "0.1"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    floats = sum(t.is_floating_point() for t in tuned.values())
    assert f"trimmed {floats} tensors" in done.stdout and "peak RSS" in done.stdout
    assert (tmp_path / "out" / "trimmed.safetensors").is_file()
    bad = subprocess.run(command[:-1] + [str(tmp_path / "bad"), "--density", "0"], capture_output=True, text=True,
                         env=env)
    assert bad.returncode == 2 and "density must lie in (0, 1]" in bad.stderr
    assert not (tmp_path / "bad").exists()
