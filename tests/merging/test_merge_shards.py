"""Sharded merges (modelmerge.merging.shards): every method's parts joined give the unsharded merge's files byte
for byte; the parts are balanced by cost; a killed part reruns alone; the join refuses parts that do not make
up one merge; merges that need every tensor at once run whole in part 1; MergeJob(shards=2) under `sis m -r`,
locally and as one SLURM array."""
import json
import os
import shutil
import subprocess
import sys
import uuid

import merge as merge_program
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny import make_tiny_bert, perturbed_copy

from modelmerge.merging import shards
from modelmerge.merging.cli import run_cli
from modelmerge.merging.plan import Source, TensorTask
from modelmerge.io.formats import TensorInfo
from modelmerge.methods import MERGE_METHODS, get_method
from sis_util import REPO, make_setup, run_sis, sis_settings

METHODS = sorted({cls.name for cls in MERGE_METHODS.values()})
# Parameters that make a method do real work on tiny models (the others' defaults do).
PARAMETERS = {"ties": ["--x:density", "0.4"], "dare_linear": ["--x:density", "0.5"], "dare_ties": ["--x:density", "0.5"],
              "breadcrumbs": ["--x:density", "0.5"], "breadcrumbs_ties": ["--x:density", "0.5"],
              "della": ["--x:density", "0.5"], "della_linear": ["--x:density", "0.5"], "sce": ["--x:select_topk", "0.5"],
              "nearswap": ["--x:t", "0.01"], "wudi": ["--x:iterations", "5"], "mats": ["--x:iterations", "5"]}
SMALL_FILES = ["--max_shard_size", "60KB"]  # the output in several files with an index, as large models are


def weights(folder):
    return load_file(os.path.join(folder, "model.safetensors"))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """θ_0, three fine-tunes, and for each model a statistics folder with a Fisher, a gradient magnitude and the Grams
    of its linear layers."""
    root = tmp_path_factory.mktemp("shards")
    base = make_tiny_bert(str(root / "base"), seed=0)
    models = [perturbed_copy(base, str(root / f"ft{i}"), seed=i, scale=0.05) for i in (1, 2, 3)]
    generator = torch.Generator().manual_seed(7)
    stats = []
    for i, model in enumerate([base, *models]):
        folder = root / f"stats{i}"
        folder.mkdir()
        tensors = weights(model)
        save_file({n: torch.rand(t.shape, generator=generator) for n, t in tensors.items()}, folder / "fisher.safetensors")
        save_file({n: torch.rand(t.shape, generator=generator) for n, t in tensors.items()},
                  folder / "gradient_magnitude.safetensors")
        linear = {n: t for n, t in tensors.items() if t.dim() == 2 and "embeddings" not in n}
        grams = {}
        for n, t in linear.items():
            x = torch.randn(40, t.shape[1], generator=generator, dtype=torch.float64)
            grams[n] = x.T @ x
        save_file(grams, folder / "gram.safetensors")
        stats.append(str(folder))
    return {"base": base, "models": models, "stats": stats[1:], "base_stats": stats[0], "root": root}


def merge_arguments(name, zoo):
    method = get_method(name)
    count = min(max(method.min_models, 3), method.max_models or 3)
    argv = ["--merge", name, "--models", *zoo["models"][:count], "--ancestor", zoo["base"], *PARAMETERS.get(name, [])]
    if (set(method.stats) | set(method.optional_stats)) & {"fisher", "gram", "gradient_magnitude"}:
        argv += ["--aux_data", *zoo["stats"][:count]]
    if method.base_stats:
        argv += ["--ancestor_aux_data", zoo["base_stats"]]
    return argv


def run(argv):
    return run_cli(merge_program.main, argv + ["--no_progress"])


def files(folder):
    """{name: bytes} of every file of an output folder, hidden ones (.written-by) included."""
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def manifest(part):
    with safe_open(part, framework="pt") as handle:
        return json.loads(handle.metadata()[shards.MANIFEST_KEY])


def sharded(argv, folder, count, output=None):
    """Run the `count` parts of merge `argv` (in reverse order) and join them; returns the part paths."""
    parts = [str(folder / f"part{i}.safetensors") for i in range(1, count + 1)]
    for index in reversed(range(1, count + 1)):
        run(argv + ["--shard", f"{index}/{count}", "--output", parts[index - 1]])
    run(["--join", *parts, "--output", output or str(folder / "joined")])
    return parts


