"""What the programs may replace (their own earlier outputs, or anything with `overwrite`), what they leave
untouched (the user's files), and the clean-up after killed runs: train.py killed at several points while
it writes, then rerun, ends with the complete output and nothing else."""
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from modelmerge.config import from_dict, run_program
from modelmerge.download import DownloadConfig, download
from modelmerge.prediction.config import PredictConfig
from modelmerge.prediction.program import run
from modelmerge.training import TrainConfig, train
from tiny import make_tiny_bert, read_jsonl, tiny_data_dir

TRAIN_OUTPUT = ["best", "checkpoint-12", "checkpoint-6", "epoch-1", "epoch-2", "train_config.json", "train_results.txt",
                "trainer_state.json"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("outputs")
    return {"model": make_tiny_bert(root / "tiny"), "data": tiny_data_dir(root / "data", tasks=("sst2",))}


def predict_keys(setup, tmp_path, **changes):
    return {"model_name_or_path": setup["model"], "output_dir": str(tmp_path / "out"), "dataset_name": "sst2",
            "split": "validation[:6]", "data_dir": setup["data"], "batch_size": 4, "max_length": 32, "num_threads": 1,
            **changes}


def train_keys(setup, tmp_path, **changes):
    return {"model_name_or_path": setup["model"], "output_dir": str(tmp_path / "out"), "dataset_name": "sst2",
            "data_dir": setup["data"], "max_length": 32, "num_train_epochs": 2, "per_device_train_batch_size": 8,
            "warmup_steps": 0, "learning_rate": 1e-3, "lr_scheduler_type": "linear", "num_threads": 1, "seed": 3,
            **changes}


def run_with(program, tmp_path, keys):
    config_cls, body = {"predict": (PredictConfig, run), "train": (TrainConfig, train),
                        "download": (DownloadConfig, download)}[program]
    (tmp_path / "config.json").write_text(json.dumps(keys))
    return run_program(config_cls, body, program, [str(tmp_path / "config.json")])


def hidden_entries(root):
    return [os.path.join(folder, name) for folder, dirs, files in os.walk(root) for name in dirs + files
            if name.startswith(".")]


def dead_process_tag():
    """The HOST-PID- part of the temporaries of a process of this host that has ended (modelmerge.atomic)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return f"{socket.gethostname().replace('-', '_')}-{process.pid}-"


def test_predict_replaces_its_own_output_and_removes_what_killed_runs_left(setup, tmp_path):
    assert run_with("predict", tmp_path, predict_keys(setup, tmp_path, split="validation[:3]")) == 0
    killed = tmp_path / f".out.tmp-{dead_process_tag()}abcdefgh"  # as an atomic write killed mid-way leaves
    killed.mkdir()
    (killed / "metrics.json").write_text("{}")
    (tmp_path / ".other.tmp-x").mkdir()  # another output's temporary: not ours to remove
    assert run_with("predict", tmp_path, predict_keys(setup, tmp_path)) == 0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["num_examples"] == 6
    assert sorted(os.listdir(tmp_path)) == [".other.tmp-x", "config.json", "out"]


def test_overwrite_replaces_a_folder_predict_did_not_write(setup, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("mine")
    assert run_with("predict", tmp_path, predict_keys(setup, tmp_path)) == 2
    assert (tmp_path / "out" / "mine.txt").read_text() == "mine"
    assert run_with("predict", tmp_path, predict_keys(setup, tmp_path, overwrite_output_dir=True)) == 0
    assert sorted(os.listdir(tmp_path / "out")) == [".written-by", "metrics.json", "predictions.jsonl"]


def test_an_empty_folder_is_a_free_output(setup, tmp_path):
    (tmp_path / "out").mkdir()
    assert run_with("download", tmp_path, {"dataset_name": "sst2", "splits": ["test[:2]"], "data_dir": setup["data"],
                                           "output_dir": str(tmp_path / "out")}) == 0
    assert len(read_jsonl(tmp_path / "out" / "test.jsonl")) == 2
    assert run_with("download", tmp_path, {"dataset_name": "sst2", "splits": ["test[:3]"], "data_dir": setup["data"],
                                           "output_dir": str(tmp_path / "out")}) == 0  # its own output
    assert len(read_jsonl(tmp_path / "out" / "test.jsonl")) == 3


def test_metric_and_prediction_files_are_replaced_when_predict_wrote_them(setup, tmp_path):
    keys = predict_keys(setup, tmp_path, output_dir=None, metric_output_file=str(tmp_path / "m.json"),
                        prediction_output_file=str(tmp_path / "p.json"))
    assert run_with("predict", tmp_path, {**keys, "split": "validation[:2]"}) == 0
    assert run_with("predict", tmp_path, keys) == 0
    assert json.loads((tmp_path / "m.json").read_text())["num_examples"] == 6
    assert len(read_jsonl(tmp_path / "p.json")) == 6
    assert sorted(os.listdir(tmp_path)) == ["config.json", "m.json", "p.json"]


def test_train_with_overwrite_writes_beside_the_users_files_and_deletes_none(setup, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert run_with("train", tmp_path, train_keys(setup, tmp_path, num_train_epochs=1)) == 2
    assert run_with("train", tmp_path, train_keys(setup, tmp_path, num_train_epochs=1, overwrite_output_dir=True)) == 0
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    assert os.path.isdir(tmp_path / "out" / "best")


def test_overwrite_restarts_checkpoints_of_a_different_config(setup, tmp_path):
    assert run_with("train", tmp_path, train_keys(setup, tmp_path, num_train_epochs=1)) == 0
    assert run_with("train", tmp_path, train_keys(setup, tmp_path, num_train_epochs=1, learning_rate=2e-3)) == 2
    assert run_with("train", tmp_path, train_keys(setup, tmp_path, num_train_epochs=1, learning_rate=2e-3,
                                                  overwrite=True)) == 0
    assert json.loads((tmp_path / "out" / "train_config.json").read_text())["learning_rate"] == 2e-3


def checksums(root):
    return {os.path.relpath(os.path.join(folder, name), root): open(os.path.join(folder, name), "rb").read()
            for folder, _, files in os.walk(root) for name in files}


def test_overwrite_replaces_the_whole_previous_run_and_keeps_the_users_files(setup, tmp_path):
    """Issue 21: 2 epochs into out, then another model for 1 epoch with overwrite: nothing of the first run stays."""
    out = tmp_path / "out"
    assert run_with("train", tmp_path, train_keys(setup, tmp_path, num_train_epochs=2)) == 0
    (out / "notes.txt").write_text("mine")
    other = make_tiny_bert(tmp_path / "other", seed=5)
    assert run_with("train", tmp_path, train_keys(setup, tmp_path, model_name_or_path=other, num_train_epochs=1,
                                                  learning_rate=2e-3, seed=4, overwrite=True)) == 0
    assert sorted(os.listdir(out)) == sorted(["best", "checkpoint-6", "epoch-1", "notes.txt", "train_config.json",
                                              "train_results.txt", "trainer_state.json"])
    assert (out / "notes.txt").read_text() == "mine"
    saved = json.loads((out / "train_config.json").read_text())
    assert (saved["model_name_or_path"], saved["num_train_epochs"], saved["seed"]) == (other, 1, 4)
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 6
    exported = load_file(out / "epoch-1" / "model.safetensors")
    trained = load_file(out / "checkpoint-6" / "model.safetensors")
    assert exported.keys() == trained.keys() and all(torch.equal(exported[k], trained[k]) for k in trained)
    assert torch.equal(load_file(out / "best" / "model.safetensors")["classifier.weight"], trained["classifier.weight"])
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []


def test_a_run_of_another_config_is_refused_without_overwrite_even_when_its_checkpoints_are_gone(setup, tmp_path):
    out = tmp_path / "out"
    assert run_with("train", tmp_path, train_keys(setup, tmp_path, num_train_epochs=1)) == 0
    shutil.rmtree(out / "checkpoint-6")  # e.g. deleted to save space: epoch-1/, best/ and the config remain
    before = checksums(out)
    assert run_with("train", tmp_path, train_keys(setup, tmp_path, num_train_epochs=1, learning_rate=2e-3)) == 2
    assert checksums(out) == before


def test_entries_named_as_train_py_s_in_a_folder_it_did_not_write_are_refused_even_with_overwrite(setup, tmp_path,
                                                                                                  caplog):
    out = tmp_path / "out"
    (out / "best").mkdir(parents=True)
    (out / "best" / "model.safetensors").write_bytes(b"the user's own model")
    (out / "epoch-3").mkdir()
    before = checksums(out)
    assert run_with("train", tmp_path, train_keys(setup, tmp_path, num_train_epochs=1, overwrite=True)) == 2
    assert checksums(out) == before and sorted(os.listdir(out)) == ["best", "epoch-3"]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and f"output_dir: {out} holds best, epoch-3 but was not written by train.py" in errors[0]


def test_train_rerun_removes_temporaries_and_unfinished_checkpoints(setup, tmp_path):
    out = tmp_path / "out"
    train(from_dict(TrainConfig, train_keys(setup, tmp_path)))
    tag = dead_process_tag()
    for leftover in (f".epoch-1.tmp-{tag}abcdefgh", f".best.tmp-{tag}old-abcdefgh", ".epoch-2.tmp-abcdefgh",
                     f".train_config.json.tmp-{tag}abcdefgh"):
        os.makedirs(out / leftover)
        (out / leftover / "model.safetensors").write_bytes(b"partial")
    os.makedirs(out / "checkpoint-18")  # cut off before its trainer_state.json
    (out / "checkpoint-18" / "model.safetensors").write_bytes(b"partial")
    train(from_dict(TrainConfig, train_keys(setup, tmp_path)))
    assert sorted(os.listdir(out)) == TRAIN_OUTPUT
    assert hidden_entries(out) == []


def _train_program(config_path, slow_exports):
    if slow_exports:  # model folders are copied file by file: give the poller time to see their temporaries
        copy = shutil.copy2
        shutil.copy2 = lambda *args, **kwargs: (time.sleep(0.05), copy(*args, **kwargs))[1]
    os._exit(run_program(TrainConfig, train, "train", [config_path]))


def _kill_when(process, condition, timeout=120):
    """SIGKILL `process` as soon as `condition()` holds (polled); False if the process ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not process.is_alive():
            return False
        if condition():
            os.kill(process.pid, signal.SIGKILL)
            process.join()
            return True
        time.sleep(0.002)
    process.kill()
    raise AssertionError("the condition never held")


@pytest.mark.slow
def test_train_killed_at_several_points_while_writing_then_rerun_is_complete_and_clean(setup, tmp_path):
    """train.py's body in a forked process (no second start-up of torch), killed with SIGKILL at each point in turn:
    during training, right after each checkpoint, inside the export of epoch-1/, epoch-2/ and best/, and while a
    complete output is being replaced; then a run to the end."""
    out = tmp_path / "out"
    config = str(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps(train_keys(setup, tmp_path)))
    fork = multiprocessing.get_context("fork")

    def exists(*parts):
        return lambda: os.path.exists(os.path.join(out, *parts))

    def new_temporary(prefix):
        """A condition: a temporary `prefix*.tmp-*` that was not there when the run started appears in out/."""
        before = set(os.listdir(out)) if os.path.isdir(out) else set()
        return lambda: os.path.isdir(out) and any(
            name.startswith(prefix) and ".tmp-" in name for name in set(os.listdir(out)) - before)

    def run_until(condition=None, slow_exports=False):
        process = fork.Process(target=_train_program, args=(config, slow_exports))
        process.start()
        if condition is None:
            process.join()
            return process.exitcode
        return _kill_when(process, condition)

    assert run_until(exists("train_config.json"))
    assert run_until(exists("checkpoint-6"))
    assert run_until(exists("checkpoint-12"))
    assert run_until(new_temporary(".epoch-1."), slow_exports=True)
    assert run_until(new_temporary(".epoch-2."), slow_exports=True)
    assert run_until(new_temporary(".best."), slow_exports=True)
    assert run_until() == 0
    assert run_until(new_temporary(".epoch-2."), slow_exports=True)  # replacing a complete output
    assert run_until(new_temporary("."), slow_exports=True)
    assert run_until() == 0

    assert sorted(os.listdir(out)) == TRAIN_OUTPUT
    assert hidden_entries(out) == [] and [n for n in os.listdir(tmp_path) if n.startswith(".")] == []
    straight = tmp_path / "straight"
    train(from_dict(TrainConfig, train_keys(setup, tmp_path, output_dir=str(straight))))
    for name in ("epoch-1", "epoch-2", "best"):
        resumed, expected = load_file(out / name / "model.safetensors"), load_file(straight / name / "model.safetensors")
        assert resumed.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(resumed[key], expected[key], rtol=1e-5, atol=1e-6)
