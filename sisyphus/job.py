"""Job: a step of the workflow, identified by its class and the hash of its arguments.

Calling a Job class runs `JobSingleton.__call__`: the arguments are bound to `__init__`'s parameters, hashed
into the job id, and the job is created once per id. A job's folder is `<WORK_DIR>/<job id>/`.
"""
import copy
import gzip
import inspect
import logging
import os
import pickle
import shutil
import tempfile

import sisyphus.global_settings as gs
from sisyphus import block
from sisyphus.errors import SisError
from sisyphus.hash import HashError, sis_hash_helper
from sisyphus.job_path import AbstractPath, NoBackup, Path, Variable
from sisyphus.task import Task
from sisyphus.tools import (EnvironmentModifier, extract_paths, finished_results_cache, remove_stale_temporaries, sh,
                            temporary_prefix, write_atomically)

#: job id -> Job, so that equal arguments give the same object.
created_jobs = {}

_HASH_CHARS = set("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz.-_/")
_TAG_CHARS = set("-.0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz")

#: Bumped whenever a job gains an input after creation (add_input in update()), so graphs recompute their jobs.
inputs_version = [0]


class JobSingleton(type):
    def __call__(cls, *args, **kwargs):
        tags = kwargs.pop("sis_tags", None)  # not an argument: never hashed
        for tag in tags or ():
            if not set(tag) <= _TAG_CHARS:
                raise ValueError(f"{cls.__qualname__}: sis_tags entry {tag!r} may only hold [-._0-9A-Za-z]")
        parsed_args = _bind_arguments(cls, args, kwargs)
        job_id = f"{cls._sis_module_path()}/{cls.__name__}.{cls._sis_hash_static(parsed_args)}"
        job = created_jobs.get(job_id)
        if job is None:
            if tags is None:  # a job carries the tags of its inputs
                tags = set().union(*(p.tags for p in extract_paths(parsed_args)))
            job = cls.__new__(cls)
            job._sis_id_cache = job_id
            job._sis_tags = set(tags)
            # Copies, so that a caller changing its dict later cannot change the job behind its id.
            job._sis_init(*copy.deepcopy((args, kwargs, parsed_args)))
            created_jobs[job_id] = job
        for active in block.active_blocks:
            active.add_job(job)
            job._sis_blocks.add(active)
        job._sis_alias_prefixes.add(gs.ALIAS_AND_OUTPUT_SUBDIR)
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
        self._sis_alias_prefixes = set()
        self._sis_vis_name = None
        self._sis_keep_value = None
        self._sis_task_rqmt_overwrite = {}
        self._sis_hold_job = False
        self._sis_blocks = set()
        self._sis_environment = EnvironmentModifier()
        self._sis_environment.keep(gs.DEFAULT_ENVIRONMENT_KEEP)
        self._sis_environment.set(gs.DEFAULT_ENVIRONMENT_SET)
        self._sis_inputs = set()
        self._sis_runtime_reset()
        if gs.AUTO_SET_JOB_INIT_ATTRIBUTES:
            self.set_attrs(parsed_args)
        self.__init__(*args, **kwargs)
        found = extract_paths([self.__dict__, args, kwargs])
        self._sis_inputs.update(p for p in found if p.creator is not self)
        for path in self._sis_inputs:
            path.add_user(self)

    def _sis_runtime_reset(self):
        """Bookkeeping of the running process, never pickled."""
        self._sis_finished_cache = False
        self._sis_setup_since_start = False
        self._sis_task_cache = None
        self._sis_blocks = set()

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
            return gs.SIS_HASH(d)
        return gs.SIS_HASH((d, cls.__sis_version__))

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

    def output_var(self, filename, pickle=False, backup=NoBackup):
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

    def get_one_alias(self):
        """One of the job's aliases (the first in sorted order), or None."""
        return min(self._sis_aliases) if self._sis_aliases else None

    def _sis_alias_links(self):
        """alias/<prefix>/<alias> paths (relative to the setup) for every alias and ALIAS_AND_OUTPUT_SUBDIR
        prefix the job was created under."""
        prefixes = getattr(self, "_sis_alias_prefixes", None) or {""}
        return sorted({os.path.join(gs.ALIAS_DIR, prefix, alias) for prefix in prefixes for alias in self._sis_aliases})

    def set_vis_name(self, vis_name):
        """Name shown for this job on the web page and in the manager's overview."""
        self._sis_vis_name = vis_name
        return self

    def get_vis_name(self):
        return self._sis_vis_name

    @property
    def tags(self):
        return self._sis_tags

    def add_input(self, path):
        """Declare `path` an input (typically in update(), for a path found only once the inputs exist)."""
        if not isinstance(path, AbstractPath):
            raise TypeError(f"{self}: add_input needs a tk.Path or tk.Variable, not {type(path).__name__}")
        if path not in self._sis_inputs:
            self._sis_inputs.add(path)
            path.add_user(self)
            inputs_version[0] += 1
        return path

    def update(self):
        """Called by the manager once all current inputs are available, before the job runs; may add_input()."""

    def path_available(self, path):
        """Whether output `path` of this job can be used; default: once the whole job finished."""
        return self._sis_finished()

    def keep_value(self, value=None):
        """Keep value (0-99) for tk.cleaner: with an argument it is set; returns the current one (None: default)."""
        if value is not None:
            if not 0 <= value < 100:
                raise ValueError(f"{self}: keep value must be in [0, 100), not {value!r}")
            self._sis_keep_value = value
        return self._sis_keep_value

    def set_keep_value(self, value):
        self.keep_value(value)
        return self

    def set_rqmt(self, task_name, rqmt):
        """Replace the requirements of task `task_name` by `rqmt`."""
        self._sis_task_rqmt_overwrite[task_name] = (dict(rqmt), True)
        self._sis_task_cache = None
        return self

    def update_rqmt(self, task_name, rqmt):
        """Update the requirements of task `task_name` with the entries of `rqmt`."""
        old, replace = self._sis_task_rqmt_overwrite.get(task_name, ({}, False))
        self._sis_task_rqmt_overwrite[task_name] = (dict(old, **rqmt), replace)
        self._sis_task_cache = None
        return self

    def set_env(self, key, value, verbatim=True):
        """Set environment variable `key` for this job's tasks (with verbatim=False, $VARS in value are expanded)."""
        self._sis_environment.set(key, value, verbatim)
        return self

    def hold(self):
        """Never submit this job (state 'hold'); jobs depending on it wait."""
        self._sis_hold_job = True
        return self

    def info(self):
        """A short text about the running job for the web page (override); None: nothing to show."""
        return None

    def completed_fraction(self):
        """Progress of the running job in [0, 1] for the web page (override); None: unknown."""
        return None

    def set_attrs(self, attrs):
        """Set every entry of `attrs` (e.g. locals()) as an attribute, except self and existing attributes."""
        for key, value in attrs.items():
            if key == "self" or value is self:
                continue
            if hasattr(self, key):
                logging.warning("%s: not overwriting attribute %s", self, key)
            else:
                setattr(self, key, value)

    def set_default(self, name, value):
        """Set attribute `name` to `value` if it is None (deprecated upstream helper)."""
        if getattr(self, name) is None:
            setattr(self, name, value)
            if isinstance(value, AbstractPath):
                self.add_input(value)

    def sh(self, command, *args, **kwargs):
        """Run a shell command with `{name}` replaced by the job's attributes (and keyword arguments)."""
        return sh(command, *args, sis_quiet=False, sis_replace=self.__dict__, **kwargs)

    def tasks(self):
        yield Task("run")

    # Folder and state.
    def _sis_path(self, name=None, task_id=None, abspath=False):
        """The job folder, or `name` inside it (an absolute name is returned as it is), with '.<task_id>' appended
        if given; relative to the setup directory unless abspath (upstream's signature)."""
        path = os.path.join(gs.WORK_DIR, self._sis_id_cache)
        if name is not None:
            path = os.path.join(path, name)
        if task_id is not None:
            path += f".{task_id}"
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
                    rqmt, replace = getattr(self, "_sis_task_rqmt_overwrite", {}).get(task.name(), ({}, False))
                    if rqmt or replace:
                        base = task._rqmt() if callable(task._rqmt) else task._rqmt
                        task._rqmt = dict(rqmt) if replace else dict(base, **rqmt)
            except Exception as e:
                raise SisError(f"{self}: tasks() of {type(self).__module__}.{type(self).__qualname__} failed: "
                               f"{type(e).__name__}: {e}") from e
            self._sis_task_cache = tasks
        return self._sis_task_cache

    def _sis_setup(self):
        return os.path.isdir(self._sis_path(abspath=True))

    def _sis_runnable(self):
        """True once every input is available; then update() runs, and the check repeats if it added inputs."""
        while all(path.available() for path in self._sis_inputs):
            before = len(self._sis_inputs)
            previous = block.active_blocks
            block.active_blocks = self._sis_blocks
            try:
                self.update()
            finally:
                block.active_blocks = previous
            if len(self._sis_inputs) == before:
                return True
        return False

    @finished_results_cache.caching(get_key=lambda self: ("job", self._sis_path()))
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
            write_atomically(marker, b"")
            self._sis_finished_cache = True
        return self._sis_finished_cache

    def _sis_setup_directory(self):
        """Create the job folder (atomically: built under a temporary name, then renamed), and write job.save
        once per manager run so that it holds the current recipe state."""
        path = self._sis_path(abspath=True)
        if self._sis_setup_since_start and os.path.isdir(path):
            return
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        remove_stale_temporaries(parent, "." + os.path.basename(path) + ".setup.")
        if os.path.isdir(path):
            remove_stale_temporaries(path)
            self._sis_fill_directory(path)
        else:
            tmp = tempfile.mkdtemp(dir=parent, prefix=temporary_prefix("." + os.path.basename(path) + ".setup."))
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
        info = [f"TAG: {tag}" for tag in sorted(self._sis_tags or ())]
        info += [f"INPUT: {p.get_path()}" for p in sorted(self._sis_inputs)]
        info += [f"PARAMETER: {key}: {value!r}" for key, value in self._sis_kwargs.items()]
        info += [f"ALIAS: {alias}" for alias in sorted(self._sis_aliases)]
        write_atomically(os.path.join(path, gs.JOB_INFO), ("\n".join(info) + "\n").encode())

    # Python protocol.
    def __getstate__(self):
        state = self.__dict__.copy()
        for key in ("_sis_finished_cache", "_sis_setup_since_start", "_sis_task_cache", "_sis_blocks"):
            state.pop(key, None)
        return state

    def __setstate__(self, state):
        defaults = {"_sis_tags": set(), "_sis_alias_prefixes": set(), "_sis_vis_name": None, "_sis_keep_value": None,
                    "_sis_task_rqmt_overwrite": {}, "_sis_hold_job": False, "_sis_environment": None}
        self.__dict__.update(defaults)  # jobs saved by older versions
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
