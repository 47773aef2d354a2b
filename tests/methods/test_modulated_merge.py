"""EMR-Merging and TALL masks written as a unified model plus per-task masks and rescalers
(code/modulated_merge.py), against the authors' formulas written here, and each task's model from them."""
import json
import os

import modulated_merge
import pytest
import torch
from safetensors.torch import load_file
from tiny import make_tiny_bert, perturbed_copy

from modelmerge.merging.cli import run_cli as run_program


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("modulated")
    base = make_tiny_bert(str(root / "base"), seed=0, num_hidden_layers=2)
    return base, [perturbed_copy(base, str(root / f"ft{i}"), seed=i, scale=0.05) for i in (1, 2, 3)]


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


def emr_reference(base, models):
    """The authors' EMR (FusionBench's emr_merge): per tensor, then one rescaler per task over all tensors."""
    taus = [{n: m[n] - base[n] for n in base if base[n].is_floating_point()} for m in models]
    unified, masks = {}, [{} for _ in models]
    own, kept = [0.0] * len(models), [0.0] * len(models)
    for n in taus[0]:
        flag = (sum(tau[n] for tau in taus) > 0).float() * 2 - 1
        biggest = torch.zeros_like(flag)
        for t, tau in enumerate(taus):
            masks[t][n] = (tau[n] * flag) > 0
            biggest = torch.where((masks[t][n] * tau[n]).abs() > biggest, (masks[t][n] * tau[n]).abs(), biggest)
            own[t] += tau[n].abs().mean().item()
        unified[n] = biggest * flag
    for t in range(len(models)):
        kept[t] = sum((unified[n] * masks[t][n]).abs().mean().item() for n in unified)
    return unified, masks, [o / k for o, k in zip(own, kept)]


def test_emr_writes_the_unified_model_masks_and_rescalers_and_materialises_each_task(zoo, tmp_path):
    base_path, model_paths = zoo
    out = tmp_path / "emr"
    run_program(modulated_merge.main, ["--merge", "emr", "--models", *model_paths, "--ancestor", base_path,
                                       "--output", str(out), "--no_progress"])
    base, models = weights(base_path), [weights(p) for p in model_paths]
    unified, masks, rescalers = emr_reference(base, models)
    written = weights(out / "unified")
    for n, tau in unified.items():
        torch.testing.assert_close(written[n], base[n] + tau, rtol=1e-5, atol=1e-6)
    description = json.loads((out / "modulators.json").read_text())
    assert description["method"] == "emr"
    assert description["rescalers"] == pytest.approx(rescalers, rel=1e-5)
    for t in range(3):
        stored = load_file(out / f"masks_{t + 1}.safetensors")
        assert all(torch.equal(stored[n], masks[t][n]) for n in masks[t])
    run_program(modulated_merge.main, ["--materialise", str(out), "--task", "2", "--ancestor", base_path,
                                       "--output", str(tmp_path / "task2"), "--no_progress"])
    task2 = weights(tmp_path / "task2")
    for n, tau in unified.items():
        torch.testing.assert_close(task2[n], base[n] + rescalers[1] * masks[1][n] * tau, rtol=1e-5, atol=1e-6)
    assert (tmp_path / "task2" / "config.json").is_file()


def test_tall_masks_select_where_a_task_dominates_and_rebuild_it(zoo, tmp_path):
    base_path, model_paths = zoo
    out = tmp_path / "tall"
    run_program(modulated_merge.main, ["--merge", "tall_masks", "--models", *model_paths, "--ancestor", base_path,
                                       "--x:tall_mask_lambda", "0.4,0.6,0.5", "--x:merge_lambda", "0.8",
                                       "--output", str(out), "--no_progress"])
    base, models = weights(base_path), [weights(p) for p in model_paths]
    assert json.loads((out / "modulators.json").read_text())["rescalers"] == [1.0, 1.0, 1.0]
    mask3 = load_file(out / "masks_3.safetensors")
    run_program(modulated_merge.main, ["--materialise", str(out), "--task", "3", "--ancestor", base_path,
                                       "--output", str(tmp_path / "task3"), "--no_progress"])
    task3 = weights(tmp_path / "task3")
    for n in mask3:
        taus = [m[n] - base[n] for m in models]
        total = sum(taus)
        torch.testing.assert_close(mask3[n], taus[2].abs() >= 0.5 * (total - taus[2]).abs())
        torch.testing.assert_close(task3[n], base[n] + 0.8 * total * mask3[n], rtol=1e-5, atol=1e-6)


def test_bad_requests_fail_with_one_line_and_no_output(zoo, tmp_path, capsys):
    base_path, model_paths = zoo
    with pytest.raises(SystemExit) as exit_info:
        run_program(modulated_merge.main, ["--merge", "tall_masks", "--models", *model_paths, "--ancestor", base_path,
                                           "--x:k", "2", "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "unknown parameter 'k'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_masks_come_from_the_executor_hook_for_every_tensor_even_where_the_models_agree(zoo, tmp_path, monkeypatch):
    """The unified model is merged by merging.execute, whose extra-outputs hook writes every task's TALL mask
    m_t = |τ_t| ≥ λ_t |τ_MTL − τ_t| (written out here), also for a tensor that no fine-tuning changed."""
    from safetensors.torch import save_file

    from modelmerge import modulated
    base_path, model_paths = zoo
    base = weights(base_path)
    untouched = next(n for n in base if n.endswith("LayerNorm.weight"))
    paths = []
    for i, path in enumerate(model_paths):
        copy = tmp_path / f"ft{i}"
        copy.mkdir()
        for name in os.listdir(path):
            if name != "model.safetensors":
                (copy / name).write_bytes(open(os.path.join(path, name), "rb").read())
        tensors = weights(path)
        tensors[untouched] = base[untouched].clone()
        save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
        paths.append(str(copy))
    calls = []
    executed = modulated.execute

    def recording(*args, **kwargs):
        calls.append(kwargs.get("extra_outputs"))
        return executed(*args, **kwargs)

    monkeypatch.setattr(modulated, "execute", recording)
    out = tmp_path / "tall"
    lambdas = [0.4, 0.6, 0.5]
    run_program(modulated_merge.main, ["--merge", "tall_masks", "--models", *paths, "--ancestor", base_path,
                                       "--x:tall_mask_lambda", ",".join(map(str, lambdas)), "--output", str(out),
                                       "--no_progress"])
    assert len(calls) == 1 and calls[0] is not None
    models = [weights(p) for p in paths]
    floats = [n for n in base if base[n].is_floating_point()]
    for t, lam in enumerate(lambdas):
        stored = load_file(out / f"masks_{t + 1}.safetensors")
        assert sorted(stored) == sorted(floats)
        for n in floats:
            taus = [m[n] - base[n] for m in models]
            assert torch.equal(stored[n], taus[t].abs() >= lam * (sum(taus) - taus[t]).abs()), (t, n)
        assert bool(stored[untouched].all())  # 0 ≥ λ·0: every entry of an unchanged tensor
    assert torch.equal(weights(out / "unified")[untouched], base[untouched])
