"""SLURM engine: submits tasks with `sbatch`, finds them again by job name with `squeue`.

Each `submit_call` becomes one `sbatch` array job named after the task (`name`), so a restarted manager
finds tasks that are still queued or running and never submits them twice. The job script runs
`call + [$SLURM_ARRAY_TASK_ID]`, sends its output to f"{logpath}.{task_id}" and writes the call's exit
status to `engine/<log name>.<task_id>.exit` next to the log.

The state of every task comes from one `squeue --states=all` listing per manager loop: it covers queued
and running jobs and, for `MinJobAge` seconds (300 by default), ended ones with their final state.
SLURM without cgroups reports a job killed for memory as FAILED, so the engine also reads the end of the
task's log for the messages `slurmstepd` writes when it kills a task (memory or time limit). A task this
engine submitted that has left the listing is judged by its exit file and log; `sacct` is not used,
since clusters without accounting storage (like the CI one) answer nothing there.

Same constructor as the SLURM engine of rwth-i6/sisyphus (there by Wilfried Michel); written anew here.
"""

import enum
import getpass
import logging
import math
import os
import re
import shlex
import subprocess
import time
from collections import namedtuple

from sisyphus.engine import (
    STATE_ENGINE_FAILED,
    STATE_ENGINE_OUT_OF_MEMORY,
    STATE_ENGINE_TIMEOUT,
    STATE_QUEUE,
    STATE_RUNNING,
    STATE_UNKNOWN,
    EngineBase,
)

ENGINE_NAME = "slurm"
COMMAND_TIMEOUT = 30  # seconds one sbatch/squeue call may take
SQUEUE_ATTEMPTS = 6  # squeue failing this many times in a row (controller down) is an error
SQUEUE_RETRY_WAIT = 10  # seconds between those attempts
CACHE_MAX_AGE = 30  # seconds a squeue listing is reused when the manager does not call reset_cache
LOG_TAIL_BYTES = 64 * 1024  # how much of a log's end is searched for slurmstepd's kill messages

# SLURM job states (squeue's State field), grouped by what they mean for the manager.
QUEUED_STATES = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESV_DEL_HOLD"}
RUNNING_STATES = {"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT", "RESIZING", "SUSPENDED", "STOPPED"}
ABNORMAL_END_STATES = {
    "FAILED", "CANCELLED", "NODE_FAIL", "BOOT_FAIL", "PREEMPTED", "DEADLINE", "SPECIAL_EXIT", "REVOKED",
}

# Lines slurmstepd adds to a task's output when it kills the task.
OUT_OF_MEMORY_MESSAGE = re.compile(
    r"^slurmstepd\S*: error: .*(exceeded (job )?memory limit|oom[-_ ]kill)", re.IGNORECASE | re.MULTILINE
)
TIME_LIMIT_MESSAGE = re.compile(r"^slurmstepd\S*: error: \*\*\* .*CANCELLED .*DUE TO TIME LIMIT", re.MULTILINE)

# One array task in the squeue listing. logpath: the `logpath` it was submitted with (None if unknown).
QueueEntry = namedtuple("QueueEntry", ["job_id", "state", "logpath"])

SQUEUE_FORMAT = "ArrayJobID:|,ArrayTaskID:|,State:|,Name:|,STDOUT:|"

logger = logging.getLogger(__name__)


