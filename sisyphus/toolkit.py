"""Functions for configs and recipes (`tk.*`)."""
import os

from sisyphus.graph import SISGraph
from sisyphus.job_path import Path, Variable
from sisyphus.tools import extract_paths

__all__ = ["Path", "Variable", "register_output", "uncached_path", "input_path", "async_run", "async_gather",
           "running_in_manager", "running_in_worker", "setup_path", "zipped", "sis_graph"]

#: The graph the configs build; the manager runs it.
sis_graph = SISGraph()

_sis_running_in_worker = False
_sis_running_in_manager = False


def register_output(name, value):
    """Link output/<name> to `value` (a Path or Variable) once it is computed; the manager computes what it needs."""
    sis_graph.add_output(name, value)


def uncached_path(path):
    """The absolute path of a tk.Path, or the string itself."""
    return path.get_path() if isinstance(path, Path) else str(path)


def input_path(path):
    """A tk.Path for a string (a Path is returned unchanged)."""
    return path if isinstance(path, Path) else Path(path)


def zipped(filename):
    """True if the file starts with the gzip magic bytes."""
    with open(str(filename), "rb") as f:
        return f.read(2) == b"\x1f\x8b"


async def async_run(obj):
    """In an `async def py()` config: wait until every Path/Variable in `obj` is computed; the manager runs the
    jobs they need meanwhile."""
    import asyncio  # imported here: workers, which never need it, start faster

    paths = extract_paths(obj)
    if all(p.available() for p in paths):
        return
    future = asyncio.get_running_loop().create_future()
    sis_graph.add_waiter(paths, future)
    await future


async def async_gather(*awaitables):
    """Run several config coroutines side by side (asyncio.gather)."""
    import asyncio

    return await asyncio.gather(*awaitables)


def running_in_worker():
    """True inside `sis worker` (a task is running)."""
    return _sis_running_in_worker


def running_in_manager():
    """True inside `sis manager` (configs are being loaded or the graph is being run)."""
    return _sis_running_in_manager


class RelPath:
    """Makes Paths relative to a package folder, hashed by a name that does not depend on where the setup is."""

    def __init__(self, origin, hash_prefix):
        self.origin = origin
        self.hash_prefix = hash_prefix

    def __call__(self, path, *args, **kwargs):
        if self.hash_prefix and "hash_overwrite" not in kwargs and len(args) < 3:
            kwargs["hash_overwrite"] = os.path.join(self.hash_prefix, path)
        if not os.path.isabs(path):
            path = os.path.relpath(os.path.join(self.origin, path))
        return Path(path, *args, **kwargs)


def setup_path(package):
    """`rel_path = setup_path(__package__)`: rel_path('data.txt') is a Path next to the calling module."""
    import importlib

    if not package:
        raise ValueError("setup_path(__package__) works only in modules inside a package")
    module = importlib.import_module(package)
    if not getattr(module, "__file__", None):
        raise ValueError(f"setup_path({package!r}): {package.replace('.', '/')}/__init__.py does not exist")
    return RelPath(os.path.relpath(os.path.dirname(module.__file__)), package.replace(".", "/"))
