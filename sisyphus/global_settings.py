"""Settings of a Sisyphus setup: the defaults below, overridden by the setup's `settings.py`.

`load_settings` executes `settings.py` and copies every global it defines onto this module, so configs,
recipes and the manager read them as `gs.NAME` (`import sisyphus.global_settings as gs`).
"""
import logging
import os
import sys

from sisyphus.errors import SisError
from sisyphus.hash import short_hash

# BASE_DIR, the setup directory (where settings.py is): every relative path is relative to it. load_settings
# sets it; until then (no setup loaded) it is the current working directory, see __getattr__ below.
SETTINGS_FILE = "settings.py"
GLOBAL_SETTINGS_FILE_DEFAULT = SETTINGS_FILE
GLOBAL_SETTINGS_FILE = SETTINGS_FILE
GLOBAL_SETTINGS_FILE_CONTENT = ""

WORK_DIR = "work"
ALIAS_DIR = "alias"
OUTPUT_DIR = "output"
#: If not empty, aliases and outputs go to alias/<subdir>/ and output/<subdir>/ (set per config, so that the
#: outputs of different configs do not collide); the value when a job is created or an output registered counts.
ALIAS_AND_OUTPUT_SUBDIR = ""
#: Added to sys.path: an entry ending in '/' makes the modules inside that folder importable top-level;
#: one without (e.g. 'config') makes a package of the setup directory importable.
IMPORT_PATHS = ["config", "recipe", "recipe/"]
#: Removed from the front of a job's module path in its id (recipe.foo.Bar -> foo/Bar.<hash>).
RECIPE_PREFIX = "recipe"
RECIPE_PATH = "recipe"
RECIPE_DIR = "recipe"
CONFIG_PREFIX = "config"
CONFIG_FILE_DEFAULT = "config.py"
CONFIG_FUNCTION_DEFAULT = "config.main"
#: Folder of the reference Sisyphus's own unit tests, relative to its repository root (they import it as gs.TEST_DIR).
TEST_DIR = "tests"

#: argv that starts `sis` in a worker; the engines run it with the setup directory as working directory.
SIS_COMMAND = [sys.executable, "-m", "sisyphus"]
#: Hash function of jobs and objects (tools.sis_hash).
SIS_HASH = short_hash

#: Seconds the manager waits between two looks at the job folders when nothing changed (the local engine
#: wakes it earlier when a task ends).
WAIT_PERIOD_BETWEEN_CHECKS = 30
#: Seconds a file written on another machine may take to show up here (network file systems).
WAIT_PERIOD_JOB_FS_SYNC = 30
#: Seconds after a submission during which an engine that does not list the task yet is believed.
WAIT_PERIOD_SUBMIT = 30
WAIT_PERIOD_CACHE = 20
WAIT_PERIOD_SSH_TIMEOUT = 15
WAIT_PERIOD_QSTAT_PARSING = 15
WAIT_PERIOD_HTTP_RETRY_BIND = 10
#: Seconds a finished job waits before JOB_AUTO_CLEANUP packs its folder.
WAIT_PERIOD_JOB_CLEANUP = 10
WAIT_PERIOD_MTIME_OF_INPUTS = 60
#: Seconds between two updates of a running task's usage file (its heartbeat).
PLOGGING_UPDATE_FILE_PERIOD = 60
PLOGGING_INTERVAL = 5
PLOGGING_QUIET = False
PLOGGING_MIN_CHANGE = 0.1
#: How often a task that keeps being interrupted is submitted again before it counts as failed.
MAX_SUBMIT_RETRIES = 3
#: Most tasks the manager keeps submitted (queued or running) at once; 0 means no limit.
MAX_PARALLEL = 0
#: Print the log tails of failed jobs, that many jobs and lines.
PRINT_ERROR = True
PRINT_ERROR_TASKS = 1
PRINT_ERROR_LINES = 40
#: Clear jobs in error state automatically (as -co does once).
CLEAR_ERROR = False
#: List every job's registered outputs in the status overview.
SHOW_JOB_TARGETS = True
SHOW_VIS_NAME_IN_MANAGER = True

