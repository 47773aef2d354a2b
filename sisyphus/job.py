"""Job: a step of the workflow, identified by its class and the hash of its arguments.

Calling a Job class runs `JobSingleton.__call__`: the arguments are bound to `__init__`'s parameters, hashed
into the job id, and the job is created once per id. A job's folder is `<WORK_DIR>/<job id>/`.
"""
import copy
import gzip
import inspect
import os
import pickle
import shutil
import tempfile

import sisyphus.global_settings as gs
from sisyphus.errors import SisError
from sisyphus.hash import HashError, short_hash, sis_hash_helper
from sisyphus.job_path import Path, Variable
from sisyphus.task import Task
from sisyphus.tools import extract_paths, write_atomically

#: job id -> Job, so that equal arguments give the same object.
created_jobs = {}

_HASH_CHARS = set("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz.-_/")


class JobSingleton(type):
    def __call__(cls, *args, **kwargs):
        parsed_args = _bind_arguments(cls, args, kwargs)
        job_id = f"{cls._sis_module_path()}/{cls.__name__}.{cls._sis_hash_static(parsed_args)}"
        job = created_jobs.get(job_id)
        if job is None:
            job = cls.__new__(cls)
            job._sis_id_cache = job_id
            # Copies, so that a caller changing its dict later cannot change the job behind its id.
            job._sis_init(*copy.deepcopy((args, kwargs, parsed_args)))
            created_jobs[job_id] = job
        return job


def _bind_arguments(cls, args, kwargs):
    """__init__'s arguments by parameter name, defaults filled in, `self` dropped."""
    if cls.__init__ is object.__init__:
        if args or kwargs:
            raise TypeError(f"{cls.__qualname__} takes no arguments (it defines no __init__)")
        return {}
    signature = inspect.signature(cls.__init__)
    try:
        bound = signature.bind(None, *args, **kwargs)
    except TypeError as e:
        raise TypeError(f"{cls.__qualname__}{signature}: {e}") from None
    bound.apply_defaults()
    parsed = dict(bound.arguments)
    del parsed[next(iter(signature.parameters))]
    return parsed


