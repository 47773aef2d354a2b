"""Sharded statistics and evaluation (modelmerge.shards): predict.py's `shard` parts joined with `join` write what the
unsharded run writes, for every family, to float32 rounding (the same sampled labels exactly); a part killed
mid-write is never joined and reruns alone; PredictJob(shards=N) as one Sisyphus job of N parallel task ids."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from modelmerge.config import run_program
from modelmerge.prediction.config import PredictConfig
from modelmerge.prediction.program import run
from modelmerge.shards import shard_range
from modelmerge.statistics import compute_fisher
from sis_util import REPO, killed_on_exit, make_setup, sis_command, sis_env, sis_settings
from tiny import (CLASSES, colour_images, make_tiny_bert, make_tiny_clip, make_tiny_gpt2, make_tiny_t5, make_tiny_vit,
                  read_jsonl, tiny_data_dir, word_tasks, write_jsonl)

FISHER, GRAM, EVALUATE, MAGNITUDE = "squared_gradients", "gram", "evaluate", "gradient_magnitude"
TASK_TYPES = {"classifier": "sequence_classification", "seq2seq": "seq2seq", "causal_lm": "causal_lm",
              "vit": "image_classification", "clip": "image_classification"}


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """family → the config keys of its tiny model and a 10-example split (images: 9)."""
    root = tmp_path_factory.mktemp("shards")
    words = root / "words"
    write_jsonl(str(words / "validation.jsonl"), word_tasks(10, seed=3, kind="reverse"))
    images = root / "images"
    colour_images(str(images / "validation"), per_class=3, seed=3)
    text = {"dataset_name": str(words), "max_length": 64}  # the tiny GPT-2 has 64 positions
    image = {"dataset_name": str(images), "class_names": CLASSES}
    return {
        "classifier": {"model_name_or_path": make_tiny_bert(str(root / "bert"), seed=1), "dataset_name": "sst2",
                       "data_dir": tiny_data_dir(root / "data", sizes={"validation": 10}), "max_length": 32},
        "seq2seq": {"model_name_or_path": make_tiny_t5(str(root / "t5"), seed=2), **text},
        "causal_lm": {"model_name_or_path": make_tiny_gpt2(str(root / "gpt2"), seed=2), **text},
        "vit": {"model_name_or_path": make_tiny_vit(str(root / "vit"), seed=2), **image},
        "clip": {"model_name_or_path": make_tiny_clip(str(root / "clip"), seed=2), **image},
    }


def keys(families, family, mode, output_dir, **overrides):
    return {**families[family], "task_type": TASK_TYPES[family], "mode": mode, "split": "validation",
            "output_dir": str(output_dir), "batch_size": 3, "num_threads": 1, "max_new_tokens": 4, **overrides}


def predict(**config):
    run(PredictConfig(**config))


def sharded_run(tmp_path, config, count, **join_keys):
    """Run the `count` shards of `config` and join them (with `join_keys`) into tmp_path/joined."""
    parts = [str(tmp_path / f"part.{index}") for index in range(1, count + 1)]
    for index, part in enumerate(parts, 1):
        predict(**{**config, "output_dir": part, "shard": f"{index}/{count}"})
    predict(**{**config, **join_keys, "output_dir": str(tmp_path / "joined"), "join": parts})


def close(a, b, where):
    """JSON values equal, floats to float32 rounding (per-example losses of other batches: other padding)."""
    if isinstance(a, float) or isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            close(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            close(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_outputs(expected, joined):
    """Every file of the unsharded output folder `expected` in `joined` too, with the same contents: JSON equal
    (floats to rounding), safetensors with the same names, dtypes and metadata and values to float32 rounding."""
    def files_of(folder):
        return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, names in os.walk(folder) for f in names)

    files = files_of(expected)
    assert files == files_of(joined)
    for name in files:
        a, b = os.path.join(expected, name), os.path.join(joined, name)
        if name.endswith(".safetensors"):
            with safe_open(a, "pt") as f, safe_open(b, "pt") as g:
                assert f.metadata() == g.metadata(), name
            first, second = load_file(a), load_file(b)
            assert first.keys() == second.keys(), name
            # key biases have an exactly zero gradient: their values are rounding noise far below the others'
            scale = max(float(t.abs().max()) for t in first.values() if t.is_floating_point())
            for key, value in first.items():
                assert second[key].dtype == value.dtype, key
                torch.testing.assert_close(second[key], value, rtol=1e-5, atol=1e-6 * scale,
                                           msg=lambda m: f"{name} {key}: {m}")
        elif name.endswith(".jsonl"):
            close(read_jsonl(a), read_jsonl(b), name)
        elif name.endswith(".json") or name == ".written-by":
            close(json.load(open(a)), json.load(open(b)), name)
        else:
            assert open(a, "rb").read() == open(b, "rb").read(), name


def test_shard_ranges_are_consecutive_and_balanced():
    assert [list(shard_range(10, i, 3)) for i in (1, 2, 3)] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert [len(shard_range(2048, i, 64)) for i in range(1, 65)] == [32] * 64


@pytest.mark.parametrize("family, mode, empirical", [
    ("classifier", FISHER, False), ("classifier", FISHER, True), ("classifier", GRAM, False),
    ("seq2seq", FISHER, False), ("seq2seq", FISHER, True), ("seq2seq", GRAM, False),
    ("causal_lm", FISHER, False), ("causal_lm", GRAM, False),
    ("vit", FISHER, False), ("vit", GRAM, False), ("clip", FISHER, False),
    ("classifier", MAGNITUDE, True), ("seq2seq", MAGNITUDE, True), ("clip", MAGNITUDE, False),
])
def test_joined_shards_write_the_unsharded_statistic(families, tmp_path, family, mode, empirical):
    config = keys(families, family, mode, tmp_path / "whole", empirical=empirical, seed=7)
    def labels(name):
        return {} if mode == GRAM else {"prediction_output_file": str(tmp_path / name)}

    predict(**config, **labels("labels.jsonl"))
    sharded_run(tmp_path, config, 3, **labels("joined.jsonl"))
    assert_same_outputs(tmp_path / "whole", tmp_path / "joined")
    examples = 9 if family in ("vit", "clip") else 10
    assert json.load(open(tmp_path / "joined" / "stats.json"))["num_examples"] == examples
    if mode in (FISHER, MAGNITUDE):  # the join's labels y_i: the unsharded run's, exactly
        assert read_jsonl(tmp_path / "joined.jsonl") == read_jsonl(tmp_path / "labels.jsonl")


@pytest.mark.parametrize("family, task_type", [("classifier", "sequence_classification"), ("seq2seq", "seq2seq")])
def test_a_shard_draws_the_labels_the_whole_run_draws_for_its_examples(families, family, task_type):
    from modelmerge.data import load_split
    from modelmerge.prediction.loading import load_for_task

    spec = families[family]
    model, processor = load_for_task(spec["model_name_or_path"], task_type)
    dataset = load_split(spec["dataset_name"], "validation", spec.get("data_dir"), task_type)
    whole = compute_fisher(model, processor, dataset, batch_size=3, seed=5, task_type=task_type)
    labels = whole.labels.tolist() if family == "classifier" else whole.labels
    parts = [compute_fisher(model, processor, dataset, batch_size=2, seed=5, task_type=task_type, examples=examples)
             for examples in (range(0, 4), range(4, 10))]
    assert [label for part in parts for label in
            (part.labels.tolist() if family == "classifier" else part.labels)] == labels
    other = compute_fisher(model, processor, dataset, batch_size=3, seed=6, task_type=task_type).labels
    assert (other.tolist() if family == "classifier" else other) != labels  # the labels follow the seed


@pytest.mark.parametrize("family", ["classifier", "seq2seq", "causal_lm", "vit"])
def test_joined_evaluation_shards_write_the_unsharded_predictions_and_metrics(families, tmp_path, family):
    config = keys(families, family, EVALUATE, tmp_path / "whole")
    predict(**config)
    sharded_run(tmp_path, config, 3)
    assert_same_outputs(tmp_path / "whole", tmp_path / "joined")
    rows = read_jsonl(tmp_path / "joined" / "predictions.jsonl")
    assert [row["index"] for row in rows] == list(range(len(rows)))


def test_sharded_evaluations_of_several_datasets(families, tmp_path):
    spec = families["classifier"]
    config = {**keys(families, "classifier", EVALUATE, tmp_path / "whole"), "dataset_name": None, "split": None,
              "evaluations": {"a": {"dataset_name": "sst2", "split": "validation"},
                              "b": {"dataset_name": "rotten_tomatoes", "split": "validation[:5]"}}}
    assert spec["data_dir"]
    predict(**config)
    sharded_run(tmp_path, config, 2)
    assert_same_outputs(tmp_path / "whole", tmp_path / "joined")


def program(tmp_path, config):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return run_program(PredictConfig, run, "predict", [str(path)])


def test_a_join_refuses_missing_foreign_and_misordered_parts(families, tmp_path, caplog):
    config = keys(families, "classifier", FISHER, tmp_path / "x")
    parts = [str(tmp_path / f"part.{index}") for index in (1, 2)]
    for index, part in enumerate(parts, 1):
        predict(**{**config, "output_dir": part, "shard": f"{index}/2"})
    predict(**{**config, "seed": 3, "output_dir": str(tmp_path / "other.2"), "shard": "2/2"})
    cases = [([parts[0], str(tmp_path / "missing")], "is not a finished part of a sharded run"),
             ([parts[1], parts[0]], "is shard 2/2, expected shard 1/2"),
             ([parts[0]], "is shard 1/2, expected shard 1/1"),
             ([parts[0], str(tmp_path / "other.2")], "is a part of another computation: its seed is 3, not 0")]
    for join, message in cases:
        caplog.clear()
        assert program(tmp_path, {**config, "join": join}) == 2
        assert message in caplog.text and not os.path.exists(tmp_path / "x")
    caplog.clear()
    assert program(tmp_path, {**config, "num_examples": 9, "join": parts}) == 2  # another count: another computation
    assert "its num_examples is None, not 9" in caplog.text
    for change, message in [({"shard": "3/2"}, "shard must be 'I/N' with 1 <= I <= N"),
                            ({"shard": "1/2", "join": parts}, "give shard (compute one part) or join"),
                            ({"shard": "11/11"}, "leave shard 11 none; use at most 10 shards"),
                            ({"shard": "1/2", "metric_output_file": str(tmp_path / "m.json")}, "not with shard")]:
        caplog.clear()
        assert program(tmp_path, {**config, **change}) == 2
        assert message in caplog.text and not os.path.exists(tmp_path / "x")


def test_a_shard_killed_mid_write_leaves_no_part_and_reruns_alone(families, tmp_path):
    """The shard is killed while it writes its part (its safetensors file held at its first write): no part
    appears, the join refuses, and the rerun of that shard alone makes the join equal the unsharded run."""
    config = keys(families, "classifier", FISHER, tmp_path / "whole")
    predict(**config)
    parts = [str(tmp_path / f"part.{index}") for index in (1, 2)]
    predict(**{**config, "output_dir": parts[0], "shard": "1/2"})
    first_part = os.stat(os.path.join(parts[0], "part.safetensors")).st_mtime_ns
    (tmp_path / "shard2.json").write_text(json.dumps({**config, "output_dir": parts[1], "shard": "2/2"}))
    held = tmp_path / "held"
    hold = (f"import sys, time, safetensors.torch as st; sys.argv = ['predict.py', {str(tmp_path / 'shard2.json')!r}]\n"
            "save = st.save_file\n"
            f"def stalled(*a, **k):\n    open({str(held)!r}, 'w').close(); time.sleep(600)\n"
            "st.save_file = stalled\n"
            f"exec(open({os.path.join(REPO, 'code', 'predict.py')!r}).read())")
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "code"), OMP_NUM_THREADS="1")
    shard = subprocess.Popen([sys.executable, "-c", hold], env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    with killed_on_exit(shard):
        deadline = time.monotonic() + 120
        while not held.exists():
            assert shard.poll() is None and time.monotonic() < deadline, "the shard ended before it wrote its part"
            time.sleep(0.1)
        os.kill(shard.pid, signal.SIGKILL)
        shard.wait(timeout=30)
    assert not os.path.exists(parts[1])  # only a temporary folder beside it, which the rerun removes
    with pytest.raises(Exception, match="is not a finished part"):
        predict(**{**config, "output_dir": str(tmp_path / "joined"), "join": parts})
    predict(**{**config, "output_dir": parts[1], "shard": "2/2"})
    predict(**{**config, "output_dir": str(tmp_path / "joined"), "join": parts})
    assert_same_outputs(tmp_path / "whole", tmp_path / "joined")
    assert os.stat(os.path.join(parts[0], "part.safetensors")).st_mtime_ns == first_part  # shard 1 not rerun
    assert not [name for name in os.listdir(tmp_path) if ".tmp-" in name]


# --- PredictJob(shards=N) under the Sisyphus manager --------------------------------------------------------------

SHARDED_GRAPH = """
from sisyphus import tk
from model_merging.search import EvaluationJob
from model_merging.statistics import FisherJob

