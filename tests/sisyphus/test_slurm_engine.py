"""SLURM engine against the real single-node cluster that `.ci/slurm.sh start` runs."""

import os
import re
import subprocess
import sys
import time
import uuid

import pytest

from sisyphus import engine as states
from sisyphus.simple_linux_utility_for_resource_management_engine import (
    SimpleLinuxUtilityForResourceManagementEngine as SlurmEngine,
)

pytestmark = pytest.mark.slurm

DEFAULT_RQMT = {"cpu": 1, "mem": 0.25, "time": 0.1}
ENDED = {states.STATE_UNKNOWN, states.STATE_ENGINE_FAILED, states.STATE_ENGINE_TIMEOUT, states.STATE_ENGINE_OUT_OF_MEMORY}


def python_call(code):
    """argv running `code`; the engine appends the task id, which the code reads as sys.argv[1]."""
    return [sys.executable, "-c", "import os, sys, time\n" + code]


def wait_for_go_file(go_file):
    """Code of a task that waits until `go_file` exists, then prints its task id."""
    return f"while not os.path.exists({str(go_file)!r}):\n    time.sleep(0.1)\nprint('task', sys.argv[1])"


def wait_until(engine, name, task_id, wanted, timeout):
    """Polls task_state as the manager does (one listing per loop) until it is in `wanted`; returns it."""
    deadline = time.monotonic() + timeout
    while True:
        engine.reset_cache()
        state = engine.task_state(name, task_id)
        if state in wanted:
            return state
        assert time.monotonic() < deadline, f"{name}.{task_id} still {state} after {timeout} s (wanted {wanted})"
        time.sleep(0.3)


def scontrol_show_job(job_id):
    return subprocess.run(["scontrol", "show", "job", str(job_id)], capture_output=True, text=True, check=True).stdout


@pytest.fixture
def job_name(request):
    """A name no other test run uses; its SLURM jobs are cancelled after the test."""
    name = f"sis-test.{uuid.uuid4().hex[:8]}.{request.node.name}"
    yield name
    subprocess.run(["scancel", f"--name={name}"], capture_output=True)


def test_task_is_queued_then_running_then_gone_and_its_output_is_logged(tmp_path, job_name):
    engine = SlurmEngine(default_rqmt=DEFAULT_RQMT)
    logpath, go_file = str(tmp_path / "log.run"), tmp_path / "go"
    rqmt = {"sbatch_args": ["--hold"]}  # held: stays queued until released
    _, [(task_ids, job_id)] = engine.submit_call(python_call(wait_for_go_file(go_file)), logpath, rqmt, job_name, "run", [3])
    assert task_ids == [3]
    assert wait_until(engine, job_name, 3, {states.STATE_QUEUE}, 1) == states.STATE_QUEUE
    subprocess.run(["scontrol", "release", str(job_id)], check=True)
    wait_until(engine, job_name, 3, {states.STATE_RUNNING}, 60)
    go_file.touch()
    assert wait_until(engine, job_name, 3, ENDED, 60) == states.STATE_UNKNOWN
    assert open(logpath + ".3").read() == "task 3\n"


def test_array_job_runs_each_task_id_with_its_own_log(tmp_path, job_name):
    engine = SlurmEngine(default_rqmt=DEFAULT_RQMT)
    logpath = str(tmp_path / "log.run")
    _, [(_, job_id)] = engine.submit_call(python_call("print('task', sys.argv[1])"), logpath, {}, job_name, "run", [1, 2, 4])
    assert re.search(r"ArrayTaskId=1-2,4\b", scontrol_show_job(job_id))
    for task_id in (1, 2, 4):
        assert wait_until(engine, job_name, task_id, ENDED, 60) == states.STATE_UNKNOWN
        assert open(f"{logpath}.{task_id}").read() == f"task {task_id}\n"
    assert not os.path.exists(f"{logpath}.3")


