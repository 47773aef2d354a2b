"""One merge path: the JSON options MergeJob writes and the same merge's command line give the same bytes;
MergeOptions round-trip through JSON; the device is checked in one place (a bad one is one line, whichever
front end names it); the command line's merges and mergekit's YAML go through one MergePlan."""
import ast
import json
import os

import merge as merge_program
import pytest
import sisyphus.global_settings as gs
import torch
import yaml
from safetensors.torch import load_file, save_file
from tiny import make_tiny_bert, perturbed_copy

from model_merging.merge import MergeJob
from modelmerge.merging import DTYPES, MergeError, MergeOptions, Shard
from modelmerge.merging.cli import run_cli
from modelmerge.merging.plan import MergePlan
from sis_util import REPO


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """θ_0, two fine-tunes and a diagonal Fisher of each fine-tune."""
    root = tmp_path_factory.mktemp("options")
    base = make_tiny_bert(str(root / "base"), seed=0)
    models = [perturbed_copy(base, str(root / f"ft{i}"), seed=i, scale=0.05) for i in (1, 2)]
    generator = torch.Generator().manual_seed(3)
    statistics = []
    for i, model in enumerate(models):
        folder = root / f"fisher{i}"
        folder.mkdir()
        weights = load_file(os.path.join(model, "model.safetensors"))
        save_file({name: torch.rand(t.shape, generator=generator) for name, t in weights.items()},
                  folder / "fisher.safetensors")
        statistics.append(str(folder))
    return {"base": base, "models": models, "statistics": statistics}


def run(argv):
    return run_cli(merge_program.main, argv + ["--no_progress"])


def files(folder):
    """{name: bytes} of every file of an output folder, hidden ones (.written-by) included."""
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def job_command(job, root):
    """The arguments of merge.py that `job` runs, after create_files wrote its options and run.sh."""
    work = os.path.join(root, gs.WORK_DIR, job.job_id(), "work")
    os.makedirs(os.path.join(root, gs.WORK_DIR, job.job_id(), "output"))
    os.makedirs(work)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        job.create_files()
    finally:
        os.chdir(cwd)
    _, program, *arguments = open(os.path.join(work, "run.sh")).read().splitlines()[-1].split()
    assert os.path.basename(program) == "merge.py"
    return arguments


@pytest.fixture
def job_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(gs, "BASE_DIR", str(tmp_path))
    monkeypatch.setattr(gs, "CODE_ROOT", os.path.join(REPO, "code"), raising=False)
    return tmp_path


CASES = {
    "ties, a per-model weight, a regex": (
        dict(method="ties", parameters={"density": 0.4, "merge_lambda": 0.9, "weight": [0.3, 0.7]}, include="encoder"),
        ["--merge", "ties", "--x:density", "0.4", "--x:merge_lambda", "0.9", "--x:weight", "0.3,0.7",
         "--include", "encoder"]),
    "fisher with statistics, in float64": (
        dict(method="fisher", statistics=True, dtype="float64"),
        ["--merge", "fisher", "--aux_data", "STATISTICS", "--dtype", "float64"]),
}


@pytest.mark.parametrize("case", CASES)
def test_the_options_merge_job_writes_merge_as_the_command_line_does(zoo, job_dir, case):
    arguments, argv = CASES[case]
    arguments = dict(arguments)
    statistics = zoo["statistics"] if arguments.pop("statistics", False) else None
    job = MergeJob(arguments.pop("method"), zoo["models"], ancestor=zoo["base"], aux_data=statistics, **arguments)
    command = job_command(job, job_dir)
    assert command == ["--threads", "1", "--options", job.out_options.get_path()]
    options = json.load(open(job.out_options.get_path()))
    assert options["models"] == zoo["models"] and options["output"] == job.out_model.get_path()
    run(command)
    argv = [item for token in argv for item in (statistics if token == "STATISTICS" else [token])]
    run(argv + ["--models", *zoo["models"], "--ancestor", zoo["base"], "--output", str(job_dir / "cli")])
    assert files(job.out_model.get_path()) == files(job_dir / "cli")


def test_a_sharded_merge_job_runs_its_parts_from_the_same_options(zoo, job_dir):
    job = MergeJob("tsv_m", zoo["models"], ancestor=zoo["base"], shards=2)
    job_command(job, job_dir)
    script = open(os.path.join(job_dir, gs.WORK_DIR, job.job_id(), "work", "run.sh")).read().splitlines()[2:]
    parts = [line.split()[2:] for line in script[:2]]
    assert parts[0] == ["--threads", "1", "--options", job.out_options.get_path(), "--output",
                        "part-1-of-2.safetensors", "--shard", "1/2", "--no_progress"]
    for arguments in parts:
        arguments[arguments.index("--output") + 1] = str(job_dir / arguments[arguments.index("--output") + 1])
        run(arguments)
    run(["--join", str(job_dir / "part-1-of-2.safetensors"), str(job_dir / "part-2-of-2.safetensors"),
         "--output", str(job_dir / "joined")])
    run(["--merge", "tsv_m", "--models", *zoo["models"], "--ancestor", zoo["base"], "--output", str(job_dir / "whole")])
    assert files(job_dir / "joined") == files(job_dir / "whole")


