"""The reference Sisyphus API beyond the basics: delayed operations (and the ids of jobs taking them, computed by
hand from the hash format), Path/Variable semantics, tags, blocks, job helpers, settings, Variable files as data,
one-line errors of `sis worker` and of a broken engine(), stale temporaries."""
import math
import os

import pytest

import sisyphus.global_settings as gs
from sisyphus import Job, Task, tk
from sisyphus import block as block_module
from sisyphus.delayed_ops import (Delayed, DelayedAdd, DelayedBase, DelayedFallback, DelayedFormat, DelayedJoin,
                                  DelayedSlice)
from sisyphus.job_path import AbstractPath, Path, Variable, VariableNotSet, parse_literal
from sisyphus.tools import remove_stale_temporaries, sh, temporary_prefix, try_get
from sis_util import make_setup, run_sis
from test_sis_hash import base62_of_sha256  # the short hash written out from the contract


def s(text):
    return f"(str, {text!r})".encode()


def job_output(job_id, name):
    return b"(Path, (tuple, " + s(f"{job_id}/output") + b", " + s(name) + b"))"


def dict_bytes(items):
    """helper(dict): sorted helper((key, value)) of each item."""
    parts = sorted(b"(tuple, " + s(k) + b", " + v + b")" for k, v in items.items())
    return b"(dict, " + b", ".join(parts) + b")"


class Score(Job):
    def __init__(self, name):
        self.name = name
        self.out_score = self.output_var("score")
        self.out_dir = self.output_path("dir", directory=True)

    def run(self):
        pass


class Takes(Job):
    def __init__(self, value):
        self.value = value
        self.out = self.output_path("out")

    def run(self):
        pass


class Lister(Job):
    """Declares an input only in update(), once it can read the list of files its input names."""

    def __init__(self, listing):
        self.listing = listing
        self.out = self.output_path("out")

    def update(self):
        with open(self.listing.get_path()) as f:
            for name in f.read().split():
                self.add_input(tk.Path(name))

    def run(self):
        pass


def module_path():
    return __name__.replace(".", "/")


