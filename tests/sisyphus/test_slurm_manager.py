"""`sis m -r` with the SLURM engine, on the real single-node cluster that `.ci/slurm.sh start` runs."""

import os
import uuid

import pytest
from sis_util import TINY_RECIPE, kill, make_setup, run_sis, sis_settings, start_sis, steps, wait_for

pytestmark = pytest.mark.slurm

# Every task goes to SLURM, mini tasks too (both selector keys name the same engine).
SLURM_SETTINGS = sis_settings("slurm", mem=0.25)

CALC_RECIPE = '''
import os
import time

from sisyphus import Job, Task


class Square(Job):
    """Squares each number in a task id of its own (one SLURM array job)."""

    def __init__(self, numbers, token):
        self.numbers = numbers
        self.token = token  # makes the SLURM job names of each test run unique
        self.out_dir = self.output_path("squares", directory=True)

    def tasks(self):
        yield Task("run", args=self.numbers)

    def run(self, number):
        with open(os.path.join(self.out_dir.get_path(), str(number)), "w") as f:
            f.write(str(number * number))


class Total(Job):
    def __init__(self, squares):
        self.squares = squares
        self.out_total = self.output_path("total.txt")

    def run(self):
        folder = self.squares.get_path()
        total = sum(int(open(os.path.join(folder, name)).read()) for name in os.listdir(folder))
        with open(self.out_total.get_path(), "w") as f:
            f.write(str(total))


class Hog(Job):
    """Touches far more memory than its rqmt allows."""

    def __init__(self, token):
        self.token = token
        self.out_file = self.output_path("never.txt")

    def tasks(self):
        yield Task("run", rqmt={"cpu": 1, "mem": 0.1, "time": 0.1})

    def run(self):
        block = b"x" * (600 * 2**20)
        time.sleep(60)
'''


def slurm_setup(tmp_path, config):
    return make_setup(tmp_path, recipes={"calc": CALC_RECIPE, "steps": TINY_RECIPE}, configs={"run": config},
                      settings=SLURM_SETTINGS)


def test_manager_runs_a_graph_through_slurm(tmp_path):
    config = f"""
        from sisyphus import tk
        from recipe.calc import Square, Total


        def py():
            squares = Square([1, 2, 3], "{uuid.uuid4().hex}")
            tk.register_output("total", Total(squares.out_dir).out_total)
        """
    setup = slurm_setup(tmp_path, config)
    result = run_sis(setup, "--config", "config/run.py", "m", "-r", timeout=240)
    assert result.returncode == 0, result.output
    assert open(os.path.join(setup, "output", "total")).read() == "14"
    square_dirs = [d for d in os.listdir(os.path.join(setup, "work", "calc")) if d.startswith("Square.")]
    engine_dir = os.path.join(setup, "work", "calc", *square_dirs, "engine")
    # The job script of each task id reported its exit status: SLURM ran them.
    assert sorted(os.listdir(engine_dir)) == ["log.run.1.exit", "log.run.2.exit", "log.run.3.exit", "log.run.sh"]


def test_manager_exits_nonzero_naming_a_job_killed_for_memory(tmp_path):
    config = f"""
        from sisyphus import tk
        from recipe.calc import Hog


        def py():
            tk.register_output("never", Hog("{uuid.uuid4().hex}").out_file)
        """
    setup = slurm_setup(tmp_path, config)
    result = run_sis(setup, "--config", "config/run.py", "m", "-r", timeout=240)
    assert result.returncode != 0, result.output
    assert "calc/Hog." in result.output and "killed for exceeding its memory requirement" in result.output


def test_restarted_manager_finds_the_running_slurm_task_and_does_not_submit_it_again(tmp_path):
    release = tmp_path / "release"
    config = f"""
        from sisyphus import tk
        from recipe.steps import Sleep


        def py():
            rqmt = {{"cpu": 1, "mem": 0.25, "time": 0.1}}
            tk.register_output("slept", Sleep(600, release={str(release)!r}, rqmt=rqmt).out_file)
        """
    setup = slurm_setup(tmp_path, config)
    first = start_sis(setup, "--config", "config/run.py", "m", "-r", log_name="first.out")
    try:
        wait_for(lambda: len(steps(setup)) == 1, timeout=120, message="the Sleep task to start under SLURM")
    finally:
        kill(first)
    second = start_sis(setup, "--config", "config/run.py", "m", "-r", log_name="second.out")
    try:
        wait_for(lambda: "running" in open(os.path.join(setup, "second.out")).read(), timeout=60,
                 message="the restarted manager to see the task running")
        release.touch()
        assert second.wait(timeout=120) == 0, open(os.path.join(setup, "second.out")).read()
    finally:
        if second.poll() is None:
            kill(second)
    assert len(steps(setup)) == 1, steps(setup)  # one start: the second manager submitted nothing
    assert open(os.path.join(setup, "output", "slept")).read() == "run"
