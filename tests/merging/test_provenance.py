"""Statistics record the model and data they were computed on, and a merge refuses statistics of another
model than the one they are paired with (issue 21: Fisher files given in the wrong order merged without a word)."""
import json
import os
import shutil

import merge as merge_program
import pytest
import torch
import trim as trim_program
import uncertainty_based_gradient_matching as ubgm_program
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny import make_tiny_bert, perturbed_copy, tiny_data_dir
from transformers import BertForSequenceClassification

from modelmerge.io.reading import open_checkpoint
from modelmerge.config import run_program
from modelmerge.merging.cli import run_cli
from modelmerge.merging.provenance import fingerprint
from modelmerge.prediction.config import PredictConfig
from modelmerge.prediction.program import run


def metadata(path):
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def predict(root, model, mode, name):
    keys = dict(model_name_or_path=model, output_dir=str(root / name), dataset_name="sst2", split="validation",
                data_dir=str(root / "data"), mode=mode, num_examples=4, batch_size=4, max_length=32, num_threads=1)
    (root / f"{name}.json").write_text(json.dumps(keys))
    assert run_program(PredictConfig, run, "predict", [str(root / f"{name}.json")]) == 0
    return str(root / name)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("provenance")
    tiny_data_dir(root / "data", tasks=("sst2",))
    base = make_tiny_bert(root / "base")
    models = [perturbed_copy(base, str(root / f"ft{i}"), seed=i) for i in (1, 2)]
    fishers = [predict(root, m, "squared_gradients", f"fisher{i}") for i, m in enumerate(models)]
    base_fisher = predict(root, base, "squared_gradients", "fisher_base")
    return {"root": root, "base": base, "models": models, "fishers": fishers, "base_fisher": base_fisher}


def merge(argv, program=merge_program):
    return run_cli(program.main, argv + (["--no_progress"] if program is merge_program else []))


def fails(argv, capsys, program=merge_program):
    with pytest.raises(SystemExit) as exit_info:
        merge(argv, program)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: ")
    return lines[-1]


def test_statistics_record_the_model_the_data_and_the_variant(zoo, tmp_path):
    model = zoo["models"][0]
    expected = {"model": os.path.abspath(model), "model_fingerprint": fingerprint(open_checkpoint(model)),
                "dataset": "sst2", "split": "validation", "variant": "sampled", "seed": "0", "num_examples": "4"}
    folder = zoo["fishers"][0]
    for path in (os.path.join(folder, "fisher.safetensors"), os.path.join(folder, "hessian", "model.safetensors")):
        assert metadata(path).items() >= expected.items()
    shutil.copytree(zoo["root"] / "data", tmp_path / "data")
    gram = predict(tmp_path, model, "gram", "gram")
    for name in ("gram.safetensors", "output_grad_gram.safetensors"):
        assert metadata(os.path.join(gram, name)).items() >= expected.items()


def test_the_fingerprint_follows_the_weights_not_the_files(zoo, tmp_path):
    model = zoo["models"][0]
    original = fingerprint(open_checkpoint(model))
    copied = shutil.copytree(model, tmp_path / "moved")  # another path, other mtimes
    resharded = tmp_path / "resharded"
    BertForSequenceClassification.from_pretrained(model).save_pretrained(resharded, max_shard_size="100KB")
    assert len([n for n in os.listdir(resharded) if n.endswith(".safetensors")]) > 1
    assert fingerprint(open_checkpoint(str(copied))) == fingerprint(open_checkpoint(str(resharded))) == original
    assert fingerprint(open_checkpoint(zoo["models"][1])) != original
    head = load_file(os.path.join(model, "model.safetensors"))
    head["classifier.bias"][0] += 1e-3  # only the small head differs: it is hashed whole
    save_file(head, tmp_path / "head.safetensors")
    assert fingerprint(open_checkpoint(str(tmp_path / "head.safetensors"))) != original


