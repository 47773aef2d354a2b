"""LoRA adapters: A and B merged independently, or as weight changes s·B·A (`lora-` methods) written back as
an adapter (truncated SVD) or folded into the base model; checked against direct formulas and PEFT itself."""
import math
import os

import merge as merge_program
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny import make_tiny_bert
from transformers import BertForSequenceClassification

from modelmerge.merging.cli import run_cli as run_program

PREFIX = "base_model.model."
TARGETS = ["query", "value"]


def make_adapter(base, path, seed, r, alpha, classifier=False, rslora=False):
    """A LoRA adapter with random A and B (B is zero at PEFT's usual init, which would make ΔW = 0)."""
    torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(base)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False, use_rslora=rslora,
                        modules_to_save=["classifier"] if classifier else None)
    peft_model = get_peft_model(model, config)
    if classifier:
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "modules_to_save" in name:
                    p.add_(torch.randn_like(p))
    peft_model.save_pretrained(path)
    return str(path)


def scale(r, alpha, rslora=False):
    return alpha / math.sqrt(r) if rslora else alpha / r


def deltas(adapter, s):
    """{base weight name: s·B·A} of an adapter folder, read with safetensors directly."""
    tensors = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    found = {}
    for name, a in tensors.items():
        if name.endswith(".lora_A.weight"):
            module = name[len(PREFIX):-len(".lora_A.weight")]
            found[module + ".weight"] = s * tensors[name.replace("lora_A", "lora_B")] @ a
    return found


def run(argv):
    return run_program(merge_program.main, argv + ["--no_progress"])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_bert(str(tmp_path_factory.mktemp("lora") / "base"), seed=0)


def test_lora_task_arithmetic_writes_an_adapter_of_the_summed_changes(base, tmp_path):
    first = make_adapter(base, tmp_path / "a1", seed=1, r=2, alpha=4)
    second = make_adapter(base, tmp_path / "a2", seed=2, r=3, alpha=3, rslora=True)
    out = str(tmp_path / "merged")
    run(["--merge", "lora-task_arithmetic", "--models", first, second, "--x:merge_lambda", "0.5",
         "--lora_rank", "5", "--output", out])
    # rank 2 + 3 holds the sum exactly; the written adapter has scale lora_alpha / r = 1
    expected = {n: 0.5 * (d + deltas(second, scale(3, 3, True))[n]) for n, d in deltas(first, scale(2, 4)).items()}
    written = deltas(out, 1.0)
    assert written.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(written[name], expected[name], rtol=1e-4, atol=1e-6)
    # PEFT loads it, and applies exactly those changes
    peft_model = PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(base), out)
    folded = peft_model.merge_and_unload().state_dict()
    original = BertForSequenceClassification.from_pretrained(base).state_dict()
    for name, change in expected.items():
        torch.testing.assert_close(folded[name] - original[name], change, rtol=1e-4, atol=1e-5)


def test_a_smaller_output_rank_is_the_truncated_svd_and_full_tensors_are_averaged(base, tmp_path):
    first = make_adapter(base, tmp_path / "a1", seed=3, r=4, alpha=8, classifier=True)
    second = make_adapter(base, tmp_path / "a2", seed=4, r=4, alpha=8, classifier=True)
    out = str(tmp_path / "merged")
    run(["--merge", "lora-linear", "--models", first, second, "--output", out])  # rank: the largest input rank, 4
    written, inputs = load_file(os.path.join(out, "adapter_model.safetensors")), [deltas(a, 2.0) for a in (first, second)]
    for name, mean in ((n, (inputs[0][n] + inputs[1][n]) / 2) for n in inputs[0]):
        u, s, vh = torch.linalg.svd(mean)
        best = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]  # Eckart–Young: the best rank-4 approximation
        torch.testing.assert_close(deltas(out, 1.0)[name], best, rtol=1e-4, atol=1e-6)
    classifiers = [load_file(os.path.join(a, "adapter_model.safetensors"))[PREFIX + "classifier.weight"] for a in (first, second)]
    torch.testing.assert_close(written[PREFIX + "classifier.weight"], (classifiers[0] + classifiers[1]) / 2)


