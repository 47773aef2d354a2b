"""`sis m` end to end on tiny jobs: outputs, job folders, the prompt, errors, -co, async configs, bad input."""
import os
import shutil
import subprocess
import sys

import pytest

from sis_util import TINY_RECIPE, make_setup, run_sis, sis_env, steps

PIPELINE = """
from sisyphus import tk
from recipe.steps import Concat, WriteText


def py():
    hello = WriteText("hello")
    world = WriteText("world", mini=False)
    joined = Concat([hello.out_file, world.out_file])
    joined.add_alias("joined")
    tk.register_output("texts/joined.txt", joined.out_file)
    tk.register_output("length", joined.out_length)
"""

FAILING = """
from sisyphus import tk
from recipe.steps import Concat, Fail, WriteText


def py():
    good = WriteText("good")
    bad = Fail("boom in the task")
    tk.register_output("good.txt", good.out_file)
    tk.register_output("joined.txt", Concat([good.out_file, bad.out_file]).out_file)
"""

ASYNC = """
from sisyphus import tk
from recipe.steps import Concat, WriteText


async def py():
    count = WriteText("3")
    await tk.async_run(count.out_file)
    n = int(open(count.out_file.get_path()).read())
    joined = Concat([WriteText(str(i)).out_file for i in range(n)], separator="+")
    await tk.async_run(joined.out_length)
    tk.register_output("sum.txt", Concat([joined.out_file], separator="").out_file)
    tk.register_output("length", joined.out_length)
"""


def job_folder(setup, prefix):
    (name,) = [n for n in os.listdir(os.path.join(setup, "work", "steps")) if n.startswith(prefix + ".")
               and ".cleared." not in n]
    return os.path.join(setup, "work", "steps", name)


@pytest.fixture
def setup(tmp_path):
    return make_setup(tmp_path, recipes={"steps": TINY_RECIPE},
                      configs={"pipeline": PIPELINE, "failing": FAILING, "async_config": ASYNC,
                               "fail_once": "from sisyphus import tk\nfrom recipe.steps import FailOnce\n\n\n"
                                            "def py():\n    tk.register_output('done', FailOnce('flag').out_file)\n",
                               "parts": "from sisyphus import tk\nfrom recipe.steps import Parts\n\n\n"
                                        "def py():\n    tk.register_output('list.txt', Parts(5).out_list)\n"})


