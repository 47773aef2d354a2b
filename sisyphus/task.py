"""A Task: one method of a job, run by the worker as one or more task ids, and its files in the job folder.

Files of task `<name>` and task id `<i>` (1-based) in the job folder:
`log.<name>.<i>` (output), `usage.<name>.<i>` (the worker's pid, host and heartbeat), `finished.<name>.<i>`,
`error.<name>.<i>` (the traceback), `lock.<name>.<i>` (held while the task runs), `submit_log.<name>`.
"""
import ast
import os

import sisyphus.global_settings as gs
from sisyphus.tools import str_to_gb, str_to_hours


class Task:
    def __init__(self, start, resume=None, rqmt=None, args=None, mini_task=False, update_rqmt=None, parallel=0,
                 tries=1, continuable=False, resumable=False):
        """
        :param str start: name of the job method to run
        :param str|None resume: method run instead after an interruption; None: the task cannot be resumed
        :param bool resumable: newer spelling of resume=start
        :param dict rqmt: requirements {'cpu', 'gpu', 'mem' (GB), 'time' (hours), ...}
        :param list args: one entry per call of the method (a list/tuple is spread into positional arguments)
        :param bool mini_task: a few seconds of work; routed to the engine selector's 'short' engine
        :param update_rqmt: function(initial_rqmt, last_usage) -> rqmt for a run after an interruption
            (default: gs.update_engine_rqmt, applied when the engine killed the run at its time or memory limit)
        :param int parallel: number of task ids the args are split into (default: one id per entry of args)
        :param int tries: how often a task id that failed (raised) is run again before it stays in error state
        :param bool continuable: the task never writes its finished marker, so it can be run again later (e.g. to
            train more epochs); a job with such a task never counts as finished
        """
        if not isinstance(tries, int) or tries < 1:
            raise ValueError(f"Task {start!r}: tries must be a positive int, not {tries!r}")
        if resume is not None and resumable:
            raise ValueError(f"Task {start!r}: give resume= or resumable=, not both")
        self._start = start
        self._resume = start if resumable else resume
        self._rqmt = rqmt if callable(rqmt) else dict(rqmt or {})
        self._args = list(args) if args is not None else [[]]
        if not self._args:
            raise ValueError(f"Task {start!r}: args must not be empty")
        self._parallel = len(self._args) if parallel == 0 else min(parallel, len(self._args))
        self.mini_task = mini_task
        self._update_rqmt = update_rqmt
        self.tries = tries
        self.continuable = continuable
        self._job = None

    def __repr__(self):
        return f"<Task {self._start!r} of {self._job}>"

    def set_job(self, job):
        for method in (self._start, self._resume):
            if method is not None and not callable(getattr(job, method, None)):
                raise AttributeError(f"{type(job).__qualname__} has no method {method!r} named by its Task")
        self._job = job

    def name(self):
        return self._start

    def resumeable(self):
        return self._resume is not None

    def task_ids(self):
        return list(range(1, self._parallel + 1))

    def rqmt(self):
        """Requirements with mem in GB and time in hours; mini tasks carry engine='short'."""
        rqmt = dict(self._rqmt() if callable(self._rqmt) else self._rqmt)
        if "mem" in rqmt:
            rqmt["mem"] = str_to_gb(rqmt["mem"])
        if "time" in rqmt:
            rqmt["time"] = str_to_hours(rqmt["time"])
        if self.mini_task:
            rqmt["engine"] = "short"
        return rqmt

    def args_for_task_id(self, task_id):
        """The argument entries task id `task_id` runs: consecutive chunks, the first ones one entry longer."""
        chunk, longer = divmod(len(self._args), self._parallel)
        index = task_id - 1
        start = index * chunk + min(index, longer)
        stop = start + chunk + (1 if index < longer else 0)
        return self._args[start:stop]

    def engine_name(self):
        """Unique, file-name-safe name of this job's task, under which engines track it."""
        return self._job.job_id().replace("/", ".") + "." + self._start

    # Files of this task in the job folder.
    def file(self, kind, task_id=None):
        name = f"{kind}.{self._start}" if task_id is None else f"{kind}.{self._start}.{task_id}"
        return self._job._sis_path(name, abspath=True)

    def finished(self, task_id):
        return os.path.isfile(self.file(gs.JOB_FINISHED_MARKER, task_id))

    def error(self, task_id):
        return os.path.isfile(self.file(gs.STATE_ERROR, task_id))

    def retire_error(self, task_id):
        """If the failed task id has tries left (Task(tries=N)), move its error, log and usage aside (error and
        log get the suffix .NN) so it runs again, and return True; else False."""
        error_file = self.file(gs.STATE_ERROR, task_id)
        for attempt in range(1, self.tries):
            retired = f"{error_file}.{attempt:02d}"
            if os.path.exists(retired):
                continue
            log = self.file(gs.JOB_LOG, task_id)
            if os.path.exists(log):
                os.replace(log, f"{log}.error.{attempt:02d}")
            try:
                os.unlink(self.file(gs.PLOGGING_FILE, task_id))
            except FileNotFoundError:
                pass
            os.replace(error_file, retired)
            return True
        return False

    def update_rqmt(self, rqmt, last_usage):
        """Requirements for a new run after an interruption (Task(update_rqmt=...) or gs.update_engine_rqmt)."""
        function = self._update_rqmt or gs.update_engine_rqmt
        return function(rqmt, last_usage)

    def usage(self, task_id):
        """What the worker wrote about itself ({'pid', 'host', 'create_time', ...}) plus the file's mtime."""
        path = self.file(gs.PLOGGING_FILE, task_id)
        try:
            with open(path, encoding="utf-8") as f:
                usage = ast.literal_eval(f.read())
            usage["mtime"] = os.path.getmtime(path)
        except (FileNotFoundError, SyntaxError, ValueError):
            return None
        return usage

    def submissions(self):
        """Entries of submit_log.<task>: dicts with 'time', 'task_ids', 'rqmt' (a line torn by a killed manager
        is skipped)."""
        try:
            with open(self.file(gs.ENGINE_SUBMIT), encoding="utf-8") as f:
                lines = [line for line in f if line.strip()]
        except FileNotFoundError:
            return []
        entries = []
        for line in lines:
            try:
                entry = ast.literal_eval(line)
            except (SyntaxError, ValueError):
                continue
            if isinstance(entry, dict) and {"time", "task_ids"} <= set(entry):
                entries.append(entry)
        return entries

    def log_submission(self, entry):
        """Append one line to submit_log.<task> (after a newline if a killed manager left a torn line)."""
        with open(self.file(gs.ENGINE_SUBMIT), "ab+") as f:
            f.seek(0, os.SEEK_END)
            torn = False
            if f.tell():
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
            f.write((("\n" if torn else "") + repr(entry) + "\n").encode())

    def run(self, task_id, resume):
        """Call the task's method (the resume method if `resume`) once per argument entry, in the job's work/."""
        method = getattr(self._job, self._resume if resume and self._resume else self._start)
        previous = os.getcwd()
        os.chdir(self._job._sis_path(gs.JOB_WORK_DIR, abspath=True))
        try:
            for args in self.args_for_task_id(task_id):
                method(*(args if isinstance(args, (list, tuple)) else [args]))
        finally:
            os.chdir(previous)
