"""SLURM engine without a cluster: rqmt -> sbatch arguments, the job script, squeue output -> engine states."""

import logging
import os
import subprocess
import sys

import pytest

from sisyphus import engine as states
from sisyphus.simple_linux_utility_for_resource_management_engine import (
    SimpleLinuxUtilityForResourceManagementEngine as SlurmEngine,
    array_spec,
    memory_size,
    time_limit,
)

# What slurmstepd wrote into job outputs on the CI cluster (Debian's SLURM 22.05).
MEMORY_KILL_LOG = (
    "allocating\n"
    "slurmstepd-vm: error: StepId=2.batch exceeded memory limit (540475392 > 104857600), being killed\n"
    "slurmstepd-vm: error: *** JOB 2 ON vm CANCELLED AT 2026-11-22T06:42:31 ***\n"
    "slurmstepd-vm: error: Exceeded job memory limit\n"
)
TIME_LIMIT_LOG = "sleeping\nslurmstepd-vm: error: *** JOB 7 ON vm CANCELLED AT 2026-11-22T07:01:02 DUE TO TIME LIMIT ***\n"


def test_memory_size_is_gigabytes_or_a_slurm_size():
    assert memory_size(4) == "4G"
    assert memory_size(1.5) == "1536M"
    assert memory_size(0.1) == "103M"  # 102.4 MB rounded up
    assert memory_size("500M") == "500M"


def test_time_limit_is_whole_minutes_of_hours_and_never_zero():
    assert time_limit(1.5) == "90"
    assert time_limit(0.1) == "6"  # 0.1 * 60 is 6.000000000000001 in floating point
    assert time_limit(0.001) == "1"  # 0 would mean "no limit" to SLURM
    assert time_limit("1-00:00:00") == "1-00:00:00"


def test_array_spec_shortens_runs_of_ids():
    assert array_spec([5]) == "5"
    assert array_spec([4, 1, 2, 3, 7, 9, 10]) == "1-4,7,9-10"
    assert array_spec([2, 2, 3]) == "2-3"


def test_rqmt_becomes_sbatch_options():
    engine = SlurmEngine(default_rqmt={})
    options = engine.sbatch_options({"cpu": 2.0, "mem": 1.5, "time": 0.5, "gpu": 1, "sbatch_args": "-p gpu --qos=high"})
    assert options == [
        "--cpus-per-task=2", "--ntasks-per-node=1", "--export=ALL", "--mem=1536M", "--time=30", "--gres=gpu:1",
        "-p", "gpu", "--qos=high",
    ]


def test_rqmt_options_follow_engine_settings(caplog):
    per_cpu = SlurmEngine(default_rqmt={}, memory_allocation_type=SlurmEngine.MemoryAllocationType.PER_CPU)
    assert "--mem-per-cpu=2G" in per_cpu.sbatch_options({"mem": 2})
    no_memory = SlurmEngine(default_rqmt={}, has_memory_resource=False)
    assert not [o for o in no_memory.sbatch_options({"mem": 2}) if o.startswith("--mem")]
    options = per_cpu.sbatch_options({"gpu": 2, "gpu_name": "a100", "sbatch_args": ["--exclusive"]})
    assert "--gres=gpu:a100:2" in options and options[-1] == "--exclusive"
    assert not [o for o in options if o.startswith(("--time", "--mem"))]  # not asked for: partition defaults
    with caplog.at_level(logging.WARNING):
        assert "-l" not in per_cpu.sbatch_options({"qsub_args": "-l h_vmem=1G"})
    assert "qsub_args" in caplog.text
    with pytest.raises(ValueError, match="multi_node_slots"):
        per_cpu.sbatch_options({"multi_node_slots": 2})


class FakeSlurm:
    """Stands in for sbatch/squeue: records commands and answers with canned output."""

    def __init__(self, squeue_lines=(), sbatch_result=(0, "42\n", "")):
        self.squeue_lines = list(squeue_lines)
        self.sbatch_result = sbatch_result
        self.commands = []

    def __call__(self, command):
        self.commands.append(command)
        if command[0] == "squeue":
            return subprocess.CompletedProcess(command, 0, "".join(line + "\n" for line in self.squeue_lines), "")
        returncode, stdout, stderr = self.sbatch_result
        return subprocess.CompletedProcess(command, returncode, stdout, stderr)


def fake_engine(fake, **kwargs):
    engine = SlurmEngine(default_rqmt={"cpu": 1, "mem": 1, "time": 1}, **kwargs)
    engine.system_call = fake
    return engine


def squeue_line(job_id, task_id, state, name, logpath):
    return f"{job_id}|{task_id}|{state}|{name}|{logpath}.%a|"


def test_submit_call_builds_one_array_job_whose_script_runs_the_call(tmp_path, monkeypatch):
    fake = FakeSlurm()
    engine = fake_engine(fake)
    logpath = str(tmp_path / "log.run")
    call = [sys.executable, "-c", "import sys; print('task', sys.argv[1]); sys.exit(int(sys.argv[1]) - 2)"]
    assert engine.submit_call(call, logpath, {"mem": 0.5}, "mod/Job.abc.run", "run", [1, 2]) == ("slurm", [([1, 2], 42)])
    (command,) = fake.commands
    assert command[:4] == ["sbatch", "--parsable", "-J", "mod.Job.abc.run"]
    assert f"--output={logpath}.%a" in command and "--array=1-2" in command
    assert "--mem=512M" in command and "--time=60" in command  # task rqmt over the engine's default_rqmt
    script = command[-1]
    for task_id, exit_status in [(2, "0"), (3, "1")]:
        monkeypatch.setenv("SLURM_ARRAY_TASK_ID", str(task_id))
        run = subprocess.run(["sh", script], capture_output=True, text=True)
        assert run.stdout == f"task {task_id}\n" and str(run.returncode) == exit_status
        assert (tmp_path / "engine" / f"log.run.{task_id}.exit").read_text().strip() == exit_status


