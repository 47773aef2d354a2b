"""Bad inputs of code/train.py, code/predict.py and code/download_data.py, one table: each ends with exit status 2,
one message naming the key, file or value and the cause, no output, and the user's files as they were."""
import argparse
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from modelmerge.config import from_dict, run_program
from modelmerge.download import DownloadConfig, download
from modelmerge.prediction.config import PredictConfig
from modelmerge.prediction.program import run
from modelmerge.training import TrainConfig, train
from sis_util import REPO
from tiny import make_tiny_bert, read_jsonl, tiny_data_dir, write_jsonl

PROGRAMS = {"train": (TrainConfig, train), "predict": (PredictConfig, run), "download": (DownloadConfig, download)}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Paths of the models and data folders the cases name ({model}, {labels3}, ...)."""
    root = tmp_path_factory.mktemp("assets")
    data = tiny_data_dir(root / "data", tasks=("sst2",))
    model = make_tiny_bert(root / "model")
    rows = read_jsonl(os.path.join(data, "sst2", "validation.jsonl"))
    paths = {"model": model, "data": data, "model3": make_tiny_bert(root / "model3", num_labels=3)}
    for name, broken in (("labels3", None), ("empty", ""), ("malformed", '{"text": "fine", "label": 1}\n{"text": oops\n')):
        folder = root / name
        write_jsonl(str(folder / "train.jsonl"), rows[:8] + ([{"text": "a third class", "label": 2}] if broken is None else []))
        write_jsonl(str(folder / "validation.jsonl"), rows[:8] + ([{"text": "and -1", "label": -1}] if broken is None else []))
        if broken is not None:
            (folder / "train.jsonl").write_text(broken)
            (folder / "validation.jsonl").write_text(broken)
        paths[name] = str(folder)
    for name, convert in (("strlabels", str), ("boollabels", bool)):  # "1"/"0", true/false: not class indices
        for split in ("train", "validation"):
            write_jsonl(str(root / name / f"{split}.jsonl"), [{**r, "label": convert(r["label"])} for r in rows[:8]])
        paths[name] = str(root / name)
    corrupt = shutil.copytree(model, root / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    paths["corrupt"] = str(corrupt)
    pickled = shutil.copytree(model, root / "pickled")
    state = load_file(pickled / "model.safetensors")
    os.remove(pickled / "model.safetensors")
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=1)}, pickled / "pytorch_model.bin")  # not weights-only
    paths["pickled"] = str(pickled)
    return paths


BASE = {
    "train": {"model_name_or_path": "{model}", "output_dir": "{tmp}/out", "dataset_name": "sst2", "data_dir": "{data}",
              "max_length": 32, "num_train_epochs": 1, "per_device_train_batch_size": 8, "warmup_steps": 0,
              "learning_rate": 1e-3, "num_threads": 1},
    "predict": {"model_name_or_path": "{model}", "output_dir": "{tmp}/out", "dataset_name": "sst2", "split": "validation",
                "data_dir": "{data}", "batch_size": 8, "max_length": 32, "num_threads": 1},
    "download": {"dataset_name": "sst2", "splits": ["validation"], "output_dir": "{tmp}/out", "data_dir": "{data}"},
}

# (program, changed keys (None removes a key), the user's files made first {relative path: content}, expected message)
CASES = {
    # Labels are checked against the model's classes before anything is written.
    "train labels outside the classes": ("train", {"dataset_name": "{labels3}"}, {}, "labels 2 are outside the model's 2 classes"),
    "evaluation labels outside the classes": ("predict", {"dataset_name": "{labels3}"}, {}, "labels -1 are outside the model's 2 classes"),
    "empirical Fisher labels outside": ("predict", {"dataset_name": "{labels3}", "empirical": True,
                                                    "mode": "squared_gradients"}, {}, "labels -1"),
    "string labels, train": ("train", {"dataset_name": "{strlabels}"}, {}, "column 'label' holds string labels ('0', '1')"),
    "boolean labels, predict": ("predict", {"dataset_name": "{boollabels}"}, {}, "column 'label' holds bool labels (False, True)"),
    # Data files.
    "empty data file": ("train", {"dataset_name": "{empty}"}, {}, "train.jsonl is empty"),
    "malformed data file": ("predict", {"dataset_name": "{malformed}"}, {}, "malformed/validation.jsonl cannot be parsed as json"),
    "malformed data file, download": ("download", {"dataset_name": "{malformed}"}, {}, "cannot be parsed as json"),
    "authors' script of an unknown task": ("predict", {"dataset_name": "/x/datasets/mnli.py"}, {}, "dataset scripts are not run"),
    # Models.
    "corrupt weights, train": ("train", {"model_name_or_path": "{corrupt}"}, {}, "corrupt/model.safetensors is corrupt"),
    "corrupt weights, predict": ("predict", {"model_name_or_path": "{corrupt}"}, {}, "corrupt/model.safetensors is corrupt"),
    "pickle checkpoint refused": ("predict", {"model_name_or_path": "{pickled}"}, {}, "pytorch_model.bin in"),
    "num_labels mismatch": ("train", {"num_labels": 3}, {}, "num_labels 3 does not match the 2 classes"),
    "num_labels mismatch, 3-class model": ("train", {"model_name_or_path": "{model3}"}, {}, "num_labels 2 does not match the 3"),
    "max_length above the positions, train": ("train", {"max_length": 200}, {}, "max_length 200 exceeds the 128 input positions"),
    "max_length above the positions, predict": ("predict", {"max_length": 129}, {}, "max_length 129 exceeds the 128"),
    # Values.
    "negative warmup_steps": ("train", {"warmup_steps": -1}, {}, "warmup_steps must be at least 0, got -1"),
    "min_lr without cosine": ("train", {"min_lr": 1e-5, "lr_scheduler_type": "linear"}, {}, "min_lr 1e-05 needs lr_scheduler_type cosine"),
    "min_lr above the learning rate": ("train", {"min_lr": 0.1}, {}, "min_lr must be in [0, learning_rate"),
    "device gpu0, train": ("train", {"device": "gpu0"}, {}, "device 'gpu0' is not a torch device"),
    "device gpu0, predict": ("predict", {"device": "gpu0"}, {}, "device 'gpu0' is not a torch device"),
    "device of another kind": ("predict", {"device": "meta"}, {}, "device meta: only cpu or cuda devices are supported"),
    "missing CUDA device": ("predict", {"device": "cuda:7"}, {}, "device cuda:7: no CUDA device is available"),
    # Outputs: never over the user's files, never over an input.
    "train output_dir is a file": ("train", {}, {"out": "my notes"}, "output_dir: {tmp}/out is a file"),
    "predict output_dir is a file": ("predict", {}, {"out": "my notes"}, "output_dir: {tmp}/out is a file"),
    "train output_dir holds the user's files": ("train", {}, {"out/mine.txt": "mine"},
                                                "output {tmp}/out exists and is not an output of this program"),
    "predict output_dir holds the user's files": ("predict", {}, {"out/mine.txt": "mine"},
                                                  "is not an output of this program; it is only replaced when asked to "
                                                  "overwrite it (set \"overwrite\": true"),
    "download output_dir holds the user's data": ("download", {}, {"out/train.jsonl": '{"text": "x", "label": 0}\n'},
                                                  "output_dir: output {tmp}/out exists and is not an output"),
    "metric file is the user's": ("predict", {"output_dir": None, "metric_output_file": "{tmp}/m.json"}, {"m.json": '{"a": 1}'},
                                  "metric_output_file: output {tmp}/m.json exists and is not an output"),
    "prediction file is a folder": ("predict", {"prediction_output_file": "{tmp}/p"}, {"p/x": "x"}, "is a folder, not a file"),
    "predict output_dir is the model": ("predict", {"output_dir": "{model}"}, {}, "output {model} is the input {model}"),
    "train output_dir holds the model": ("train", {"output_dir": "{model}/..", "overwrite": True}, {}, "holds the input {model}"),
    "predict output_dir inside the data": ("predict", {"output_dir": "{data}/sst2/out"}, {}, "lies inside the input {data}/sst2"),
    "download output_dir is its data": ("download", {"dataset_name": "{tmp}/mine", "output_dir": "{tmp}/mine", "overwrite": True},
                                        {"mine/validation.jsonl": '{"text": "x", "label": 0}\n'}, "is the input"),
    "predict output_dir holds the config": ("predict", {"output_dir": "{tmp}"}, {}, "holds the config file"),
    # The paper's keys.
    "optimizer other than AdamW": ("train", {"optimizer_name": "SGD"}, {}, "optimizer_name must be one of 'AdamW', 'IVON', got 'SGD'"),
    "per-step evaluation": ("train", {"evaluation_strategy": "steps"}, {}, "evaluation_strategy must be one of 'epoch'"),
    "alias and key disagree": ("train", {"max_input_length": 64}, {}, "max_input_length (64) and max_length (32) name the same"),
    "unknown dataset configuration": ("predict", {"dataset_config_name": "generation"}, {}, "dataset_config_name must be one of"),
    "predictions of the Gram": ("predict", {"mode": "gram", "prediction_output_file": "{tmp}/p.json"},
                                {}, "prediction_output_file: mode gram has no per-example rows"),
    "statistic without output_dir": ("predict", {"mode": "squared_gradients", "output_dir": None,
                                                 "metric_output_file": "{tmp}/m.json"}, {}, "missing required key(s) output_dir"),
    # Regressions: these worked before and must keep working.
    "unknown key": ("train", {"learning_rat": 1}, {}, "unknown key(s) learning_rat"),
    "unknown key, predict": ("predict", {"track_fisher": True}, {}, "unknown key(s) track_fisher"),
    "wrong type": ("predict", {"batch_size": "8"}, {}, "batch_size must be an integer, got '8'"),
    "missing model folder": ("train", {"model_name_or_path": "/nonexistent/model"}, {}, "model_name_or_path: /nonexistent/model"),
    "missing dataset": ("predict", {"dataset_name": "nosuch"}, {}, "dataset 'nosuch'"),
    "missing split": ("download", {"splits": ["dev"]}, {}, "no split 'dev'"),
    "bad scheduler": ("train", {"lr_scheduler_type": "cosinus"}, {}, "lr_scheduler_type 'cosinus'"),
}


def snapshot(root):
    """{relative path: content} of every file under `root` (folders as None)."""
    result = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            result[os.path.relpath(os.path.join(folder, name), root)] = None
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                result[os.path.relpath(os.path.join(folder, name), root)] = f.read()
    return result


def fill(value, paths):
    if isinstance(value, str):
        return value.format(**paths)
    if isinstance(value, list):
        return [fill(v, paths) for v in value]
    return value


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_message_and_leaves_everything_as_it_was(assets, tmp_path, caplog, case):
    program, changes, user_files, message = CASES[case]
    paths = {**assets, "tmp": str(tmp_path)}
    keys = {key: fill(value, paths) for key, value in {**BASE[program], **changes}.items() if value is not None}
    for relative, content in user_files.items():
        os.makedirs(os.path.dirname(tmp_path / relative), exist_ok=True)
        (tmp_path / relative).write_text(content)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(keys))
    watched = [tmp_path, assets["data"], assets["model"]]
    before = [snapshot(folder) for folder in watched]

    config_cls, body = PROGRAMS[program]
    assert run_program(config_cls, body, program, [str(config)]) == 2
    errors = [record for record in caplog.records if record.levelname == "ERROR" and record.name.startswith("modelmerge")]
    assert len(errors) == 1 and fill(message, paths) in errors[0].getMessage()
    assert "\n" not in errors[0].getMessage()
    assert [snapshot(folder) for folder in watched] == before  # no output, the user's files intact


def test_a_bad_input_is_one_line_on_stderr_without_traceback(assets, tmp_path):
    keys = {key: fill(value, {**assets, "tmp": str(tmp_path)}) for key, value in BASE["train"].items()}
    (tmp_path / "c.json").write_text(json.dumps({**keys, "dataset_name": assets["labels3"]}))
    result = subprocess.run([sys.executable, os.path.join(REPO, "code", "train.py"), str(tmp_path / "c.json")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert "labels 2 are outside the model's 2 classes" in result.stderr and "Traceback" not in result.stderr
    assert os.listdir(tmp_path) == ["c.json"]


class FailAtFirstStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        raise RuntimeError("a failure before the first checkpoint")


def test_a_corrected_rerun_after_a_failed_one_runs(assets, tmp_path):
    """A run that failed before its first checkpoint leaves nothing that blocks a corrected config."""
    keys = {key: fill(value, {**assets, "tmp": str(tmp_path)}) for key, value in BASE["train"].items()}
    keys.update(train_split="train[:8]", validation_split="validation[:8]")
    with pytest.raises(RuntimeError, match="before the first checkpoint"):
        train(from_dict(TrainConfig, keys), callbacks=[FailAtFirstStep()])
    (tmp_path / "c.json").write_text(json.dumps({**keys, "learning_rate": 2e-3}))
    assert run_program(TrainConfig, train, "train", [str(tmp_path / "c.json")]) == 0
    saved = json.loads((tmp_path / "out" / "train_config.json").read_text())
    assert saved["learning_rate"] == 2e-3 and os.path.isdir(tmp_path / "out" / "best")