#: Pack a finished job's folder into finished.tar.gz (logs, job.save, markers; output/ stays; work/ is removed
#: unless JOB_CLEANUP_KEEP_WORK) once it finished.
JOB_AUTO_CLEANUP = True
JOB_CLEANER_INTERVAL = 60
JOB_CLEANER_WORKER = 5
JOB_CLEANUP_KEEP_WORK = False
#: Keep value of jobs without one; tk.cleaner(keep_value=N) removes unneeded jobs below N.
JOB_DEFAULT_KEEP_VALUE = 50
#: Name of a job's final log file (a setting of the reference Sisyphus; read by settings that set it).
JOB_FINAL_LOG = "finished.log"
JOB_USE_TAGS_IN_PATH = False
JOB_ADD_STACKTRACE_WITH_DEPTH = 0
JOB_MAX_NUMBER_OF_LOCKS = 100
LOG_TRACEBACKS = False
AUTO_SET_JOB_INIT_ATTRIBUTES = False
TEAM_SHARE_DIR = None
START_KERNEL = False
GRAPH_WORKER = 16
MANAGER_SUBMIT_WORKER = 10
FILESYSTEM_CACHE_TIME = 30
USE_VERBOSE_TRACEBACK = True
VERBOSE_TRACEBACK_TYPE = "ipython"
USE_SIGNAL_HANDLERS = False
USE_UI = True
MEMORY_PROFILE_LOG = None
ENGINE_NOT_SETUP_WARNING = True
SKIP_IS_FINISHED_TIMEOUT = False
CACHE_FINISHED_RESULTS = False
CACHE_FINISHED_RESULTS_PATH = "finished_results_cache.pkl"
CACHE_FINISHED_RESULTS_MAX_SIZE = 1024
WARNING_NO_FUNCTION_CALLED = True
WARNING_ABSPATH = True
DELAYED_CHECK_FOR_WORKER = False
#: repr(Path) is '<Path /abs/path>' unless this is set (then the quoted path, as in old versions).
LEGACY_PATH_CONVERSION = False
#: str()/repr() of a Variable give its value unless this is False (repr: '<Variable rel/path value>').
LEGACY_VARIABLE_CONVERSION = False
#: Pickle a Path's creator job with it (into a job.save, tk.dump); by default a Path is pickled as its path
#: relative to the setup folder, without the job that writes it.
INCLUDE_CREATOR_STATE = False
#: Reading an unset Variable without backup raises VariableNotSet instead of returning a placeholder string.
RAISE_VARIABLE_NOT_SET_EXCEPTION = False

# Visualization (web page).
VIS_RELATIVE_MERGE_THRESHOLD = 0.25
VIS_ABSOLUTE_MERGE_THRESHOLD = 5
VIS_TIMEOUT = 5
VIS_MAX_NODES_PER_VIEW = 500

#: The worker replaces its environment by DEFAULT_ENVIRONMENT_KEEP (kept) and DEFAULT_ENVIRONMENT_SET (set)
#: before a task runs, so that tasks see the same environment whoever starts the manager. Both can be changed
#: in place in settings.py (DEFAULT_ENVIRONMENT_SET['X'] = ...); Job.set_env adds to them per job.
CLEANUP_ENVIRONMENT = True
DEFAULT_ENVIRONMENT_KEEP = {"CUDA_VISIBLE_DEVICES", "HOME", "PWD", "SGE_STDERR_PATH", "SGE_TASK_ID", "TMP", "TMPDIR",
                            "USER"}
DEFAULT_ENVIRONMENT_SET = {
    "LANG": "en_US.UTF-8",
    "MKL_NUM_THREADS": 1,
    "OMP_NUM_THREADS": 1,
    "PATH": ":".join(["/rbi/sge/bin", "/rbi/sge/bin/lx-amd64", "/usr/local/sbin", "/usr/local/bin", "/usr/sbin",
                      "/usr/bin", "/sbin", "/bin", "/usr/games", "/usr/local/games", "/snap/bin"]),
    "SHELL": "/bin/bash",
}
#: Prefix of tk.mktemp's temporary files.
TMP_PREFIX = os.path.join(os.environ.get("TMPDIR", "/tmp"), "sis_")
#: Environment variables SIS_<NAME> override setting NAME after settings.py ran (value read as a literal).
ENVIRONMENT_SETTINGS_PREFIX = "SIS_"
ENVIRONMENT_SETTINGS = {}
GLOBAL_SETTINGS_COMMANDLINE = []

