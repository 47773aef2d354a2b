"""Faults: tasks and managers killed with signals, Ctrl-C, two managers on one work folder, job folders deleted
or damaged while the manager runs."""
import os
import shutil
import signal
import subprocess

import psutil

import pytest

from sis_util import (TINY_RECIPE, kill, killed_on_exit, make_setup, run_sis, sis_command, sis_env, start_sis, steps,
                      wait_for)

SLEEPERS = """
from sisyphus import tk
from recipe.steps import Concat, Sleep


def py():
    resumable = Sleep(60, resumable=True, release="{setup}/release")
    plain = Sleep(60, resumable=False, release="{setup}/release")
    tk.register_output("resumable.txt", resumable.out_file)
    tk.register_output("plain.txt", plain.out_file)
    tk.register_output("both.txt", Concat([resumable.out_file, plain.out_file]).out_file)
"""

SHORT_GRAPH = """
from sisyphus import tk
from recipe.steps import Concat, Sleep


def py():
    parts = [Sleep(seconds).out_file for seconds in (0.3, 0.6, 0.9)]
    tk.register_output("all.txt", Concat(parts).out_file)
"""


CHAIN = """
from sisyphus import tk
from recipe.steps import Concat, Sleep, WriteText


def py():
    first = Sleep(60, release="{setup}/release")
    tk.register_output("chain.txt", Concat([first.out_file]).out_file)
    tk.register_output("other.txt", WriteText("other", mini=False).out_file)
"""


@pytest.fixture
def setup(tmp_path):
    return make_setup(tmp_path, recipes={"steps": TINY_RECIPE},
                      configs={"sleepers": SLEEPERS.format(setup=tmp_path), "short": SHORT_GRAPH,
                               "chain": CHAIN.format(setup=tmp_path)})


def job_folder(setup, prefix):
    work = os.path.join(setup, "work", "steps")
    (name,) = [n for n in os.listdir(work) if n.startswith(prefix + ".") and ".cleared." not in n]
    return os.path.join(work, name)


def manager_output(setup, name="manager.out"):
    return open(os.path.join(setup, name)).read()


def sleep_pids(setup, how="run"):
    """pid of each Sleep task start of kind `how`, in order."""
    return [int(line.split()[-1]) for line in steps(setup) if line.startswith("Sleep") and f" {how} " in line]


def release(setup):
    open(os.path.join(setup, "release"), "w").close()


def test_killed_tasks_resume_or_are_reported(setup):
    manager = start_sis(setup, "--config", "config/sleepers.py", "m", "-r")
    with killed_on_exit(manager):
        wait_for(lambda: len(sleep_pids(setup)) == 2, message="both Sleep tasks to start")
        for pid in sleep_pids(setup):
            kill(pid, signal.SIGKILL)
        wait_for(lambda: sleep_pids(setup, "resume"), message="the resumable task to be resumed")
        release(setup)
        assert manager.wait(timeout=120) == 1
    out = open(os.path.join(setup, "manager.out")).read()
    assert "interrupted_resumable: Job<work/steps/Sleep." in out
    assert "interrupted_not_resumable: Job<work/steps/Sleep." in out and "end abnormally" in out
    assert "output plain.txt: not computed" in out and "output both.txt: not computed" in out
    assert open(os.path.join(setup, "output", "resumable.txt")).read() == "resume"
    assert sorted(os.listdir(os.path.join(setup, "output"))) == ["resumable.txt"]
    assert len(sleep_pids(setup, "resume")) == 1 and len(sleep_pids(setup)) == 2

    # -cio clears the interrupted job once; with the release file present it now finishes at once.
    result = run_sis(setup, "--config", "config/sleepers.py", "m", "-r", "-cio")
    assert result.returncode == 0, result.output
    assert open(os.path.join(setup, "output", "both.txt")).read() == "resume run"


def test_task_killed_by_sigterm_is_interrupted_not_error(setup):
    config = "from sisyphus import tk\nfrom recipe.steps import Sleep\n\n\ndef py():\n" \
             "    tk.register_output('x', Sleep(60).out_file)\n"
    make_setup(setup, configs={"one": config})
    manager = start_sis(setup, "--config", "config/one.py", "m", "-r")
    wait_for(lambda: sleep_pids(setup), message="the Sleep task to start")
    kill(sleep_pids(setup)[0], signal.SIGTERM)
    assert manager.wait(timeout=120) == 1
    out = open(os.path.join(setup, "manager.out")).read()
    assert "interrupted_not_resumable: Job<work/steps/Sleep." in out
    job = [name for name in os.listdir(os.path.join(setup, "work", "steps"))][0]
    assert not any(name.startswith("error.") for name in os.listdir(os.path.join(setup, "work", "steps", job)))