class SimpleLinuxUtilityForResourceManagementEngine(EngineBase):
    """Runs tasks as SLURM array jobs.

    rqmt keys: 'cpu' (--cpus-per-task), 'mem' (GB, or a SLURM size string like '500M'), 'time' (hours,
    or a SLURM time string), 'gpu' (--gres=gpu:N, with 'gpu_name' as gres type), 'sbatch_args' (list or
    string of further sbatch arguments, e.g. ['-p', 'gpu']). 'qsub_args' (SGE options) is ignored, as by
    the reference implementation, but with a warning; 'multi_node_slots' > 1 is refused.
    """

    class MemoryAllocationType(enum.Enum):
        PER_CPU = "per_cpu"  # rqmt['mem'] is per CPU: --mem-per-cpu
        PER_NODE = "per_node"  # rqmt['mem'] is the task's total: --mem

    def __init__(
        self,
        default_rqmt,
        gateway=None,
        has_memory_resource=True,
        auto_clean_eqw=True,
        ignore_jobs=(),
        memory_allocation_type=MemoryAllocationType.PER_NODE,
        job_name_mapping=None,
    ):
        """
        :param dict default_rqmt: requirements used where a task does not set them
        :param str|None gateway: run every SLURM command on this host through `ssh` (same working directory)
        :param bool has_memory_resource: False where SLURM does not manage memory (no --mem is passed)
        :param bool auto_clean_eqw: accepted for compatibility; SLURM has no error-queue-wait state
        :param ignore_jobs: SLURM tasks ("<array job id>.<task id>", e.g. "123.1") left out of the listing,
            for jobs stuck in SLURM that cannot be deleted
        :param MemoryAllocationType memory_allocation_type: how rqmt['mem'] is passed
        :param job_name_mapping: callable turning a task name into the sbatch job name; changing it
            makes the engine blind to tasks submitted under the old names
        """
        self.default_rqmt = dict(default_rqmt)
        self.gateway = gateway
        self.has_memory_resource = has_memory_resource
        self.auto_clean_eqw = auto_clean_eqw
        self.ignore_jobs = set(ignore_jobs)
        self.memory_allocation_type = memory_allocation_type
        self.job_name_mapping = job_name_mapping
        self._queue = None  # {(job name, task id): QueueEntry} from the last squeue listing
        self._queue_time = 0.0
        self._submitted_logpaths = {}  # {(job name, task id): logpath} of what this object submitted
        self._rejected = {}  # {(job name, task id): sbatch's error message}

    # --- EngineBase ---

    def get_default_rqmt(self, task):
        return self.default_rqmt

    def reset_cache(self):
        self._queue = None

    def submit_call(self, call, logpath, rqmt, name, task_name, task_ids):
        """Submits one sbatch array job running `call + [task_id]` for each of `task_ids`.

        Returns (ENGINE_NAME, [(task_ids, SLURM job id)]), or (ENGINE_NAME, []) when nothing was submitted.
        """
        if not task_ids:
            return ENGINE_NAME, []
        rqmt = {**self.default_rqmt, **rqmt}
        logpath = os.path.abspath(logpath)  # squeue shows it to a restarted manager, whatever its cwd
        job_name = self.process_task_name(name)
        script = self._write_job_script(call, logpath)
        command = ["sbatch", "--parsable", "-J", job_name, f"--chdir={os.getcwd()}"]
        command += [f"--output={_escape_filename_pattern(logpath)}.%a", f"--array={array_spec(task_ids)}"]
        command += self.sbatch_options(rqmt) + [script]
        logger.info("Submitting %s task %s ids %s: %s", name, task_name, task_ids, shlex.join(command))
        try:
            result = self.system_call(command)
        except subprocess.TimeoutExpired:
            # It may have been submitted all the same: the next listing will tell.
            logger.warning("sbatch did not answer within %d s: %s", COMMAND_TIMEOUT, shlex.join(command))
            self.reset_cache()
            return ENGINE_NAME, []
        if result.returncode != 0:
            self._reject(job_name, logpath, task_ids, command, result)
            return ENGINE_NAME, []
        if result.stderr.strip():
            logger.warning("sbatch submitted %s but said: %s", job_name, result.stderr.strip())
        slurm_job_id = int(result.stdout.strip().split(";")[0])
        logger.info("Submitted %s as SLURM job %d", job_name, slurm_job_id)
        for task_id in task_ids:
            key = (job_name, task_id)
            self._rejected.pop(key, None)
            self._submitted_logpaths[key] = logpath
            if self._queue is not None:  # until the next listing, which will show it
                self._queue[key] = QueueEntry(slurm_job_id, "PENDING", logpath)
        return ENGINE_NAME, [(list(task_ids), slurm_job_id)]

    def task_state(self, name, task_id):
        key = (self.process_task_name(name), task_id)
        if key in self._rejected:
            return STATE_ENGINE_FAILED
        entry = self._queue_entries().get(key)
        if entry is None:
            return self._state_after_listing(key)
        if entry.state in QUEUED_STATES:
            return STATE_QUEUE
        if entry.state in RUNNING_STATES:
            return STATE_RUNNING
        if entry.state == "COMPLETED":
            return STATE_UNKNOWN
        if entry.state == "TIMEOUT":
            return STATE_ENGINE_TIMEOUT
        if entry.state == "OUT_OF_MEMORY":
            return STATE_ENGINE_OUT_OF_MEMORY
        if entry.state in ABNORMAL_END_STATES:
            return self._kill_reason(entry.logpath, task_id) or STATE_ENGINE_FAILED
        logger.warning("SLURM job %d (%s) is in state %s: taken as running", entry.job_id, key[0], entry.state)
        return STATE_RUNNING

    # --- sbatch ---

    def sbatch_options(self, rqmt):
        """The sbatch arguments that request `rqmt` (a merged requirement dict)."""
        if (rqmt.get("multi_node_slots") or 1) > 1:
            raise ValueError(f"rqmt multi_node_slots={rqmt['multi_node_slots']}: multi-node tasks are not supported")
        options = [f"--cpus-per-task={int(rqmt.get('cpu', 1))}", "--ntasks-per-node=1", "--export=ALL"]
        if self.has_memory_resource and "mem" in rqmt:
            flag = "--mem-per-cpu" if self.memory_allocation_type == self.MemoryAllocationType.PER_CPU else "--mem"
            options.append(f"{flag}={memory_size(rqmt['mem'])}")
        if "time" in rqmt:
            options.append(f"--time={time_limit(rqmt['time'])}")
        if rqmt.get("gpu", 0) > 0:
            gpu_type = f"{rqmt['gpu_name']}:" if rqmt.get("gpu_name") else ""
            options.append(f"--gres=gpu:{gpu_type}{int(rqmt['gpu'])}")
        if rqmt.get("qsub_args"):
            logger.warning("rqmt qsub_args=%r ignored: they are SGE options; use sbatch_args", rqmt["qsub_args"])
        extra = rqmt.get("sbatch_args", [])
        options += shlex.split(extra) if isinstance(extra, str) else [str(arg) for arg in extra]
        return options

    def _write_job_script(self, call, logpath):
        """Writes the batch script (kept for rerunning by hand) to engine/<log name>.sh; returns its path."""
        exit_prefix = _engine_file_prefix(logpath)
        os.makedirs(os.path.dirname(exit_prefix), exist_ok=True)
        script = "\n".join(
            [
                "#!/bin/sh",
                "# Written by the sisyphus SLURM engine; runs one task id of an sbatch array job.",
                f'exit_file={shlex.quote(exit_prefix)}."$SLURM_ARRAY_TASK_ID".exit',
                'rm -f "$exit_file"',
                f'{shlex.join(call)} "$SLURM_ARRAY_TASK_ID"',
                "status=$?",
                'echo "$status" > "$exit_file.tmp" && mv "$exit_file.tmp" "$exit_file"',
                'exit "$status"',
                "",
            ]
        )
        path = f"{exit_prefix}.sh"
        with open(path + ".tmp", "w") as f:
            f.write(script)
        os.replace(path + ".tmp", path)
        return path

    def _reject(self, job_name, logpath, task_ids, command, result):
        """Records an sbatch refusal: the tasks read as failed, and their logs say why."""
        message = (
            f"sbatch refused to submit {job_name} (exit status {result.returncode}): "
            f"{(result.stderr or result.stdout).strip()}\ncommand: {shlex.join(command)}\n"
        )
        logger.error(message.strip())
        for task_id in task_ids:
            self._rejected[(job_name, task_id)] = message
            with open(f"{logpath}.{task_id}", "w") as f:
                f.write(message)

    # --- squeue ---

    def _queue_entries(self):
        """{(job name, task id): QueueEntry} of this user's jobs, the newest job per key; cached."""
        if self._queue is not None and time.monotonic() - self._queue_time < CACHE_MAX_AGE:
            return self._queue
        command = ["squeue", "--noheader", "--array", "--states=all", "-u", getpass.getuser(), "-O", SQUEUE_FORMAT]
        output = self._run_squeue(command)
        queue = {}
        for line in output.splitlines():
            parsed = self._parse_squeue_line(line)
            if parsed is None:
                continue
            key, entry = parsed
            if key not in queue or entry.job_id > queue[key].job_id:
                queue[key] = entry
        self._queue, self._queue_time = queue, time.monotonic()
        return queue

    def _run_squeue(self, command):
        for attempt in range(1, SQUEUE_ATTEMPTS + 1):
            try:
                result = self.system_call(command)
                if result.returncode == 0:
                    return result.stdout
                problem = f"exit status {result.returncode}: {result.stderr.strip()}"
            except subprocess.TimeoutExpired:
                problem = f"no answer within {COMMAND_TIMEOUT} s"
            logger.warning("squeue failed (attempt %d of %d, %s)", attempt, SQUEUE_ATTEMPTS, problem)
            if attempt < SQUEUE_ATTEMPTS:
                time.sleep(SQUEUE_RETRY_WAIT)
        raise RuntimeError(f"SLURM does not answer: {shlex.join(command)} failed {SQUEUE_ATTEMPTS} times ({problem})")

    def _parse_squeue_line(self, line):
        """((job name, task id), QueueEntry) from one line in SQUEUE_FORMAT, or None to skip it."""
        fields = line.split("|", 4)
        if len(fields) != 5:
            logger.warning("Unexpected squeue line skipped: %r", line)
            return None
        job_id, task_id, state, name, stdout = (field.strip() for field in fields)
        task_id = 1 if task_id == "N/A" else task_id  # a job submitted without --array
        if f"{job_id}.{task_id}" in self.ignore_jobs:
            return None
        try:
            key = (name, int(task_id))
            entry = QueueEntry(int(job_id), state.split()[0], _logpath_from_output_pattern(stdout.rstrip("|")))
        except (ValueError, IndexError):
            logger.warning("Unexpected squeue line skipped: %r", line)
            return None
        return key, entry

    # --- ended tasks ---

    def _state_after_listing(self, key):
        """State of a task squeue does not list: unknown unless this object submitted it and it ended badly."""
        logpath = self._submitted_logpaths.get(key)
        if logpath is None:
            return STATE_UNKNOWN
        task_id = key[1]
        try:
            with open(f"{_engine_file_prefix(logpath)}.{task_id}.exit") as f:
                exit_status = f.read().strip()
        except FileNotFoundError:
            # The job script never finished: SLURM killed it, and dropped the job from its listing since.
            return self._kill_reason(logpath, task_id) or STATE_ENGINE_FAILED
        return STATE_UNKNOWN if exit_status == "0" else STATE_ENGINE_FAILED

    @staticmethod
    def _kill_reason(logpath, task_id):
        """STATE_ENGINE_OUT_OF_MEMORY / _TIMEOUT when slurmstepd's kill message ends the task's log, else None."""
        if logpath is None:
            return None
        try:
            with open(f"{logpath}.{task_id}", "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - LOG_TAIL_BYTES))
                tail = f.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return None
        if OUT_OF_MEMORY_MESSAGE.search(tail):
            return STATE_ENGINE_OUT_OF_MEMORY
        if TIME_LIMIT_MESSAGE.search(tail):
            return STATE_ENGINE_TIMEOUT
        return None

    # --- helpers ---

    def process_task_name(self, name):
        """The sbatch job name of task `name` ('/' would not survive as a name on every setup)."""
        if self.job_name_mapping is not None:
            name = self.job_name_mapping(name)
        return name.replace("/", ".")

    def system_call(self, command):
        """Runs a SLURM command here, or on the gateway through ssh; returns the CompletedProcess (text)."""
        if self.gateway:
            remote = f"cd {shlex.quote(os.getcwd())} && {shlex.join(command)}"
            command = ["ssh", "-x", self.gateway, "-o", "BatchMode=yes", remote]
        logger.debug("Running %s", shlex.join(command))
        return subprocess.run(command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)


def array_spec(task_ids):
    """sbatch --array value for these ids, runs of consecutive ids shortened: [1, 2, 3, 5] -> '1-3,5'."""
    ids = sorted(set(task_ids))
    runs = []
    start = previous = ids[0]
    for task_id in ids[1:] + [None]:
        if task_id is not None and task_id == previous + 1:
            previous = task_id
            continue
        runs.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = task_id
    return ",".join(runs)


def memory_size(mem):
    """sbatch memory value of rqmt['mem']: GB as a number (1.5 -> '1536M', 4 -> '4G'), or a SLURM size string."""
    try:
        gigabytes = float(mem)
    except ValueError:
        return str(mem)
    if gigabytes == int(gigabytes):
        return f"{int(gigabytes)}G"
    return f"{math.ceil(round(gigabytes * 1024, 6))}M"  # round: 0.1 * 1024 is not exactly 102.4


def time_limit(hours):
    """sbatch --time value of rqmt['time']: hours as a number, rounded up to whole minutes (at least one,
    since 0 means no limit to SLURM), or a SLURM time string ('1-00:00:00') passed on."""
    try:
        minutes = float(hours) * 60
    except ValueError:
        return str(hours)
    return str(max(1, math.ceil(round(minutes, 6))))  # round: 0.1 * 60 is 6.000000000000001


def _engine_file_prefix(logpath):
    """<log folder>/engine/<log name>: where the job script and the exit files of a task live."""
    return os.path.join(os.path.dirname(logpath), "engine", os.path.basename(logpath))


def _escape_filename_pattern(path):
    return path.replace("%", "%%")  # sbatch expands %-patterns in --output


def _logpath_from_output_pattern(pattern):
    """The `logpath` of a job submitted with --output=<logpath>.%a (squeue shows the pattern), else None."""
    if not pattern.endswith(".%a"):
        return None
    return pattern[: -len(".%a")].replace("%%", "%")