# Names of the files in a job folder (work/<module path>/<Class>.<hash>/).
JOB_OUTPUT = "output"
JOB_INPUT = "input"
JOB_WORK_DIR = "work"
JOB_SAVE = "job.save"
JOB_INFO = "info"
JOB_LOG = "log"
JOB_LOG_ENGINE = "engine"
JOB_LAST_USER = "last_user"
JOB_FINISHED_MARKER = "finished"
JOB_FINISHED_ARCHIVE = "finished.tar.gz"
ENGINE_LOG = "log"
ENGINE_SUBMIT = "submit_log"
PLOGGING_FILE = "usage"
TASK_LOCK = "lock"

# Job and task states.
STATE_INPUT_PATH = "input_path"
STATE_INPUT_MISSING = "input_missing"
STATE_WAITING = "waiting"  # inputs not computed yet
STATE_RUNNABLE = "runnable"  # can be submitted
STATE_QUEUE = "queue"  # submitted, not started
STATE_QUEUE_ERROR = "queue_error"
STATE_RUNNING = "running"
STATE_UNKNOWN = "unknown"
STATE_INTERRUPTED = "interrupted"
STATE_INTERRUPTED_RESUMABLE = "interrupted_resumable"  # ended without finishing; will be resumed
STATE_INTERRUPTED_NOT_RESUMABLE = "interrupted_not_resumable"  # ended without finishing; cannot resume
STATE_RETRY_ERROR = "retry_error"  # interrupted more than MAX_SUBMIT_RETRIES times
STATE_ERROR = "error"  # the task raised an exception (as often as its Task allows)
STATE_HOLD = "hold"  # job.hold() was called: never submitted
STATE_FINISHED = "finished"

CMD_WORKER = "worker"


def __getattr__(name):
    """BASE_DIR before a setup is loaded: the working directory at the time of asking, where the reference
    Sisyphus makes its job folders (relative paths) in that case."""
    if name == "BASE_DIR":
        return os.getcwd()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def engine():
    """The engine that runs the tasks; settings.py normally overrides this function."""
    from sisyphus.localengine import LocalEngine

    return LocalEngine(cpu=os.cpu_count() or 1, gpu=0, mem=8)


def worker_wrapper(job, task_name, call):
    """Every worker call passes through here (e.g. to run it in a container: return ['singularity', ...] + call)."""
    return call


def update_engine_rqmt(initial_rqmt, last_usage):
    """Requirements of a task submitted again after an interruption: time or memory doubled when the last run
    (nearly) used up what it asked for. `last_usage` is what the worker wrote into usage.<task>.<id>."""
    requested = dict(last_usage.get("requested_resources", {}))
    time_limit = requested.get("time", initial_rqmt.get("time", 1))
    mem_limit = requested.get("mem", initial_rqmt.get("mem", 1))
    out_of_memory = last_usage.get("out_of_memory") or mem_limit - last_usage.get("max_rss_gb", 0) < 0.25
    out_of_time = time_limit - last_usage.get("used_time", 0) < 0.1
    if out_of_time:
        time_limit = max(initial_rqmt.get("time", 0), time_limit * 2)
    if out_of_memory:
        mem_limit = max(initial_rqmt.get("mem", 0), mem_limit * 2)
    rqmt = dict(initial_rqmt)
    rqmt.update(requested)
    rqmt["time"], rqmt["mem"] = time_limit, mem_limit
    return rqmt


def check_engine_limits(current_rqmt, task):
    """Cap requirements at what the cluster offers (default: unchanged)."""
    return current_rqmt


def file_caching(path):
    """Path of a cached copy of `path` (used for Paths made with cached=True when caching is enabled)."""
    return path


