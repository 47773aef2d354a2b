"""One writer per output (modelmerge.atomic's output lock): while a live process writes an output, every
program refuses it at once with one line naming that process (exit status 2, the output and the user's
files untouched); a killed writer never blocks the rerun, and no lock file stays after a run. Also: a full
disk names the output, and a layer-count mismatch without an ancestor does not speak of one."""
import errno
import hashlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import types

import pytest
from transformers import TrainerCallback

import merge as merge_program
import trim as trim_program
from modelmerge import atomic
from modelmerge.io.writing import SafetensorsStreamWriter
from modelmerge.config import run_program
from modelmerge.download import DownloadConfig, download
from modelmerge.merging.cli import run_cli
from modelmerge.prediction.config import PredictConfig
from modelmerge.prediction.program import run
from modelmerge.training import TrainConfig, train
from sis_util import REPO
from tiny import make_tiny_bert, perturbed_copy, tiny_data_dir

HOLDER = """
import sys, time
from modelmerge import atomic
target = sys.argv[1]
sys.argv = ["code/train.py", "the-other-config.json"]
atomic.lock_output(target)
print("holding", flush=True)
time.sleep(120)
"""


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("writers")
    base = make_tiny_bert(root / "base")
    return {"base": base, "a": perturbed_copy(base, str(root / "a"), seed=1), "data": tiny_data_dir(root / "data", tasks=("sst2",))}


def checksums(root):
    found = {}
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                found[os.path.relpath(os.path.join(folder, name), root)] = hashlib.sha256(f.read()).hexdigest()
    return found


