"""Small helpers shared by the manager, the worker, the engines, configs and recipes (`sisyphus.tools`)."""
import collections
import enum
import functools
import inspect
import logging
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import sisyphus.global_settings as gs

#: Marks the temporary files and folders the engine writes in job folders; the rest of the name says who wrote it.
TEMPORARY_MARK = ".sistmp."
_HOST = socket.gethostname().replace(".", "_")
#: A temporary of another machine is stale after this many seconds (its writer cannot be asked).
FOREIGN_TEMPORARY_AGE = 24 * 3600


def temporary_prefix(prefix):
    """`prefix` + a mark naming this host and process, so that a later run can tell a killed writer's leftovers."""
    return f"{prefix}{TEMPORARY_MARK}{_HOST}.{os.getpid()}."


def remove_stale_temporaries(folder, prefix=""):
    """Remove temporaries (made with temporary_prefix) in `folder` whose writer is gone: a process of this host
    that no longer runs, or anything older than a day from another host. Returns the names removed."""
    import psutil

    removed = []
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return removed
    for name in names:
        if not name.startswith(prefix) or TEMPORARY_MARK not in name:
            continue
        host, _, rest = name.rpartition(TEMPORARY_MARK)[2].partition(".")
        pid = rest.partition(".")[0]
        path = os.path.join(folder, name)
        if host == _HOST and pid.isdigit():
            stale = int(pid) != os.getpid() and not psutil.pid_exists(int(pid))
        else:
            try:
                stale = time.time() - os.lstat(path).st_mtime > FOREIGN_TEMPORARY_AGE
            except FileNotFoundError:
                continue
        if stale:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            removed.append(name)
    if removed:
        logging.info("removed %d stale temporaries in %s: %s", len(removed), folder, " ".join(sorted(removed)))
    return removed


def write_atomically(path, data):
    """Write bytes to `path` through a temporary file and a rename: readers see the old or the new file, whole."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=temporary_prefix("." + os.path.basename(path)))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def extract_paths(obj):
    """Every Path/Variable reachable from `obj` through containers and object attributes.

    Attributes and dict keys starting with `_sis_` are skipped (a job's own bookkeeping), as are enums.
    """
    found = set()
    seen = {}  # id -> object, keeps the objects alive so ids stay unique
    todo = [obj]
    while todo:
        item = todo.pop()
        if id(item) in seen:
            continue
        seen[id(item)] = item
        if item is None or isinstance(item, (bool, int, float, complex, str, bytes, enum.Enum)):
            continue
        if getattr(item, "_sis_path", False) is True and not inspect.isclass(item):
            found.add(item)
        elif isinstance(item, (list, tuple, set, frozenset)):
            todo.extend(item)
        elif isinstance(item, dict):
            todo.extend(v for k, v in item.items() if not (isinstance(k, str) and k.startswith("_sis_")))
        elif isinstance(item, functools.partial):
            todo.extend((item.func, item.args, item.keywords))
        elif inspect.isclass(item) or inspect.isroutine(item) or inspect.ismodule(item):
            continue
        elif hasattr(item, "__sis_state__"):
            todo.append(item.__sis_state__())
        elif hasattr(item, "__dict__"):
            todo.extend(v for k, v in vars(item).items() if not k.startswith("_sis_"))
        elif hasattr(item, "__slots__"):
            todo.extend(getattr(item, k) for k in item.__slots__ if hasattr(item, k) and not k.startswith("_sis_"))
    return found


def str_to_gb(value):
    """Memory as GB: a number (GB) or a string with a unit suffix K, M, G or T."""
    try:
        return float(value)
    except ValueError:
        pass
    text = str(value).strip().upper().rstrip("B")
    factors = {"K": 1 / 1024**2, "M": 1 / 1024, "G": 1.0, "T": 1024.0}
    if text and text[-1] in factors:
        return float(text[:-1]) * factors[text[-1]]
    raise ValueError(f"memory requirement {value!r} is neither a number of GB nor a size like '500M' or '4G'")


str_to_GB = str_to_gb  # upstream's name


def str_to_hours(value):
    """Time as hours: a number (hours) or a string 'H:MM:SS' / 'H:MM'."""
    try:
        return float(value)
    except ValueError:
        pass
    fields = str(value).split(":")
    if len(fields) in (2, 3) and all(f.strip().isdigit() for f in fields):
        seconds = sum(int(f) * 60**i for i, f in enumerate(reversed(fields if len(fields) == 3 else fields + ["0"])))
        return seconds / 3600
    raise ValueError(f"time requirement {value!r} is neither a number of hours nor 'H:MM:SS'")


def tail(path, lines):
    """The last `lines` lines of a text file ('' if it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 200 * lines))
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def try_get(value):
    """`value.get()` for a delayed value (Path, Variable, DelayedFormat, ...), else the value itself."""
    from sisyphus.delayed_ops import try_get as delayed_try_get

    return delayed_try_get(value)


