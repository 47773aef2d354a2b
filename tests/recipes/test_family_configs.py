"""config/vit_tasks.py and config/t5_tasks.py build their graphs (both presets): every task model with its
statistics, every merge method of the library, every model evaluated on every task. (The offline presets run
end to end with `python benchmarks/family_configs.py`.)"""
import os
import sys

import pytest
from sis_util import REPO, jobs_below

sys.path[:0] = [REPO, os.path.join(REPO, "recipe")]


@pytest.mark.parametrize("config, preset", [("vit_tasks", "offline"), ("vit_tasks", "full"), ("t5_tasks", "offline"),
                                            ("t5_tasks", "full")])
def test_graph_of_every_preset(config, preset, monkeypatch):
    import importlib

    from model_merging.catalogue import SWEEPS
    from model_merging.families import build_suite
    from model_merging.selection import setting_label

    module = importlib.import_module(f"config.{config}")
    chosen = getattr(module, f"{preset}_preset")()
    results, report = build_suite(chosen)
    tasks = list(chosen["tasks"])
    methods = [label for label, entry in SWEEPS.items() if entry["kind"] != "data-aware"]
    multitask = {"multitask"} if chosen.get("multitask") else set()
    fixed = {"pretrained", *(f"fine-tuned {t}" for t in tasks), *multitask}
    settings = {setting_label(label, SWEEPS[label]["parameter"], value)
                for label in methods for value in chosen["methods"][label]["settings"]}
    assert set(results) == fixed | settings
    assert all(set(by_task) == set(tasks) for by_task in results.values())
    assert set(chosen["methods"]) == set(methods) == set(report.choices)
    for label, entry in SWEEPS.items():  # per-task methods: each task on its own model, that task only
        if entry["kind"] == "per-task":
            for by_task in report.choices[label]["test"].values():
                searches = {task: metrics.creator for task, metrics in by_task.items()}
                assert all(list(search.datasets) == [task] for task, search in searches.items())
                assert [search.model.creator.task for search in searches.values()] == list(range(1, len(tasks) + 1))
                assert len({search.model.creator.modulated for search in searches.values()}) == 1
    assert chosen["task_type"] == ("image_classification" if config == "vit_tasks" else "seq2seq")
    if preset == "full":
        assert len(tasks) >= 7 and not any("offline" in str(spec["dataset"]) for spec in chosen["tasks"].values())
    assert report.results == {label: results[label] for label in fixed}
    assert all(report.choices[label]["test"][value] == results[setting_label(label, SWEEPS[label]["parameter"], value)]
               for label in methods for value in chosen["methods"][label]["settings"])


@pytest.mark.parametrize("config", ["vit_tasks", "t5_tasks"])
def test_each_method_is_merged_at_every_setting_and_each_merge_evaluated_once_on_validation(config):
    """One merge per grid value (the offline preset's three about the grid's middle, its α grid), each evaluated
    once on every task's validation split and once on its test split; a method merged once needs no validation."""
    import importlib

    from model_merging.families import build_suite
    from model_merging.merge import MergeJob
    from model_merging.search import MultiTaskSearchJob

    preset = importlib.import_module(f"config.{config}").offline_preset()
    _, report = build_suite(preset)
    tasks = list(preset["tasks"])
    assert list(preset["methods"]["ties"]["settings"]) == [0.2, 0.3, 0.5]  # of 0.1, 0.2, 0.3, 0.5: middle 0.3 kept
    assert list(preset["methods"]["tsv-m"]["settings"]) == [0.3, 0.6, 1.0]
    assert preset["methods"]["ties"]["parameters"] == {"density": 0.3, "merge_lambda": 1.0}  # the setting of before
    for label in ("ties", "tsv-m", "regmean", "gradient matching"):
        choice, settings = report.choices[label], preset["methods"][label]["settings"]
        assert list(choice["test"]) == list(choice["validation"]) == list(settings)
        merges = {}
        for value, parameters in settings.items():
            searches = {split: {metrics.creator for metrics in choice[split][value].values()}
                        for split in ("validation", "test")}
            assert all(len(jobs) == 1 for jobs in searches.values())  # one evaluation of every task per split
            (validation,), (test,) = searches["validation"], searches["test"]
            assert isinstance(validation, MultiTaskSearchJob) and validation is not test
            assert {task: split for task, (_, split) in validation.datasets.items()} == {
                task: preset["tasks"][task]["splits"]["validation"] for task in tasks}
            assert {task: split for task, (_, split) in test.datasets.items()} == {
                task: preset["tasks"][task]["splits"]["test"] for task in tasks}
            assert validation.model == test.model
            merge = validation.model.creator
            assert isinstance(merge, MergeJob) and merge.parameters == parameters
            merges[value] = merge
        assert len({id(job) for job in merges.values()}) == len(settings)
    assert report.choices["average"]["validation"] == {} and list(report.choices["average"]["test"]) == [None]
    mats = {job.initial for job in (next(iter(by_task.values())).creator.model.creator
                                    for by_task in report.choices["mats (regmean)"]["test"].values())}
    assert len(mats) == 1  # every MaTS setting starts from task arithmetic at the suite's α
    assert next(iter(mats)).creator.parameters["merge_lambda"] == 0.3