def test_folding_one_adapter_into_its_base_equals_peft_merge_and_unload(base, tmp_path):
    adapter = make_adapter(base, tmp_path / "a", seed=5, r=2, alpha=16, classifier=True, rslora=True)
    out = str(tmp_path / "folded")
    run(["--merge", "lora-task_arithmetic", "--models", adapter, "--ancestor", base, "--output", out])
    peft_model = PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(base), adapter)
    expected = peft_model.merge_and_unload().state_dict()
    merged = BertForSequenceClassification.from_pretrained(out).state_dict()
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-5, atol=1e-6)


def test_lora_ties_into_the_base_merges_full_weights(base, tmp_path):
    adapters = [make_adapter(base, tmp_path / f"a{i}", seed=10 + i, r=2, alpha=2, classifier=True) for i in range(2)]
    out = str(tmp_path / "ties")
    run(["--merge", "lora-ties", "--models", *adapters, "--ancestor", base, "--x:density", "1.0", "--output", out])
    # density 1: TIES keeps every entry, elects signs and averages the agreeing changes
    original = load_file(os.path.join(base, "model.safetensors"))
    changes = [deltas(a, 1.0) for a in adapters]
    merged = load_file(os.path.join(out, "model.safetensors"))
    for name, d0 in changes[0].items():
        stacked = torch.stack([d0, changes[1][name]])
        agree = stacked.sign() == stacked.sum(0).sign()
        expected = original[name] + (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)
        torch.testing.assert_close(merged[name], expected, rtol=1e-5, atol=1e-6)
    untouched = "bert.encoder.layer.0.attention.self.key.weight"
    assert torch.equal(merged[untouched], original[untouched])


def test_plain_methods_merge_a_and_b_independently_into_a_loadable_adapter(base, tmp_path):
    adapters = [make_adapter(base, tmp_path / f"a{i}", seed=20 + i, r=2, alpha=4, classifier=True) for i in range(2)]
    out = str(tmp_path / "avg")
    run(["--merge", "average", "--models", *adapters, "--output", out])
    tensors = [load_file(os.path.join(a, "adapter_model.safetensors")) for a in adapters]
    merged = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert merged.keys() == tensors[0].keys()
    for name in merged:
        torch.testing.assert_close(merged[name], (tensors[0][name] + tensors[1][name]) / 2)
    assert os.path.isfile(os.path.join(out, "adapter_config.json"))
    PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(base), out)


def test_lora_methods_needing_an_ancestor_refuse_full_tensors_without_one(base, tmp_path, capsys):
    adapters = [make_adapter(base, tmp_path / f"a{i}", seed=30 + i, r=2, alpha=4, classifier=True) for i in range(2)]
    with pytest.raises(SystemExit):
        run(["--merge", "lora-ties", "--models", *adapters, "--output", str(tmp_path / "out")])
    assert "give the base model as ancestor" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_lora_merge_refuses_statistics_that_name_none_of_the_weight_changes(base, tmp_path, capsys):
    """An adapter's Grams are keyed by its lora_A/lora_B weights, not by the base weights whose changes a
    lora- merge combines: RegMean would silently average every change; it must refuse instead."""
    adapters = [make_adapter(base, tmp_path / f"a{i}", seed=40 + i, r=2, alpha=4) for i in range(2)]
    grams = []
    for i, adapter in enumerate(adapters):
        a_names = [n for n in load_file(os.path.join(adapter, "adapter_model.safetensors")) if "lora_A" in n]
        path = str(tmp_path / f"gram{i}.safetensors")
        save_file({name: torch.eye(32) for name in a_names}, path)
        grams.append(path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(["--merge", "lora-regmean", "--models", *adapters, "--aux_data", *grams, "--ancestor", base,
             "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert "no 'gram' statistic for any merged tensor" in error and len(error.splitlines()) == 1
    assert not (tmp_path / "out").exists()
