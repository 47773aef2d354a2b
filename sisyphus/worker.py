"""`sis worker JOBDIR TASK [ID]`: runs one task id of one job, in the job's work/ folder.

The worker holds `lock.<task>.<id>` while it runs, so the same task id never runs twice at once (two managers
on one work folder, or a resubmission while an earlier run goes on), and it never reruns a finished one.
It writes `usage.<task>.<id>` (pid, host, heartbeat), then `finished.<task>.<id>`, or, if the method raised,
`error.<task>.<id>` with the traceback (which also goes to the log).
"""
import fcntl
import gzip
import logging
import os
import pickle
import pprint
import socket
import sys
import threading
import time
import traceback

import psutil

import sisyphus.global_settings as gs
import sisyphus.toolkit
from sisyphus.errors import SisError
from sisyphus.tools import remove_stale_temporaries, write_atomically

logger = logging.getLogger("sisyphus.worker")

EXIT_TASK_FAILED = 1


def run_worker(jobdir, task_name, task_id=None, engine_key=None, force_resume=False, redirect_output=False):
    """Run the task; returns the process exit status (0: finished or nothing to do). force_resume: run a task id
    in error state again (its error file is removed), through its resume method if it has one."""
    jobdir = os.path.join(gs.BASE_DIR, jobdir)
    saved = os.path.join(jobdir, gs.JOB_SAVE)
    if not os.path.isfile(saved):
        what = "no such job folder" if not os.path.isdir(jobdir) else f"no {gs.JOB_SAVE} in the job folder"
        raise SisError(f"{jobdir}: {what} (the manager sets job folders up before it starts workers)")
    from sisyphus.__main__ import _engine

    engine = _engine()
    if engine_key is not None:
        engine = engine.get_used_engine(engine_key)
    task_id = int(engine.get_task_id(task_id) or 1)
    sisyphus.toolkit._sis_running_in_worker = True

    try:
        with gzip.open(saved) as f:
            job = pickle.load(f)
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ImportError) as e:
        raise SisError(f"{saved}: cannot load the job: {type(e).__name__}: {e}") from e
    remove_stale_temporaries(jobdir)
    task = next((t for t in job._sis_tasks() if t.name() == task_name), None)
    if task is None:
        raise SisError(f"{jobdir}: job has no task {task_name!r} (tasks: {[t.name() for t in job._sis_tasks()]})")
    if task_id not in task.task_ids():
        raise SisError(f"{jobdir}: task {task_name!r} has ids {task.task_ids()}, not {task_id}")
    if redirect_output:
        _redirect_output(task.file(gs.JOB_LOG, task_id))

    with open(task.file(gs.TASK_LOCK, task_id), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("%s %s.%s is being run by another worker; nothing to do", job, task_name, task_id)
            return 0
        if task.finished(task_id):
            logger.info("%s %s.%s already finished; nothing to do", job, task_name, task_id)
            return 0
        if task.error(task_id):
            if not force_resume:
                logger.error("%s %s.%s is in error state; clear it with `sis m -co` (or run the worker with "
                             "--force_resume) to run it again", job, task_name, task_id)
                return EXIT_TASK_FAILED
            os.unlink(task.file(gs.STATE_ERROR, task_id))
        return _run_locked(job, task, task_id, force_resume)


def _redirect_output(logfile):
    """Append this process's stdout and stderr (file descriptors 1 and 2) to `logfile`."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _prepare_environment(job, task):
    """Threads per task from its cpu requirement; then, with CLEANUP_ENVIRONMENT, the job's environment."""
    cpu = str(int(task.rqmt().get("cpu", 1)))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = cpu
    environment = getattr(job, "_sis_environment", None)
    if environment is not None and gs.CLEANUP_ENVIRONMENT:
        environment.modify_environment(cleanup=True)


def _run_locked(job, task, task_id, force_resume=False):
    resume = force_resume or task.usage(task_id) is not None  # an earlier run started and did not finish
    _prepare_environment(job, task)

    heartbeat = _Heartbeat(task, task_id)
    heartbeat.start()
    logger.info("%s task %s.%s %s (pid %s on %s)", "Resume" if resume else "Start", task.name(), task_id, job,
                os.getpid(), socket.gethostname())
    sys.stdout.flush()
    try:
        missing = sorted(str(p) for p in job._sis_inputs if not os.path.exists(p.get_path()))
        if missing:
            raise FileNotFoundError(f"inputs missing: {', '.join(missing)}")
        task.run(task_id, resume)
    except Exception:
        text = traceback.format_exc()
        sys.stderr.write(text)
        write_atomically(task.file(gs.STATE_ERROR, task_id), text.encode())
        logger.error("Task %s.%s of %s failed", task.name(), task_id, job)
        return EXIT_TASK_FAILED
    finally:
        heartbeat.stop()
        sys.stdout.flush()
        sys.stderr.flush()
    if not task.continuable:
        write_atomically(task.file(gs.JOB_FINISHED_MARKER, task_id), b"")
    logger.info("Task %s.%s of %s finished", task.name(), task_id, job)
    return 0


class _Heartbeat(threading.Thread):
    """Rewrites usage.<task>.<id> every PLOGGING_UPDATE_FILE_PERIOD seconds: who runs the task, and how much
    memory it has used; a manager that did not start the task tells from it whether the task still runs."""

    def __init__(self, task, task_id):
        super().__init__(name="heartbeat", daemon=True)
        self.path = task.file(gs.PLOGGING_FILE, task_id)
        self.process = psutil.Process()
        self.rqmt = task.rqmt()
        self.start_time = time.time()
        self.max_rss_gb = 0.0
        self._stopped = threading.Event()
        self.write()

    def run(self):
        while not self._stopped.wait(gs.PLOGGING_UPDATE_FILE_PERIOD):
            self.write()

    def stop(self):
        self._stopped.set()
        self.join()
        self.write()

    def write(self):
        rss = self.process.memory_info().rss
        for child in self.process.children(recursive=True):
            try:
                rss += child.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        self.max_rss_gb = max(self.max_rss_gb, rss / 1024**3)
        usage = {
            "pid": self.process.pid,
            "host": socket.gethostname(),
            "create_time": self.process.create_time(),
            "start_time": self.start_time,
            "used_time": (time.time() - self.start_time) / 3600,
            "max_rss_gb": self.max_rss_gb,
            "requested_resources": self.rqmt,
        }
        write_atomically(self.path, (pprint.pformat(usage) + "\n").encode())
