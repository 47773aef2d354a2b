"""Settings of a Sisyphus setup: the defaults below, overridden by the setup's `settings.py`.

`load_settings` executes `settings.py` and copies every global it defines onto this module, so configs,
recipes and the manager read them as `gs.NAME` (`import sisyphus.global_settings as gs`).
"""
import os
import sys

from sisyphus.errors import SisError

#: Setup directory (where settings.py is); every relative path is relative to it.
BASE_DIR = os.getcwd()
SETTINGS_FILE = "settings.py"

WORK_DIR = "work"
ALIAS_DIR = "alias"
OUTPUT_DIR = "output"
#: Added to sys.path: an entry ending in '/' makes the modules inside that folder importable top-level;
#: one without (e.g. 'config') makes a package of the setup directory importable.
IMPORT_PATHS = ["config", "recipe/"]
#: Removed from the front of a job's module path in its id (recipe.foo.Bar -> foo/Bar.<hash>).
RECIPE_PREFIX = "recipe"

#: argv that starts `sis` in a worker; the engines run it with the setup directory as working directory.
SIS_COMMAND = [sys.executable, "-m", "sisyphus"]

#: Seconds the manager waits between two looks at the job folders when nothing changed.
WAIT_PERIOD_BETWEEN_CHECKS = 5
#: Seconds a file written on another machine may take to show up here (network file systems).
WAIT_PERIOD_JOB_FS_SYNC = 5
#: Seconds after a submission during which an engine that does not list the task yet is believed.
WAIT_PERIOD_SUBMIT = 30
#: Seconds between two updates of a running task's usage file (its heartbeat).
PLOGGING_UPDATE_FILE_PERIOD = 30
#: How often a task that keeps being interrupted is submitted again before it counts as failed.
MAX_SUBMIT_RETRIES = 3
#: Most tasks the manager keeps submitted (queued or running) at once; 0 means no limit.
MAX_PARALLEL = 0
#: Lines of a failed task's log printed by the manager.
PRINT_ERROR_LINES = 40

# Names of the files in a job folder (work/<module path>/<Class>.<hash>/).
JOB_OUTPUT = "output"
JOB_INPUT = "input"
JOB_WORK_DIR = "work"
JOB_SAVE = "job.save"
JOB_INFO = "info"
JOB_LOG = "log"
JOB_FINISHED_MARKER = "finished"
JOB_FINISHED_ARCHIVE = "finished.tar.gz"
ENGINE_SUBMIT = "submit_log"
PLOGGING_FILE = "usage"
TASK_LOCK = "lock"

# Job and task states.
STATE_WAITING = "waiting"  # inputs not computed yet
STATE_RUNNABLE = "runnable"  # can be submitted
STATE_QUEUE = "queue"  # submitted, not started
STATE_RUNNING = "running"
STATE_INTERRUPTED_RESUMABLE = "interrupted_resumable"  # ended without finishing; will be resumed
STATE_INTERRUPTED_NOT_RESUMABLE = "interrupted_not_resumable"  # ended without finishing; cannot resume
STATE_RETRY_ERROR = "retry_error"  # interrupted more than MAX_SUBMIT_RETRIES times
STATE_ERROR = "error"  # the task raised an exception
STATE_FINISHED = "finished"

CMD_WORKER = "worker"


def engine():
    """The engine that runs the tasks; settings.py normally overrides this function."""
    from sisyphus.localengine import LocalEngine

    return LocalEngine(cpu=os.cpu_count() or 1, gpu=0, mem=8)


def load_settings(setup_dir):
    """Execute `<setup_dir>/settings.py` and make its globals attributes of this module."""
    global BASE_DIR
    path = os.path.join(setup_dir, SETTINGS_FILE)
    if not os.path.isfile(path):
        raise SisError(f"{path}: no {SETTINGS_FILE} here; run sis from the setup directory that holds it")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    namespace = {"__file__": path, "__name__": "settings"}
    try:
        exec(compile(text, path, "exec"), namespace)
    except Exception as e:
        raise SisError(f"{path}: {type(e).__name__}: {e}") from e
    module = sys.modules[__name__]
    for key, value in namespace.items():
        if not key.startswith("__"):
            setattr(module, key, value)
    BASE_DIR = os.path.abspath(setup_dir)
    _extend_sys_path()


def _extend_sys_path():
    """The setup directory goes first on sys.path (for `recipe.x`, `config.x`); every IMPORT_PATHS folder ending
    in '/' goes last, so its modules are importable top-level without shadowing installed ones."""
    if BASE_DIR not in sys.path:
        sys.path.insert(0, BASE_DIR)
    for entry in IMPORT_PATHS:
        folder = os.path.join(BASE_DIR, entry.rstrip("/"))
        if entry.endswith("/") and folder not in sys.path:
            sys.path.append(folder)