def test_squeue_states_map_to_engine_states(tmp_path):
    log = str(tmp_path / "log.run")
    for task_id, text in [(5, MEMORY_KILL_LOG), (6, TIME_LIMIT_LOG), (7, "Traceback ...\n")]:
        (tmp_path / f"log.run.{task_id}").write_text(text)
    lines = [
        squeue_line(10, 1, "PENDING", "j.run", log),
        squeue_line(10, 2, "RUNNING", "j.run", log),
        squeue_line(10, 3, "COMPLETING", "j.run", log),
        squeue_line(10, 4, "COMPLETED", "j.run", log),
        squeue_line(10, 5, "FAILED", "j.run", log),  # memory kill without cgroups
        squeue_line(10, 6, "TIMEOUT", "j.run", log),
        squeue_line(10, 7, "FAILED", "j.run", log),
        squeue_line(10, 8, "OUT_OF_MEMORY", "j.run", log),
        squeue_line(10, 9, "CANCELLED", "j.run", log),
        squeue_line(10, "N/A", "RUNNING", "single.run", log),  # submitted without --array
    ]
    engine = fake_engine(FakeSlurm(lines))
    expected = {
        1: states.STATE_QUEUE,
        2: states.STATE_RUNNING,
        3: states.STATE_RUNNING,
        4: states.STATE_UNKNOWN,
        5: states.STATE_ENGINE_OUT_OF_MEMORY,
        6: states.STATE_ENGINE_TIMEOUT,
        7: states.STATE_ENGINE_FAILED,
        8: states.STATE_ENGINE_OUT_OF_MEMORY,
        9: states.STATE_ENGINE_FAILED,
        10: states.STATE_UNKNOWN,  # never submitted
    }
    assert {task_id: engine.task_state("j/run", task_id) for task_id in expected} == expected
    assert engine.task_state("single/run", 1) == states.STATE_RUNNING


def test_kill_messages_count_only_from_slurmstepd(tmp_path):
    (tmp_path / "log.run.1").write_text("print('exceeded memory limit ... being killed')\nDUE TO TIME LIMIT\n")
    engine = fake_engine(FakeSlurm([squeue_line(3, 1, "FAILED", "j", tmp_path / "log.run")]))
    assert engine.task_state("j", 1) == states.STATE_ENGINE_FAILED


def test_newest_job_wins_ignored_jobs_are_left_out_and_listing_is_cached(tmp_path):
    lines = [
        squeue_line(11, 1, "TIMEOUT", "j", "/x/log"),
        squeue_line(12, 1, "PENDING", "j", "/x/log"),  # resubmitted after the time-out
        squeue_line(13, 2, "RUNNING", "j", "/x/log"),
    ]
    fake = FakeSlurm(lines)
    engine = fake_engine(fake, ignore_jobs=["13.2"])
    assert engine.task_state("j", 1) == states.STATE_QUEUE
    assert engine.task_state("j", 2) == states.STATE_UNKNOWN
    assert len(fake.commands) == 1  # one listing per manager loop
    engine.submit_call(["true"], str(tmp_path / "log.run"), {}, "k", "run", [1])
    assert engine.task_state("k", 1) == states.STATE_QUEUE  # the cached listing learnt the submission
    assert len(fake.commands) == 2
    engine.reset_cache()
    engine.task_state("j", 1)
    assert len(fake.commands) == 3


def test_task_that_left_the_listing_is_judged_by_its_exit_file_and_log(tmp_path):
    fake = FakeSlurm()
    engine = fake_engine(fake)
    logpath = str(tmp_path / "log.run")
    engine.submit_call(["true"], logpath, {}, "j", "run", [1, 2, 3, 4])
    (tmp_path / "engine" / "log.run.1.exit").write_text("0\n")
    (tmp_path / "engine" / "log.run.2.exit").write_text("1\n")
    (tmp_path / "log.run.3").write_text(TIME_LIMIT_LOG)
    assert [engine.task_state("j", i) for i in (1, 2, 3, 4)] == [
        states.STATE_UNKNOWN, states.STATE_ENGINE_FAILED, states.STATE_ENGINE_TIMEOUT, states.STATE_ENGINE_FAILED,
    ]
    assert fake_engine(fake).task_state("j", 2) == states.STATE_UNKNOWN  # a new engine knows only squeue


def test_refused_submission_reads_as_failed_and_its_log_says_why(tmp_path):
    fake = FakeSlurm(sbatch_result=(1, "", "sbatch: error: Memory specification can not be satisfied"))
    engine = fake_engine(fake)
    logpath = str(tmp_path / "log.run")
    assert engine.submit_call(["true"], logpath, {"mem": 999}, "j", "run", [1]) == ("slurm", [])
    assert engine.task_state("j", 1) == states.STATE_ENGINE_FAILED
    assert "Memory specification can not be satisfied" in open(logpath + ".1").read()
    fake.sbatch_result = (0, "43\n", "")
    engine.submit_call(["true"], logpath, {"mem": 1}, "j", "run", [1])
    fake.squeue_lines = [squeue_line(43, 1, "PENDING", "j", logpath)]
    assert engine.task_state("j", 1) == states.STATE_QUEUE


def test_gateway_runs_commands_through_ssh(monkeypatch, tmp_path):
    calls = []

    def fake_run(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.chdir(tmp_path)
    SlurmEngine(default_rqmt={}, gateway="head").system_call(["squeue", "-u", "me x"])
    assert calls == [["ssh", "-x", "head", "-o", "BatchMode=yes", f"cd {os.getcwd()} && squeue -u 'me x'"]]