def test_rqmt_reaches_slurm_and_a_cancelled_task_reads_as_failed(tmp_path, job_name):
    engine = SlurmEngine(default_rqmt=DEFAULT_RQMT)
    rqmt = {"cpu": 2, "mem": 0.5, "time": 0.5, "sbatch_args": "--hold --comment=from-rqmt"}
    _, [(_, job_id)] = engine.submit_call(python_call("pass"), str(tmp_path / "log.run"), rqmt, job_name, "run", [1])
    job = scontrol_show_job(job_id)
    for expected in ["NumCPUs=2", "MinMemoryNode=512M", "TimeLimit=00:30:00", "Comment=from-rqmt", f"JobName={job_name}"]:
        assert expected in job.split(), f"{expected} not in scontrol show job:\n{job}"
    subprocess.run(["scancel", str(job_id)], check=True)
    assert wait_until(engine, job_name, 1, ENDED, 30) == states.STATE_ENGINE_FAILED


def test_nonzero_exit_is_engine_failed(tmp_path, job_name):
    engine = SlurmEngine(default_rqmt=DEFAULT_RQMT)
    logpath = str(tmp_path / "log.run")
    engine.submit_call(python_call("print('failing'); sys.exit(3)"), logpath, {}, job_name, "run", [1])
    assert wait_until(engine, job_name, 1, ENDED, 60) == states.STATE_ENGINE_FAILED
    assert open(logpath + ".1").read() == "failing\n"
    assert (tmp_path / "engine" / "log.run.1.exit").read_text().strip() == "3"


def test_memory_kill_is_out_of_memory_also_for_a_restarted_engine(tmp_path, job_name):
    engine = SlurmEngine(default_rqmt=DEFAULT_RQMT)
    hog = "print('allocating', flush=True)\nblock = b'x' * (600 * 2**20)\ntime.sleep(60)"
    engine.submit_call(python_call(hog), str(tmp_path / "log.run"), {"mem": 0.1}, job_name, "run", [1])
    assert wait_until(engine, job_name, 1, ENDED, 60) == states.STATE_ENGINE_OUT_OF_MEMORY
    assert SlurmEngine(default_rqmt={}).task_state(job_name, 1) == states.STATE_ENGINE_OUT_OF_MEMORY


def test_restarted_engine_finds_queued_and_running_tasks_by_name(tmp_path, job_name):
    logpath, go_file = str(tmp_path / "log.run"), tmp_path / "go"
    SlurmEngine(default_rqmt=DEFAULT_RQMT).submit_call(
        python_call(wait_for_go_file(go_file)), logpath, {}, job_name, "run", [1, 2]
    )
    restarted = SlurmEngine(default_rqmt=DEFAULT_RQMT)
    for task_id in (1, 2):
        assert wait_until(restarted, job_name, task_id, {states.STATE_RUNNING}, 60) == states.STATE_RUNNING
    assert restarted.task_state(job_name, 3) == states.STATE_UNKNOWN
    go_file.touch()
    assert wait_until(restarted, job_name, 2, ENDED, 60) == states.STATE_UNKNOWN


def test_commands_through_a_gateway_reach_the_cluster(tmp_path, job_name, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ssh = bin_dir / "ssh"  # `ssh -x HOST -o BatchMode=yes COMMAND` run here by sh, recording HOST
    ssh.write_text(f'#!/bin/sh\necho "$2" >> {tmp_path / "ssh.hosts"}\nshift 4\nexec sh -c "$1"\n')
    ssh.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    engine = SlurmEngine(default_rqmt=DEFAULT_RQMT, gateway="headnode")
    logpath = str(tmp_path / "log with space")
    engine.submit_call(python_call("print('task', sys.argv[1])"), logpath, {}, job_name, "run", [1])
    assert wait_until(engine, job_name, 1, ENDED, 60) == states.STATE_UNKNOWN
    assert open(logpath + ".1").read() == "task 1\n"
    assert set((tmp_path / "ssh.hosts").read_text().split()) == {"headnode"}


@pytest.mark.slow
def test_time_limit_is_engine_timeout(tmp_path, job_name):
    engine = SlurmEngine(default_rqmt=DEFAULT_RQMT)
    logpath = str(tmp_path / "log.run")
    one_minute = 1 / 60
    engine.submit_call(python_call("time.sleep(600)"), logpath, {"time": one_minute}, job_name, "run", [1])
    assert wait_until(engine, job_name, 1, ENDED, 240) == states.STATE_ENGINE_TIMEOUT
    assert "DUE TO TIME LIMIT" in open(logpath + ".1").read()
