"""The graph of a setup: registered outputs, paths awaited by async configs, and the jobs they need."""
import os

from sisyphus import job as job_module
from sisyphus.errors import SisError
from sisyphus.job import Job
from sisyphus.job_path import AbstractPath


class OutputPath:
    """A registered output (the reference's graph target): `SISGraph.add_target(OutputPath(name, path))` is
    `add_output(name, path)`."""

    def __init__(self, output_path, sis_path):
        if not isinstance(sis_path, AbstractPath):
            raise SisError(f"OutputPath({output_path!r}, ...): needs a tk.Path or tk.Variable, "
                           f"not {type(sis_path).__name__}")
        self.name = self._output_path = output_path
        self._sis_path = sis_path

    @property
    def required(self):
        """The paths still missing."""
        return set() if self._sis_path.available() else {self._sis_path}

    def is_done(self):
        return not self.required


class SISGraph:
    def __init__(self):
        self.outputs = {}  # output name -> Path
        self.waiters = []  # (set of Paths, asyncio.Future) of configs waiting in tk.async_run
        self._jobs = None  # cache of jobs(), dropped when a target is added or a job gains an input
        self._jobs_inputs_version = None
        self.callbacks = []  # (function, args, kwargs) of tk.register_callback, called once the graph is finished
        self.reports = {}  # name -> tk.register_report entry

    def add_output(self, name, path):
        if not isinstance(path, AbstractPath):
            raise SisError(f"tk.register_output({name!r}, ...): needs a tk.Path or tk.Variable, "
                           f"not {type(path).__name__}")
        normalized = os.path.normpath(name)
        if not name or os.path.isabs(name) or normalized.startswith(".."):
            raise SisError(f"tk.register_output({name!r}, ...): the name must be a relative path inside output/")
        known = self.outputs.get(normalized)
        if known is not None and known != path:
            raise SisError(f"output {normalized!r} registered twice with different paths: "
                           f"{known.rel_path()} and {path.rel_path()}")
        self.outputs[normalized] = path
        self._jobs = None

    def add_target(self, target):
        """The reference's way to register an output (an OutputPath)."""
        if not isinstance(target, OutputPath):
            raise SisError(f"SISGraph.add_target needs an OutputPath, not {type(target).__name__}")
        self.add_output(target.name, target._sis_path)

    def add_report(self, report):
        self.reports[report["name"]] = report
        self._jobs = None

    def add_waiter(self, paths, future):
        self.waiters.append((set(paths), future))
        self._jobs = None

    def resolve_waiters(self):
        """Wake the configs whose awaited paths are all available; True if any woke."""
        ready = [(paths, future) for paths, future in self.waiters if all(p.available() for p in paths)]
        for paths, future in ready:
            self.waiters.remove((paths, future))
            if not future.done():
                future.set_result(None)
        if ready:
            self._jobs = None
        return bool(ready)

    def jobs(self):
        """Every job the outputs and awaited paths depend on, sorted by id."""
        if self._jobs is None or self._jobs_inputs_version != job_module.inputs_version[0]:
            self._jobs_inputs_version = job_module.inputs_version[0]
            found = {}
            todo = [p.creator for p in self._target_paths() if isinstance(p.creator, Job)]
            while todo:
                job = todo.pop()
                if job.job_id() in found:
                    continue
                found[job.job_id()] = job
                todo.extend(p.creator for p in job._sis_inputs if isinstance(p.creator, Job))
            self._jobs = [found[key] for key in sorted(found)]
        return self._jobs

    def _target_paths(self):
        yield from self.outputs.values()
        for report in self.reports.values():
            yield from report["required"]
        for paths, _ in self.waiters:
            yield from paths

    def id_to_job_dict(self):
        return {job.job_id(): job for job in self.jobs()}

    def job_by_id(self, job_id):
        """The job of the graph with that id, or None."""
        return self.id_to_job_dict().get(job_id)

    def jobs_sorted(self):
        """Every job after the jobs it depends on, in the reference's order: depth first from the jobs without
        inputs (by id), each job's users by id, a user as soon as its last input was given."""
        jobs = self.id_to_job_dict()
        missing = {job_id: {p.creator_id() for p in job._sis_inputs} & jobs.keys() for job_id, job in jobs.items()}
        users = {job_id: set() for job_id in jobs}
        for job_id, inputs in missing.items():
            for input_id in inputs:
                users[input_id].add(job_id)
        for start in sorted(job_id for job_id, inputs in missing.items() if not inputs):
            yield jobs[start]
            stack = [iter(sorted(users[start]))]  # per job on the path: its users not yet looked at
            path = [start]
            while stack:
                user = next(stack[-1], None)
                if user is None:
                    stack.pop()
                    path.pop()
                    continue
                missing[user].discard(path[-1])
                if not missing[user]:
                    yield jobs[user]
                    stack.append(iter(sorted(users[user])))
                    path.append(user)

    def find(self, pattern, mode="all"):
        """Jobs (mode 'job'), paths (mode 'path') or both ('all') whose id or path contains `pattern`."""
        found = []
        if mode in ("all", "job"):
            found += [job for job in self.jobs() if pattern in job.job_id() or pattern in str(job.get_vis_name())]
        if mode in ("all", "path"):
            paths = {p for job in self.jobs() for p in job._sis_outputs.values()} | set(self.outputs.values())
            found += sorted(p for p in paths if pattern in p.get_path())
        return found
