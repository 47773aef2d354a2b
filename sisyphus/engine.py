"""Engine interface shared by every engine, and the engine selector.

The manager hands an engine one task of one job at a time with `submit_call`; it later asks
`task_state` for each submitted (name, task_id). An engine never decides whether a task finished:
the manager reads that from the job folder (`finished.<task>.<id>` markers, `error.<task>.<id>` files);
the engine only says whether it still holds the task, and, for a task it lost, whether the
scheduler killed it (time limit, memory, node failure), so the manager can record why.
"""

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

    def get_task_id(self, task_id):
        """In the worker: the task id to run (engines that pass it in the environment read it here)."""
        return task_id