# Delayed operations.
def test_variable_arithmetic_and_formatting_read_the_current_value(setup_dir):
    job = Score("a")
    var = job.out_score
    total = var * 2 + 1
    text = DelayedFormat("score={}, half={:.1f}", var, var / 2)
    assert isinstance(total, DelayedAdd) and not total.is_set() and not text.is_set()
    os.makedirs(os.path.dirname(var.get_path()))
    var.set(3)
    assert total.is_set() and total.get() == 7 and text.get() == "score=3, half=1.5"
    assert (10 - var).get() == 7 and (var ** 2).get() == 9 and (7 // var).get() == 2 and (var % 2).get() == 1
    assert round(var / 7, 2).get() == 0.43 and (2 ** var).get() == 8
    assert DelayedJoin([var.function(str), "x", Delayed("y")], "-").get() == "3-x-y"
    assert DelayedSlice([1, 2, 3, 4, 5], 1, var).get() == [2, 3]
    assert var.rformat("<{}>").get() == "<3>" and tk.Delayed([1, 2])[var - 2].get() == 2
    assert try_get(var) == 3 and try_get(5) == 5


def test_fallback_until_the_variable_is_set(setup_dir):
    var = Score("fallback").out_score
    chosen = var.fallback("default")
    assert isinstance(chosen, DelayedFallback) and chosen.get() == "default"
    os.makedirs(os.path.dirname(var.get_path()))
    var.set("real")
    assert chosen.get() == "real"


def test_ids_of_jobs_taking_delayed_values_follow_the_hash_format(setup_dir):
    score = Score("x")
    var = score.out_score
    var_bytes = job_output(score.job_id(), "score")

    job = Takes(DelayedFormat("{}-x", var))
    fmt = b"(DelayedFormat, " + dict_bytes({"string": s("{}-x"), "args": b"(tuple, " + var_bytes + b")",
                                            "kwargs": b"(dict)"}) + b")"
    assert job.job_id() == f"{module_path()}/Takes.{base62_of_sha256(dict_bytes({'value': fmt}))}"

    job = Takes(var + 1)
    add = b"(DelayedAdd, " + dict_bytes({"a": var_bytes, "b": b"(int, 1)"}) + b")"
    assert job.job_id() == f"{module_path()}/Takes.{base62_of_sha256(dict_bytes({'value': add}))}"

    # tk.Delayed(x) is hashed as x itself.
    assert Takes(Delayed("plain")).job_id() == Takes("plain").job_id()


def test_join_right_and_copy_append_keep_creator_and_hash_overwrite(setup_dir):
    job = Score("paths")
    model = job.out_dir.join_right("model.bin")
    assert model.creator is job and model.get_path() == job.out_dir.get_path() + "/model.bin"
    assert model is not job.out_dir and job.out_dir.path == "dir"
    expected = job_output(job.job_id(), "dir/model.bin")
    assert Takes(model).job_id().endswith(base62_of_sha256(dict_bytes({"value": expected})))

    data = Path("/data/x", hash_overwrite="pkg/x")
    joined = data.copy_append(".gz")
    assert joined.get_path() == "/data/x.gz" and joined.hash_overwrite == (None, "pkg/x.gz")
    path_bytes = b"(Path, (tuple, (NoneType), " + s("pkg/x.gz") + b"))"
    assert Takes(joined).job_id().endswith(base62_of_sha256(dict_bytes({"value": path_bytes})))


def test_path_and_variable_semantics(setup_dir, monkeypatch):
    job = Score("semantics")
    assert not isinstance(job.out_score, Path) and isinstance(job.out_score, AbstractPath)
    assert isinstance(job.out_dir, DelayedBase) and tk.is_path(job.out_score)
    assert repr(job.out_dir) == f"<Path {job.out_dir.get_path()}>"
    assert not job.out_dir.is_set() and not DelayedFormat("{}/x", job.out_dir).is_set()
    assert repr(job.out_score) == f"<Variable {job.out_score.rel_path()}>"
    assert job.out_score.get().startswith("<UNFINISHED VARIABLE")
    monkeypatch.setattr(gs, "RAISE_VARIABLE_NOT_SET_EXCEPTION", True)
    with pytest.raises(VariableNotSet):
        job.out_score.get()
    assert Variable("v", backup=5).get() == 5
    calls = []
    custom = Path("never/exists", available=lambda p: calls.append(p) or True)
    assert custom.available() and calls == [custom]


def test_tags_blocks_and_vis_names_leave_ids_alone(setup_dir):
    plain_id = Score("tagged").job_id()
    tagged = Score("tagged", sis_tags={"de-en"})
    assert tagged.job_id() == plain_id
    untagged_new = Score("other", sis_tags={"en"})
    assert Takes(untagged_new.out_score).tags == {"en"}  # a job carries its inputs' tags
    with pytest.raises(ValueError, match="sis_tags"):
        Score("bad", sis_tags={"a b"})
    with tk.block("outer") as outer:
        inner_job = Takes("in block")
        with tk.block("inner"):
            deeper = Takes("deeper")
        with tk.async_context():
            outside = Takes("outside any block")
    assert outside not in outer.children and block_module.active_blocks == set()
    assert inner_job in outer.children and [b.name for b in outer.get_sub_blocks()] == ["inner"]
    assert deeper in outer.get_sub_blocks()[0].children
    assert inner_job.set_vis_name("Nice name") is inner_job and inner_job.get_vis_name() == "Nice name"


def test_update_adds_inputs_once_the_known_ones_exist(setup_dir):
    listing = setup_dir / "listing.txt"
    extra = setup_dir / "extra.txt"
    job = Lister(tk.Path(str(listing)))
    assert not job._sis_runnable()
    listing.write_text(str(extra))
    assert not job._sis_runnable()  # update() added extra.txt, which does not exist yet
    assert tk.Path(str(extra)) in job._sis_inputs
    extra.write_text("x")
    assert job._sis_runnable()


def test_job_helpers(setup_dir, tmp_path):
    job = Score("helpers")
    assert job.keep_value() is None and job.set_keep_value(70).keep_value() == 70
    with pytest.raises(ValueError):
        job.keep_value(100)
    job.update_rqmt("run", {"mem": 3}).set_rqmt("other", {"cpu": 4})
    assert job._sis_tasks()[0].rqmt() == {"mem": 3.0}
    assert job.add_alias("nice").get_one_alias() == "nice"
    out = tmp_path / "sh.txt"
    job.sh("echo {name} > {target}", target=str(out))
    assert out.read_text() == "helpers\n"
    assert sh("echo hi | tr a-z A-Z", capture_output=True) == "HI\n"
    with pytest.raises(Exception):
        sh("false | cat")  # pipefail


def test_task_options():
    task = Task("run", tries=3, continuable=True, update_rqmt=lambda rqmt, usage: dict(rqmt, mem=9))
    assert task.tries == 3 and task.continuable and task.update_rqmt({"mem": 1}, {}) == {"mem": 9}
    with pytest.raises(ValueError):
        Task("run", tries=0)
    assert Task("run", rqmt=lambda: {"mem": "2G"}).rqmt() == {"mem": 2.0}


# Settings.
def test_every_upstream_setting_has_a_default():
    names = ["ALIAS_AND_OUTPUT_SUBDIR", "DEFAULT_ENVIRONMENT_SET", "DEFAULT_ENVIRONMENT_KEEP", "CLEANUP_ENVIRONMENT",
             "TMP_PREFIX", "file_caching", "SIS_COMMAND", "JOB_FINAL_LOG", "JOB_AUTO_CLEANUP",
             "JOB_DEFAULT_KEEP_VALUE", "SHOW_JOB_TARGETS", "PRINT_ERROR_LINES", "worker_wrapper",
             "update_engine_rqmt", "check_engine_limits", "on_job_failure", "on_job_finished",
             "WAIT_PERIOD_BETWEEN_CHECKS", "WAIT_PERIOD_JOB_FS_SYNC", "WAIT_PERIOD_JOB_CLEANUP", "SIS_HASH",
             "IMPORT_PATHS", "RAISE_VARIABLE_NOT_SET_EXCEPTION", "LEGACY_PATH_CONVERSION", "JOB_CLEANUP_KEEP_WORK"]
    assert [n for n in names if not hasattr(gs, n)] == []
    assert gs.ALIAS_AND_OUTPUT_SUBDIR == "" and gs.CLEANUP_ENVIRONMENT is True and gs.JOB_DEFAULT_KEEP_VALUE == 50
    assert gs.DEFAULT_ENVIRONMENT_SET["OMP_NUM_THREADS"] == 1 and "HOME" in gs.DEFAULT_ENVIRONMENT_KEEP
    assert gs.update_engine_rqmt({"time": 1, "mem": 2}, {"used_time": 0.95, "max_rss_gb": 0.1,
                                                        "requested_resources": {"time": 1, "mem": 2}}) == \
        {"time": 2, "mem": 2}


SETTINGS_FOR_UPSTREAM = '''
DEFAULT_ENVIRONMENT_SET["MY_SETTING"] = "from settings"
DEFAULT_ENVIRONMENT_KEEP.add("SIS_TEST_SETUP")
DEFAULT_ENVIRONMENT_KEEP.add("PYTHONPATH")
WAIT_PERIOD_BETWEEN_CHECKS = 0.5
WAIT_PERIOD_JOB_FS_SYNC = 0
JOB_AUTO_CLEANUP = False


def engine():
    from sisyphus.localengine import LocalEngine
    return LocalEngine(cpu=1, mem=1)
'''

ENV_RECIPE = '''
import os
from sisyphus import Job, Task


class Env(Job):
    def __init__(self):
        self.out = self.output_var("env")

    def run(self):
        self.out.set({k: os.environ.get(k) for k in ("MY_SETTING", "MY_JOB_VAR", "HOME_COPY_CHECK", "OMP_NUM_THREADS")})
'''

ENV_CONFIG = '''
from sisyphus import tk
from env import Env


def py():
    tk.register_output("env", Env().set_env("MY_JOB_VAR", "job value").out)
'''


def test_settings_written_for_upstream_change_the_task_environment(tmp_path):
    setup = make_setup(tmp_path, recipes={"env": ENV_RECIPE}, configs={"env": ENV_CONFIG},
                       settings=SETTINGS_FOR_UPSTREAM)
    env = {"HOME_COPY_CHECK": "dropped by CLEANUP_ENVIRONMENT"}
    result = run_sis(setup, "--config", "config/env.py", "m", "-r", extra_env=env)
    assert result.returncode == 0, result.output
    value = parse_literal((tmp_path / "output" / "env").read_text())
    assert value == {"MY_SETTING": "from settings", "MY_JOB_VAR": "job value", "HOME_COPY_CHECK": None,
                     "OMP_NUM_THREADS": "1"}


# Variable files are data.
def test_variable_files_are_parsed_as_literals_never_run(setup_dir, tmp_path):
    var = Variable(str(tmp_path / "value"))
    for value in [1.5, -math.inf, {"a": (1, 2.5e-3), "b": [None, True]}, set(), {1, 2}, "text", b"raw", 1 + 2j, -3]:
        var.set(value)
        assert var.get() == value
    var.set([math.nan, math.inf])
    first, second = var.get()
    assert math.isnan(first) and second == math.inf
    marker = tmp_path / "pwned"
    for text in [f"__import__('os').system('touch {marker}')", f"open('{marker}', 'w')",
                 "[x for x in ().__class__.__base__.__subclasses__()]", "nan.__class__"]:
        (tmp_path / "value").write_text(text)
        with pytest.raises(ValueError, match="not a Python literal"):
            var.get()
    assert not marker.exists()


# One-line errors.
def test_worker_on_a_missing_job_folder_is_one_line(tmp_path):
    setup = make_setup(tmp_path)
    result = run_sis(setup, "worker", "work/nothing/Job.abc", "run")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"sis: error: {tmp_path}/work/nothing/Job.abc: no such job folder (the manager sets job folders up before "
        "it starts workers)"]