def sis_hash(obj):
    """The 12-character hash of an object's value (gs.SIS_HASH, by default hash.short_hash)."""
    return gs.SIS_HASH(obj)


class execute_in_dir:
    """`with execute_in_dir(folder):` runs the block in `folder`, then returns to the previous directory."""

    def __init__(self, workdir):
        self.workdir = workdir

    def __enter__(self):
        self.base_dir = os.getcwd()
        os.chdir(self.workdir)

    def __exit__(self, exc_type, exc_value, traceback):
        os.chdir(self.base_dir)


class cache_result:
    """Decorator: cache a function's result for `cache_time` seconds per argument list. Calling it with the
    keyword named by `force_update` set recomputes; with the keyword named by `clear_cache` empties the cache."""

    def __init__(self, cache_time=30, force_update=None, clear_cache=None):
        self.cache = {}
        self.time = collections.defaultdict(float)
        self.cache_time = cache_time
        self.force_update = force_update
        self.clear_cache = clear_cache

    def __call__(self, function):
        def cached(*args, **kwargs):
            if self.clear_cache and self.clear_cache in kwargs:
                self.cache = {}
                return None
            update = bool(self.force_update and kwargs.pop(self.force_update, False))
            key = str((function, args, kwargs))
            if update or key not in self.cache or time.time() - self.time[key] > self.cache_time:
                self.cache[key] = function(*args, **kwargs)
                self.time[key] = time.time()
            return self.cache[key]

        return cached


def hardlink_or_copy(src, dst, use_symlink_instead_of_copy=False):
    """Recreate the folder tree `src` at `dst` (existing folders and files there are kept), each file a hard
    link to its source, or where linking fails (another file system) a copy, or a symlink if asked."""
    for folder, _, files in os.walk(src):
        target = os.path.join(dst, os.path.relpath(folder, src))
        os.makedirs(target, exist_ok=True)
        for name in files:
            source, destination = os.path.join(folder, name), os.path.join(target, name)
            if os.path.lexists(destination):
                continue
            try:
                os.link(source, destination)
            except OSError as e:
                logging.warning("Could not hardlink %s to %s (%s), %s it", source, destination, e.strerror,
                                "symlink" if use_symlink_instead_of_copy else "copy")
                if use_symlink_instead_of_copy:
                    os.symlink(os.path.abspath(source), destination)
                else:
                    shutil.copy2(source, destination)