def on_job_failure(job):
    """Called by the manager once when a job enters the error state."""


def on_job_finished(job):
    """Called by the manager once when a job finished."""


def load_settings(setup_dir):
    """Execute `<setup_dir>/settings.py` and make its globals attributes of this module, then apply the SIS_*
    environment variables.

    Unlike update_global_settings_from_file, settings.py runs in a namespace of its own, named `settings`
    with its own `__file__`, so that it can find its folder; only the environment dicts are shared with it."""
    global BASE_DIR, GLOBAL_SETTINGS_FILE, GLOBAL_SETTINGS_FILE_CONTENT
    path = os.path.join(setup_dir, SETTINGS_FILE)
    if not os.path.isfile(path):
        raise SisError(f"{path}: no {SETTINGS_FILE} here; run sis from the setup directory that holds it")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    namespace = {"__file__": path, "__name__": "settings",
                 # changed in place by settings written for the reference Sisyphus
                 "DEFAULT_ENVIRONMENT_KEEP": DEFAULT_ENVIRONMENT_KEEP,
                 "DEFAULT_ENVIRONMENT_SET": DEFAULT_ENVIRONMENT_SET}
    try:
        exec(compile(text, path, "exec"), namespace)
    except Exception as e:
        raise SisError(f"{path}: {type(e).__name__}: {e}") from e
    module = sys.modules[__name__]
    for key, value in namespace.items():
        if not key.startswith("__"):
            setattr(module, key, value)
    GLOBAL_SETTINGS_FILE = path
    GLOBAL_SETTINGS_FILE_CONTENT = _settings_file_record(path, text)
    update_global_settings_from_env()
    BASE_DIR = os.path.abspath(setup_dir)
    _extend_sys_path()


def _settings_file_record(path, text):
    return f"##### Settings file: {path} #####\n{text}\n"


def update_global_settings_from_file(filename):
    """Execute a settings file in this module's namespace (the reference's way: its functions belong to this
    module and pickle by name) and append its text to GLOBAL_SETTINGS_FILE_CONTENT. A missing file is ignored
    with a warning."""
    global GLOBAL_SETTINGS_FILE_CONTENT
    try:
        with open(filename, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError as e:
        logging.warning("Settings file %r does not exist, ignoring it (%s).", filename, e)
        return
    exec(compile(text, filename, "exec"), globals())
    GLOBAL_SETTINGS_FILE_CONTENT += _settings_file_record(filename, text)


def update_global_settings_from_env():
    """SIS_NAME=value in the environment sets NAME (as a Python literal if it is one, else as a string;
    SIS_IMPORT_PATHS as a ':'-separated list); what was set is appended to GLOBAL_SETTINGS_FILE_CONTENT."""
    from sisyphus.job_path import parse_literal

    global GLOBAL_SETTINGS_FILE_CONTENT
    lines = []
    for key, value in os.environ.items():
        if not key.startswith(ENVIRONMENT_SETTINGS_PREFIX) or len(key) == len(ENVIRONMENT_SETTINGS_PREFIX):
            continue
        ENVIRONMENT_SETTINGS[key] = value
        try:
            value = parse_literal(value)
        except ValueError:
            pass
        name = key[len(ENVIRONMENT_SETTINGS_PREFIX):]
        if name == "IMPORT_PATHS" and isinstance(value, str):
            value = value.split(":")
        globals()[name] = value
        lines.append(f"{name} = {value!r}\n")
    if lines:
        GLOBAL_SETTINGS_FILE_CONTENT += "##### Settings from environment #####\n" + "".join(lines)


def _extend_sys_path():
    """The setup directory goes first on sys.path (for `recipe.x`, `config.x`); every IMPORT_PATHS folder ending
    in '/' goes last, so its modules are importable top-level without shadowing installed ones."""
    if BASE_DIR not in sys.path:
        sys.path.insert(0, BASE_DIR)
    for entry in IMPORT_PATHS:
        folder = os.path.join(BASE_DIR, entry.rstrip("/"))
        if entry.endswith("/") and folder not in sys.path:
            sys.path.append(folder)
