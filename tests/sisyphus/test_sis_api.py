"""The API configs and recipes use: jobs, paths, variables, tasks, outputs, the engine selector."""
import gzip
import math
import pickle

import pytest

import sisyphus
import sisyphus.global_settings as gs
from sisyphus import Job, Task, tk
from sisyphus.engine import STATE_QUEUE, STATE_UNKNOWN, EngineBase, EngineSelector
from sisyphus.errors import SisError
from sisyphus.graph import SISGraph
from sisyphus.tools import extract_paths, str_to_gb, str_to_hours


class Producer(Job):
    def __init__(self, name, options=None):
        self.name = name
        self.options = options or {}
        self.out_model = self.output_path("model", directory=True)
        self.out_score = self.output_var("score")

    def tasks(self):
        yield Task("create_files", mini_task=True)
        yield Task("run", resume="run", rqmt={"cpu": 2, "mem": "512M", "time": "1:30:00"})

    def create_files(self):
        pass

    def run(self):
        pass


class Consumer(Job):
    def __init__(self, inputs):
        self.inputs = inputs
        self.out = self.output_path("result.txt")


class Holder:
    def __init__(self, path):
        self.path = path


def test_star_import_gives_the_contract_names():
    namespace = {}
    exec("from sisyphus import *", namespace)
    assert {"Job", "Task", "tk", "gs", "Path", "Variable", "setup_path"} <= set(namespace)
    assert namespace["tk"] is sisyphus.toolkit and namespace["gs"] is gs
    assert tk.Path is sisyphus.Path and tk.Variable is sisyphus.Variable


def test_outputs_live_in_the_job_folder(setup_dir):
    job = Producer("a")
    folder = setup_dir / "work" / "test_sis_api" / job.job_id().split("/")[-1]
    assert job.job_id().startswith("test_sis_api/Producer.")
    assert str(job.out_model) == str(folder / "output" / "model")
    assert job.out_model.get_path() == tk.uncached_path(job.out_model) == str(folder / "output" / "model")
    assert tk.uncached_path("plain/string") == "plain/string"
    assert job.out_model.rel_path() == f"work/{job.job_id()}/output/model"


def test_variable_set_and_get(setup_dir):
    job = Producer("variable")
    assert job.out_score.get() == f"<UNFINISHED VARIABLE: {job.out_score.get_path()}>"
    (setup_dir / "work" / job.job_id() / "output").mkdir(parents=True)
    job.out_score.set({"accuracy": 0.5, "names": ["a"]})
    assert job.out_score.get() == {"accuracy": 0.5, "names": ["a"]}
    job.out_score.set(math.inf)
    assert job.out_score.get() == math.inf
    pickled = tk.Variable("blob", job, pickle=True)
    pickled.set({1, 2})
    assert pickled.get() == {1, 2}


def test_dependencies_are_the_paths_a_job_holds(setup_dir):
    a, b = Producer("a"), Producer("b")
    plain = tk.Path("data/input.txt")
    consumer = Consumer({"nested": [a.out_model, (Holder(b.out_score),)], "raw": plain})
    assert consumer._sis_inputs == {a.out_model, b.out_score, plain}
    assert a.out_model not in Producer("a")._sis_inputs  # its own outputs are not inputs
    graph = SISGraph()
    graph.add_output("result", consumer.out)
    assert graph.jobs() == sorted([a, b, consumer])


def test_job_arguments_are_copied(setup_dir):
    options = {"lr": 1}
    job = Producer("copy", options)
    options["lr"] = 2
    assert job.options == {"lr": 1}
    assert Producer("copy", {"lr": 1}) is job


def test_register_output_twice(setup_dir):
    graph = SISGraph()
    a, b = Producer("a"), Producer("b")
    graph.add_output("model", a.out_model)
    graph.add_output("model", a.out_model)  # the same path again is fine
    with pytest.raises(SisError, match="output 'model' registered twice with different paths"):
        graph.add_output("model", b.out_model)
    with pytest.raises(SisError, match="relative path"):
        graph.add_output("../escape", a.out_model)
    with pytest.raises(SisError, match="needs a tk.Path"):
        graph.add_output("text", "a string")


