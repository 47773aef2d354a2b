"""Functions for configs, recipes and the console (`tk.*`), with the names of the reference Sisyphus."""
import gzip
import logging
import os
import pickle
import shutil
import tarfile
import tempfile

import sisyphus.block as _blocks
import sisyphus.global_settings as gs
from sisyphus.block import block, set_root_block, sub_block
from sisyphus.delayed_ops import Delayed, DelayedBase, DelayedFormat, DelayedJoin
from sisyphus.graph import SISGraph
from sisyphus.job import Job
from sisyphus.job_path import AbstractPath, Path, Variable, VariableNotSet
from sisyphus.tools import extract_paths, sh

__all__ = ["Path", "Variable", "AbstractPath", "VariableNotSet", "Job", "gs", "Delayed", "DelayedBase",
           "DelayedFormat", "DelayedJoin", "Object", "RelPath", "BlockedWorkflow", "register_output",
           "register_callback", "register_report", "uncached_path", "input_path", "is_path", "bundle_to_str",
           "async_run", "async_gather", "running_in_manager", "running_in_worker", "setup_path", "zipped",
           "sis_graph", "block", "sub_block", "set_root_block", "sh", "mktemp", "dump", "load_file", "load_job",
           "find_job", "find_path", "setup_job_directory", "run_job", "run", "cached_engine", "export_graph",
           "remove_job_and_descendants", "import_work_directory", "cleaner", "current_config", "async_context"]


class BlockedWorkflow(Exception):
    """tk.run could not finish: a job it needs failed."""


class Object:
    """A plain object to hang attributes on."""

#: The graph the configs build; the manager runs it.
sis_graph = SISGraph()

_sis_running_in_worker = False
_sis_running_in_manager = False


def register_output(name, value, export_graph=False):
    """Link output/<name> (output/<ALIAS_AND_OUTPUT_SUBDIR>/<name>) to `value`, a Path or Variable, once it is
    computed; the manager computes what it needs."""
    full_name = os.path.join(gs.ALIAS_AND_OUTPUT_SUBDIR, name) if gs.ALIAS_AND_OUTPUT_SUBDIR else name
    sis_graph.add_output(full_name, value)
    if export_graph:
        dump(value, os.path.join(gs.OUTPUT_DIR, gs.ALIAS_AND_OUTPUT_SUBDIR, f".{name}.sis"))


def register_callback(f, *args, **kwargs):
    """Call f(*args, **kwargs) in the manager once every registered output is computed."""
    if not callable(f):
        raise TypeError(f"tk.register_callback needs a callable, not {f!r}")
    sis_graph.callbacks.append((f, args, kwargs))


def register_report(name, values, template=None, required=None, update_frequency=300):
    """Write output/<name>: `values` (or `template(values)` / `template.format(**values)`) with every delayed value
    read, once the paths in `required` (default: all in `values`) are computed; rewritten while the manager runs."""
    full_name = os.path.join(gs.ALIAS_AND_OUTPUT_SUBDIR, name) if gs.ALIAS_AND_OUTPUT_SUBDIR else name
    report = {"name": full_name, "values": values, "template": template,
              "required": extract_paths(values if required is None else required),
              "update_frequency": update_frequency}
    sis_graph.add_report(report)
    return report


def uncached_path(path):
    """The absolute path of a tk.Path, or the string itself."""
    return path.get_path() if isinstance(path, AbstractPath) else str(path)


def input_path(path):
    """A tk.Path for a string (a Path is returned unchanged)."""
    return path if isinstance(path, AbstractPath) else Path(path)


def is_path(path):
    return isinstance(path, AbstractPath)


def bundle_to_str(bundle):
    """Space separated str() of the items (sorted if a set)."""
    return " ".join(str(item) for item in (sorted(bundle) if isinstance(bundle, set) else bundle))


def current_config():
    """The config file being loaded (None outside config loading)."""
    return current_config_


current_config_ = None


class async_context:
    """`with tk.async_context():` code outside the current config: no current config, no active blocks (restored
    at exit), so jobs created inside are not filed under the config's blocks."""

    def __enter__(self):
        global current_config_
        self.saved = current_config_, _blocks.active_blocks, _blocks.all_root_blocks
        current_config_, _blocks.active_blocks, _blocks.all_root_blocks = None, set(), []
        return self

    def __exit__(self, exc_type, exc_value, traceback):
        global current_config_
        current_config_, _blocks.active_blocks, _blocks.all_root_blocks = self.saved


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


class mktemp:
    """`with tk.mktemp() as name:` a fresh temporary path (gs.TMP_PREFIX...), removed with what is there at exit."""

    def __enter__(self):
        self.temp_path = tempfile.mktemp(prefix=gs.TMP_PREFIX)
        return self.temp_path

    def __exit__(self, exc_type, exc_value, traceback):
        if os.path.isdir(self.temp_path) and not os.path.islink(self.temp_path):
            shutil.rmtree(self.temp_path)
        elif os.path.lexists(self.temp_path):
            os.unlink(self.temp_path)


def dump(obj, filename):
    """Pickle `obj` into gzip file `filename` (folders created)."""
    folder = os.path.dirname(filename)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with gzip.open(filename, "wb") as f:
        pickle.dump(obj, f)


def load_file(path):
    """Unpickle a (possibly gzipped) file written by tk.dump."""
    opener = gzip.open if zipped(path) else open
    with opener(path, "rb") as f:
        return pickle.load(f)