def test_restarted_manager_picks_up_without_submitting_twice(setup):
    first = start_sis(setup, "--config", "config/sleepers.py", "m", "-r", log_name="first.out")
    wait_for(lambda: len(sleep_pids(setup)) == 2, message="both Sleep tasks to start")
    kill(first)  # SIGKILL: the tasks it started keep running

    work = os.path.join(setup, "work", "steps")
    sleeper = next(name for name in os.listdir(work) if name.startswith("Sleep."))
    # A worker started by hand on a running task does nothing: the task's lock is held.
    again = subprocess.run(sis_command("worker", f"work/steps/{sleeper}", "run", "1"), cwd=setup,
                           env=sis_env(setup), capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "is being run by another worker" in again.stderr

    second = start_sis(setup, "--config", "config/sleepers.py", "m", "-r", log_name="second.out")
    with killed_on_exit(second):
        wait_for(lambda: "running(2)" in open(os.path.join(setup, "second.out")).read(),
                 message="the restarted manager to see both tasks running")
        release(setup)
        assert second.wait(timeout=120) == 0
    out = open(os.path.join(setup, "second.out")).read()
    assert "submit: Job<work/steps/Sleep." not in out and "still runs as process" in out
    assert len(sleep_pids(setup)) == 2 and not sleep_pids(setup, "resume")  # each task ran exactly once
    for name in os.listdir(work):
        if name.startswith("Sleep."):
            assert len(open(os.path.join(work, name, "submit_log.run")).readlines()) == 1
    assert open(os.path.join(setup, "output", "both.txt")).read() == "run run"

    done = subprocess.run(sis_command("worker", f"work/steps/{sleeper}", "run", "1"), cwd=setup, env=sis_env(setup),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "already finished" in done.stderr


def test_two_managers_on_one_work_folder_run_each_task_once(setup):
    managers = [start_sis(setup, "--config", "config/short.py", "m", "-r", log_name=f"manager{i}.out") for i in (1, 2)]
    with killed_on_exit(*managers):
        assert [m.wait(timeout=180) for m in managers] == [0, 0]
    assert sorted(line.split()[1] for line in steps(setup) if line.startswith("Sleep")) == ["0.3", "0.6", "0.9"]
    assert steps(setup).count("Concat") == 1
    work = os.path.join(setup, "work", "steps")
    for name in os.listdir(work):  # and only one of the two managers submitted it
        assert len(open(os.path.join(work, name, "submit_log.run")).readlines()) == 1


def test_a_job_folder_deleted_while_its_task_runs_is_set_up_again(setup):
    manager = start_sis(setup, "--config", "config/chain.py", "m", "-r")
    with killed_on_exit(manager):
        wait_for(lambda: sleep_pids(setup), message="the Sleep task to start")
        (old_worker,) = sleep_pids(setup)
        shutil.rmtree(job_folder(setup, "Sleep"))
        wait_for(lambda: "disappeared while the manager ran" in manager_output(setup), message="the report")
        release(setup)
        assert manager.wait(timeout=120) == 0, manager_output(setup)
    out = manager_output(setup)
    assert "Traceback" not in out and "set up again, the job runs anew" in out
    assert not psutil.pid_exists(old_worker)  # the worker in the deleted folder ended (and was reaped)
    assert len(sleep_pids(setup)) == 2  # the job ran anew in its new folder
    assert open(os.path.join(setup, "output", "chain.txt")).read() == "run"
    assert os.path.isfile(os.path.join(job_folder(setup, "Sleep"), "finished"))


def test_a_damaged_job_folder_is_an_error_the_others_go_on_and_co_clears_it(setup):
    manager = start_sis(setup, "--config", "config/chain.py", "m", "-r")
    with killed_on_exit(manager):
        wait_for(lambda: sleep_pids(setup), message="the Sleep task to start")
        concat = manager_output(setup).split("waiting: Job<")[1].split(">")[0]
        with open(os.path.join(setup, concat), "w") as f:  # a file where the Concat job's folder will go
            f.write("not a job folder")
        release(setup)
        assert manager.wait(timeout=120) == 1
    out = manager_output(setup)
    assert "Traceback" not in out
    assert f"{concat} is there but is not a folder); the other jobs go on. Move it aside with -co" in out
    assert "output chain.txt: not computed" in out
    assert open(os.path.join(setup, "output", "other.txt")).read() == "other"
    assert open(os.path.join(setup, concat)).read() == "not a job folder"  # nothing of the user's removed
    again = run_sis(setup, "--config", "config/chain.py", "m", "-r", "-co")
    assert again.returncode == 0, again.output
    assert open(os.path.join(setup, concat + ".cleared.0001")).read() == "not a job folder"
    assert open(os.path.join(setup, "output", "chain.txt")).read() == "run"


def test_after_ctrl_c_every_message_names_the_way_on(setup):
    manager = start_sis(setup, "--config", "config/chain.py", "m", "-r", own_session=True)
    with killed_on_exit(manager):
        wait_for(lambda: sleep_pids(setup), message="the Sleep task to start")
        os.killpg(manager.pid, signal.SIGINT)  # Ctrl-C in the terminal: the manager and its local tasks
        assert manager.wait(timeout=60) == 130
    assert "sis: interrupted; run the manager again to go on" in manager_output(setup)
    assert "-cio runs the others (state interrupted_not_resumable) again" in manager_output(setup)
    wait_for(lambda: not psutil.pid_exists(sleep_pids(setup)[0]), message="the interrupted task to end")
    release(setup)
    restart = run_sis(setup, "--config", "config/chain.py", "m", "-r")
    assert restart.returncode == 1
    hint = "its task cannot resume; run the manager with -cio (-co does not clear it) to clear it and run it again"
    assert f"interrupted_not_resumable: Job<work/steps/Sleep." in restart.output and hint in restart.output
    assert run_sis(setup, "--config", "config/chain.py", "m", "-r", "-co").returncode == 1  # -co leaves it
    cleared = run_sis(setup, "--config", "config/chain.py", "m", "-r", "-cio")
    assert cleared.returncode == 0, cleared.output
    assert open(os.path.join(setup, "output", "chain.txt")).read() == "run"
    assert len(sleep_pids(setup)) == 2