@pytest.mark.parametrize("name", METHODS)
def test_every_method_sharded_and_joined_writes_the_unsharded_files_byte_for_byte(name, zoo, tmp_path):
    argv = merge_arguments(name, zoo) + SMALL_FILES
    run(argv + ["--output", str(tmp_path / "whole")])
    parts = sharded(argv, tmp_path, 2)
    whole, joined = files(tmp_path / "whole"), files(tmp_path / "joined")
    assert "model.safetensors.index.json" in whole and "config.json" in whole and ".written-by" in whole
    assert joined == whole
    assert all(manifest(part)["tensors"] for part in parts)  # both parts merged something


def test_three_parts_of_a_bare_file_and_of_a_lora_merge(zoo, tmp_path):
    argv = merge_arguments("tsv_m", zoo)
    run(argv + ["--output", str(tmp_path / "whole.safetensors")])
    sharded(argv, tmp_path, 3, output=str(tmp_path / "joined.safetensors"))
    assert open(tmp_path / "joined.safetensors", "rb").read() == open(tmp_path / "whole.safetensors", "rb").read()


def fake_task(name, shape, merge=True):
    class Header:
        def info(self, _):
            return TensorInfo(shape, torch.float32)

    return TensorTask(name, [Source(Header(), name)] * 4, ancestor=Source(Header(), name), merge=merge)


def test_parts_are_balanced_by_the_methods_cost_not_by_bytes():
    """TSV-M: a 2-D tensor costs its entries (4 models, θ_0, the output) plus (T + 2) SVDs of min(m, n)²·max(m, n)/20 each; vectors their entries."""
    tsv_m, linear = get_method("tsv_m")(), get_method("linear")()
    params = {"exclude": None, "merge_lambda": 1.0}
    assert tsv_m.cost("w", (96, 384), 4, params) == pytest.approx(96 * 384 * 6 + 6 * 96 ** 2 * 384 / 20)
    assert tsv_m.cost("b", (384,), 4, params) == linear.cost("b", (384,), 4, {}) == 384 * 6
    assert tsv_m.cost("w", (96, 384), 4, {**params, "exclude": "w"}) == 96 * 384 * 6
    # a wide embedding (16 x 8192: many bytes, a cheap SVD) and four square matrices of fewer bytes each
    tasks = [fake_task("embedding", (16, 8192))] + [fake_task(f"layer{i}", (256, 256)) for i in range(4)]
    # by cost the four SVD-heavy matrices split 2 and 2 (the cheap embedding joins part 1); by bytes the
    # embedding weighs two matrices, so part 2 would get three of the four SVD-heavy ones
    assert shards.assign_parts(tsv_m, params, tasks, 2) == [1, 1, 2, 1, 2]
    assert shards.assign_parts(linear, {}, tasks, 2) == [1, 2, 2, 1, 2]
    assert shards.assign_parts(tsv_m, params, tasks, 2, "needs all") == [1] * 5


def test_a_part_killed_mid_write_leaves_no_part_and_reruns_alone(zoo, tmp_path):
    argv = merge_arguments("ties", zoo)
    run(argv + ["--output", str(tmp_path / "whole")])
    parts = [str(tmp_path / "part1.safetensors"), str(tmp_path / "part2.safetensors")]
    run(argv + ["--shard", "1/2", "--output", parts[0]])
    first = os.stat(parts[0]).st_mtime_ns
    killed = ("import os, signal, sys; sys.argv[0] = 'merge.py'; import merge; "
              "from modelmerge.io import writing; write = writing.SafetensorsStreamWriter.write\n"
              "def dying(self, name, tensor):\n    write(self, name, tensor); self._file.flush()\n"
              "    if self._next > 2: os.kill(os.getpid(), signal.SIGKILL)\n"
              "writing.SafetensorsStreamWriter.write = dying\n"
              "from modelmerge.merging.cli import run_cli; run_cli(merge.main, sys.argv[1:])")
    done = subprocess.run([sys.executable, "-c", killed, *argv, "--shard", "2/2", "--output", parts[1], "--no_progress"],
                          cwd=os.path.join(REPO, "code"), capture_output=True, text=True)
    assert done.returncode == -9, done.stderr[-2000:]
    assert not os.path.exists(parts[1])
    assert [n for n in os.listdir(tmp_path) if n.startswith(".part2.safetensors.tmp-")]  # what the kill left
    with pytest.raises(SystemExit) as refused:
        run(["--join", *parts, "--output", str(tmp_path / "joined")])
    assert refused.value.code == 2 and not (tmp_path / "joined").exists()
    run(argv + ["--shard", "2/2", "--output", parts[1]])  # the killed part alone
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
    assert os.stat(parts[0]).st_mtime_ns == first
    run(["--join", *parts, "--output", str(tmp_path / "joined")])
    assert files(tmp_path / "joined") == files(tmp_path / "whole")