def load_job(path):
    """The job saved in a job folder (its job.save, or the one inside finished.tar.gz), or in a job.save file."""
    if os.path.isfile(path) and not path.endswith(gs.JOB_FINISHED_ARCHIVE):
        return load_file(path)
    archive = path if os.path.isfile(path) else os.path.join(path, gs.JOB_FINISHED_ARCHIVE)
    saved = os.path.join(path, gs.JOB_SAVE)
    if os.path.isfile(saved):
        return load_file(saved)
    if not os.path.isfile(archive):
        raise FileNotFoundError(f"{path}: neither {gs.JOB_SAVE} nor {gs.JOB_FINISHED_ARCHIVE} found")
    with tarfile.open(archive) as tar, tar.extractfile(gs.JOB_SAVE) as f:
        return pickle.loads(gzip.decompress(f.read()))


def find_job(pattern):
    """Jobs of the graph whose id (or vis name) contains `pattern`, printed with a number."""
    jobs = sis_graph.find(pattern, mode="job")
    for i, job in enumerate(jobs):
        print(f"{i}: {job}")
    return jobs


def find_path(pattern):
    return sis_graph.find(pattern, mode="path")


def setup_job_directory(job):
    """Create the folder of `job` (or of the creator of a Path) if its inputs are available."""
    if isinstance(job, AbstractPath):
        job = job.creator
    if not isinstance(job, Job):
        raise TypeError(f"setup_job_directory needs a Job or a job's Path, not {job!r}")
    if not job._sis_runnable():
        missing = ", ".join(str(p) for p in sorted(job._sis_inputs) if not p.available())
        raise RuntimeError(f"{job}: inputs missing: {missing}")
    job._sis_setup_directory()
    logging.info("Set up %s", job)


def run_job(job, task_name=None, task_id=1, force_resume=False):
    """Run one task id of `job` here, in a worker process (for debugging from the console); returns its status."""
    import subprocess

    setup_job_directory(job)
    tasks = job._sis_tasks()
    task = tasks[0] if task_name is None else next((t for t in tasks if t.name() == task_name), None)
    if task is None:
        raise ValueError(f"{job}: no task {task_name!r} (tasks: {[t.name() for t in tasks]})")
    call = list(gs.SIS_COMMAND) + [gs.CMD_WORKER, job._sis_path(), task.name(), str(task_id)]
    if force_resume:
        call.append("--force_resume")
    return subprocess.call(call, cwd=gs.BASE_DIR)


_engine = None


def cached_engine(cache=None):
    """The engine of settings.py, created once per process."""
    global _engine
    if cache is not None:
        _engine = cache
    if _engine is None:
        _engine = gs.engine()
    return _engine


def run(obj, quiet=False):
    """Compute every Path/Variable in `obj` now (from the console or a script), running the jobs they need with
    the settings' engine; raises BlockedWorkflow if a needed job fails."""
    from sisyphus.loader import ConfigLoader
    from sisyphus.manager import Manager

    graph = SISGraph()
    for i, path in enumerate(sorted(extract_paths(obj))):
        graph.add_output(f"tk.run.{i}", path)
    loader = ConfigLoader()
    level = logging.getLogger("sisyphus").level
    if quiet:
        logging.getLogger("sisyphus").setLevel(logging.WARNING)
    try:
        status = Manager(graph, cached_engine(), loader, link_outputs=False).run()
    finally:
        logging.getLogger("sisyphus").setLevel(level)
        loader.close()
    if status != 0:
        raise BlockedWorkflow(f"tk.run: not every path could be computed: {sorted(extract_paths(obj))}")


def export_graph(output_file=None):
    """Pickle the registered outputs (name -> Path) into `output_file` (default: <OUTPUT_DIR>/graph.sis)."""
    dump(dict(sis_graph.outputs), output_file or os.path.join(gs.OUTPUT_DIR, "graph.sis"))


def remove_job_and_descendants(jobs, mode="remove"):
    """Delete (mode 'remove'), move aside ('move') or only list ('dryrun') the folders of `jobs` (Jobs, Paths or
    job folder strings) and of every job of the graph depending on them; asks before changing anything."""
    from sisyphus.cleanup import remove_job_and_descendants as remove

    return remove(sis_graph, jobs, mode)


def import_work_directory(directories, mode="dryrun"):
    """Link ('symlink') or copy ('copy') finished job folders of other work directories into this one for the
    graph's jobs that are not set up here; 'dryrun' only lists them."""
    from sisyphus.cleanup import import_work_directory as import_dirs

    return import_dirs(sis_graph, [directories] if isinstance(directories, str) else directories, mode)


def cleaner(clean_job_dir=False, clean_work_dir=False, mode="dryrun", keep_value=0, only_remove_current_graph=False):
    """Free disk space: with clean_work_dir, remove job folders under WORK_DIR that the graph does not need (never
    a running job; asks before deleting); with clean_job_dir, pack finished job folders into finished.tar.gz.
    mode: 'dryrun' (list only), 'move' (to <WORK_DIR>/../trash), 'remove'. Jobs of the graph with a keep value
    below `keep_value` that no unfinished job needs are removed as well."""
    from sisyphus.cleanup import cleaner as clean

    return clean(sis_graph, clean_job_dir, clean_work_dir, mode, keep_value, only_remove_current_graph)