def test_job_save_pickles_only_its_own_job(setup_dir):
    a = Producer("saved")
    consumer = Consumer([a.out_model])
    consumer._sis_setup_directory()
    folder = setup_dir / "work" / consumer.job_id()
    with gzip.open(folder / "job.save") as f:
        loaded = pickle.load(f)
    (path,) = loaded.inputs
    # as in the reference (gs.INCLUDE_CREATOR_STATE off): no creator, the path relative to the setup folder
    assert path.creator is None and path.path == f"work/{a.job_id()}/output/model"
    assert path.get_path() == a.out_model.get_path()
    assert loaded.job_id() == consumer.job_id()
    assert (folder / "input" / a.job_id().replace("/", "_")).resolve() == (setup_dir / "work" / a.job_id())
    assert {p.name for p in folder.iterdir()} == {"output", "work", "input", "job.save", "info"}
    assert f"PARAMETER: inputs: [<Path {a.out_model.get_path()}>]" in (folder / "info").read_text()


def test_tasks_requirements_and_argument_chunks(setup_dir):
    create, run = Producer("tasks")._sis_tasks()
    assert create.rqmt() == {"engine": "short"}
    assert run.rqmt() == {"cpu": 2, "mem": 0.5, "time": 1.5}
    assert run.resumeable() and not create.resumeable()
    assert Task("run", resumable=True).resumeable()

    for count, parallel in [(7, 3), (3, 3), (5, 0), (10, 4), (2, 5)]:
        task = Task("run", args=list(range(count)), parallel=parallel)
        chunks = [task.args_for_task_id(i) for i in task.task_ids()]
        assert [arg for chunk in chunks for arg in chunk] == list(range(count))  # each argument once, in order
        sizes = [len(c) for c in chunks]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
        assert len(chunks) == (count if parallel == 0 else min(parallel, count))


def test_requirement_units():
    assert str_to_gb("512M") == 0.5 and str_to_gb("2G") == 2 and str_to_gb(3) == 3 and str_to_gb("1T") == 1024
    assert str_to_hours("1:30:00") == 1.5 and str_to_hours("0:45") == 0.75 and str_to_hours(2) == 2
    with pytest.raises(ValueError, match="memory requirement 'lots'"):
        str_to_gb("lots")


def test_extract_paths_skips_sis_bookkeeping(setup_dir):
    job = Producer("extract")
    found = extract_paths({"a": [job.out_model], "_sis_hidden": job.out_score, "obj": Holder(job.out_score)})
    assert found == {job.out_model, job.out_score}


class RecordingEngine(EngineBase):
    def __init__(self):
        self.calls = []

    def submit_call(self, call, logpath, rqmt, name, task_name, task_ids):
        self.calls.append((call, rqmt, name, task_ids))

    def task_state(self, name, task_id):
        return STATE_QUEUE if any(c[2] == name and task_id in c[3] for c in self.calls) else STATE_UNKNOWN


def test_engine_selector_routes_mini_tasks_to_short(setup_dir):
    short, long = RecordingEngine(), RecordingEngine()
    selector = EngineSelector(engines={"short": short, "long": long}, default_engine="long")
    create, run = Producer("route")._sis_tasks()
    call = ["python", "-m", "sisyphus", "worker", "work/x", "run"]
    selector.submit_call(call, "log", create.rqmt(), "x.create_files", "create_files", [1])
    selector.submit_call(call, "log", run.rqmt(), "x.run", "run", [1, 2])
    assert short.calls == [(["python", "-m", "sisyphus", "worker", "--engine", "short", "work/x", "run"],
                            {"engine": "short"}, "x.create_files", [1])]
    assert long.calls[0][0][4:6] == ["--engine", "long"] and long.calls[0][3] == [1, 2]
    assert selector.task_state("x.run", 2) == STATE_QUEUE and selector.task_state("x.create_files", 1) == STATE_QUEUE
    assert selector.task_state("x.other", 1) == STATE_UNKNOWN
    assert selector.get_used_engine("short") is short
    with pytest.raises(ValueError, match="default_engine 'gpu'"):
        EngineSelector(engines={"short": short}, default_engine="gpu")


def test_running_flags_outside_sis():
    assert not tk.running_in_manager() and not tk.running_in_worker()