def test_options_round_trip_through_json():
    options = MergeOptions("lora-ties", ["/a", "/b"], "/out", statistics=["/fa", "/fb"], ancestor="/base",
                           params={"density": 0.2, "weight": [0.4, 0.6]}, include="enc", dtype=DTYPES["bfloat16"],
                           max_shard_bytes=1000, lora_rank=4, overwrite=True, shard=Shard(2, 3), threads=2)
    values = json.loads(json.dumps(options.to_json()))
    assert values["dtype"] == "bfloat16" and values["shard"] == "2/3" and values["device"] == "cpu"
    assert MergeOptions.from_json(values) == options


@pytest.mark.parametrize("values, message", [
    ({"method": "ties", "models": ["/a"], "output": "/o", "merge_lambda": 1}, "unknown key(s) merge_lambda"),
    ({"method": "ties", "models": "/a", "output": "/o"}, "models must be a list of paths"),
    ({"method": "ties", "models": ["/a"], "output": "/o", "dtype": "int8"}, "dtype 'int8' is not one of"),
    ({"method": "ties", "models": ["/a"], "output": "/o", "shard": "3/2"}, "--shard takes I/N"),
    ({"models": ["/a"], "output": "/o"}, "a merge needs a method and models"),
    ({"config": "m.yml", "models": ["/a"], "output": "/o"}, "names the whole merge; drop models"),
    (["ties"], "expected a JSON object"),
])
def test_bad_options_files_are_one_line(tmp_path, capsys, values, message):
    path = tmp_path / "merge.json"
    path.write_text(json.dumps(values))
    with pytest.raises(SystemExit) as exit_:
        run(["--options", str(path)])
    error = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(error) == 1 and message in error[0], error


def test_a_bad_device_is_one_line_before_any_input_is_read(tmp_path, capsys):
    """The same message whether the command line, a JSON options file or a YAML merge names the device, though
    no input exists (the device is checked when the options are made, nowhere later)."""
    config = tmp_path / "merge.yml"
    config.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": "/none/a"}, {"model": "/none/b"}]}))
    options = tmp_path / "merge.json"
    options.write_text(json.dumps({"method": "linear", "models": ["/none/a"], "output": str(tmp_path / "o"),
                                   "device": "gpu0"}))
    expected = "error: device 'gpu0' is not a torch device (cpu, cuda or cuda:N)"
    for argv in (["--merge", "linear", "--models", "/none/a", "--device", "gpu0", "--output", str(tmp_path / "o")],
                 ["--config", str(config), str(tmp_path / "o"), "--device", "gpu0"],
                 ["--options", str(options)]):
        with pytest.raises(SystemExit) as exit_:
            run(argv)
        assert exit_.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [expected], argv


def _calls(path, name):
    tree = ast.parse(open(path).read())
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", None) == name]


def test_the_merge_path_checks_the_device_in_one_place():
    code = os.path.join(REPO, "code")
    mergekit = os.path.join(code, "modelmerge", "merging", "mergekit")
    path = [os.path.join(code, "merge.py")] + [os.path.join(mergekit, name) for name in os.listdir(mergekit)
                                               if name.endswith(".py")]
    path += [os.path.join(code, "modelmerge", "merging", f"{name}.py")
             for name in ("frontend", "plan", "execute", "shards", "parameters", "lora")]
    assert not [p for p in path if _calls(p, "check_device") or _calls(p, "device_argument")]
    assert len(_calls(os.path.join(code, "modelmerge", "merging", "options.py"), "check_device")) == 1


def test_the_command_line_and_yaml_merges_run_one_merge_plan(zoo, tmp_path, monkeypatch):
    planned = []
    run_plan = MergePlan.run

    def recording(plan, options):
        planned.append((plan.method.name, len(plan.tasks)))
        return run_plan(plan, options)

    monkeypatch.setattr(MergePlan, "run", recording)
    run(["--merge", "task_arithmetic", "--models", *zoo["models"], "--ancestor", zoo["base"],
         "--output", str(tmp_path / "cli")])
    config = tmp_path / "merge.yml"
    config.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": zoo["base"],
                                      "models": [{"model": m} for m in zoo["models"]]}))
    run(["--config", str(config), str(tmp_path / "yaml")])
    assert planned[0] == planned[1] and planned[0][0] == "task_arithmetic" and planned[0][1] > 0
    assert files(tmp_path / "cli").keys() == files(tmp_path / "yaml").keys()


def test_options_with_a_config_refuse_what_the_config_names():
    with pytest.raises(MergeError, match="names the whole merge; drop method"):
        MergeOptions("ties", output="/o", config="merge.yml")
    with pytest.raises(MergeError, match="merged whole"):
        MergeOptions(output="/o", config="merge.yml", shard=Shard(1, 2))