def test_statistics_in_the_wrong_order_are_refused_naming_both(zoo, tmp_path, capsys, caplog):
    out = tmp_path / "out"
    swapped = ["--merge", "fisher", "--models", *zoo["models"], "--aux_data", *zoo["fishers"][::-1], "--output", str(out)]
    error = fails(swapped, capsys)
    assert (f"statistics {zoo['fishers'][1]} were computed on {os.path.abspath(zoo['models'][1])}, not "
            f"{zoo['models'][0]} (model 1) that they are paired with: they are those of model 2") in error
    assert "--allow_statistics_mismatch" in error
    assert os.listdir(tmp_path) == []  # nothing left behind

    merge(swapped + ["--allow_statistics_mismatch"])
    assert "were computed on" in caplog.text and "(allowed)" in caplog.text and os.path.isdir(out)
    caplog.clear()
    merge(["--merge", "fisher", "--models", *zoo["models"], "--aux_data", *zoo["fishers"], "--output", str(tmp_path / "ok")])
    assert "computed on" not in caplog.text


def test_statistics_without_provenance_merge_with_a_warning(zoo, tmp_path, caplog):
    old = tmp_path / "old"
    old.mkdir()
    tensors = load_file(os.path.join(zoo["fishers"][1], "fisher.safetensors"))
    save_file(tensors, old / "fisher.safetensors", metadata={"format": "pt"})  # as written before provenance
    merge(["--merge", "fisher", "--models", *zoo["models"], "--aux_data", zoo["fishers"][0], str(old),
           "--output", str(tmp_path / "out")])
    assert f"statistics {old} record no model they were computed on" in caplog.text
    assert os.path.isdir(tmp_path / "out")


def test_gradient_matching_refuses_an_ancestor_hessian_of_another_model(zoo, tmp_path, capsys):
    argv = ["--pretrained_model_name_or_path", zoo["base"], "--pretrained_hessian_path", zoo["fishers"][0],
            "--ft_model_name_or_paths", ",".join(zoo["models"]), "--ft_hessian_paths", ",".join(zoo["fishers"]),
            "--scaling_factors_ft", "1,1", "--delta_0", "1e-12", "--out_model_path", str(tmp_path / "out")]
    error = fails(argv, capsys, ubgm_program)
    assert f"not {zoo['base']} (the ancestor) that they are paired with: they are those of model 1" in error
    assert not os.path.exists(tmp_path / "out")
    argv[3] = os.path.join(zoo["base_fisher"], "hessian")  # the paper's hessian/ folders record it too
    merge(argv, ubgm_program)
    assert os.path.isdir(tmp_path / "out")


def test_a_trimmed_task_vector_records_its_model_and_ancestor(zoo, tmp_path, capsys):
    trimmed = []
    for i, model in enumerate(zoo["models"]):
        trimmed.append(str(tmp_path / f"trimmed{i}"))
        run_cli(trim_program.main, ["--model", model, "--ancestor", zoo["base"], "--density", "0.5", "--output", trimmed[-1]])
    recorded = metadata(os.path.join(trimmed[0], "trimmed.safetensors"))
    assert recorded["model_fingerprint"] == fingerprint(open_checkpoint(zoo["models"][0]))
    assert recorded["ancestor_fingerprint"] == fingerprint(open_checkpoint(zoo["base"]))
    ties = ["--merge", "ties", "--models", *zoo["models"], "--x:density", "0.5"]
    error = fails(ties + ["--ancestor", zoo["base"], "--aux_data", *trimmed[::-1], "--output", str(tmp_path / "a")], capsys)
    assert "(model 1) that they are paired with: they are those of model 2" in error
    other_base = perturbed_copy(zoo["base"], str(tmp_path / "other_base"), seed=9)
    error = fails(ties + ["--ancestor", other_base, "--aux_data", *trimmed, "--output", str(tmp_path / "b")], capsys)
    assert f"were taken against the ancestor {os.path.abspath(zoo['base'])}, not {other_base} (the ancestor)" in error
    merge(ties + ["--ancestor", zoo["base"], "--aux_data", *trimmed, "--output", str(tmp_path / "c")])
    assert os.path.isdir(tmp_path / "c") and not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")