BROKEN_ENGINE_SETTINGS = '''
import os
ENGINE = os.environ.get("SIS_ENGINE", "local")


def engine():
    if ENGINE != "local":
        raise ValueError(f"ENGINE must be 'local', not {ENGINE!r}")
'''


def test_a_broken_engine_setting_is_one_line(tmp_path):
    setup = make_setup(tmp_path, configs={"empty": "def py():\n    pass\n"}, settings=BROKEN_ENGINE_SETTINGS)
    result = run_sis(setup, "--config", "config/empty.py", "m", "-r", extra_env={"SIS_ENGINE": "bogus"})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == \
        f"sis: error: {tmp_path}/settings.py: engine(): ValueError: ENGINE must be 'local', not 'bogus'"
    assert not (tmp_path / "work").exists()


def test_a_torn_submit_log_line_is_skipped(setup_dir):
    job = Score("torn")
    task = job._sis_tasks()[0]
    os.makedirs(job._sis_path(abspath=True))
    task.log_submission({"time": 1.0, "task_ids": [1], "rqmt": {}})
    with open(task.file(gs.ENGINE_SUBMIT), "a") as f:
        f.write("{'time': 2.0, 'task_i")  # a manager killed while appending
    assert task.submissions() == [{"time": 1.0, "task_ids": [1], "rqmt": {}}]
    task.log_submission({"time": 3.0, "task_ids": [1], "rqmt": {}})
    assert [e["time"] for e in task.submissions()] == [1.0, 3.0]


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    mine = tmp_path / (temporary_prefix(".finished.run.1") + "abc")
    mine.write_text("")
    prefix = temporary_prefix(".job.save").replace(f".{os.getpid()}.", f".{dead_pid}.")
    stale_file = tmp_path / (prefix + "xyz")
    stale_file.write_text("half")
    stale_dir = tmp_path / (temporary_prefix(".Job.abc.setup.").replace(f".{os.getpid()}.", f".{dead_pid}.") + "q")
    stale_dir.mkdir()
    (stale_dir / "job.save").write_text("half")
    user_file = tmp_path / ".mine.tmp"
    user_file.write_text("not ours")
    removed = remove_stale_temporaries(str(tmp_path))
    assert sorted(removed) == sorted([stale_file.name, stale_dir.name])
    assert mine.exists() and user_file.exists() and not stale_file.exists() and not stale_dir.exists()