KEYS = {keys!r}


def py():
    rqmt = {{"cpu_rqmt": 1, "mem_rqmt": 1.5, "time_rqmt": 0.2}}
    fisher = FisherJob({model!r}, "sst2", "validation", KEYS, shards=2, **rqmt)
    tk.register_output("fisher", fisher.out_dir)
    if {evaluate!r}:
        search = EvaluationJob({model!r}, "sst2", "validation", KEYS, shards=2, **rqmt)
        tk.register_output("search", search.out_dir)
"""


def sis_setup(root, families, settings, evaluate):
    spec = families["classifier"]
    keys_ = {"data_dir": spec["data_dir"], "max_length": 32, "batch_size": 3}
    graph = SHARDED_GRAPH.format(keys=keys_, model=spec["model_name_or_path"], evaluate=evaluate)
    make_setup(root, configs={"sharded": graph}, settings=settings, project_recipes=True)
    return root


def manager_command(setup):
    return sis_command("--config", "config/sharded.py", "m", "-r"), {"cwd": setup, "env": sis_env(setup)}


def job_folder(setup, module, name):
    folder = setup / "work" / "model_merging" / module
    (job,) = [entry for entry in os.listdir(folder) if entry.startswith(name + ".")]
    return folder / job


def submitted_ids(folder, task):
    from ast import literal_eval

    return [literal_eval(line)["task_ids"] for line in open(folder / f"submit_log.{task}") if line.strip()]


def test_sharded_jobs_ids_tasks_and_configs(tmp_path, monkeypatch):
    import sisyphus.global_settings as gs
    from sisyphus.hash import short_hash
    from model_merging.statistics import FisherJob, GramJob

    monkeypatch.setattr(gs, "BASE_DIR", str(tmp_path))
    monkeypatch.setattr(gs, "CODE_ROOT", "/project/code", raising=False)
    monkeypatch.setattr(gs, "PYTHON_EXE", "/usr/bin/python3", raising=False)
    unsharded = FisherJob("/m", "sst2", "train", {"max_length": 32})
    assert FisherJob("/m", "sst2", "train", {"max_length": 32}, shards=1) is unsharded  # shards=1: the id of before
    assert unsharded.job_id() == "model_merging/statistics/FisherJob." + short_hash(
        {"model": "/m", "dataset_name": "sst2", "split": "train", "config": {"max_length": 32}})
    assert [t.name() for t in unsharded.tasks()] == ["create_files", "run"]
    sharded = GramJob("/m", "sst2", "train", {"max_length": 32}, shards=3)
    assert sharded.job_id() != GramJob("/m", "sst2", "train", {"max_length": 32}).job_id()
    create, shards, join = sharded.tasks()
    assert (create.name(), shards.name(), join.name()) == ("create_files", "run_shard", "run")
    assert shards.task_ids() == [1, 2, 3] and [shards.args_for_task_id(i) for i in (1, 2, 3)] == [[1], [2], [3]]
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="shards must be a positive int"):
            FisherJob("/m", "sst2", "train", shards=bad)

    work = tmp_path / "work" / sharded.job_id() / "work"
    os.makedirs(work)
    os.makedirs(tmp_path / "work" / sharded.job_id() / "output")
    monkeypatch.chdir(work)
    sharded.create_files()
    parts = [str(work / f"part.{i}") for i in (1, 2, 3)]
    base = {"mode": "gram", "max_length": 32, "model_name_or_path": "/m",
            "dataset_name": "sst2", "split": "train", "num_threads": 1}  # the job's cpu_rqmt
    assert json.load(open(sharded.out_config_file.get_path())) == {**base, "output_dir": sharded.out_dir.get_path(),
                                                                   "join": parts}
    for index, part in enumerate(parts, 1):
        assert json.load(open(work / f"shard.{index}.json")) == {**base, "output_dir": part, "shard": f"{index}/3"}
    assert open(work / "run.sh").read().splitlines()[2:] == [
        *(f"/usr/bin/python3 /project/code/predict.py {work}/shard.{index}.json" for index in (1, 2, 3)),
        f"/usr/bin/python3 /project/code/predict.py {sharded.out_config_file.get_path()}"]


def unsharded_reference(families, tmp_path, mode, **overrides):
    spec = families["classifier"]
    config = {"model_name_or_path": spec["model_name_or_path"], "dataset_name": "sst2", "split": "validation",
              "data_dir": spec["data_dir"], "max_length": 32, "batch_size": 3, "num_threads": 1, "mode": mode,
              "output_dir": str(tmp_path / f"reference.{mode}"), **overrides}
    predict(**config)
    return config["output_dir"]


@pytest.mark.slow
def test_sharded_jobs_under_the_manager_and_a_killed_shard_resumed_alone(families, tmp_path):
    """`sis m -r`: a Fisher and an evaluation job of 2 shards each; shard 2 of the Fisher is killed (its worker and
    predict.py) while it runs, the manager resumes that task id alone, and both outputs equal the unsharded runs."""
    import psutil

    setup = sis_setup(tmp_path / "setup", families, sis_settings(cpu=2, mem=8), evaluate=True)
    command, options = manager_command(setup)
    with open(setup / "manager.out", "w") as log:
        manager = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **options)
    with killed_on_exit(manager):
        usage = setup / "work" / "model_merging" / "statistics"
        deadline = time.monotonic() + 120
        victims = []
        while not victims:
            assert manager.poll() is None and time.monotonic() < deadline, open(setup / "manager.out").read()
            time.sleep(0.1)
            found = list(usage.glob("FisherJob.*/usage.run_shard.2")) if usage.is_dir() else []
            if found:
                from ast import literal_eval
                try:
                    worker = psutil.Process(literal_eval(found[0].read_text())["pid"])
                    victims = [worker, *worker.children(recursive=True)]
                except (SyntaxError, ValueError, psutil.NoSuchProcess):
                    continue
                if len(victims) < 2:  # predict.py not started yet
                    victims = []
        for process in victims:
            process.kill()
        assert manager.wait(timeout=300) == 0, open(setup / "manager.out").read()[-3000:]
    fisher = job_folder(setup, "statistics", "FisherJob")
    assert submitted_ids(fisher, "run_shard") == [[1, 2], [2]]  # one submission of both, then shard 2 alone
    assert_same_outputs(unsharded_reference(families, tmp_path, FISHER), setup / "output" / "fisher")
    search = job_folder(setup, "search", "EvaluationJob")
    assert submitted_ids(search, "run_shard") == [[1, 2]]
    assert_same_outputs(unsharded_reference(families, tmp_path, EVALUATE), setup / "output" / "search")


@pytest.mark.slurm
def test_a_sharded_fisher_runs_as_one_slurm_array(families, tmp_path):
    setup = sis_setup(tmp_path / "setup", families, sis_settings("slurm", mem=1, time=0.2), evaluate=False)
    command, options = manager_command(setup)
    result = subprocess.run(command, capture_output=True, text=True, timeout=400, **options)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    fisher = job_folder(setup, "statistics", "FisherJob")
    assert submitted_ids(fisher, "run_shard") == [[1, 2]]  # one sbatch --array=1-2
    assert {"log.run_shard.1.exit", "log.run_shard.2.exit"} <= set(os.listdir(fisher / "engine"))  # SLURM ran both
    assert_same_outputs(unsharded_reference(families, tmp_path, FISHER), setup / "output" / "fisher")
