"""The manager: runs the jobs the registered outputs need, each task once, and links the outputs.

Every loop it reads the state of each unfinished job from its folder (finished/error markers, the usage file
the worker keeps) and from the engine, submits what can run, and links outputs whose job finished. Finished
jobs are remembered and never looked at again, so a rerun over a finished graph costs one stat per job.
It stops when nothing can make progress any more.
"""
import fcntl
import logging
import os
import socket
import time

import psutil

import sisyphus.global_settings as gs
from sisyphus import engine as engine_states
from sisyphus.tools import finished_results_cache, tail

logger = logging.getLogger("sisyphus.manager")

HOST = socket.gethostname()
MANAGER_ID = f"{HOST}:{os.getpid()}"  # written into submit_log entries

# States as the overview lists them: errors last.
STATE_ORDER = [gs.STATE_FINISHED, gs.STATE_HOLD, gs.STATE_WAITING, gs.STATE_RUNNABLE, gs.STATE_QUEUE, gs.STATE_RUNNING,
               gs.STATE_INTERRUPTED_RESUMABLE, gs.STATE_INTERRUPTED_NOT_RESUMABLE, gs.STATE_RETRY_ERROR,
               gs.STATE_ERROR]
# A job in one of these states needs a person (or -co / -cio).
FAILED_STATES = {gs.STATE_ERROR, gs.STATE_RETRY_ERROR, gs.STATE_INTERRUPTED_NOT_RESUMABLE}
# A job in one of these states makes progress on its own.
ACTIVE_STATES = {gs.STATE_RUNNABLE, gs.STATE_QUEUE, gs.STATE_RUNNING, gs.STATE_INTERRUPTED_RESUMABLE}
# Of several task ids, the one first in this list gives the task's state.
WORST_FIRST = [gs.STATE_ERROR, gs.STATE_RETRY_ERROR, gs.STATE_INTERRUPTED_NOT_RESUMABLE,
               gs.STATE_INTERRUPTED_RESUMABLE, gs.STATE_RUNNABLE, gs.STATE_QUEUE, gs.STATE_RUNNING,
               gs.STATE_FINISHED]
# What to do about a job in a failed state (every message naming one says it).
NEXT_STEP = {
    gs.STATE_ERROR: "fix the cause, then run the manager with -co to clear it and run it again",
    gs.STATE_RETRY_ERROR: "interrupted too often; run the manager with -cio to clear it and run it again",
    gs.STATE_INTERRUPTED_NOT_RESUMABLE: "its task cannot resume; run the manager with -cio (-co does not clear "
                                        "it) to clear it and run it again",
}
KILL_REASONS = {
    engine_states.STATE_ENGINE_FAILED: "the engine saw it end abnormally",
    engine_states.STATE_ENGINE_TIMEOUT: "killed at its time limit",
    engine_states.STATE_ENGINE_OUT_OF_MEMORY: "killed for exceeding its memory requirement",
}


