"""Local engine: runs tasks as processes on this machine, as many at once as fit its cpu/gpu/mem limits."""
import logging
import os
import subprocess
import threading
from dataclasses import dataclass, field

import psutil

from sisyphus.engine import STATE_ENGINE_FAILED, STATE_QUEUE, STATE_RUNNING, STATE_UNKNOWN, EngineBase

logger = logging.getLogger(__name__)

POLL_INTERVAL = 0.1  # seconds between two looks at the running processes


@dataclass
class _LocalTask:
    name: str
    task_id: int
    argv: list
    log: str
    cpu: int
    gpu: int
    mem: float
    process: object = None  # subprocess.Popen, or psutil.Process for a task adopted after a restart
    gpus: list = field(default_factory=list)


class LocalEngine(EngineBase):
    """Runs each task id as a child process (output appended to its log), first come first served among the
    tasks whose requirements fit the free cpu, gpu and mem (GB). A task needing more than the whole engine is
    run alone, with a warning. GPU tasks see only their GPUs (CUDA_VISIBLE_DEVICES), the others none."""

    def __init__(self, cpu=1, gpu=0, mem=16):
        if cpu < 1 or gpu < 0 or mem <= 0:
            raise ValueError(f"LocalEngine(cpu={cpu}, gpu={gpu}, mem={mem}): needs cpu >= 1, gpu >= 0, mem > 0")
        self.cpu, self.gpu, self.mem = cpu, gpu, mem
        self._lock = threading.Lock()
        self._wake = threading.Event()  # wakes the scheduler thread
        self._changed = threading.Event()  # a task ended (ends wait_for_change)
        self._queue = []
        self._running = {}  # (name, task_id) -> _LocalTask
        self._ended = {}  # (name, task_id) -> exit status (None when unknown, for adopted tasks)
        self._free_gpus = list(range(gpu))
        self._thread = None
        self._stopping = False

    def get_default_rqmt(self, task):
        return {"cpu": 1, "gpu": 0, "mem": 1, "time": 1}

    def start_engine(self):
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._schedule, name="LocalEngine", daemon=True)
            self._thread.start()

    def stop_engine(self):
        """Stop scheduling; tasks already running go on (a restarted manager adopts them)."""
        if self._thread is not None:
            self._stopping = True
            self._wake.set()
            self._thread.join()
            self._thread = None

    def submit_call(self, call, logpath, rqmt, name, task_name, task_ids):
        cpu, gpu, mem = self._fit(rqmt, name)
        with self._lock:
            for task_id in task_ids:
                self._ended.pop((name, task_id), None)
                self._queue.append(_LocalTask(name, task_id, list(call) + [str(task_id)], f"{logpath}.{task_id}",
                                              cpu, gpu, mem))
        self._wake.set()

    def task_state(self, name, task_id):
        key = (name, task_id)
        with self._lock:
            if key in self._running:
                return STATE_RUNNING
            if any((t.name, t.task_id) == key for t in self._queue):
                return STATE_QUEUE
            status = self._ended.get(key)
        return STATE_ENGINE_FAILED if status not in (None, 0) else STATE_UNKNOWN

    def adopt_running_task(self, name, task_id, rqmt, pid):
        try:
            process = psutil.Process(pid)
        except psutil.NoSuchProcess:
            return
        cpu, gpu, mem = self._fit(rqmt, name)
        with self._lock:
            if (name, task_id) not in self._running:
                logger.info("LocalEngine: %s.%s still runs as process %s; counted against the limits", name,
                            task_id, pid)
                task = _LocalTask(name, task_id, [], "", cpu, gpu, mem, process)
                task.gpus = self._free_gpus[:gpu]
                del self._free_gpus[:gpu]
                self._running[(name, task_id)] = task

    def wait_for_change(self, timeout):
        changed = self._changed.wait(timeout)
        self._changed.clear()
        return changed

    def used(self):
        """(cpu, gpu, mem) taken by the running tasks."""
        with self._lock:
            tasks = list(self._running.values())
        return sum(t.cpu for t in tasks), sum(t.gpu for t in tasks), sum(t.mem for t in tasks)

    def _fit(self, rqmt, name):
        wanted = (int(rqmt.get("cpu", 1)), int(rqmt.get("gpu", 0)), float(rqmt.get("mem", 1)))
        fitted = tuple(min(w, limit) for w, limit in zip(wanted, (self.cpu, self.gpu, self.mem)))
        if fitted != wanted:
            logger.warning("LocalEngine: %s wants cpu=%s gpu=%s mem=%s but the engine has cpu=%s gpu=%s mem=%s; "
                           "it runs with what there is", name, *wanted, self.cpu, self.gpu, self.mem)
        return fitted

    def _schedule(self):
        while not self._stopping:
            self._reap()
            self._start_fitting()
            self._wake.wait(POLL_INTERVAL)
            self._wake.clear()

    def _reap(self):
        with self._lock:
            for key, task in list(self._running.items()):
                status = _exit_status(task.process)
                if status is _STILL_RUNNING:
                    continue
                del self._running[key]
                self._free_gpus.extend(task.gpus)
                self._ended[key] = status
                self._changed.set()

    def _start_fitting(self):
        with self._lock:
            cpu = self.cpu - sum(t.cpu for t in self._running.values())
            mem = self.mem - sum(t.mem for t in self._running.values())
            for task in list(self._queue):
                if task.cpu <= cpu and task.gpu <= len(self._free_gpus) and task.mem <= mem + 1e-9:
                    self._queue.remove(task)
                    task.gpus = self._free_gpus[:task.gpu]
                    del self._free_gpus[:task.gpu]
                    self._launch(task)
                    cpu -= task.cpu
                    mem -= task.mem

    def _launch(self, task):
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(str(g) for g in task.gpus))
        try:
            with open(task.log, "a") as log:
                task.process = subprocess.Popen(task.argv, stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, env=env)
        except OSError as e:
            logger.error("LocalEngine: cannot start %s.%s (%s): %s", task.name, task.task_id, task.argv, e)
            self._free_gpus.extend(task.gpus)
            self._ended[(task.name, task.task_id)] = -1
            self._changed.set()
            return
        self._running[(task.name, task.task_id)] = task


_STILL_RUNNING = object()


def _exit_status(process):
    """The exit status of a Popen, None for an ended adopted process, _STILL_RUNNING while it runs."""
    if isinstance(process, subprocess.Popen):
        status = process.poll()
        return _STILL_RUNNING if status is None else status
    try:
        if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
            return _STILL_RUNNING
    except psutil.NoSuchProcess:
        pass
    return None
