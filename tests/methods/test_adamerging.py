"""AdaMerging (code/adamerging.py): with no step it is task arithmetic at the prior; its first Adam step
moves every coefficient by the learning rate against the sign of the entropy's derivative, which is
checked here by finite differences of the entropy written out in the test; the entropy falls."""
import json
import os

import adamerging as program
import pytest
import torch
from safetensors.torch import load_file
from tiny import make_tiny_bert, perturbed_copy, read_jsonl, tiny_data_dir
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from modelmerge.merging.cli import run_cli

TASKS = ("sst2", "rotten_tomatoes")
EXAMPLES, BATCH = 8, 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("adamerging")
    base = make_tiny_bert(str(root / "base"), seed=0)
    models = [perturbed_copy(base, str(root / f"ft{i}"), seed=i, scale=0.3) for i in (1, 2)]
    return base, models, tiny_data_dir(root / "data", tasks=TASKS)


def run(setup, out, *extra):
    base, models, data = setup
    return run_cli(program.main, ["--ancestor", base, "--models", *models, "--datasets", *TASKS, "--data_dir", data,
                                  "--num_examples", str(EXAMPLES), "--batch_size", str(BATCH), "--max_length", "24",
                                  "--output", str(out), "--no_progress", *extra])


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def test_no_step_is_task_arithmetic_at_the_prior(setup, tmp_path):
    base, models, _ = setup
    run(setup, tmp_path / "out", "--iterations", "0", "--prior", "0.4")
    merged, theta_0, thetas = weights(tmp_path / "out"), weights(base), [weights(m) for m in models]
    for name, tensor in theta_0.items():
        if tensor.is_floating_point() and "position_ids" not in name:
            expected = tensor + 0.4 * sum(t[name] - tensor for t in thetas)
            torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)


def test_first_step_follows_the_sign_of_the_entropy_gradient(setup, tmp_path):
    base, models, data = setup
    run(setup, tmp_path / "out", "--iterations", "1", "--learning_rate", "0.01")
    learned = json.loads((tmp_path / "out" / "adamerging.json").read_text())["coefficients"]
    model = AutoModelForSequenceClassification.from_pretrained(base).eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    theta_0 = {n: t.clone() for n, t in model.state_dict().items()}  # load_state_dict writes into the model's own tensors
    thetas = [weights(m) for m in models]
    batches = [tokenizer([r["text"] for r in read_jsonl(os.path.join(data, task, "validation.jsonl"), BATCH)],
                         truncation=True, max_length=24, padding=True, return_tensors="pt") for task in TASKS]

    def loss(coefficients):
        state = {n: theta_0[n] + sum(c[n] * (t[n] - theta_0[n]) for c, t in zip(coefficients, thetas)) if n in learned
                 else theta_0[n] for n in theta_0}
        model.load_state_dict(state)
        with torch.no_grad():
            total = 0.0
            for batch in batches:
                p = torch.softmax(model(**batch).logits.double(), dim=-1)
                total += float(-(p * p.log()).sum(-1).mean())
        return total

    checked = 0
    for name in ["classifier.weight", "bert.pooler.dense.weight", "bert.encoder.layer.1.output.dense.weight"]:
        for t in range(2):
            up = [{n: 0.3 for n in learned} for _ in range(2)]
            down = [{n: 0.3 for n in learned} for _ in range(2)]
            up[t][name], down[t][name] = 0.31, 0.29
            gradient = (loss(up) - loss(down)) / 0.02
            if abs(gradient) > 1e-3:
                assert learned[name][t] == pytest.approx(0.3 - 0.01 * (1 if gradient > 0 else -1), abs=1e-6)
                checked += 1
    assert checked >= 3


def test_the_entropy_falls(setup, tmp_path):
    summary = run(setup, tmp_path / "out", "--iterations", "30", "--learning_rate", "0.01")
    assert summary.last < summary.first


def test_an_existing_folder_it_did_not_write_is_refused_before_any_work(setup, tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(SystemExit) as exit_info:
        run(setup, tmp_path / "mine", "--iterations", "1")
    assert exit_info.value.code == 2 and "exists and is not an output of this program" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
