"""Variational training with IVON (code/train.py, modelmerge.variational) on a tiny random BERT: the posterior it
writes is ivon's own state, training resumes with the optimizer's state, evaluation over posterior draws averages
their probabilities, gradient matching takes the posteriors as H_0 and H_t, and config/variational.py has no
Fisher job."""
import json
import os
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny import make_tiny_bert, read_jsonl, tiny_data_dir
from transformers import AutoTokenizer, TrainerCallback

from modelmerge.io.reading import open_checkpoint
from modelmerge.config import from_dict
from modelmerge.merging import MergeError
from modelmerge.merging.provenance import fingerprint
from modelmerge.training import TrainConfig, train
from uncertainty_based_gradient_matching import main as gradient_matching
from sis_util import REPO

WEIGHT_DECAY = 1e-3


def ivon_config(model, data, output_dir, dataset="sst2", **overrides):
    keys = dict(model_name_or_path=str(model), output_dir=str(output_dir), dataset_name=dataset, data_dir=data,
                learning_rate=0.05, warmup_steps=0, lr_scheduler_type="linear", num_train_epochs=2,
                per_device_train_batch_size=8, max_length=32, logging_steps=1, num_threads=1, seed=3,
                optimizer_name="IVON", weight_decay=WEIGHT_DECAY,
                ivon={"hess_init": 0.5, "beta2": 0.9, "train_samples": 2})  # β2 0.9: h moves in 12 steps
    keys.update(overrides)
    return from_dict(TrainConfig, keys)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """θ_0 trained by IVON on sst2, and two task models trained by IVON from it (rotten_tomatoes, sst2)."""
    root = tmp_path_factory.mktemp("ivon")
    data = tiny_data_dir(root / "data")
    base = make_tiny_bert(root / "tiny")
    runs = {"pretrained": train(ivon_config(base, data, root / "pretrained"))}
    for name, dataset, seed in (("rotten", "rotten_tomatoes", 4), ("sst2", "sst2", 5)):
        runs[name] = train(ivon_config(root / "pretrained" / "best", data, root / name, dataset, seed=seed,
                                       num_train_epochs=1))
    return root, data, runs


def best_checkpoint(output_dir):
    with open(os.path.join(output_dir, "trainer_state.json")) as f:
        return json.load(f)["best_model_checkpoint"]


def precision_from_optimizer_state(checkpoint):
    """{parameter name: ess · (h + δ)} straight from ivon's state in a Trainer checkpoint."""
    state = torch.load(os.path.join(checkpoint, "optimizer.pt"), map_location="cpu", weights_only=True)
    (group,) = state["param_groups"]
    precision = group["ess"] * (group["hess"] + group["weight_decay"])
    result, offset = {}, 0
    parameters = load_file(os.path.join(checkpoint, "model.safetensors"))
    for name in group["param_names"]:
        size = parameters[name].numel()
        result[name] = precision[offset:offset + size].reshape(parameters[name].shape)
        offset += size
    assert offset == precision.numel()
    return result, group


def test_the_posterior_precision_is_ivons_state_over_ess(trained):
    root, _, _ = trained
    out = root / "pretrained"
    assert "posterior" in os.listdir(out)
    checkpoint = best_checkpoint(out)
    expected, group = precision_from_optimizer_state(checkpoint)
    assert group["ess"] == 48 and group["weight_decay"] == WEIGHT_DECAY  # ess: the training set's size
    assert not torch.allclose(group["hess"], torch.full_like(group["hess"], 0.5))  # h was learned
    stats = json.loads((out / "posterior" / "stats.json").read_text())
    assert stats == {"num_examples": 48, "variant": "ivon", "seed": 3}
    written = load_file(out / "posterior" / "fisher.safetensors")
    assert set(written) == set(load_file(out / "best" / "model.safetensors"))
    for name, precision in expected.items():
        torch.testing.assert_close(stats["num_examples"] * written[name], precision, rtol=1e-6, atol=0)
    # the hessian/ folder holds the same tensors in the model's layout; the files record the model they describe
    hessian = load_file(out / "posterior" / "hessian" / "model.safetensors")
    assert all(torch.equal(hessian[name], written[name]) for name in expected)
    with safe_open(out / "posterior" / "fisher.safetensors", framework="pt") as f:
        metadata = f.metadata()
    assert metadata["model_fingerprint"] == fingerprint(open_checkpoint(str(out / "best")))
    assert (metadata["variant"], metadata["dataset"], metadata["split"]) == ("ivon", "sst2", "train")
    assert torch.equal(load_file(out / "best" / "model.safetensors")["classifier.weight"],
                       load_file(os.path.join(checkpoint, "model.safetensors"))["classifier.weight"])  # the mean


class StopAfterFirstSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        raise KeyboardInterrupt


def test_training_resumes_with_ivons_state(trained, tmp_path):
    root, data, _ = trained
    interrupted = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        train(ivon_config(root / "tiny", data, interrupted), callbacks=[StopAfterFirstSave()])
    assert sorted(os.listdir(interrupted)) == ["checkpoint-6", "train_config.json"]
    saved = torch.load(interrupted / "checkpoint-6" / "optimizer.pt", weights_only=True)
    assert saved["current_step"] == 6  # the step count of the momentum's bias correction is kept
    train(ivon_config(root / "tiny", data, interrupted))
    straight = root / "pretrained"
    for folder in ("epoch-2/model.safetensors", "posterior/fisher.safetensors"):
        resumed, uninterrupted = load_file(interrupted / folder), load_file(straight / folder)
        for name in uninterrupted:
            torch.testing.assert_close(resumed[name], uninterrupted[name], rtol=1e-5, atol=1e-6)


def test_evaluation_with_posterior_draws_averages_their_probabilities(trained, tmp_path):
    root, data, _ = trained
    trainer = train(ivon_config(root / "tiny", data, tmp_path / "out", num_train_epochs=1,
                                ivon={"hess_init": 0.5, "eval_samples": 3}))
    batch = trainer.data_collator([trainer.eval_dataset[i] for i in range(5)])
    torch.manual_seed(11)
    loss, log_probabilities, labels = trainer.prediction_step(trainer.model, dict(batch), prediction_loss_only=False)
    torch.manual_seed(11)
    probabilities = []
    model = trainer.model.eval()
    for _ in range(3):
        with trainer.ivon.sampled_params(), torch.no_grad():
            probabilities.append(model(**batch).logits.softmax(-1))
    expected = torch.stack(probabilities).mean(0)
    torch.testing.assert_close(log_probabilities.exp(), expected)
    torch.testing.assert_close(loss, torch.nn.functional.nll_loss(expected.log(), batch["labels"]))
    with torch.no_grad():
        mean_model = model(**batch).logits.softmax(-1)
    assert not torch.allclose(mean_model, expected)  # the draws are not the mean


def merge_gradient_matching(root, output, pretrained_hessian, hessians, allow_mismatch=False):
    argv = ["--pretrained_model_name_or_path", str(root / "pretrained" / "best"),
            "--pretrained_hessian_path", str(pretrained_hessian),
            "--ft_model_name_or_paths", ",".join(str(root / name / "best") for name in ("rotten", "sst2")),
            "--ft_hessian_paths", ",".join(map(str, hessians)), "--scaling_factors_ft", "48,48",
            "--scaling_factor_pt", "48", "--delta_0", "1e-8", "--out_model_path", str(output)]
    gradient_matching(argv + (["--allow_statistics_mismatch"] if allow_mismatch else []))
    return load_file(output / "model.safetensors")


