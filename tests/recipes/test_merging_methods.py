"""config/merging_methods.py's per-task methods (EMR-Merging, TALL masks): the jobs that write a modulated
merge and materialise each task's model give the models code/modulated_merge.py gives, and the config
chooses their setting on validation with each task evaluated on its own model (TALL's λ_t for each task), then
reports them on test."""
import asyncio
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tiny import make_tiny_bert, perturbed_copy

import sisyphus.global_settings as gs
from sisyphus import tk
from sisyphus.job_path import Variable
from model_merging.merge import (MaterialiseTaskJob, ModulatedMergeJob, TaskArithmeticJob,
                                 UncertaintyBasedGradientMatchingJob, per_task_models)
from model_merging.search import MultiTaskSearchJob
from sis_util import REPO

sys.path[:0] = [REPO, os.path.join(REPO, "recipe")]


def _run_job(job):
    """Write the job's run.sh in its work folder and run its program, as a Sisyphus worker does."""
    folder = os.path.join(gs.BASE_DIR, gs.WORK_DIR, job.job_id())
    os.makedirs(os.path.join(folder, "output"), exist_ok=True)
    os.makedirs(os.path.join(folder, "work"), exist_ok=True)
    cwd = os.getcwd()
    os.chdir(os.path.join(folder, "work"))
    try:
        job.create_files()
        job.run()
    finally:
        os.chdir(cwd)


def _weights(folder):
    return load_file(os.path.join(str(folder), "model.safetensors"))


@pytest.mark.slow
def test_jobs_materialise_each_task_as_the_program_does(tmp_path, monkeypatch):
    monkeypatch.setattr(gs, "BASE_DIR", str(tmp_path / "setup"))
    monkeypatch.setattr(gs, "CODE_ROOT", os.path.join(REPO, "code"), raising=False)
    monkeypatch.setattr(gs, "PYTHON_EXE", sys.executable, raising=False)
    base = make_tiny_bert(str(tmp_path / "base"), seed=0, num_hidden_layers=1)
    models = [perturbed_copy(base, str(tmp_path / f"ft{i}"), seed=i, scale=0.05) for i in (1, 2, 3)]

    merged = ModulatedMergeJob("tall_masks", models, base, parameters={"tall_mask_lambda": 0.4})
    unified, own = per_task_models("tall_masks", models, base, {"tall_mask_lambda": 0.4})
    assert unified is merged.out_unified and len(own) == 3
    assert [path.creator for path in own] == [MaterialiseTaskJob(merged.out_dir, base, t) for t in (1, 2, 3)]
    _run_job(merged)
    _run_job(own[1].creator)

    program = os.path.join(REPO, "code", "modulated_merge.py")
    direct = tmp_path / "direct"
    for argv in (["--merge", "tall_masks", "--models", *models, "--ancestor", base, "--x:tall_mask_lambda", "0.4",
                  "--output", str(direct)],
                 ["--materialise", str(direct), "--task", "2", "--ancestor", base, "--output", str(tmp_path / "task2")]):
        subprocess.run([sys.executable, program, *argv, "--no_progress"], check=True, capture_output=True)
    expected, got = _weights(tmp_path / "task2"), _weights(own[1].get_path())
    assert set(got) == set(expected) and all(torch.equal(got[n], expected[n]) for n in expected)
    assert not all(torch.equal(got[n], _weights(merged.out_unified.get_path())[n]) for n in got)  # masked, not unified


TALL_BEST = {"rotten_tomatoes": 0.4, "imdb": 0.2, "yelp": 0.6, "amazon": 0.4}  # λ_t of the fake accuracies


def _fake_accuracy(variable):
    """Validation/test accuracy of a search job's variable: TALL masks best at λ_t = TALL_BEST[t] on task t
    (λ = 0.4 on average), everything else 0.5."""
    model = variable.creator.model
    job = getattr(model, "creator", None)
    if isinstance(job, MaterialiseTaskJob):
        job = job.modulated.creator
    task = variable.path.rsplit("accuracy.", 1)[-1]
    if isinstance(job, ModulatedMergeJob) and job.method == "tall_masks" and task in TALL_BEST:
        return 0.9 - abs(job.parameters["tall_mask_lambda"] - TALL_BEST[task])
    return 0.5


