"""Engine interface shared by every engine, and the engine selector.

The manager hands an engine one task of one job at a time with `submit_call`; it later asks
`task_state` for each submitted (name, task_id). An engine never decides whether a task finished:
the manager reads that from the job folder (`finished.<task>.<id>` markers, `error.<task>.<id>` files);
the engine only says whether it still holds the task, and, for a task it lost, whether the
scheduler killed it (time limit, memory, node failure), so the manager can record why.
"""
import time

# What `task_state` returns.
STATE_QUEUE = "queue"  # accepted by the engine, not started
STATE_RUNNING = "running"  # started, not ended
STATE_UNKNOWN = "unknown"  # the engine does not hold it (never submitted, or ended normally)
# The engine saw the task end abnormally (the manager turns these into error/interrupted states).
STATE_ENGINE_FAILED = "engine_failed"  # scheduler reported failure / non-zero exit / node failure
STATE_ENGINE_TIMEOUT = "engine_timeout"  # killed at its time limit
STATE_ENGINE_OUT_OF_MEMORY = "engine_out_of_memory"  # killed for exceeding its memory requirement


class EngineBase:
    """Base class of every engine. Subclasses override `submit_call` and `task_state`."""

    def start_engine(self):
        """Called once by the manager before the first submission."""

    def stop_engine(self):
        """Called once when the manager exits."""

    def reset_cache(self):
        """Drop cached scheduler state (called once per manager loop)."""

    def get_default_rqmt(self, task):
        return {}

    def submit_call(self, call, logpath, rqmt, name, task_name, task_ids):
        """Run `call + [str(task_id)]` once per id in `task_ids`, honouring `rqmt`.

        call: argv that runs one task of one job, e.g. [python, -m, sisyphus, worker, JOBDIR, TASK_NAME];
        logpath: the output (stdout + stderr) of task id i goes to f"{logpath}.{i}";
        rqmt: {'cpu': int, 'mem': GB, 'time': hours, 'gpu': int, 'sbatch_args': [...] (SLURM only), ...};
        name: a unique, filesystem-safe name of this job's task (engines use it to find the task again,
        also from a restarted manager).
        """
        raise NotImplementedError

    def task_state(self, name, task_id):
        """One of the STATE_* constants above for the task submitted under `name` and `task_id`."""
        raise NotImplementedError

    def held_reason(self, name, task_id):
        """Why a queued task cannot start with this engine at all (it asks more than the engine has), or None."""
        return None

    def get_task_id(self, task_id):
        """In the worker: the task id to run (engines that pass it in the environment read it here)."""
        return task_id

    # Optional, with defaults that suit engines that ask a scheduler.
    def get_used_engine(self, selector_key):
        """The engine that runs tasks routed to `selector_key` (an EngineSelector picks one of its engines)."""
        return self

    def adopt_running_task(self, name, task_id, rqmt, pid):
        """A restarted manager found task (name, task_id) still running on this machine as process `pid`,
        started by an earlier manager. Engines that run tasks as local processes count it against their
        limits until it ends and report it as running; the default ignores it (a scheduler knows its tasks)."""

    def wait_for_change(self, timeout):
        """Sleep up to `timeout` seconds. Engines that see their tasks end may return early, with True,
        as soon as one does."""
        time.sleep(timeout)
        return False


class EngineSelector(EngineBase):
    """Routes each task to one of several engines by its rqmt['engine'] key ('short' for mini tasks),
    else to `default_engine`. The worker call gets `--engine KEY`, so the worker asks the same engine."""

    def __init__(self, engines, default_engine):
        if default_engine not in engines:
            raise ValueError(f"EngineSelector: default_engine {default_engine!r} is not one of {sorted(engines)}")
        for key, engine in engines.items():
            if not isinstance(key, str) or not isinstance(engine, EngineBase):
                raise TypeError(f"EngineSelector: engines must map names to engines, got {key!r}: {engine!r}")
        self.engines = engines
        self.default_engine = default_engine

    def _distinct_engines(self):
        seen = {}
        for engine in self.engines.values():
            seen.setdefault(id(engine), engine)
        return list(seen.values())

    def get_used_engine(self, selector_key):
        if selector_key not in self.engines:
            raise KeyError(f"EngineSelector: no engine named {selector_key!r} (known: {sorted(self.engines)})")
        return self.engines[selector_key].get_used_engine(selector_key)

    def _key(self, rqmt):
        return rqmt.get("engine", self.default_engine)

    def start_engine(self):
        for engine in self._distinct_engines():
            engine.start_engine()

    def stop_engine(self):
        for engine in self._distinct_engines():
            engine.stop_engine()

    def reset_cache(self):
        for engine in self._distinct_engines():
            engine.reset_cache()

    def get_default_rqmt(self, task):
        return self.get_used_engine(self._key(task.rqmt())).get_default_rqmt(task)

    def submit_call(self, call, logpath, rqmt, name, task_name, task_ids):
        key = self._key(rqmt)
        position = call.index("worker") + 1 if "worker" in call else len(call)
        call = call[:position] + ["--engine", key] + call[position:]
        return self.get_used_engine(key).submit_call(call, logpath, rqmt, name, task_name, task_ids)

    def task_state(self, name, task_id):
        """The first state other than unknown any engine reports (a restarted manager does not know which
        engine got the task, and names are unique across engines)."""
        for engine in self._distinct_engines():
            state = engine.task_state(name, task_id)
            if state != STATE_UNKNOWN:
                return state
        return STATE_UNKNOWN

    def held_reason(self, name, task_id):
        reasons = (engine.held_reason(name, task_id) for engine in self._distinct_engines())
        return next((reason for reason in reasons if reason), None)

    def adopt_running_task(self, name, task_id, rqmt, pid):
        self.get_used_engine(self._key(rqmt)).adopt_running_task(name, task_id, rqmt, pid)

    def wait_for_change(self, timeout):
        """Share the wait among the engines in short slices, so any of them can end it early."""
        deadline = time.monotonic() + timeout
        engines = self._distinct_engines()
        while time.monotonic() < deadline:
            for engine in engines:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                if engine.wait_for_change(min(0.05, remaining)):
                    return True
        return False