def test_offline_t5_starts_from_a_trained_model_and_has_a_multitask_reference():
    """θ_0 of the offline T5 suite is the random T5 trained on the pretraining task, every task model and the
    multitask model (on the mixture of the four tasks) are fine-tuned from it, and H_0 is taken on pretraining data."""
    from config.t5_tasks import OFFLINE_PRETRAINING, offline_preset
    from model_merging.families import build_suite
    from model_merging.statistics import FisherJob
    from model_merging.training import HuggingfaceTrainingJob

    preset = offline_preset()
    _, report = build_suite(preset)
    jobs = jobs_below(report)
    trainings = [job for job in jobs if isinstance(job, HuggingfaceTrainingJob)]
    by_data = {str(job.train_config["dataset_name"]): job for job in trainings}
    suite_data = preset["pretraining"]["dataset"]
    pretraining = by_data[str(suite_data)]
    assert pretraining.train_config["model_name_or_path"] == preset["model"]
    assert pretraining.train_config["learning_rate"] == preset["pretraining"]["training"]["learning_rate"]
    theta_0 = pretraining.out_best_model
    others = [job for job in trainings if job is not pretraining]
    assert all(job.train_config["model_name_or_path"] == theta_0 for job in others)
    mixtures = [job for job in others if isinstance(job.train_config["dataset_name"], list)]
    task_data = [spec["dataset"] for spec in preset["tasks"].values()]
    assert len(mixtures) == 1 and mixtures[0].train_config["dataset_name"] == task_data
    assert len(others) == len(preset["tasks"]) + 1
    fishers_of_theta_0 = [job for job in jobs if isinstance(job, FisherJob) and job.model == theta_0]
    assert [job.dataset_name for job in fishers_of_theta_0] == [suite_data] and OFFLINE_PRETRAINING in str(suite_data)


def test_a_suite_preset_shards_its_statistics_and_evaluations():
    """`shards` of a suite preset reaches every Fisher / Gram and evaluation job; without it the ids are unchanged."""
    from config.t5_tasks import offline_preset
    from model_merging.families import build_suite
    from model_merging.search import PredictJob

    def predict_jobs(preset):
        return [job for job in jobs_below(build_suite(preset)[1]) if isinstance(job, PredictJob)]

    plain = predict_jobs(offline_preset())
    assert plain and all(job.shards == 1 for job in plain)
    sharded = predict_jobs({**offline_preset(), "shards": {"statistics": 2, "evaluation": 3}})
    assert sorted({(job.mode, job.shards) for job in sharded}) == [
        ("evaluate", 3), ("gradient_magnitude", 2), ("gram", 2), ("squared_gradients", 2)]
    assert not {job.job_id() for job in plain} & {job.job_id() for job in sharded}


def test_the_suite_and_the_sweep_merge_tatr_gradient_from_theta_0s_gradient_magnitude_on_each_task():
    """tatr_gradient's statistic of task t is a GradientMagnitudeJob of θ_0 on task t's statistics data, in the family
    suites and in config/merging_methods.py's sweep (its grid: the preset's α grid, q fixed at 0.99)."""
    from config import merging_methods
    from config.vit_tasks import offline_preset
    from model_merging import pipeline, presets
    from model_merging.catalogue import SWEEPS, grid
    from model_merging.families import build_suite
    from model_merging.statistics import GradientMagnitudeJob

    def magnitudes_of(merged_model, tasks):
        job = merged_model.creator
        assert job.method == "tatr_gradient" and job.ancestor_aux_data is None
        creators = [folder.creator for folder in job.aux_data]
        assert all(isinstance(c, GradientMagnitudeJob) and c.model == job.ancestor for c in creators)
        return [(c.dataset_name, c.split) for c in creators], job

    preset = offline_preset()
    results, _ = build_suite(preset)
    model = next(iter(results["tatr_gradient (merge_lambda=0.3)"].values())).creator.model
    data, job = magnitudes_of(model, preset["tasks"])
    assert [split for _, split in data] == [spec["splits"]["statistics"] for spec in preset["tasks"].values()]
    assert len({str(dataset) for dataset, _ in data}) == len(preset["tasks"])
    assert job.parameters["threshold_quantile"] == 0.99

    sweep = presets.select("paper")  # its data sets by name: no local folder needed
    experiment = pipeline.build_experiment(sweep)
    assert grid(SWEEPS["tatr_gradient"], sweep["scaling_factors"]) == list(sweep["scaling_factors"])
    data, job = magnitudes_of(merging_methods.merge(experiment, "tatr_gradient", 0.5, {}), sweep["tasks"])
    assert data == [(experiment.data[t], sweep["tasks"][t]["fisher_split"]) for t in sweep["tasks"]]
    assert job.ancestor == experiment.pretrained and job.parameters["merge_lambda"] == 0.5