class Job(metaclass=JobSingleton):
    """Base class of every job. Subclasses store their arguments and declare outputs in `__init__`, list their
    steps in `tasks()`, and implement the methods the tasks name."""

    #: Arguments left out of the hash while they have the given value, e.g. {'verbose': False}.
    __sis_hash_exclude__ = {}
    #: [(argument, value, replacement)]: hash `argument=value` as if it were `replacement`.
    __sis_hash_overwrite__ = []
    #: Set to anything but None to give every job of the class new ids.
    __sis_version__ = None

    def _sis_init(self, args, kwargs, parsed_args):
        self._sis_kwargs = parsed_args
        self._sis_outputs = {}
        self._sis_output_dirs = set()
        self._sis_aliases = set()
        self._sis_runtime_reset()
        self.__init__(*args, **kwargs)
        found = extract_paths([self.__dict__, args, kwargs])
        self._sis_inputs = {p for p in found if p.creator is not self}

    def _sis_runtime_reset(self):
        """Bookkeeping of the running process, never pickled."""
        self._sis_finished_cache = False
        self._sis_setup_since_start = False
        self._sis_task_cache = None

    # Identity and hash.
    @classmethod
    def _sis_module_path(cls):
        module = cls.__module__
        prefix = gs.RECIPE_PREFIX + "."
        if module.startswith(prefix):
            module = module[len(prefix):]
        return module.replace(".", "/")

    @classmethod
    def hash(cls, parsed_args):
        """The hash part of the job id for these `__init__` arguments (override to leave some out)."""
        d = {}
        for key, value in parsed_args.items():
            if key not in cls.__sis_hash_exclude__ or cls.__sis_hash_exclude__[key] != value:
                d[key] = value
        for key, original, replacement in cls.__sis_hash_overwrite__:
            if key in d and d[key] == original:
                d[key] = replacement
        if cls.__sis_version__ is None:
            return short_hash(d)
        return short_hash((d, cls.__sis_version__))

    @classmethod
    def _sis_hash_static(cls, parsed_args):
        try:
            h = cls.hash(parsed_args)
        except HashError as e:
            for name, value in parsed_args.items():
                try:
                    sis_hash_helper(value)
                except HashError as inner:
                    raise HashError(f"cannot hash argument {name!r} of {cls.__module__}.{cls.__qualname__}: "
                                    f"{inner}") from None
            raise HashError(f"cannot hash the arguments of {cls.__module__}.{cls.__qualname__}: {e}") from None
        if not isinstance(h, str) or not h or not set(h) <= _HASH_CHARS:
            raise ValueError(f"{cls.__qualname__}.hash returned {h!r}; it must be a non-empty str of [0-9A-Za-z.-_/]")
        return h

    def job_id(self):
        return self._sis_id_cache

    def _sis_id(self):
        return self._sis_id_cache

    def _sis_hash(self):
        return self._sis_id_cache.encode()

    # Declarations used in __init__.
    def output_path(self, filename, directory=False, cached=False):
        """A Path under this job's output/ folder; with directory=True the folder is created at setup."""
        path = self._sis_outputs.get(filename)
        if path is None:
            path = self._sis_outputs[filename] = Path(filename, self, cached)
        if directory:
            self._sis_output_dirs.add(filename)
        return path

    def output_var(self, filename, pickle=False, backup=None):
        """A Variable stored in this job's output/ folder."""
        if filename in self._sis_outputs:
            raise ValueError(f"{self}: output {filename!r} declared twice")
        path = self._sis_outputs[filename] = Variable(filename, self, pickle=pickle, backup=backup)
        return path

    def add_alias(self, alias):
        """Link alias/<alias> to this job's folder (done by the manager)."""
        self._sis_aliases.add(alias)
        return self

    def get_aliases(self):
        return self._sis_aliases

    def tasks(self):
        yield Task("run")

    # Folder and state.
    def _sis_path(self, name=None, abspath=False):
        path = os.path.join(gs.WORK_DIR, self._sis_id_cache)
        if name is not None:
            path = os.path.join(path, name)
        return os.path.join(gs.BASE_DIR, path) if abspath else path

    def work_path(self):
        return self._sis_path(gs.JOB_WORK_DIR)

    def _sis_tasks(self):
        if self._sis_task_cache is None:
            try:
                tasks = list(self.tasks())
                if not tasks:
                    raise ValueError("it yielded no Task")
                for task in tasks:
                    task.set_job(self)
            except Exception as e:
                raise SisError(f"{self}: tasks() of {type(self).__module__}.{type(self).__qualname__} failed: "
                               f"{type(e).__name__}: {e}") from e
            self._sis_task_cache = tasks
        return self._sis_task_cache

    def _sis_setup(self):
        return os.path.isdir(self._sis_path(abspath=True))

    def _sis_runnable(self):
        return all(path.available() for path in self._sis_inputs)

    def _sis_finished(self):
        """True once the job's `finished` marker exists; written here when every task id has finished."""
        if self._sis_finished_cache:
            return True
        base = self._sis_path(abspath=True)
        marker = os.path.join(base, gs.JOB_FINISHED_MARKER)
        if os.path.isfile(marker):
            self._sis_finished_cache = True
        elif not os.path.isdir(base):
            return False
        elif os.path.isfile(os.path.join(base, gs.JOB_FINISHED_ARCHIVE)):
            self._sis_finished_cache = True
        elif all(t.finished(i) for t in self._sis_tasks() for i in t.task_ids()):
            with open(marker, "w"):
                pass
            self._sis_finished_cache = True
        return self._sis_finished_cache

    def _sis_setup_directory(self):
        """Create the job folder (atomically: built under a temporary name, then renamed), and write job.save
        once per manager run so that it holds the current recipe state."""
        if self._sis_setup_since_start:
            return
        path = self._sis_path(abspath=True)
        if os.path.isdir(path):
            self._sis_fill_directory(path)
        else:
            parent = os.path.dirname(path)
            os.makedirs(parent, exist_ok=True)
            tmp = tempfile.mkdtemp(dir=parent, prefix="." + os.path.basename(path) + ".setup.")
            try:
                self._sis_fill_directory(tmp)
                try:
                    os.rename(tmp, path)
                except OSError:
                    if not os.path.isdir(path):  # else another manager set it up meanwhile
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)  # nothing left after a successful rename
        self._sis_setup_since_start = True

    def _sis_fill_directory(self, path):
        for name in (gs.JOB_OUTPUT, gs.JOB_WORK_DIR, gs.JOB_INPUT):
            os.makedirs(os.path.join(path, name), exist_ok=True)
        for name in self._sis_output_dirs:
            os.makedirs(os.path.join(path, gs.JOB_OUTPUT, name), exist_ok=True)
        for creator_id in sorted({p.creator_id() for p in self._sis_inputs} - {None}):
            link = os.path.join(path, gs.JOB_INPUT, creator_id.replace("/", "_"))
            if not os.path.islink(link):
                os.symlink(os.path.join(gs.BASE_DIR, gs.WORK_DIR, creator_id), link, target_is_directory=True)
        try:
            saved = pickle.dumps(self)
        except (pickle.PicklingError, TypeError, AttributeError) as e:
            raise SisError(f"{self}: cannot save the job into {gs.JOB_SAVE}: {e}") from e
        write_atomically(os.path.join(path, gs.JOB_SAVE), gzip.compress(saved))
        info = [f"INPUT: {p}" for p in sorted(self._sis_inputs)]
        info += [f"PARAMETER: {key}: {value!r}" for key, value in self._sis_kwargs.items()]
        info += [f"ALIAS: {alias}" for alias in sorted(self._sis_aliases)]
        write_atomically(os.path.join(path, gs.JOB_INFO), ("\n".join(info) + "\n").encode())

    # Python protocol.
    def __getstate__(self):
        state = self.__dict__.copy()
        for key in ("_sis_finished_cache", "_sis_setup_since_start", "_sis_task_cache"):
            state.pop(key, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._sis_runtime_reset()

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self  # a job is identified by its id; copies would break the one-object-per-id rule

    def __eq__(self, other):
        return isinstance(other, Job) and self._sis_id_cache == other._sis_id_cache

    def __hash__(self):
        return hash(self._sis_id_cache)

    def __lt__(self, other):
        return self._sis_id_cache < other._sis_id_cache

    def __str__(self):
        return f"Job<{self._sis_path()}>"

    __repr__ = __str__
