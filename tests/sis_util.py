"""Helpers for tests that run `sis` on a temporary setup directory.

    setup = make_setup(tmp_path, recipes={"steps": TINY_RECIPE}, configs={"run": CONFIG_TEXT})
    result = run_sis(setup, "--config", "config/run.py", "m", "-r")
    assert result.returncode == 0, result.output

`settings` selects the engine: the local one (default, of `cpu` CPUs and `mem` GB), sis_settings("slurm") or any
settings.py text of your own. The recipe package is `recipe`, so jobs of `recipe/steps.py` get ids
`steps/<Class>.<hash>`; with project_recipes=True the project's Jobs (model_merging, ukp) are there too.
"""
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SETTINGS = '''
import sys
WORK_DIR = "work"
IMPORT_PATHS = ["config", "recipe/"]
PYTHON_EXE = sys.executable  # the interpreter the project's Jobs run its programs with
CODE_ROOT = {code!r}  # the project's programs, for its Jobs (recipe/model_merging)
WAIT_PERIOD_BETWEEN_CHECKS = 0.5
WAIT_PERIOD_JOB_FS_SYNC = 0
PLOGGING_UPDATE_FILE_PERIOD = 2
CLEANUP_ENVIRONMENT = False  # tasks keep the caller's environment
JOB_AUTO_CLEANUP = False  # job folders stay unpacked for inspection


def engine():
    from sisyphus.engine import EngineSelector
{engines}
    return EngineSelector(engines={{"short": short, "long": long}}, default_engine="long")
'''
LOCAL_ENGINES = '''    from sisyphus.localengine import LocalEngine

    short, long = LocalEngine(cpu=1, mem=1), LocalEngine(cpu={cpu}, mem={mem})'''
SLURM_ENGINES = '''    from sisyphus.simple_linux_utility_for_resource_management_engine import (
        SimpleLinuxUtilityForResourceManagementEngine,
    )

    short = long = SimpleLinuxUtilityForResourceManagementEngine(default_rqmt={{"cpu": 1, "mem": {mem}, "time": {time}}})'''


def sis_settings(engine="local", cpu=2, mem=4, time=0.1):
    """settings.py text: mini tasks on a LocalEngine of 1 CPU and 1 GB, the others on one of `cpu` CPUs and `mem`
    GB; or with engine="slurm", every task on SLURM (`mem` GB and `time` hours for tasks that ask for none)."""
    engines = LOCAL_ENGINES.format(cpu=cpu, mem=mem) if engine == "local" else SLURM_ENGINES.format(mem=mem, time=time)
    return SETTINGS.format(code=os.path.join(REPO, "code"), engines=engines)


LOCAL_SETTINGS = sis_settings()

# Tiny jobs whose tasks only touch files; a step log (work/steps.log in the setup) records every task start.
TINY_RECIPE = '''
import os
import time

from sisyphus import Job, Task, tk


def note(text):
    """Append one line to the setup's steps.log (tests count task starts with it)."""
    with open(os.path.join(os.environ["SIS_TEST_SETUP"], "steps.log"), "a") as f:
        f.write(text + "\\n")


class WriteText(Job):
    def __init__(self, text, mini=True):
        self.text = text
        self.mini = mini
        self.out_file = self.output_path("text.txt")

    def tasks(self):
        yield Task("run", mini_task=self.mini)

    def run(self):
        note(f"WriteText {self.text}")
        with open(self.out_file.get_path(), "w") as f:
            f.write(self.text)


class Concat(Job):
    def __init__(self, inputs, separator=" "):
        self.inputs = inputs
        self.separator = separator
        self.out_file = self.output_path("joined.txt")
        self.out_length = self.output_var("length")

    def run(self):
        note("Concat")
        parts = [open(tk.uncached_path(p)).read() for p in self.inputs]
        text = self.separator.join(parts)
        with open(self.out_file.get_path(), "w") as f:
            f.write(text)
        self.out_length.set(len(text))


class Fail(Job):
    def __init__(self, message):
        self.message = message
        self.out_file = self.output_path("never.txt")

    def run(self):
        note("Fail")
        raise RuntimeError(self.message)


class FailOnce(Job):
    """Fails on its first run (leaving the file `flag` in the setup), succeeds on the next."""

    def __init__(self, flag):
        self.flag = flag
        self.out_file = self.output_path("done.txt")

    def run(self):
        note("FailOnce")
        flag = os.path.join(os.environ["SIS_TEST_SETUP"], self.flag)
        if not os.path.exists(flag):
            open(flag, "w").close()
            raise ValueError("first attempt fails")
        with open(self.out_file.get_path(), "w") as f:
            f.write("second attempt")


class Parts(Job):
    """An array task (one file per argument, in 2 task ids) followed by a mini task that lists them."""

    def __init__(self, count):
        self.count = count
        self.out_dir = self.output_path("parts", directory=True)
        self.out_list = self.output_path("list.txt")

    def tasks(self):
        yield Task("write", args=list(range(self.count)), parallel=2)
        yield Task("merge", mini_task=True)

    def write(self, index):
        note(f"Parts.write {index}")
        with open(os.path.join(self.out_dir.get_path(), f"{index}.txt"), "w") as f:
            f.write(str(os.getpid()))

    def merge(self):
        with open(self.out_list.get_path(), "w") as f:
            f.write(" ".join(sorted(os.listdir(self.out_dir.get_path()))))


class Sleep(Job):
    """Writes started.<n> into its work folder, waits for `seconds` (or until the file `release` exists),
    then writes its output. With resumable=True the task resumes after an interruption."""

    def __init__(self, seconds, resumable=False, release=None, rqmt=None):
        self.seconds = seconds
        self.resumable = resumable
        self.release = release
        self.rqmt = rqmt or {"cpu": 1, "mem": 1}
        self.out_file = self.output_path("slept.txt")

    def tasks(self):
        yield Task("run", resume="resume" if self.resumable else None, rqmt=self.rqmt)

    def run(self):
        self._sleep("run")

    def resume(self):
        self._sleep("resume")

    def _sleep(self, how):
        note(f"Sleep {self.seconds} {how} {os.getpid()}")
        deadline = time.time() + self.seconds
        while time.time() < deadline and not (self.release and os.path.exists(self.release)):
            time.sleep(0.05)
        with open(self.out_file.get_path(), "w") as f:
            f.write(how)
'''