def hold(target):
    """A live process holding the lock of `target`, as a program writing it does."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(target)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.path.join(REPO, "code")})
    assert holder.stdout.readline().strip() == "holding"
    return holder


def config_program(program, assets, tmp_path, out, **keys):
    common = {"model_name_or_path": assets["base"], "dataset_name": "sst2", "data_dir": assets["data"],
              "max_length": 32, "num_threads": 1, "output_dir": str(out)}
    if program == "train":
        config = {**common, "num_train_epochs": 1, "per_device_train_batch_size": 8, "warmup_steps": 0,
                  "learning_rate": 1e-3, "lr_scheduler_type": "linear", "seed": 3, **keys}
        cls, body = TrainConfig, train
    elif program == "predict":
        config, cls, body = {**common, "split": "validation[:6]", "batch_size": 4, **keys}, PredictConfig, run
    else:
        config = {"dataset_name": "sst2", "splits": ["test[:2]"], "data_dir": assets["data"], "output_dir": str(out)}
        cls, body = DownloadConfig, download
    (tmp_path / "config.json").write_text(json.dumps(config))
    return run_program(cls, body, program, [str(tmp_path / "config.json")])


def merge_argv(assets, out, *extra):
    return ["--merge", "task_arithmetic", "--ancestor", assets["base"], "--models", assets["a"], "--output", str(out),
            "--no_progress", *extra]


PROGRAMS = ["train", "predict", "download", "merge", "merge file", "merge yaml", "trim"]


def run_one(program, assets, tmp_path, out):
    """The exit status of `program` writing `out`."""
    if program in ("train", "predict", "download"):
        return config_program(program, assets, tmp_path, out)
    if program == "trim":
        main, argv = trim_program.main, ["--model", assets["a"], "--ancestor", assets["base"], "--density", "0.5",
                                         "--output", str(out)]
    elif program == "merge yaml":
        (tmp_path / "merge.yml").write_text(f"merge_method: linear\nmodels:\n  - model: {assets['a']}\n")
        main, argv = merge_program.main, ["--config", str(tmp_path / "merge.yml"), str(out), "--no_progress"]
    else:
        main, argv = merge_program.main, merge_argv(assets, out)
    try:
        run_cli(main, argv)
    except SystemExit as exit_:
        return exit_.code
    return 0


@pytest.mark.parametrize("program", PROGRAMS)
def test_an_output_a_live_process_writes_is_refused_naming_it(assets, tmp_path, capsys, caplog, program):
    out = tmp_path / ("out.safetensors" if program == "merge file" else "out")
    lock = tmp_path / f".{out.name}.lock"
    out.mkdir() if program != "merge file" else None
    if out.is_dir():
        (out / "notes.txt").write_text("the user's")
    before = checksums(tmp_path)
    holder = hold(out)
    try:
        started = time.monotonic()
        assert run_one(program, assets, tmp_path, out) == 2
        took = time.monotonic() - started
    finally:
        holder.kill()
        holder.wait()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")] + [
        r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(lines) == 1, lines
    assert (f"output {out} is being written by another process (pid {holder.pid} on " in lines[0]
            and "code/train.py the-other-config.json" in lines[0]), lines[0]
    assert took < 30
    after = checksums(tmp_path)  # but the lock file the killed holder left (see the next test)
    assert {k: v for k, v in after.items() if k not in ("config.json", "merge.yml", lock.name)} == {
        k: v for k, v in before.items() if k != "config.json"}
    assert not [name for name in os.listdir(tmp_path) if ".tmp-" in name]


def test_a_killed_writer_never_blocks_the_rerun_and_no_lock_file_stays(assets, tmp_path):
    out = tmp_path / "out"
    holder = hold(out)
    holder.send_signal(signal.SIGKILL)  # as a killed merge: its lock file stays, unlocked
    holder.wait()
    assert os.path.exists(tmp_path / ".out.lock")
    run_cli(merge_program.main, merge_argv(assets, out))
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert run_one("merge", assets, tmp_path, out) == 0  # and again, over its own output
    assert sorted(os.listdir(tmp_path)) == ["out"]


class WaitFor(TrainerCallback):
    """Holds training at its first step until the file `go` exists (the other run has been tried meanwhile)."""

    def __init__(self, go):
        self.go = go

    def on_step_begin(self, args, state, control, **kwargs):
        while not os.path.exists(self.go):
            time.sleep(0.01)


def _first_train_program(config_path, go):
    os._exit(run_program(TrainConfig, lambda config: train(config, callbacks=[WaitFor(go)]), "train", [config_path]))


def test_a_second_train_py_beside_a_running_one_is_refused_and_the_first_finishes_alone(assets, tmp_path, caplog):
    """Issue 21: two train.py runs into one output_dir with different configs (seed, lr)."""
    out, go = tmp_path / "out", tmp_path / "go"
    first_config = {"model_name_or_path": assets["base"], "dataset_name": "sst2", "data_dir": assets["data"],
                    "max_length": 32, "num_threads": 1, "output_dir": str(out), "num_train_epochs": 1,
                    "per_device_train_batch_size": 8, "warmup_steps": 0, "learning_rate": 1e-3, "seed": 1}
    (tmp_path / "first.json").write_text(json.dumps(first_config))
    first = multiprocessing.get_context("fork").Process(target=_first_train_program, args=(str(tmp_path / "first.json"), str(go)))
    first.start()
    try:
        deadline = time.monotonic() + 120
        while not (out / "train_config.json").exists():
            # it writes its config as it starts training, then waits at its first step
            assert first.is_alive() and time.monotonic() < deadline, "the first run did not start training"
            time.sleep(0.02)
        assert config_program("train", assets, tmp_path, out, seed=2, learning_rate=2e-3) == 2
    finally:
        go.touch()
        first.join(300)
    assert first.exitcode == 0
    message = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(message) == 1 and f"output {out} is being written by another process (pid {first.pid} on " in message[0]
    saved = json.loads((out / "train_config.json").read_text())
    assert saved["seed"] == 1 and saved["learning_rate"] == 1e-3  # the first run's, alone
    assert [name for name in os.listdir(tmp_path) if name.startswith(".")] == []


def test_the_lock_is_taken_once_per_process_and_given_back_with_its_file(tmp_path):
    out = str(tmp_path / "out")
    assert atomic.lock_output(out) and not atomic.lock_output(out)  # this process holds it already
    record = json.loads((tmp_path / ".out.lock").read_text())
    assert record["pid"] == os.getpid() and record["command"]
    atomic.release_output(out)
    assert os.listdir(tmp_path) == []
    atomic.release_output(out)  # not held: nothing


def test_a_lock_file_replaced_while_waiting_is_not_trusted(tmp_path, monkeypatch):
    """The holder removes its lock file as it ends; a process that opened the old file then locks a file
    no longer at the path, and must lock the new one instead of believing it holds the output."""
    out = str(tmp_path / "out")
    real_flock, calls = atomic.fcntl.flock, []

    def flock_after_the_holder_left(fd, operation):
        if not calls:  # the holder removes the file between our open and our flock
            os.remove(tmp_path / ".out.lock")
        calls.append(fd)
        return real_flock(fd, operation)

    (tmp_path / ".out.lock").write_text("{}")
    monkeypatch.setattr(atomic.fcntl, "flock", flock_after_the_holder_left)
    assert atomic.lock_output(out)
    assert len(calls) == 2 and os.path.exists(tmp_path / ".out.lock")
    held = os.fstat(atomic._held_locks[atomic._lock_path(out)])
    assert held.st_ino == os.stat(tmp_path / ".out.lock").st_ino
    atomic.release_output(out)


# --- a full disk -----------------------------------------------------------------------------------------

def test_a_full_disk_names_the_output_and_leaves_nothing(assets, tmp_path, capsys, monkeypatch):
    def no_space(self, name, tensor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(SafetensorsStreamWriter, "write", no_space)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        run_cli(merge_program.main, merge_argv(assets, out))
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and lines[-1] == (
        f"error: no space left on the device of {tmp_path} while writing {out} ([Errno 28] No space left on device); "
        "free some space or choose another output")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("raised", [
    RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),  # safetensors
    OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)),  # a quota
])
def test_a_full_disk_in_a_librarys_words_is_named_too(tmp_path, raised):
    with pytest.raises(atomic.DiskFullError, match=f"while writing {tmp_path / 'out'} "):
        with atomic.atomic_dir(str(tmp_path / "out"), kind="predict") as tmp:  # as predict.py writes a Fisher
            with atomic.atomic_file(os.path.join(tmp, "fisher.safetensors")):
                raise raised
    assert os.listdir(tmp_path) == []


def test_an_error_that_is_not_a_full_disk_stays_itself(tmp_path):
    with pytest.raises(ValueError, match="^other$"):
        with atomic.atomic_dir(str(tmp_path / "out"), kind="merge"):
            raise ValueError("other")


def test_a_full_disk_during_training_names_the_output_dir(assets, tmp_path, caplog, monkeypatch):
    def no_space(self, *args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr("transformers.Trainer.train", no_space)
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=4096))  # a full disk
    assert config_program("train", assets, tmp_path, tmp_path / "out") == 2
    message = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"][0]
    assert f"no space left on the device of {tmp_path} while writing {tmp_path / 'out'} (" in message
    assert "unexpected pos" in message


# --- wording --------------------------------------------------------------------------------------------

def test_a_layer_count_mismatch_without_an_ancestor_does_not_speak_of_one(tmp_path, capsys):
    two, three = make_tiny_bert(tmp_path / "two", num_hidden_layers=2), make_tiny_bert(tmp_path / "three", num_hidden_layers=3)
    with pytest.raises(SystemExit):
        run_cli(merge_program.main, ["--merge", "linear", "--models", two, three, "--output", str(tmp_path / "out")])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: the models hold different tensors: nothing only in ") and "ancestor" not in line
    assert "bert.encoder.layer.2.attention" in line
    with pytest.raises(SystemExit):
        run_cli(merge_program.main, ["--merge", "task_arithmetic", "--models", two, "--ancestor", three, "--output",
                                     str(tmp_path / "out")])
    assert "the models and the ancestor hold different tensors" in capsys.readouterr().err