def test_run_links_outputs_and_a_rerun_does_nothing(setup):
    result = run_sis(setup, "--config", "config/pipeline.py", "m", "-r")
    assert result.returncode == 0, result.output
    assert "All 2 outputs finished" in result.output
    assert open(os.path.join(setup, "output", "texts", "joined.txt")).read() == "hello world"
    assert open(os.path.join(setup, "output", "length")).read().strip() == "11"
    assert sorted(steps(setup)) == ["Concat", "WriteText hello", "WriteText world"]

    concat = job_folder(setup, "Concat")
    assert os.path.realpath(os.path.join(setup, "alias", "joined")) == os.path.realpath(concat)
    assert sorted(os.listdir(concat)) == ["finished", "finished.run.1", "info", "input", "job.save", "lock.run.1",
                                          "log.run.1", "output", "submit_log.run", "usage.run.1", "work"]
    inputs = sorted(os.listdir(os.path.join(concat, "input")))
    assert len(inputs) == 2 and all(name.startswith("steps_WriteText.") for name in inputs)
    load = "import gzip, pickle, sys; sys.path.insert(0, '.'); print(pickle.load(gzip.open(sys.argv[1])).job_id())"
    loaded = subprocess.run([sys.executable, "-c", load, os.path.join(concat, "job.save")], cwd=setup,
                            env=sis_env(setup), capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "steps/" + os.path.basename(concat)
    assert "Start task run.1" in open(os.path.join(concat, "log.run.1")).read()

    again = run_sis(setup, "--config", "config/pipeline.py", "m", "-r")
    assert again.returncode == 0, again.output
    assert "submit" not in again.output and "finished(3)" in again.output
    assert len(steps(setup)) == 3


def test_prompt_before_starting(setup):
    declined = run_sis(setup, "--config", "config/pipeline.py", "m", input="n\n")
    assert declined.returncode == 0
    assert "Start manager? (y/n)" in declined.stdout
    assert "runnable: Job<work/steps/WriteText." in declined.output and "waiting: Job<work/steps/Concat." in declined.output
    assert not os.path.exists(os.path.join(setup, "work")) and steps(setup) == []

    accepted = run_sis(setup, "--config", "config/pipeline.py", "m", input="y\n")
    assert accepted.returncode == 0, accepted.output
    assert open(os.path.join(setup, "output", "texts", "joined.txt")).read() == "hello world"


def test_task_exception_gives_error_state_with_traceback(setup):
    result = run_sis(setup, "--config", "config/failing.py", "m", "-r")
    assert result.returncode == 1, result.output
    fail = job_folder(setup, "Fail")
    assert f"error: Job<work/steps/{os.path.basename(fail)}> task run.1" in result.output
    assert "RuntimeError: boom in the task" in result.output  # the log's tail is printed
    assert "output joined.txt: not computed" in result.output
    error_text = open(os.path.join(fail, "error.run.1")).read()
    assert error_text.startswith("Traceback") and "RuntimeError: boom in the task" in error_text
    assert "RuntimeError: boom in the task" in open(os.path.join(fail, "log.run.1")).read()
    assert not os.path.exists(os.path.join(fail, "finished"))
    assert os.listdir(os.path.join(setup, "output")) == ["good.txt"]  # never a link to a failed job's output

    again = run_sis(setup, "--config", "config/failing.py", "m", "-r")
    assert again.returncode == 1 and steps(setup).count("Fail") == 1  # an error is not retried by itself


def test_clear_errors_once(setup):
    assert run_sis(setup, "--config", "config/fail_once.py", "m", "-r").returncode == 1
    result = run_sis(setup, "--config", "config/fail_once.py", "m", "-r", "-co")
    assert result.returncode == 0, result.output
    folder = job_folder(setup, "FailOnce")
    assert os.path.isfile(folder + ".cleared.0001/error.run.1")
    assert open(os.path.join(setup, "output", "done")).read() == "second attempt"
    assert steps(setup) == ["FailOnce", "FailOnce"]


def test_array_task_then_mini_task(setup):
    result = run_sis(setup, "--config", "config/parts.py", "m", "-r")
    assert result.returncode == 0, result.output
    folder = job_folder(setup, "Parts")
    assert open(os.path.join(setup, "output", "list.txt")).read() == "0.txt 1.txt 2.txt 3.txt 4.txt"
    assert {f for f in os.listdir(folder) if f.startswith("finished.")} == {"finished.write.1", "finished.write.2",
                                                                            "finished.merge.1"}
    # Task id 1 ran arguments 0-2 in one process, task id 2 ran 3-4 in another.
    pids = {i: open(os.path.join(folder, "output", "parts", f"{i}.txt")).read() for i in range(5)}
    assert pids[0] == pids[1] == pids[2] != pids[3] == pids[4]


def test_async_config_builds_jobs_from_computed_values(setup):
    result = run_sis(setup, "--config", "config/async_config.py", "m", "-r")
    assert result.returncode == 0, result.output
    assert open(os.path.join(setup, "output", "sum.txt")).read() == "0+1+2"
    assert open(os.path.join(setup, "output", "length")).read().strip() == "5"
    assert sorted(steps(setup)) == ["Concat", "Concat", "WriteText 0", "WriteText 1", "WriteText 2", "WriteText 3"]


BAD_CONFIGS = {
    "lambda_arg": ("from recipe.steps import Concat, WriteText\n\n\ndef py():\n"
                   "    Concat([WriteText('a').out_file], separator=lambda x: x)\n",
                   "config/lambda_arg.py:5: cannot hash argument 'separator' of recipe.steps.Concat: a lambda"),
    "syntax": ("def py(:\n    pass\n", "config/syntax.py:1: SyntaxError"),
    "raises": ("import json\n\n\ndef py():\n    json.loads('{')\n", "config/raises.py:5: JSONDecodeError"),
    "twice": ("from sisyphus import tk\nfrom recipe.steps import WriteText\n\n\ndef py():\n"
              "    tk.register_output('x', WriteText('a').out_file)\n    tk.register_output('x', WriteText('b').out_file)\n",
              "config/twice.py:7: output 'x' registered twice with different paths"),
    "missing_recipe": ("from recipe.nothing import Job1\n", "config/missing_recipe.py:1: ModuleNotFoundError"),
}


HELD = """
from sisyphus import tk
from recipe.steps import Sleep, WriteText


def py():
    tk.register_output("small.txt", WriteText("small", mini=False).out_file)
    tk.register_output("big.txt", Sleep(0, rqmt={"cpu": 1, "mem": 12}).out_file)
"""


def test_a_task_larger_than_the_engine_is_held_with_the_reason_and_runs_once_the_limit_allows(tmp_path):
    settings = "MAX_SUBMIT_RETRIES = 0  # a held submission counted as an attempt would be a retry_error\n"
    make_setup(tmp_path, recipes={"steps": TINY_RECIPE}, configs={"held": HELD}, mem=4)
    with open(tmp_path / "settings.py", "a") as f:
        f.write(settings)
    result = run_sis(str(tmp_path), "--config", "config/held.py", "m", "-r")
    assert result.returncode == 1, result.output
    assert "Requested resources are higher than maximal available resources" in result.output
    held = "task run.1 asks mem=12 (at most 4), more than the local engine has"
    assert f"queue: Job<work/steps/Sleep." in result.output and f"held by the engine: {held}" in result.output
    assert "finished(1) queue(1); held by the engine(1): Job<work/steps/Sleep." in result.output  # status line
    assert "raise the engine's limits in settings.py, or lower the job's requirements" in result.output
    assert steps(str(tmp_path)) == ["WriteText small"]  # the big task never started
    assert (tmp_path / "output" / "small.txt").read_text() == "small"
    make_setup(tmp_path, recipes={"steps": TINY_RECIPE}, configs={"held": HELD}, mem=16)
    with open(tmp_path / "settings.py", "a") as f:
        f.write(settings)
    again = run_sis(str(tmp_path), "--config", "config/held.py", "m", "-r")
    assert again.returncode == 0, again.output
    assert steps(str(tmp_path)) == ["WriteText small", "Sleep 0 run " + steps(str(tmp_path))[1].split()[-1]]
    assert (tmp_path / "output" / "big.txt").read_text() == "run"


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_bad_config_gives_one_line_error_and_no_output(tmp_path, name):
    text, expected = BAD_CONFIGS[name]
    setup = make_setup(tmp_path, recipes={"steps": TINY_RECIPE}, configs={name: text})
    result = run_sis(setup, "--config", f"config/{name}.py", "m", "-r")
    assert result.returncode == 2
    assert result.stderr.startswith("sis: error: " + expected), result.stderr
    assert result.stderr.count("\n") == 1
    assert not os.path.exists(os.path.join(setup, "work")) and not os.path.exists(os.path.join(setup, "output"))


def test_missing_settings_and_missing_config(tmp_path):
    setup = make_setup(tmp_path, configs={"pipeline": PIPELINE})
    missing_config = run_sis(setup, "--config", "config/nope.py", "m", "-r")
    assert missing_config.returncode == 2
    assert missing_config.stderr.startswith("sis: error: config/nope.py: no such config file")
    os.remove(os.path.join(setup, "settings.py"))
    result = run_sis(setup, "--config", "config/pipeline.py", "m", "-r")
    assert result.returncode == 2
    assert result.stderr == f"sis: error: {os.path.join(setup, 'settings.py')}: no settings.py here; run sis from " \
                            f"the setup directory that holds it\n"


@pytest.mark.skipif(shutil.which("sis") is None, reason="the sis console script is not installed (pip install -e .)")
def test_sis_console_script(setup):
    completed = subprocess.run(["sis", "--config", "config/pipeline.py", "m", "-r"], cwd=setup, env=sis_env(setup),
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert open(os.path.join(setup, "output", "texts", "joined.txt")).read() == "hello world"