@pytest.fixture(scope="module")
def two_parts(zoo, tmp_path_factory):
    folder = tmp_path_factory.mktemp("parts")
    argv = merge_arguments("task_arithmetic", zoo)
    parts = sharded(argv, folder, 2)
    other = str(folder / "other2.safetensors")
    run(argv + ["--x:merge_lambda", "0.7", "--shard", "2/2", "--output", other])
    truncated = str(folder / "truncated.safetensors")
    data = open(parts[1], "rb").read()
    open(truncated, "wb").write(data[: len(data) - 100])
    three = str(folder / "three1.safetensors")
    run(argv + ["--shard", "1/3", "--output", three])
    return parts, other, truncated, three, os.path.join(zoo["models"][0], "model.safetensors")


@pytest.mark.parametrize("which,message", [
    (lambda p, o, t, three, m: [p[0]], "the join needs parts 1..2 once each: missing 2"),
    (lambda p, o, t, three, m: [p[0], p[0], p[1]], "repeated 1"),
    (lambda p, o, t, three, m: [p[0], o], "are parts of different merges"),
    (lambda p, o, t, three, m: [three, p[1]], "are parts of different merges"),
    (lambda p, o, t, three, m: [p[0], t], "is not a merge part"),
    (lambda p, o, t, three, m: [p[0], m], "is not a merge part (no merge_part manifest"),
    (lambda p, o, t, three, m: [p[0], p[1] + ".missing"], "does not exist"),
])
def test_the_join_refuses_parts_that_are_not_one_whole_merge(two_parts, tmp_path, capsys, which, message):
    with pytest.raises(SystemExit) as refused:
        run(["--join", *which(*two_parts), "--output", str(tmp_path / "joined")])
    err = capsys.readouterr().err.strip().splitlines()
    assert refused.value.code == 2 and err[-1].startswith("error:") and message in err[-1], err[-1]
    assert os.listdir(tmp_path) == []


def test_a_part_whose_tensors_do_not_match_its_manifest_is_refused(two_parts, tmp_path, capsys):
    part = two_parts[0][1]
    with safe_open(part, framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, tmp_path / "short.safetensors", metadata=metadata)
    with pytest.raises(SystemExit):
        run(["--join", two_parts[0][0], str(tmp_path / "short.safetensors"), "--output", str(tmp_path / "joined")])
    assert "does not hold the tensors its manifest plans" in capsys.readouterr().err
    assert not (tmp_path / "joined").exists()


def test_a_merge_that_needs_every_tensor_runs_whole_in_part_one(zoo, tmp_path, caplog, monkeypatch):
    """LiNeS's default α is a ratio of norms over the whole model; a method can declare the same."""
    argv = merge_arguments("task_arithmetic", zoo) + ["--x:lines_beta", "0.5"]
    run(argv + ["--output", str(tmp_path / "whole")])
    parts = sharded(argv, tmp_path, 2)
    assert "LiNeS without lines_alpha takes the paper's α" in caplog.text and "part 2 is empty" in caplog.text
    assert manifest(parts[1])["tensors"] == [] and len(manifest(parts[0])["tensors"]) == 41
    assert files(tmp_path / "joined") == files(tmp_path / "whole")
    # with lines_alpha given each tensor is scaled on its own: both parts work
    given = merge_arguments("task_arithmetic", zoo) + ["--x:lines_beta", "0.5", "--x:lines_alpha", "0.4"]
    parts = sharded(given, tmp_path, 2, str(tmp_path / "given"))
    assert all(manifest(part)["tensors"] for part in parts)
    monkeypatch.setattr(get_method("magmax"), "needs_every_tensor", "a threshold over the whole model", raising=False)
    caplog.clear()
    parts = sharded(merge_arguments("magmax", zoo), tmp_path, 2, str(tmp_path / "magmax"))
    assert "a threshold over the whole model: the whole merge runs in part 1 of 2" in caplog.text
    assert manifest(parts[1])["tensors"] == []


