"""Torch threads from a job's cpu_rqmt (modelmerge.threads): every Job of recipe/ passes its CPUs to its program
(`--threads N`, or `num_threads` in the JSON config) outside the job id, every program accepts what its Job
writes and runs torch with that many threads, and a bad count ends in one line, exit status 2, nothing written."""
import importlib
import json
import logging
import os

import pytest
import torch
from tiny import make_tiny_bert, perturbed_copy, tiny_data_dir

import sisyphus.global_settings as gs
import sisyphus.job
from modelmerge.config import load_config, run_program
from modelmerge.harness import HarnessConfig
from modelmerge.merging.cli import run_cli
from modelmerge.prediction.config import PredictConfig
from modelmerge.threads import check_threads, torch_threads
from modelmerge.training import TrainConfig

BAD_COUNTS = ("0", "-1", "1.5", "two")
COMMAND_LINE_PROGRAMS = ("merge", "trim", "modulated_merge", "task_arithmetic", "uncertainty_based_gradient_matching",
                         "regmean_plusplus", "adamerging")
JSON_PROGRAMS = {"train.py": TrainConfig, "predict.py": PredictConfig, "harness_eval.py": HarnessConfig}


def test_check_threads_takes_whole_numbers_of_at_least_one():
    assert check_threads(1) == 1 and check_threads(16) == 16
    for bad in (0, -1, 1.5, True, "2", None):
        with pytest.raises(ValueError, match="threads must be a whole number of at least 1"):
            check_threads(bad)


def test_torch_threads_sets_the_count_for_the_block_then_restores_it(restore_threads):
    torch.set_num_threads(1)
    with torch_threads(2):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == 1
    with torch_threads(None):  # None: as they are
        assert torch.get_num_threads() == 1
    with pytest.raises(ValueError):
        with torch_threads(0):
            pass
    assert torch.get_num_threads() == 1


# --- bad counts -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", (0, -1, 1.5, True))
def test_the_merge_library_refuses_a_bad_thread_count(bad):
    from modelmerge.merging import MergeError, MergeOptions

    with pytest.raises(MergeError, match=f"the number of threads must be a whole number of at least 1, got {bad!r}"):
        MergeOptions("task_arithmetic", ["/a", "/b"], "/out", ancestor="/base", threads=bad)


@pytest.mark.parametrize("name", COMMAND_LINE_PROGRAMS)
@pytest.mark.parametrize("bad", BAD_COUNTS)
def test_command_line_programs_refuse_a_bad_thread_count(name, bad, tmp_path, capsys):
    program = importlib.import_module(name)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(program.main, [f"--threads={bad}", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    assert "--threads" in err[0] and f"a whole number of at least 1, got {bad!r}" in err[0], err
    assert os.listdir(tmp_path) == []


MINIMAL_CONFIGS = {TrainConfig: {"dataset_name": "sst2"},
                   PredictConfig: {"model_name_or_path": "/m", "dataset_name": "sst2", "split": "test"},
                   HarnessConfig: {"model_name_or_path": "/m", "tasks": ["hellaswag"]}}


@pytest.mark.parametrize("cls", MINIMAL_CONFIGS, ids=lambda cls: cls.__name__)
@pytest.mark.parametrize("bad", (0, -1, 1.5, True, "2"))
def test_json_programs_refuse_a_bad_num_threads(cls, bad, tmp_path, caplog):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**MINIMAL_CONFIGS[cls], "output_dir": str(tmp_path / "out"), "num_threads": bad}))
    with caplog.at_level(logging.ERROR):
        status = run_program(cls, lambda config: pytest.fail("ran with a bad num_threads"), "test", argv=[str(path)])
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert status == 2 and len(errors) == 1 and "num_threads" in errors[0], errors
    assert len(errors[0].splitlines()) == 1 and os.listdir(tmp_path) == ["config.json"]


# --- the programs run torch with the threads asked for ------------------------------------------------------------

@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("threads")
    base = make_tiny_bert(str(root / "base"), seed=0, num_hidden_layers=1)
    models = [perturbed_copy(base, str(root / f"ft{i}"), seed=i) for i in (1, 2)]
    return {"base": base, "models": models, "data": tiny_data_dir(root / "data", tasks=("sst2", "rotten_tomatoes"),
                                                                   sizes={"train": 8, "validation": 8})}