class FinishedResultsCache:
    """Results that stay true once true (a job finished, a path available), remembered while
    gs.CACHE_FINISHED_RESULTS is set so that a large graph does not look at every finished job's folder on
    every pass; kept between manager runs in gs.CACHE_FINISHED_RESULTS_PATH."""

    def __init__(self, cache_file):
        self.cache_file = cache_file
        self.cache = {}
        self.changed = False

    def read_from_file(self):
        try:
            with open(self.cache_file, "rb") as f:
                self.cache = pickle.load(f)
            logging.info("Loaded cached results from %s", self.cache_file)
        except FileNotFoundError:
            pass
        except Exception as e:  # a damaged cache only costs the time to look again
            logging.warning("Cannot read the cached results in %s (%s); starting with an empty cache",
                            self.cache_file, e)

    def write_to_file(self):
        if self.changed:
            write_atomically(self.cache_file, pickle.dumps(dict(self.cache)))
            self.changed = False

    def __getitem__(self, key):
        return self.cache[key]

    def __setitem__(self, key, value):
        self.cache[key] = value
        self.changed = True

    def reset(self):
        self.cache = {}
        self.changed = True

    def caching(self, get_key=lambda x: x, cache_if=lambda result, *args, **kwargs: result is True):
        """Decorator: with gs.CACHE_FINISHED_RESULTS, the result for get_key(*args) is kept once cache_if
        accepts it (default: once it is True)."""

        def decorator(function):
            @functools.wraps(function)
            def cached(*args, **kwargs):
                if not gs.CACHE_FINISHED_RESULTS:
                    return function(*args, **kwargs)
                key = get_key(*args, **kwargs)
                try:
                    return self[key]
                except KeyError:
                    pass
                result = function(*args, **kwargs)
                if cache_if(result, *args, **kwargs):
                    self[key] = result
                return result

            return cached

        return decorator


finished_results_cache = FinishedResultsCache(gs.CACHE_FINISHED_RESULTS_PATH)


def sh(command, capture_output=False, pipefail=True, executable=None, except_return_codes=(0,), sis_quiet=False,
       sis_replace=None, include_stderr=False, **kwargs):
    """Run `command` in bash after `command.format(**sis_replace, **kwargs)`; with pipefail, a failing part of a
    pipe fails the whole. Raises CalledProcessError unless the exit status is in except_return_codes; with
    capture_output returns the output as str."""
    replace = dict(sis_replace or {})
    replace.update(kwargs)
    command = command.format(**replace)
    if not sis_quiet:
        logging.info("Run in Shell%s: %s", " (capture output)" if capture_output else "", command)
    sys.stdout.flush()
    sys.stderr.flush()
    if executable is None:
        executable = "/bin/bash"
        if pipefail:
            command = "set -ueo pipefail && " + command
    try:
        if capture_output:
            return subprocess.check_output(command, shell=True, executable=executable,
                                           stderr=subprocess.STDOUT if include_stderr else None).decode()
        subprocess.check_call(command, shell=True, executable=executable)
    except subprocess.CalledProcessError as e:
        if e.returncode not in except_return_codes:
            raise
        if capture_output:
            return e.output.decode() if isinstance(e.output, bytes) else e.output
    return None


class EnvironmentModifier:
    """The environment a job's tasks run in: with gs.CLEANUP_ENVIRONMENT, only the kept variables survive, then
    the set ones are set (a value that is not verbatim has its $VARS expanded)."""

    def __init__(self):
        self.keep_vars = set()
        self.set_vars = {}

    def keep(self, var):
        if isinstance(var, str):
            self.keep_vars.add(var)
        else:
            self.keep_vars.update(var)

    def set(self, var, value=None, verbatim=True):
        if isinstance(var, dict):
            self.set_vars.update({k: (v, True) for k, v in var.items()})
        else:
            self.set_vars[var] = (value, verbatim)

    def modify_environment(self, cleanup=True):
        """Apply to os.environ (cleanup=False: only set, keep everything else)."""
        original = dict(os.environ)
        if cleanup:
            for key in list(os.environ):
                if key not in self.keep_vars:
                    del os.environ[key]
        for key, (value, verbatim) in self.set_vars.items():
            value = str(value)
            if not verbatim:
                value = os.path.expandvars(value.replace("$" + key, original.get(key, "")))
            os.environ[key] = value