def test_config_chooses_per_task_methods_on_validation_each_task_on_its_own_model(monkeypatch):
    from config import merging_methods

    monkeypatch.setenv("MERGE_DATA_DIR", os.path.join(REPO, "data", "sentiment"))
    monkeypatch.delenv("MERGE_PRESET", raising=False)
    monkeypatch.setattr(Variable, "get", _fake_accuracy)
    awaited, reports, report_views = [], [], []

    async def no_wait(obj):
        awaited.append(obj)

    class Report:
        def __init__(self, results, sweeps=None, title=None, **views):
            reports.append(results)
            report_views.append(views)
            self.out_dir = tk.Path("report")

    monkeypatch.setattr(merging_methods.tk, "async_run", no_wait)
    monkeypatch.setattr(merging_methods.tk, "register_output", lambda *args, **kwargs: None)
    monkeypatch.setattr(merging_methods, "ReportJob", Report)
    asyncio.run(merging_methods.py())

    from model_merging import pipeline, presets
    preset = presets.select()
    experiment = pipeline.build_experiment(preset)  # the same jobs the config built (job singletons)
    pretraining, tasks = preset["pretraining"]["task"], list(preset["tasks"])
    validation = awaited[0]
    assert set(validation["tall masks (per-task)"]) == {0.2, 0.4, 0.6}
    (results,) = reports
    assert list(TALL_BEST) == tasks
    tall = f"tall masks (per-task) (tall_mask_lambda per task={'/'.join(str(v) for v in TALL_BEST.values())})"
    assert tall in results and "emr (per-task)" in results
    for label, method, parameters in ((tall, "tall_masks", {"tall_mask_lambda": 0.4}), ("emr (per-task)", "emr", {})):
        assert set(results[label]) == {pretraining, *tasks}
        searches = {task: metrics.creator for task, metrics in results[label].items()}
        assert all(isinstance(s, MultiTaskSearchJob) and list(s.datasets) == [t] for t, s in searches.items())
        assert all(s.datasets[t][1] == preset["test_splits"][t] for t, s in searches.items())
        merged = searches[pretraining].model.creator  # the pretraining task has no mask: the unified model
        assert isinstance(merged, ModulatedMergeJob) and searches[pretraining].model is merged.out_unified
        assert (merged.method, merged.parameters) == (method, parameters)  # TALL: the best λ on average
        for index, task in enumerate(tasks, start=1):
            materialise = searches[task].model.creator
            assert isinstance(materialise, MaterialiseTaskJob)
            assert materialise.task == index and materialise.ancestor == experiment.pretrained
            own = materialise.modulated.creator  # TALL: the merge with task t's best λ_t
            assert own.parameters == ({"tall_mask_lambda": TALL_BEST[task]} if method == "tall_masks" else {})
            assert own.method == method and own.ancestor == experiment.pretrained
            assert own.models == [experiment.models[t] for t in tasks]
    # the merged (not per-task) methods keep one model for every task
    ties = {metrics.creator for metrics in next(v for k, v in results.items() if k.startswith("ties")).values()}
    assert len(ties) == 1 and set(next(iter(ties)).datasets) == {pretraining, *tasks}
    # held-in against held-out: the paper's merges at their chosen α once more without the last task's model
    (views,) = report_views
    held_out, merged_tasks = tasks[-1], tasks[:-1]
    assert views["own_models"] == {pretraining: "pretrained", **{t: f"finetuned {t}" for t in tasks}}
    assert all(set(results[f"finetuned {t}"]) == {pretraining, *tasks} for t in tasks) and views["multitask"] == "multitask"
    for label, job_type in (("task arithmetic", TaskArithmeticJob), ("gradient matching", UncertaintyBasedGradientMatchingJob)):
        (full,) = [name for name in results if name.startswith(label + " (") and "without" not in name]
        without = f"{full} (without {held_out})"
        merged = {metrics.creator.model.creator for metrics in results[without].values()}
        assert len(merged) == 1 and isinstance(next(iter(merged)), job_type)
        merged = next(iter(merged))
        assert merged.finetuned_models == [experiment.models[t] for t in merged_tasks]
        assert views["held_in"][without] == [pretraining, *merged_tasks]
        assert views["held_in"][full] == [pretraining, *tasks]
    assert "pretrained" not in views["held_in"] and "multitask" not in views["held_in"]