def recording(monkeypatch, module, name):
    """Wrap `module.name` so that each call records torch's thread count; returns the list of counts."""
    seen, original = [], getattr(module, name)

    def wrapped(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return seen


def test_predict_runs_with_num_threads(zoo, tmp_path, monkeypatch, restore_threads):
    from modelmerge.prediction import evaluation, program

    torch.set_num_threads(1)
    seen = recording(monkeypatch, evaluation, "predict")
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_name_or_path": zoo["base"], "dataset_name": "sst2", "split": "validation",
                                "data_dir": zoo["data"], "batch_size": 4, "max_length": 32, "num_threads": 2,
                                "output_dir": str(tmp_path / "out")}))
    assert run_program(PredictConfig, program.run, "predict", argv=[str(path)]) == 0
    assert seen == [2]


def test_trim_runs_with_threads(zoo, tmp_path, monkeypatch, restore_threads):
    import trim
    from modelmerge.merging import trim as library

    torch.set_num_threads(1)
    seen = recording(monkeypatch, library, "trim_by_magnitude")
    run_cli(trim.main, ["--model", zoo["models"][0], "--ancestor", zoo["base"], "--density", "0.5", "--threads", "2",
                        "--output", str(tmp_path / "out")])
    assert seen and set(seen) == {2}


def test_regmean_plusplus_runs_with_threads(zoo, tmp_path, monkeypatch, restore_threads):
    import regmean_plusplus

    torch.set_num_threads(1)
    seen = recording(monkeypatch, regmean_plusplus, "regmean_plusplus")
    run_cli(regmean_plusplus.main, ["--models", *zoo["models"], "--datasets", "sst2", "rotten_tomatoes", "--data_dir",
                                    zoo["data"], "--num_examples", "4", "--batch_size", "4", "--max_length", "24",
                                    "--threads", "2", "--no_progress", "--output", str(tmp_path / "out")])
    assert seen == [2]


def test_task_arithmetic_merges_with_threads(zoo, tmp_path, record_threads, restore_threads):
    import task_arithmetic
    from modelmerge.methods.task_arithmetic import TaskArithmetic

    seen = record_threads(TaskArithmetic)
    torch.set_num_threads(1)
    run_cli(task_arithmetic.main, ["--pretrained_model_name_or_path", zoo["base"], "--ft_model_name_or_paths",
                                   ",".join(zoo["models"]), "--threads", "2", "--out_model_path", str(tmp_path / "out")])
    assert seen and set(seen) == {2} and torch.get_num_threads() == 1  # restored after the merge


# --- every Job passes its cpu_rqmt, outside the job id ------------------------------------------------------------

def jobs(cpu):
    """One of each Job of recipe/ that runs a program taking threads, with `cpu_rqmt=cpu`."""
    from model_merging import merge, search, statistics, training
    from ukp.huggingface import search as ukp_search, task_arithmetic as ukp_merge, training as ukp_training

    models, code = ["/a", "/b"], "/project/code"
    return [
        training.HuggingfaceTrainingJob({"dataset_name": "sst2"}, cpu_rqmt=cpu),
        search.EvaluationJob("/m", "sst2", "test", cpu_rqmt=cpu),
        search.MultiTaskSearchJob("/m", {"sst2": ("sst2", "test")}, cpu_rqmt=cpu),
        search.LmEvalJob("/m", ["hellaswag"], cpu_rqmt=cpu),
        statistics.FisherJob("/m", "sst2", "train", cpu_rqmt=cpu),
        statistics.GramJob("/m", "sst2", "train", cpu_rqmt=cpu),
        statistics.GradientMagnitudeJob("/base", "sst2", "train", cpu_rqmt=cpu),
        statistics.FisherJob("/m", "sst2", "train", shards=2, cpu_rqmt=cpu),
        statistics.TrimmedTaskVectorJob("/a", "/base", 0.2, cpu_rqmt=cpu),
        merge.MergeJob("tsv_m", models, ancestor="/base", cpu_rqmt=cpu),
        merge.MergeJob("tsv_m", models, ancestor="/base", shards=2, cpu_rqmt=cpu),
        merge.ModulatedMergeJob("emr", models, "/base", cpu_rqmt=cpu),
        merge.MaterialiseTaskJob("/modulated", "/base", 1, cpu_rqmt=cpu),
        merge.TaskArithmeticJob("/base", models, 0.5, cpu_rqmt=cpu),
        merge.UncertaintyBasedGradientMatchingJob("/base", models, "/h0", ["/ha", "/hb"], 1e-12,
                                                  scaling_factors_finetuned=[1, 2], cpu_rqmt=cpu),
        merge.RegMeanPlusPlusJob(models, ["/da", "/db"], cpu_rqmt=cpu),
        merge.AdaMergingJob("/base", models, ["/da", "/db"], cpu_rqmt=cpu),
        ukp_training.HuggingfaceTrainingJob(code, {"model_name_or_path": "/m"}, {"dataset_name": "sst2"}, cpu_rqmt=cpu),
        ukp_search.HuggingfaceSearchJob(code, "/m", {"method": "sequence_classification"},
                                        {"dataset_name": "sst2", "dataset_test_split": "test"}, cpu_rqmt=cpu),
        ukp_merge.TaskArithmeticJob(code, "/base", models, 0.5, cpu_rqmt=cpu),
        ukp_merge.UncertaintyBasedGradientMatchingJob(code, "/base", models, "/h0", ["/ha", "/hb"], 1e-12,
                                                      scaling_factors_finetuned=[1, 2], cpu_rqmt=cpu),
    ]


