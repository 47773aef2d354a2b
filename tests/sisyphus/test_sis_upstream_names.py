"""Names the reference Sisyphus's own unit tests use, with the reference's behaviour: graph targets
(OutputPath, add_target, job_by_id, jobs_sorted), tools.finished_results_cache and hardlink_or_copy,
gs.TEST_DIR and the settings loaders, AssertionError for what cannot be hashed, Paths pickled without
their creator, extract_paths through functools.partial."""
import errno
import functools
import logging
import os
import pickle

import pytest

import sisyphus.global_settings as gs
from sisyphus import Job, tk
from sisyphus.delayed_ops import Delayed, DelayedBase
from sisyphus.errors import SisError
from sisyphus.graph import OutputPath, SISGraph
from sisyphus.hash import HashError, sis_hash_helper
from sisyphus.job_path import Path, Variable
from sisyphus.tools import FinishedResultsCache, extract_paths, finished_results_cache, hardlink_or_copy


class Leaf(Job):
    def __init__(self, name):
        self.name = name
        self.out = self.output_path("out.txt")


class User(Job):
    def __init__(self, inputs):
        self.inputs = inputs
        self.out = self.output_path("out.txt")


def test_output_path_targets_register_outputs_and_jobs_sort_depth_first(setup_dir):
    first, second = sorted([Leaf("p"), Leaf("q")], key=lambda job: job.job_id())
    only_first = User([first.out])
    both = User([second.out, first.out, only_first.out])
    graph = SISGraph()
    graph.add_target(OutputPath("result", both.out))
    assert graph.outputs == {"result": both.out}
    assert graph.job_by_id(only_first.job_id()) is only_first and graph.job_by_id("no/Such.job") is None
    # depth first from the inputless jobs by id: `only_first` is ready right after `first`, `both` only at the end
    assert list(graph.jobs_sorted()) == [first, only_first, second, both]
    target = OutputPath("x", first.out)
    assert target.required == {first.out} and not target.is_done()
    with pytest.raises(SisError, match="needs an OutputPath"):
        graph.add_target("result")


def test_finished_results_are_cached_only_while_enabled_and_only_once_true(setup_dir, monkeypatch, caplog):
    data = setup_dir / "data.txt"
    path = Path(str(data))
    finished_results_cache.reset()
    monkeypatch.setattr(gs, "CACHE_FINISHED_RESULTS", True)
    assert not path.available()  # False is not remembered
    data.write_text("x")
    assert path.available()
    data.unlink()
    assert path.available()  # True is
    monkeypatch.setattr(gs, "CACHE_FINISHED_RESULTS", False)
    assert not path.available()

    cache = FinishedResultsCache(str(setup_dir / "cache.pkl"))
    cache["key"] = True
    cache.write_to_file()
    again = FinishedResultsCache(str(setup_dir / "cache.pkl"))
    again.read_from_file()
    assert again["key"] is True
    (setup_dir / "cache.pkl").write_bytes(b"not a pickle")
    damaged = FinishedResultsCache(str(setup_dir / "cache.pkl"))
    with caplog.at_level(logging.WARNING):
        damaged.read_from_file()
    assert damaged.cache == {} and "Cannot read the cached results" in caplog.text
    finished_results_cache.reset()


def _tree(root):
    return sorted((os.path.relpath(folder, root), sorted(dirs), sorted(files)) for folder, dirs, files in os.walk(root))


def test_hardlink_or_copy_links_each_file_and_copies_where_linking_fails(tmp_path, monkeypatch):
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "top.txt").write_text("top")
    (src / "a" / "b" / "deep.txt").write_text("deep")
    hardlink_or_copy(str(src), str(tmp_path / "linked"))
    assert _tree(src) == _tree(tmp_path / "linked")
    assert os.path.samefile(src / "a" / "b" / "deep.txt", tmp_path / "linked" / "a" / "b" / "deep.txt")

    def cross_device(a, b):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    (tmp_path / "copied").mkdir()
    (tmp_path / "copied" / "top.txt").write_text("kept")
    hardlink_or_copy(str(src), str(tmp_path / "copied"))
    assert _tree(src) == _tree(tmp_path / "copied")
    assert (tmp_path / "copied" / "top.txt").read_text() == "kept"  # an existing file stays
    copied = tmp_path / "copied" / "a" / "b" / "deep.txt"
    assert copied.read_text() == "deep" and not os.path.samefile(copied, src / "a" / "b" / "deep.txt")
    hardlink_or_copy(str(src), str(tmp_path / "symlinked"), use_symlink_instead_of_copy=True)
    assert os.readlink(tmp_path / "symlinked" / "top.txt") == str(src / "top.txt")


@pytest.fixture
def clean_settings(monkeypatch):
    """gs without SIS_* variables and with an empty settings record; names the test adds are removed after."""
    for key in list(os.environ):
        if key.startswith("SIS_"):
            monkeypatch.delenv(key)
    monkeypatch.setattr(gs, "GLOBAL_SETTINGS_FILE_CONTENT", "")
    monkeypatch.setattr(gs, "ENVIRONMENT_SETTINGS", {})
    for name in ("t_text", "t_number", "t_function", "t_word", "t_dict", "IMPORT_PATHS"):
        monkeypatch.setattr(gs, name, None, raising=False)
    monkeypatch.setattr(gs, "DEFAULT_ENVIRONMENT_SET", dict(gs.DEFAULT_ENVIRONMENT_SET))
    return monkeypatch