def test_gradient_matching_takes_the_posteriors_as_it_takes_the_same_tensors_as_a_fisher(trained, tmp_path):
    root, _, _ = trained
    merged = merge_gradient_matching(root, tmp_path / "posteriors", root / "pretrained" / "posterior",
                                     [root / name / "posterior" for name in ("rotten", "sst2")])
    # the same tensors in a bare file (no provenance, so no check): the same merge
    bare = []
    for name in ("pretrained", "rotten", "sst2"):
        bare.append(tmp_path / f"{name}.safetensors")
        save_file(load_file(root / name / "posterior" / "fisher.safetensors"), bare[-1])
    assert merged.keys() == merge_gradient_matching(root, tmp_path / "bare", bare[0], bare[1:]).keys()
    again = load_file(tmp_path / "bare" / "model.safetensors")
    assert all(torch.equal(merged[name], again[name]) for name in merged)
    # and the paper's formula with each model's precision ess·(h+δ) read from ivon's state
    theta = {name: load_file(root / name / "best" / "model.safetensors") for name in ("pretrained", "rotten", "sst2")}
    precision = {name: precision_from_optimizer_state(best_checkpoint(root / name))[0]
                 for name in ("pretrained", "rotten", "sst2")}
    for tensor in precision["pretrained"]:
        p0, p1, p2 = (precision[name][tensor] for name in ("pretrained", "rotten", "sst2"))
        t0, t1, t2 = (theta[name][tensor] for name in ("pretrained", "rotten", "sst2"))
        expected = t0 + ((p1 + 1e-8 + p0) * (t1 - t0) + (p2 + 1e-8 + p0) * (t2 - t0)) / (p1 + p2 + p0 + 1e-8)
        torch.testing.assert_close(merged[tensor], expected, rtol=1e-4, atol=1e-6)


def test_a_posterior_of_another_model_or_with_other_tensors_is_refused(trained, tmp_path):
    root, _, _ = trained
    swapped = [root / name / "posterior" for name in ("sst2", "rotten")]
    with pytest.raises(MergeError, match="not in the order of the models"):
        merge_gradient_matching(root, tmp_path / "swapped", root / "pretrained" / "posterior", swapped)
    tensors = load_file(root / "rotten" / "posterior" / "fisher.safetensors")
    tensors["classifier.weight"] = tensors["classifier.weight"][:, :-1].contiguous()
    save_file(tensors, tmp_path / "cut.safetensors")
    with pytest.raises(MergeError, match="classifier.weight"):
        merge_gradient_matching(root, tmp_path / "cut", root / "pretrained" / "posterior",
                                [tmp_path / "cut.safetensors", root / "sst2" / "posterior"])
    assert not (tmp_path / "swapped").exists() and not (tmp_path / "cut").exists()


def test_variational_config_merges_with_posteriors_and_has_no_fisher_job(monkeypatch):
    sys.path[:0] = [REPO, os.path.join(REPO, "recipe")]
    from config.variational import build
    from model_merging import presets
    from model_merging.merge import UncertaintyBasedGradientMatchingJob
    from model_merging.statistics import FisherJob
    from model_merging.training import HuggingfaceTrainingJob

    monkeypatch.setenv("MERGE_DATA_DIR", os.path.join(REPO, "data", "sentiment"))
    results, report = build(presets.select("offline"))

    def jobs(label):
        seen, stack = set(), [metrics.creator for metrics in results[label].values()]
        while stack:
            job = stack.pop()
            if job not in seen:
                seen.add(job)
                stack.extend(path.creator for path in job._sis_inputs if path.creator is not None)
        return seen

    ivon, adam = jobs("gradient matching (IVON)"), jobs("gradient matching (Adam + Fisher)")
    assert not any(isinstance(job, FisherJob) for job in ivon)
    assert sum(isinstance(job, FisherJob) for job in adam) == 5
    (merge,) = [job for job in ivon if isinstance(job, UncertaintyBasedGradientMatchingJob)]
    for hessian in [merge.pretrained_hessian, *merge.finetuned_hessians]:
        assert isinstance(hessian.creator, HuggingfaceTrainingJob) and hessian is hessian.creator.out_posterior
        assert hessian.creator.train_config["optimizer_name"] == "IVON"
    trained = [job for job in ivon if isinstance(job, HuggingfaceTrainingJob)]
    assert len(trained) == 5 and all(job.train_config["optimizer_name"] == "IVON" for job in trained)
    assert {"pretrained (IVON)", "pretrained (Adam + Fisher)", "multitask"} <= set(report.results)