def written_threads(job):
    """The torch threads each program run of `job` is given, as the programs read what the job wrote."""
    root = gs.BASE_DIR
    work = os.path.join(root, gs.WORK_DIR, job.job_id(), "work")
    os.makedirs(os.path.join(root, gs.WORK_DIR, job.job_id(), "output"))
    os.makedirs(work)
    os.chdir(work)
    job.create_files()
    counts = []
    for line in open("run.sh").read().splitlines()[2:]:
        _, path, *arguments = line.split()
        name = os.path.basename(path)
        if name in JSON_PROGRAMS:
            counts.append(load_config(JSON_PROGRAMS[name], arguments[0]).num_threads)
            continue
        parsed = importlib.import_module(name.removesuffix(".py")).parse_args(arguments)
        counts.append((parsed[0] if isinstance(parsed, tuple) else parsed).threads)
    return counts


def test_every_job_gives_its_program_its_cpu_rqmt_as_threads_outside_the_job_id(tmp_path, monkeypatch):
    monkeypatch.setattr(gs, "CODE_ROOT", "/project/code", raising=False)
    monkeypatch.setattr(gs, "PYTHON_EXE", "/usr/bin/python3", raising=False)
    monkeypatch.chdir(tmp_path)
    ids = {}
    for cpu in (3, 1):
        monkeypatch.setattr(gs, "BASE_DIR", str(tmp_path / str(cpu)))
        monkeypatch.setattr(sisyphus.job, "created_jobs", {})  # a job made before keeps its resources
        made = jobs(cpu)
        ids[cpu] = [job.job_id() for job in made]
        for job in made:
            counts = written_threads(job)
            assert counts and set(counts) == {cpu}, (job.job_id(), counts)
    assert ids[3] == ids[1]  # cpu_rqmt stays out of the id


def test_the_table_above_holds_every_job_that_runs_a_program_with_threads(tmp_path, monkeypatch):
    from model_merging import data, families, merge, report, search, statistics, training  # noqa: F401
    from model_merging.program_job import CommandJob, ProgramJob
    from ukp.huggingface import search as ukp_search, task_arithmetic, training as ukp_training  # noqa: F401

    def subclasses(cls):
        return {cls} | {c for sub in cls.__subclasses__() for c in subclasses(sub)}

    monkeypatch.setattr(gs, "BASE_DIR", str(tmp_path))
    monkeypatch.setattr(sisyphus.job, "created_jobs", {})
    ours = {cls for cls in subclasses(CommandJob) if cls.__module__.startswith(("model_merging.", "ukp."))}
    bases = {CommandJob, ProgramJob, search.PredictJob, merge.TaskDataMergeJob}
    without = {cls for cls in ours if getattr(cls, "threads_key", "") is None}
    assert without == {data.DownloadDatasetJob, families.OfflineSuiteJob, report.ReportJob}  # no torch arithmetic
    assert ours - bases - without == {type(job) for job in jobs(1)}