class Manager:
    def __init__(self, graph, engine, loader, clear_errors=False, clear_interrupts=False, ignore_errors=False,
                 link_outputs=True, interactive=False, display=None):
        """clear_errors (-co) / clear_interrupts (-cio): run failed jobs again once; ignore_errors (-io): do not
        ask whether to (interactive runs ask when there are failed jobs)."""
        self.graph = graph
        self.engine = engine
        self.loader = loader
        self.clear_errors = clear_errors
        self.clear_interrupts = clear_interrupts
        self.ignore_errors = ignore_errors
        self.states = {}  # job -> state
        self.current = {}  # job -> (task, {task id: state}) of its first unfinished task, once set up
        self.held = {}  # job -> {task id: why the engine holds it} of its queued ids that can never start
        self.set_up = set()  # jobs whose folder this manager has seen
        self.vanished = set()  # set-up jobs whose folder disappeared while tasks of them still ran
        self.damaged = {}  # job -> why its folder cannot be used (an error state until -co or a restart)
        self.kill_reasons = {}  # (engine name, task id) -> engine state of its last abnormal end
        self.link_outputs = link_outputs
        self.interactive = interactive  # -i: ask before submitting each job
        self.declined = set()  # jobs the user chose not to submit (-i)
        self.display = display  # --ui: a manager_ui.TerminalDisplay redrawn after each change
        self.linked_outputs = set()
        self.aliased_jobs = set()
        self.report_times = {}  # report name -> time it was last written
        self.to_pack = {}  # job -> time it was seen finished, for gs.JOB_AUTO_CLEANUP
        self.callbacks_done = False
        self.done = False  # set when run() returns (the status page stops refreshing)

    def run(self, ask=False):
        """Run until nothing can progress; returns the exit status (0: every output finished)."""
        self.engine.start_engine()
        if gs.CACHE_FINISHED_RESULTS:
            finished_results_cache.cache_file = gs.CACHE_FINISHED_RESULTS_PATH
            finished_results_cache.read_from_file()
        try:
            self.update()
            self.print_overview(every_job=True)
            if self.display is not None:
                self.display.draw(self)
            if ask and not _confirm("Start manager? (y/n) "):
                logger.info("Manager not started")
                return 0
            failed = FAILED_STATES & set(self.states.values())
            if ask and failed and not (self.clear_errors or self.clear_interrupts or self.ignore_errors):
                if _confirm(f"Clear jobs in state {', '.join(sorted(failed))} and run them again? (y/n) "):
                    self.clear_errors = self.clear_interrupts = True
            self.clear_failed()
            while True:
                self.link_outputs_and_aliases()
                submitted = self.submit_runnable()
                if not submitted and not self.can_progress():
                    break
                self.engine.wait_for_change(gs.WAIT_PERIOD_BETWEEN_CHECKS)
                self.engine.reset_cache()
                self.pack_finished_jobs()
                changes = self.update()
                if changes:
                    self.print_changes(changes)
                if gs.CACHE_FINISHED_RESULTS:
                    finished_results_cache.write_to_file()
            self.link_outputs_and_aliases()
            self.write_reports(force=True)
            self.pack_finished_jobs()
            return self.final_report()
        finally:
            self.done = True
            if gs.CACHE_FINISHED_RESULTS:
                finished_results_cache.write_to_file()
            self.engine.stop_engine()

    # States.
    def update(self):
        """Wake async configs whose paths are ready, then recompute every job's state; returns the changes."""
        if self.graph.resolve_waiters() or self.loader.waiting():
            self.loader.step()
        changes = []
        jobs = self.graph.jobs()
        if len(jobs) != len(self.states) or any(job not in self.states for job in jobs):
            # Targets changed (an async config went on): forget jobs no longer needed.
            self.states = {job: self.states[job] for job in jobs if job in self.states}
            self.current = {job: self.current[job] for job in jobs if job in self.current}
            self.held = {job: self.held[job] for job in jobs if job in self.held}
        for job in jobs:
            old = self.states.get(job)
            if old == gs.STATE_FINISHED:
                continue
            new = self.job_state(job)
            self.states[job] = new
            if new != old:
                changes.append((job, new))
                if new == gs.STATE_FINISHED:
                    gs.on_job_finished(job)
                    marker = job._sis_path(gs.JOB_FINISHED_MARKER, abspath=True)
                    if gs.JOB_AUTO_CLEANUP and os.path.isfile(marker):
                        self.to_pack[job] = os.path.getmtime(marker)
                elif new == gs.STATE_ERROR:
                    gs.on_job_failure(job)
        return changes

    def job_state(self, job):
        """The job's state from its folder and the engine; a folder that cannot be read or written makes it
        an error (the other jobs go on)."""
        self.current.pop(job, None)
        self.held.pop(job, None)
        if job in self.damaged:
            return gs.STATE_ERROR
        try:
            return self._job_state(job)
        except OSError as e:
            return self.damaged_state(job, e)

    def _job_state(self, job):
        if job._sis_finished():
            return gs.STATE_FINISHED
        if not job._sis_runnable():
            return gs.STATE_WAITING
        if job._sis_hold_job:
            return gs.STATE_HOLD
        if not job._sis_setup():
            folder = job._sis_path(abspath=True)
            if os.path.lexists(folder):
                raise NotADirectoryError(f"{job._sis_path()} is there but is not a folder")
            if job in self.set_up:
                return self.vanished_state(job)
            task = job._sis_tasks()[0]
            self.current[job] = (task, dict.fromkeys(task.task_ids(), gs.STATE_RUNNABLE))
            return gs.STATE_RUNNABLE
        self.set_up.add(job)
        for task in job._sis_tasks():
            ids = {i: self.task_id_state(task, i) for i in task.task_ids()}
            if any(state != gs.STATE_FINISHED for state in ids.values()):
                self.current[job] = (task, ids)
                held = {i: self.engine.held_reason(task.engine_name(), i)
                        for i, state in ids.items() if state == gs.STATE_QUEUE}
                held = {i: reason for i, reason in held.items() if reason}
                if held:
                    self.held[job] = held
                return min(ids.values(), key=WORST_FIRST.index)
        job._sis_finished()  # writes the job's finished marker
        return gs.STATE_FINISHED

    def vanished_state(self, job):
        """A job whose folder disappeared while the manager ran (deleted by hand): running while the engine still
        holds tasks of it (they cannot write into the folder any more), then set up again and run anew."""
        holding = [(task, i) for task in job._sis_tasks() for i in task.task_ids()
                   if self.engine.task_state(task.engine_name(), i) in (engine_states.STATE_QUEUE,
                                                                          engine_states.STATE_RUNNING)]
        if holding:
            if job not in self.vanished:
                self.vanished.add(job)
                logger.warning("%s: its folder %s disappeared while the manager ran; %s still running without it "
                               "(it cannot write its outputs), the job is set up again and runs anew once %s",
                               job, job._sis_path(), ", ".join(f"task {t.name()}.{i}" for t, i in holding),
                               "it ends" if len(holding) == 1 else "they end")
            task = holding[0][0]
            self.current[job] = (task, {i: gs.STATE_RUNNING for t, i in holding if t is task})
            return gs.STATE_RUNNING
        logger.warning("%s: its folder %s disappeared while the manager ran; set up again, the job runs anew",
                       job, job._sis_path())
        self.set_up.discard(job)
        self.vanished.discard(job)
        job._sis_runtime_reset()
        task = job._sis_tasks()[0]
        self.current[job] = (task, dict.fromkeys(task.task_ids(), gs.STATE_RUNNABLE))
        return gs.STATE_RUNNABLE

    def damaged_state(self, job, error):
        self.current.pop(job, None)
        self.damaged[job] = f"{type(error).__name__}: {error}"
        logger.error("%s: its folder %s is damaged (%s); the other jobs go on. Move it aside with -co (or remove "
                     "it), then run the manager again", job, job._sis_path(), self.damaged[job])
        return gs.STATE_ERROR

    def task_id_state(self, task, task_id):
        if task.finished(task_id):
            return gs.STATE_FINISHED
        if task.error(task_id):
            return gs.STATE_RUNNABLE if task.retire_error(task_id) else gs.STATE_ERROR
        name = task.engine_name()
        engine_state = self.engine.task_state(name, task_id)
        # The task may have ended while the engine was asked; its markers are written before it exits.
        if task.finished(task_id):
            return gs.STATE_FINISHED
        if task.error(task_id):
            return gs.STATE_ERROR
        if engine_state in (engine_states.STATE_QUEUE, engine_states.STATE_RUNNING):
            return engine_state
        usage = task.usage(task_id)
        # Submissions the engine held (it could never start them) are no attempts.
        history = [entry for entry in task.submissions() if task_id in entry["task_ids"] and not entry.get("held")]
        if engine_state == engine_states.STATE_UNKNOWN:
            if usage is not None and _still_running(usage):
                if usage["host"] == HOST:  # started by an earlier manager; let the engine count it
                    rqmt = history[-1]["rqmt"] if history else task.rqmt()
                    self.engine.adopt_running_task(name, task_id, rqmt, usage["pid"])
                return gs.STATE_RUNNING
            last_submit = history[-1]["time"] if history else None
            if last_submit is not None and time.time() - last_submit < gs.WAIT_PERIOD_SUBMIT and \
                    (usage is None or last_submit > usage["start_time"]):
                return gs.STATE_QUEUE  # submitted, not listed by the engine yet
            if usage is None:
                return gs.STATE_RETRY_ERROR if len(history) > gs.MAX_SUBMIT_RETRIES else gs.STATE_RUNNABLE
        else:
            self.kill_reasons[(name, task_id)] = engine_state
        # It ended without finishing: interrupted.
        if not task.resumeable():
            return gs.STATE_INTERRUPTED_NOT_RESUMABLE
        return gs.STATE_RETRY_ERROR if len(history) > gs.MAX_SUBMIT_RETRIES else gs.STATE_INTERRUPTED_RESUMABLE

    def can_progress(self):
        return any(state in ACTIVE_STATES and job not in self.declined and not self.only_held(job)
                   for job, state in self.states.items())

    def only_held(self, job):
        """Whether every unfinished task id of the job is held by the engine (it can never start)."""
        held = self.held.get(job)
        return bool(held) and all(i in held for i, s in self.current[job][1].items() if s != gs.STATE_FINISHED)

    # Actions.
    def submit_runnable(self):
        """Submit the runnable and resumable task ids of jobs without failed ids; returns how many."""
        busy = sum(1 for _, ids in self.current.values() for s in ids.values()
                   if s in (gs.STATE_QUEUE, gs.STATE_RUNNING))
        count = 0
        for job, (task, ids) in sorted(self.current.items()):
            if any(state in FAILED_STATES for state in ids.values()):
                continue
            todo = [i for i, s in ids.items() if s in (gs.STATE_RUNNABLE, gs.STATE_INTERRUPTED_RESUMABLE)]
            if todo and self.interactive:
                if job in self.declined:
                    continue
                if not _confirm(f"Submit {job} task {task.name()} {todo}? (y/n) "):
                    self.declined.add(job)
                    continue
            if gs.MAX_PARALLEL:
                todo = todo[:max(0, gs.MAX_PARALLEL - busy - count)]
            if todo:
                try:
                    self.submit(job, task, todo)
                except OSError as e:
                    self.states[job] = self.damaged_state(job, e)
                    continue
                for i in todo:
                    ids[i] = gs.STATE_QUEUE
                count += len(todo)
        return count

    def submit(self, job, task, task_ids):
        """Submit task ids, holding a lock on submit_log.<task> so that of two managers deciding at the same
        time only one submits (the other sees the fresh entry and leaves the ids to it)."""
        job._sis_setup_directory()
        self.set_up.add(job)
        name = task.engine_name()
        call = gs.worker_wrapper(job, task.name(), list(gs.SIS_COMMAND) + [gs.CMD_WORKER, job._sis_path(), task.name()])
        logpath = job._sis_path(f"{gs.JOB_LOG}.{task.name()}")
        with open(task.file(gs.ENGINE_SUBMIT), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            history = task.submissions()
            groups = {}  # ids with equal requirements are submitted together
            for i in task_ids:
                earlier = [e for e in history if i in e["task_ids"] and not e.get("held")]
                if earlier and earlier[-1].get("manager") != MANAGER_ID and \
                        time.time() - earlier[-1]["time"] < gs.WAIT_PERIOD_SUBMIT:
                    logger.info("%s task %s.%s was just submitted by another manager", job, task.name(), i)
                    continue
                rqmt = self.requirements(task, i, [e["rqmt"] for e in earlier])
                groups.setdefault(repr(sorted(rqmt.items())), (rqmt, []))[1].append(i)
            for rqmt, ids in groups.values():
                logger.info("submit: %s task %s %s", job, task.name(), ids)
                self.engine.submit_call(call, logpath, rqmt, name, task.name(), ids)
                entry = {"time": time.time(), "task_ids": ids, "rqmt": rqmt, "manager": MANAGER_ID}
                if all(self.engine.held_reason(name, i) for i in ids):
                    entry["held"] = True
                task.log_submission(entry)

    def requirements(self, task, task_id, earlier):
        """The engine's defaults updated by the task's rqmt; time or memory doubled after the engine killed
        the previous run for exceeding it."""
        rqmt = dict(self.engine.get_default_rqmt(task))
        rqmt.update(task.rqmt())
        reason = self.kill_reasons.get((task.engine_name(), task_id))
        if earlier and reason == engine_states.STATE_ENGINE_TIMEOUT:
            rqmt["time"] = max(rqmt.get("time", 1), 2 * earlier[-1].get("time", rqmt.get("time", 1)))
        if earlier and reason == engine_states.STATE_ENGINE_OUT_OF_MEMORY:
            rqmt["mem"] = max(rqmt.get("mem", 1), 2 * earlier[-1].get("mem", rqmt.get("mem", 1)))
        usage = task.usage(task_id)
        if earlier and task._update_rqmt is not None and usage is not None:
            rqmt = task.update_rqmt(rqmt, usage)
        return gs.check_engine_limits(rqmt, task)

    def clear_failed(self):
        """-co / -cio: move the folders of failed jobs aside (<job>.cleared.NNNN) so they run again."""
        cleared = set()
        if self.clear_errors:
            cleared |= {gs.STATE_ERROR}
        if self.clear_interrupts:
            cleared |= {gs.STATE_INTERRUPTED_NOT_RESUMABLE, gs.STATE_RETRY_ERROR}
        for job, state in sorted(self.states.items()):
            if state in cleared:
                path = job._sis_path(abspath=True)
                n = 1
                while os.path.lexists(f"{path}.cleared.{n:04d}"):
                    n += 1
                try:
                    os.rename(path, f"{path}.cleared.{n:04d}")
                except OSError as e:
                    logger.error("cannot clear %s: %s (move %s aside by hand)", job, e, job._sis_path())
                    continue
                logger.warning("cleared %s: %s moved to %s.cleared.%04d", state, job, job._sis_path(), n)
                job._sis_runtime_reset()
                self.damaged.pop(job, None)
                self.set_up.discard(job)
                self.states[job] = self.job_state(job)

    def link_outputs_and_aliases(self):
        """output/<name> -> each registered path whose job finished; alias/<name> -> each set-up job folder."""
        for name, path in self.graph.outputs.items():
            if name not in self.linked_outputs and path.available() and os.path.exists(path.get_path()):
                if self.link_outputs:
                    _symlink(path.get_path(), os.path.join(gs.BASE_DIR, gs.OUTPUT_DIR, name))
                self.linked_outputs.add(name)
        self.write_reports()
        if not self.callbacks_done and len(self.linked_outputs) == len(self.graph.outputs):
            self.callbacks_done = True
            for function, args, kwargs in self.graph.callbacks:
                function(*args, **kwargs)
        for job in self.graph.jobs():
            if job.get_aliases() and job not in self.aliased_jobs and job._sis_setup():
                for link in job._sis_alias_links():
                    _symlink(job._sis_path(abspath=True), os.path.join(gs.BASE_DIR, link))
                self.aliased_jobs.add(job)

    def pack_finished_jobs(self):
        """gs.JOB_AUTO_CLEANUP: pack the folders of jobs finished at least WAIT_PERIOD_JOB_CLEANUP seconds ago."""
        from sisyphus.cleanup import archive_job_folder

        for job, since in sorted(self.to_pack.items()):
            if time.time() - since >= gs.WAIT_PERIOD_JOB_CLEANUP:
                del self.to_pack[job]
                try:
                    archive_job_folder(job._sis_path(abspath=True))
                except OSError as e:
                    logger.warning("%s: not packed (%s); its folder stays as it is", job, e)

    def write_reports(self, force=False):
        """Write output/<name> of each tk.register_report whose required paths are computed, again every
        update_frequency seconds while the manager runs."""
        for name, report in self.graph.reports.items():
            due = time.time() - self.report_times.get(name, -1e9) >= report["update_frequency"]
            if (force or due) and all(p.available() for p in report["required"]):
                write_report(report, os.path.join(gs.BASE_DIR, gs.OUTPUT_DIR, name))
                self.report_times[name] = time.time()

    # Reports.
    def print_overview(self, every_job=False):
        jobs = sorted(self.states.items(), key=lambda item: (STATE_ORDER.index(item[1]), item[0]))
        for job, state in jobs:
            if every_job or state != gs.STATE_FINISHED:
                self.log_state(state, job)
        logger.info("%s", self.summary())

    def print_changes(self, changes):
        for job, state in changes:
            self.log_state(state, job)
        logger.info("%s", self.summary())
        if self.display is not None:
            self.display.draw(self)

    def summary(self):
        counts = {}
        for state in self.states.values():
            counts[state] = counts.get(state, 0) + 1
        text = " ".join(f"{state}({counts[state]})" for state in STATE_ORDER if state in counts)
        if self.held:
            first = min(self.held)
            more = " ..." if len(self.held) > 1 else ""
            text += f"; held by the engine({len(self.held)}): {first} {self.held_text(first)}{more}"
        waiting = self.loader.waiting()
        return text + (f" configs waiting: {' '.join(waiting)}" if waiting else "")

    def held_text(self, job):
        """Why the engine holds the job: 'task run.1 asks mem=12 (at most 4), more than the local engine has'."""
        task = self.current[job][0]
        return "; ".join(f"task {task.name()}.{i} {reason}" for i, reason in sorted(self.held[job].items()))

    def log_state(self, state, job):
        if job in self.held:
            logger.warning("%s: %s held by the engine: %s", state, job, self.held_text(job))
        elif state in FAILED_STATES:
            logger.error("%s: %s (%s)", state, job, NEXT_STEP[state])
        else:
            logger.info("%s: %s", state, job)

    def final_report(self):
        missing = {name: path for name, path in self.graph.outputs.items() if name not in self.linked_outputs}
        waiting = self.loader.waiting()
        if not missing and not waiting:
            logger.info("All %d outputs finished", len(self.graph.outputs))
            return 0
        for job, state in sorted(self.states.items()):
            if state in FAILED_STATES:
                self.report_failure(job, state)
        for job in sorted(self.held):
            logger.error("held by the engine: %s %s; raise the engine's limits in settings.py, or lower the job's "
                         "requirements (its rqmt, or gs.check_engine_limits), then run the manager again",
                         job, self.held_text(job))
        for name, path in sorted(missing.items()):
            why = "its job finished without writing it" if path.available() else "not computed"
            logger.error("output %s: %s (%s)", name, why, path.rel_path())
        for config in waiting:
            logger.error("config %s still waits for jobs that cannot run", config)
        return 1

    def report_failure(self, job, state):
        if job in self.damaged:
            logger.error("%s: %s: its folder %s is damaged (%s); move it aside with -co (or remove it), then run "
                         "the manager again", state, job, job._sis_path(), self.damaged[job])
            return
        task, ids = self.current[job]
        for task_id, id_state in sorted(ids.items()):
            if id_state not in FAILED_STATES:
                continue
            reason = KILL_REASONS.get(self.kill_reasons.get((task.engine_name(), task_id)), "")
            log = task.file(gs.JOB_LOG, task_id)
            logger.error("%s: %s task %s.%s%s; %s; log %s ends:\n%s", id_state, job, task.name(), task_id,
                         f" ({reason})" if reason else "", NEXT_STEP[id_state], os.path.relpath(log, gs.BASE_DIR),
                         _indent(tail(log, gs.PRINT_ERROR_LINES)))


def write_report(report, filename):
    """The report's text: template(values) if callable, template.format(**values) if a str, else the values one
    per line (delayed values read), written atomically."""
    from sisyphus.delayed_ops import try_get
    from sisyphus.tools import write_atomically

    values, template = report["values"], report["template"]
    if callable(template):
        text = template(values)
    elif isinstance(template, str):
        text = template.format(**{k: try_get(v) for k, v in values.items()})
    elif isinstance(values, dict):
        text = "".join(f"{key}: {try_get(value)}\n" for key, value in values.items())
    else:
        text = f"{try_get(values)}\n"
    os.makedirs(os.path.dirname(filename), exist_ok=True)
    write_atomically(filename, str(text).encode())


def _still_running(usage):
    """Whether the worker that wrote this usage file still runs: by its pid on this machine, elsewhere by its
    heartbeat (the file's age)."""
    if usage["host"] == HOST:
        try:
            process = psutil.Process(usage["pid"])
            return abs(process.create_time() - usage["create_time"]) < 1 and \
                process.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False
    return time.time() - usage["mtime"] < 2 * gs.PLOGGING_UPDATE_FILE_PERIOD + gs.WAIT_PERIOD_JOB_FS_SYNC


def _symlink(target, link):
    """Point `link` at `target`, replacing an older link atomically (a link left half-made by a killed manager is
    removed on the next call for the same name)."""
    from sisyphus.tools import remove_stale_temporaries, temporary_prefix

    if os.path.islink(link) and os.readlink(link) == target:
        return
    folder = os.path.dirname(link)
    os.makedirs(folder, exist_ok=True)
    prefix = "." + os.path.basename(link)
    remove_stale_temporaries(folder, prefix)
    tmp = os.path.join(folder, temporary_prefix(prefix) + "link")
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _indent(text):
    return "\n".join("    " + line for line in text.splitlines())


def _confirm(prompt):
    try:
        return input(prompt).strip().lower() in ("y", "yes")
    except EOFError:
        return False