def test_settings_from_a_file_run_in_the_settings_module(tmp_path, clean_settings, caplog):
    assert gs.TEST_DIR == "tests"
    text = ("t_text = 'foo'\nt_number = 4\nDEFAULT_ENVIRONMENT_SET['PATH'] += ':extra'\n\n"
            "def t_function():\n    return 42\n")
    (tmp_path / "s.py").write_text(text)
    path_before = gs.DEFAULT_ENVIRONMENT_SET["PATH"]
    gs.update_global_settings_from_file(str(tmp_path / "s.py"))
    assert (gs.t_text, gs.t_number, gs.t_function()) == ("foo", 4, 42)
    assert gs.DEFAULT_ENVIRONMENT_SET["PATH"] == path_before + ":extra"
    assert pickle.loads(pickle.dumps(gs.t_function))() == 42  # defined in sisyphus.global_settings
    assert gs.GLOBAL_SETTINGS_FILE_CONTENT == f"##### Settings file: {tmp_path / 's.py'} #####\n{text}\n"
    with caplog.at_level(logging.WARNING):
        gs.update_global_settings_from_file(str(tmp_path / "missing.py"))
    assert "does not exist, ignoring it" in caplog.text
    assert gs.GLOBAL_SETTINGS_FILE_CONTENT.count("#####") == 2  # nothing recorded for the missing file


def test_settings_from_the_environment_are_literals_or_strings(clean_settings):
    clean_settings.setenv("SIS_t_word", "bar")
    clean_settings.setenv("SIS_t_text", '"quoted"')
    clean_settings.setenv("SIS_t_dict", "{'a': [1, 2.5]}")
    clean_settings.setenv("SIS_IMPORT_PATHS", "config:recipe/")
    gs.update_global_settings_from_env()
    assert (gs.t_word, gs.t_text, gs.t_dict) == ("bar", "quoted", {"a": [1, 2.5]})
    assert gs.IMPORT_PATHS == ["config", "recipe/"]
    assert gs.ENVIRONMENT_SETTINGS["SIS_t_word"] == "bar"
    assert gs.GLOBAL_SETTINGS_FILE_CONTENT == (
        "##### Settings from environment #####\nt_word = 'bar'\nt_text = 'quoted'\nt_dict = {'a': [1, 2.5]}\n"
        "IMPORT_PATHS = ['config', 'recipe/']\n")


def test_what_cannot_be_hashed_raises_assertion_errors_of_the_old_types_too():
    with pytest.raises(AssertionError) as caught:
        sis_hash_helper(lambda x: x)
    assert isinstance(caught.value, HashError) and isinstance(caught.value, TypeError)
    with pytest.raises(AssertionError) as caught:
        Delayed("foo").function(lambda a, b: a + b, "bar")
    assert isinstance(caught.value, ValueError) and "lambda" in str(caught.value)
    with pytest.raises(AssertionError) as caught:
        DelayedBase(1, 2).get()
    assert isinstance(caught.value, NotImplementedError)


class Creator:
    """A creator that is not a Job (the reference's Paths work with any object with these methods)."""

    def __init__(self, folder):
        self.folder = folder

    def _sis_path(self, name):
        return os.path.join("work", self.folder, name)

    def path_available(self, path):
        return True


def test_paths_pickle_without_their_creator_unless_asked(setup_dir, monkeypatch):
    job = Leaf("pickled")
    loaded = pickle.loads(pickle.dumps(job.out))
    assert loaded.creator is None and loaded.path == f"work/{job.job_id()}/output/out.txt"
    assert loaded.get_path() == str(setup_dir / "work" / job.job_id() / "output" / "out.txt")
    variable = pickle.loads(pickle.dumps(Variable("v", Creator("x/Y.1"), backup=3)))
    assert (variable.creator, variable.path, variable.get()) == (None, "work/x/Y.1/output/v", 3)
    monkeypatch.setattr(gs, "INCLUDE_CREATOR_STATE", True)
    loaded = pickle.loads(pickle.dumps(job.out))
    assert loaded.creator == job and loaded.path == "out.txt" and loaded.get_path() == job.out.get_path()


def test_a_creator_that_is_not_a_job_gives_folder_hash_and_availability(setup_dir):
    path = Path("lm.gz", Creator("test/me.1234"))
    assert path.get_path() == str(setup_dir / "work" / "test" / "me.1234" / "output" / "lm.gz")
    assert path._sis_hash() == (b"(Path, (tuple, (Creator, (dict, (tuple, (str, 'folder'), (str, 'test/me.1234')))),"
                                b" (str, 'lm.gz')))")
    assert path.available()
    assert Path("x", hash_overwrite=("pkg", "x.gz"))._sis_hash() == b"(Path, (tuple, (str, 'pkg'), (str, 'x.gz')))"


def test_extract_paths_looks_into_functools_partial(setup_dir):
    path = Path("foo/bar")
    other = Path("other")
    assert extract_paths(functools.partial(Path.join_right, path, key=other)) == {path, other}


def test_base_dir_before_any_setup_is_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.delattr(gs, "BASE_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert gs.BASE_DIR == str(tmp_path)
    assert Path("x").get_path() == str(tmp_path / "x")
    with tk.mktemp() as temp:
        assert not os.path.exists(temp)