class SisResult:
    def __init__(self, completed):
        self.returncode = completed.returncode
        self.stdout = completed.stdout
        self.stderr = completed.stderr
        self.output = completed.stdout + completed.stderr


def make_setup(root, recipes=None, configs=None, settings=None, cpu=2, mem=4, project_recipes=False):
    """Write settings.py, recipe/<name>.py and config/<name>.py under `root`; returns root as str. With
    project_recipes, recipe/ also links the project's recipe packages (model_merging, ukp)."""
    root = str(root)
    files = {"settings.py": settings if settings is not None else sis_settings(cpu=cpu, mem=mem),
             "recipe/__init__.py": "", "config/__init__.py": ""}
    files.update({f"recipe/{name}.py": text for name, text in (recipes or {}).items()})
    files.update({f"config/{name}.py": text for name, text in (configs or {}).items()})
    for name, text in files.items():
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(textwrap.dedent(text))
    recipes_dir = os.path.join(REPO, "recipe")
    for package in sorted(os.listdir(recipes_dir)) if project_recipes else []:
        if os.path.isfile(os.path.join(recipes_dir, package, "__init__.py")):
            os.symlink(os.path.join(recipes_dir, package), os.path.join(root, "recipe", package))
    return root


def sis_env(setup):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["SIS_TEST_SETUP"] = str(setup)
    return env


def sis_command(*args):
    return [sys.executable, "-m", "sisyphus", *args]


def run_sis(setup, *args, input=None, timeout=120, extra_env=None):
    """Run `sis ARGS` in the setup directory and wait for it (extra_env: further environment variables)."""
    env = dict(sis_env(setup), **(extra_env or {}))
    completed = subprocess.run(sis_command(*args), cwd=setup, env=env, input=input, text=True,
                               capture_output=True, timeout=timeout)
    return SisResult(completed)


def start_sis(setup, *args, log_name="manager.out", own_session=False):
    """Start `sis ARGS` in the background (output to <setup>/<log_name>); returns the Popen. With own_session
    the manager leads a process group of its own, as in a terminal (os.killpg(p.pid, SIGINT) is a Ctrl-C)."""
    log = open(os.path.join(setup, log_name), "w")
    return subprocess.Popen(sis_command(*args), cwd=setup, env=sis_env(setup), stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=own_session)


def steps(setup):
    """Lines of steps.log: one per task start of the TINY_RECIPE jobs."""
    try:
        with open(os.path.join(setup, "steps.log")) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def wait_for(condition, timeout=60, interval=0.1, message="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


def kill(process_or_pid, sig=signal.SIGKILL):
    """Send a signal to one process (by Popen or pid), and reap it if it is our child."""
    pid = process_or_pid.pid if hasattr(process_or_pid, "pid") else process_or_pid
    os.kill(pid, sig)
    if hasattr(process_or_pid, "wait"):
        process_or_pid.wait(timeout=30)


@contextlib.contextmanager
def killed_on_exit(*processes):
    """Runs the block; then kills each of `processes` (Popen) that still runs, so that a failed test leaves none."""
    try:
        yield
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()


def jobs_below(job):
    """Every job `job` depends on (itself included), found through the creators of its inputs."""
    found, todo = {}, [job]
    while todo:
        job = todo.pop()
        if id(job) not in found:
            found[id(job)] = job
            todo.extend(path.creator for path in job._sis_inputs if path.creator is not None)
    return list(found.values())
