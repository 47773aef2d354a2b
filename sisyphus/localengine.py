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
    rqmt: dict  # what it takes of each limited resource
    process: object = None  # subprocess.Popen, or psutil.Process for a task adopted after a restart
    gpus: list = field(default_factory=list)


class LocalEngine(EngineBase):
    """Runs each task id as a child process (output appended to its log), first come first served among the
    tasks whose requirements fit what is free. As in the reference, cpu and gpu are always limited, mem (GB) and
    any other requirement only where a limit is given (`LocalEngine(cpu=4, mem=16)`; the reference's
    `cpus=`/`gpus=` spellings work too). A task asking more of a resource than the engine has at all is held:
    it stays queued and never starts (the reference's warning "Requested resources are higher than maximal
    available resources"), and `held_reason` says why. GPU tasks see only their GPUs (CUDA_VISIBLE_DEVICES:
    indices, or the names in `available_gpus`), the others none."""

    def __init__(self, cpu=None, gpu=None, mem=None, cpus=1, gpus=0, available_gpus="", **resources):
        limits = {"cpu": cpus if cpu is None else cpu, "gpu": gpus if gpu is None else gpu}
        if mem is not None:
            limits["mem"] = mem
        limits.update(resources)
        gpu_names = [g for g in str(available_gpus).split(",") if g] or [str(i) for i in range(max(limits["gpu"], 0))]
        arguments = ", ".join(f"{key}={value}" for key, value in limits.items())
        if limits["cpu"] < 1 or limits["gpu"] < 0 or any(v <= 0 for k, v in limits.items() if k not in ("cpu", "gpu")):
            raise ValueError(f"LocalEngine({arguments}): needs cpu >= 1, gpu >= 0 and every other limit > 0")
        if len(gpu_names) != limits["gpu"]:
            raise ValueError(f"LocalEngine({arguments}): available_gpus={available_gpus!r} names "
                             f"{len(gpu_names)} GPUs, not {limits['gpu']}")
        self.limits = limits
        self._lock = threading.Lock()
        self._wake = threading.Event()  # wakes the scheduler thread
        self._changed = threading.Event()  # a task ended (ends wait_for_change)
        self._queue = []
        self._running = {}  # (name, task_id) -> _LocalTask
        self._ended = {}  # (name, task_id) -> exit status (None when unknown, for adopted tasks)
        self._free_gpus = gpu_names
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
        wanted = self._wanted(rqmt)
        above = self._above_limits(wanted)
        if above:
            logger.warning("LocalEngine: Requested resources are higher than maximal available resources: %s %s "
                           "asks %s; held (it never starts with these limits)", name, list(task_ids), above)
        with self._lock:
            for task_id in task_ids:
                self._ended.pop((name, task_id), None)
                self._queue.append(_LocalTask(name, task_id, list(call) + [str(task_id)], f"{logpath}.{task_id}",
                                              wanted))
        self._wake.set()

    def held_reason(self, name, task_id):
        with self._lock:
            queued = [t for t in self._queue if (t.name, t.task_id) == (name, task_id)]
        above = queued and self._above_limits(queued[0].rqmt)
        return f"asks {above}, more than the local engine has" if above else None

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
        wanted = self._wanted(rqmt)
        with self._lock:
            if (name, task_id) not in self._running:
                logger.info("LocalEngine: %s.%s still runs as process %s; counted against the limits", name,
                            task_id, pid)
                task = _LocalTask(name, task_id, [], "", wanted, process)
                task.gpus = self._free_gpus[:int(wanted["gpu"])]
                del self._free_gpus[:int(wanted["gpu"])]
                self._running[(name, task_id)] = task

    def wait_for_change(self, timeout):
        changed = self._changed.wait(timeout)
        self._changed.clear()
        return changed

    def used(self):
        """{resource: amount} taken by the running tasks, for every limited resource."""
        with self._lock:
            tasks = list(self._running.values())
        return {key: sum(t.rqmt[key] for t in tasks) for key in self.limits}

    def _wanted(self, rqmt):
        """What a task with these requirements takes of each limited resource (0 of what it does not name)."""
        wanted = {key: float(rqmt.get(key) or 0) for key in self.limits}
        wanted["cpu"], wanted["gpu"] = int(wanted["cpu"]), int(wanted["gpu"])
        return wanted

    def _above_limits(self, wanted):
        """'mem=12 (at most 4)' for each resource the task wants more of than the engine has; '' if none."""
        return ", ".join(f"{key}={_number(value)} (at most {_number(self.limits[key])})"
                         for key, value in wanted.items() if value > self.limits[key] + 1e-9)

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
            free = {key: limit - sum(t.rqmt[key] for t in self._running.values())
                    for key, limit in self.limits.items()}
            for task in list(self._queue):
                if all(task.rqmt[key] <= free[key] + 1e-9 for key in free) and \
                        task.rqmt["gpu"] <= len(self._free_gpus):
                    self._queue.remove(task)
                    task.gpus = self._free_gpus[:task.rqmt["gpu"]]
                    del self._free_gpus[:task.rqmt["gpu"]]
                    self._launch(task)
                    for key in free:
                        free[key] -= task.rqmt[key]

    def _launch(self, task):
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(task.gpus))
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


def _number(value):
    return int(value) if float(value).is_integer() else value


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