@pytest.mark.parametrize("argv,message", [
    (["--shard", "3/2"], "--shard takes I/N with 1 ≤ I ≤ N"),
    (["--shard", "two"], "--shard takes I/N"),
    (["--config", "merge.yml", "--shard", "1/2"], "--config takes everything from the YAML file; drop --shard"),
    (["--join", "p1", "--merge", "linear"], "--join takes everything from the parts; drop --merge"),
])
def test_bad_shard_arguments_are_one_line(zoo, tmp_path, capsys, argv, message):
    if "--config" not in argv and "--join" not in argv:
        argv = ["--merge", "linear", "--models", *zoo["models"]] + argv
    with pytest.raises(SystemExit) as refused:
        run(argv + ["--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert refused.value.code == 2 and message in err and len(err.splitlines()) == 1, err


SIS_CONFIG = '''
from sisyphus import tk

from model_merging.merge import MergeJob


def py():
    job = MergeJob("tsv_m", [tk.Path(p) for p in {models!r}], ancestor=tk.Path({base!r}), shards=2, mem_rqmt=1,
                   time_rqmt=0.1)
    tk.register_output("merged", job.out_model)
'''
def sis_merge(zoo, setup, settings):
    """MergeJob("tsv_m", shards=2) under `sis m -r` in a new setup; returns (its job folder, the unsharded merge)."""
    setup.mkdir()
    # a fresh copy of the inputs: a new job id each run, so SLURM job names never meet those of an earlier run
    base = str(setup / f"base-{uuid.uuid4().hex[:8]}")
    shutil.copytree(zoo["base"], base)
    make_setup(setup, configs={"merge": SIS_CONFIG.format(models=zoo["models"], base=base)}, settings=settings,
               project_recipes=True)
    done = run_sis(setup, "--config", "config/merge.py", "m", "-r", timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    job = os.path.dirname(os.path.dirname(os.path.realpath(os.path.join(setup, "output", "merged"))))
    run(["--merge", "tsv_m", "--models", *zoo["models"], "--ancestor", base, "--output", str(setup / "whole")])
    return job, str(setup / "whole")


@pytest.mark.slow
def test_merge_job_with_two_shards_runs_its_parts_as_two_task_ids_and_joins_them(zoo, tmp_path):
    job, whole = sis_merge(zoo, tmp_path / "setup", sis_settings(cpu=2, mem=4))
    assert files(os.path.join(job, "output", "model")) == files(whole)
    names = os.listdir(job)
    assert {"finished.run_part.1", "finished.run_part.2", "finished.join.1"} <= set(names), names
    assert sorted(n for n in os.listdir(os.path.join(job, "work")) if n.startswith("part-")) == [
        "part-1-of-2.safetensors", "part-2-of-2.safetensors"]
    script = open(os.path.join(job, "work", "run.sh")).read().splitlines()
    assert [line.count("--shard") for line in script[2:]] == [1, 1, 0] and "--join" in script[-1]


@pytest.mark.slurm
def test_merge_job_with_two_shards_runs_as_one_slurm_array(zoo, tmp_path):
    job, whole = sis_merge(zoo, tmp_path / "setup", sis_settings("slurm", mem=1, time=0.1))
    assert files(os.path.join(job, "output", "model")) == files(whole)
    engine = sorted(os.listdir(os.path.join(job, "engine")))
    assert {"log.run_part.1.exit", "log.run_part.2.exit", "log.join.1.exit"} <= set(engine), engine
    submissions = [eval(line) for line in open(os.path.join(job, "submit_log.run_part")) if line.strip()]
    assert [entry["task_ids"] for entry in submissions] == [[1, 2]]  # one submission: one array of two
