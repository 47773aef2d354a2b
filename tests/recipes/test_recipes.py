"""Job classes of recipe/: ids (resources left out of the hash), outputs, and the configs and commands
they write for their programs."""
import json
import os
import stat

import pytest

import sisyphus.global_settings as gs
from sisyphus import tk
from sisyphus.hash import short_hash
from model_merging.data import DownloadDatasetJob
from model_merging.merge import (AdaMergingJob, MergeJob, RegMeanPlusPlusJob, TaskArithmeticJob,
                                  UncertaintyBasedGradientMatchingJob)
from model_merging.report import ReportJob
from model_merging.search import EvaluationJob, MultiTaskSearchJob
from model_merging.statistics import FisherJob, GradientMagnitudeJob, GramJob, TrimmedModelJob, TrimmedTaskVectorJob
from model_merging.training import HuggingfaceTrainingJob


@pytest.fixture
def setup_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(gs, "BASE_DIR", str(tmp_path))
    monkeypatch.setattr(gs, "CODE_ROOT", "/project/code", raising=False)
    monkeypatch.setattr(gs, "PYTHON_EXE", "/usr/bin/python3", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _create_files(job, tmp_path):
    os.makedirs(os.path.join(tmp_path, gs.WORK_DIR, job.job_id(), "output"))
    work = os.path.join(tmp_path, gs.WORK_DIR, job.job_id(), "work")
    os.makedirs(work)
    cwd = os.getcwd()
    os.chdir(work)
    try:
        job.create_files()
    finally:
        os.chdir(cwd)
    script = os.path.join(work, "run.sh")
    assert os.stat(script).st_mode & stat.S_IXUSR
    return open(script).read().splitlines()[-1]


def test_resources_stay_out_of_the_hash(setup_dir):
    a = EvaluationJob("/models/m", "sst2", "test", {"batch_size": 8}, cpu_rqmt=1, mem_rqmt=2)
    b = EvaluationJob("/models/m", "sst2", "test", {"batch_size": 8}, cpu_rqmt=4, mem_rqmt=16, gpu_rqmt=1)
    assert a is b  # one job per id: resources do not make a new one
    c = EvaluationJob("/models/m", "sst2", "test[:10%]", {"batch_size": 8})
    assert c.job_id() != a.job_id()
    # The id is the hash of exactly the non-resource arguments, defaults filled in.
    expected = {"model": "/models/m", "dataset_name": "sst2", "split": "test", "config": {"batch_size": 8}}
    assert a.job_id() == f"model_merging/search/EvaluationJob.{short_hash(expected)}"

    ta = TaskArithmeticJob("/m0", ["/m1", "/m2"], 0.5, time_rqmt=9)
    expected = {"pretrained_model": "/m0", "finetuned_models": ["/m1", "/m2"], "scaling_factor": 0.5, "task_type": "SEQ_CLS"}
    assert ta.job_id() == f"model_merging/merge/TaskArithmeticJob.{short_hash(expected)}"


def test_training_job_outputs_and_config(setup_dir):
    base = DownloadDatasetJob("sst2", data_dir="/data")
    other = DownloadDatasetJob("imdb", data_dir="/data")
    job = HuggingfaceTrainingJob({"model_name_or_path": "/models/base", "dataset_name": [base.out_dir, other.out_dir],
                                  "train_split": ["train[:10]", "train"], "validation_split": ["validation", "validation"],
                                  "learning_rate": 3e-5}, num_epochs=2)
    out = os.path.join(setup_dir, gs.WORK_DIR, job.job_id(), "output")
    assert job.out_best_model.get_path() == os.path.join(out, "training", "best")
    assert sorted(job.out_models) == [1, 2]
    assert job.out_models[2].get_path() == os.path.join(out, "training", "epoch-2")
    assert {base, other} <= {p.creator for p in job._sis_inputs}  # the data jobs are dependencies

    command = _create_files(job, setup_dir)
    assert command == f"/usr/bin/python3 /project/code/train.py {job.out_config_file.get_path()}"
    config = json.load(open(job.out_config_file.get_path()))
    assert config["dataset_name"] == f"{base.out_dir.get_path()};{other.out_dir.get_path()}"
    assert config["train_split"] == "train[:10];train"
    assert config["output_dir"] == os.path.join(out, "training")
    assert config["num_train_epochs"] == 2 and config["learning_rate"] == 3e-5


def test_predict_jobs_write_their_mode(setup_dir):
    model = HuggingfaceTrainingJob({"model_name_or_path": "/m", "dataset_name": "sst2"}).out_best_model
    for cls, mode, out in [(EvaluationJob, "evaluate", "search"),
                           (FisherJob, "squared_gradients", "fisher"),
                           (GramJob, "gram", "gram"),
                           (GradientMagnitudeJob, "gradient_magnitude", "gradient_magnitude")]:
        job = cls(model, "sst2", "train[:8]", {"max_length": 32})
        _create_files(job, setup_dir)
        config = json.load(open(job.out_config_file.get_path()))
        assert config == {"mode": mode, "max_length": 32, "model_name_or_path": model.get_path(),
                          "dataset_name": "sst2", "split": "train[:8]", "output_dir": job.out_dir.get_path(),
                          "num_threads": 1}  # the job's cpu_rqmt
        assert job.out_dir.get_path().endswith(os.path.join("output", out))
    fisher = FisherJob(model, "sst2", "train[:8]", {"max_length": 32})
    assert fisher.out_hessian.get_path() == os.path.join(fisher.out_dir.get_path(), "hessian")


def test_merge_job_commands(setup_dir):
    job = MergeJob("ties", ["/a", "/b"], ancestor="/base", aux_data=["/fa", "/fb"],
                   parameters={"density": 0.2, "merge_lambda": 1.0})
    command = _create_files(job, setup_dir).split()
    assert command[1:] == ["/project/code/merge.py", "--threads", "1", "--options", job.out_options.get_path()]
    assert json.load(open(job.out_options.get_path())) == {
        "method": "ties", "models": ["/a", "/b"], "statistics": ["/fa", "/fb"], "ancestor": "/base",
        "params": {"density": 0.2, "merge_lambda": 1.0}, "output": job.out_model.get_path()}

    assert MergeJob("ties", ["/a", "/b"], ancestor="/base", aux_data=["/fa", "/fb"],
                    parameters={"density": 0.2, "merge_lambda": 1.0}, allow_statistics_mismatch=False) is job
    allowed = MergeJob("fisher", ["/a", "/b"], aux_data=["/fb", "/fa"], allow_statistics_mismatch=True)
    _create_files(allowed, setup_dir)
    assert json.load(open(allowed.out_options.get_path()))["allow_statistics_mismatch"] is True

    ubgm = UncertaintyBasedGradientMatchingJob("/base", ["/a", "/b"], "/h0", ["/ha", "/hb"], 1e-12,
                                               scaling_factor=0.7, scaling_factor_pretrained=100,
                                               scaling_factors_finetuned=[10, 20])
    command = _create_files(ubgm, setup_dir).split()
    args = dict(zip(command[2::2], command[3::2]))
    assert command[1] == "/project/code/uncertainty_based_gradient_matching.py"
    assert args == {"--pretrained_model_name_or_path": "/base", "--pretrained_hessian_path": "/h0",
                    "--ft_model_name_or_paths": "/a,/b", "--ft_hessian_paths": "/ha,/hb", "--delta_0": "1e-12",
                    "--scaling_factor": "0.7", "--scaling_factor_pt": "100", "--scaling_factors_ft": "10,20",
                    "--task_type": "SEQ_CLS", "--out_model_path": ubgm.out_model_path.get_path(), "--threads": "1"}

    trim = TrimmedTaskVectorJob("/a", "/base", 0.2)
    assert TrimmedModelJob("/a", "/base", 0.2) is trim  # the old name builds the same job
    assert trim.job_id() == "model_merging/statistics/TrimmedTaskVectorJob." + short_hash(
        {"model": "/a", "ancestor": "/base", "density": 0.2})
    assert _create_files(trim, setup_dir).split()[1:] == [
        "/project/code/trim.py", "--threads", "1", "--model", "/a", "--ancestor", "/base", "--density", "0.2", "--output",
        trim.out_dir.get_path()]


def test_regmean_plusplus_job_command(setup_dir):
    job = RegMeanPlusPlusJob(["/a", "/b"], ["/da", "/db"], "train", alpha=0.9, num_examples=32)
    assert _create_files(job, setup_dir).split()[1:] == [
        "/project/code/regmean_plusplus.py", "--threads", "1", "--models", "/a", "/b", "--datasets", "/da", "/db", "--split", "train",
        "--num_examples", "32", "--batch_size", "16", "--max_length", "128", "--alpha", "0.9",
        "--output", job.out_model.get_path()]


def test_adamerging_job_command(setup_dir):
    job = AdaMergingJob("/base", ["/a", "/b"], ["/da", "/db"], iterations=50, gpu_rqmt=1)
    command = _create_files(job, setup_dir).split()
    assert command[1:6] == ["/project/code/adamerging.py", "--threads", "1", "--ancestor", "/base"]
    assert command[-4:] == ["--device", "cuda", "--output", job.out_model.get_path()]
    assert "--iterations" in command and command[command.index("--iterations") + 1] == "50"
    assert AdaMergingJob("/base", ["/a", "/b"], ["/da", "/db"], iterations=50, gpu_rqmt=0) is job  # resources not hashed


def test_report_job_config(setup_dir):
    search = EvaluationJob("/m", "sst2", "test")
    job = ReportJob({"m": {"sst2": search.out_metric_file}}, sweeps={"ta": {0.5: {"sst2": search.out_metric_file}}})
    _create_files(job, setup_dir)
    config = json.load(open(job.out_config_file.get_path()))
    assert config["results"] == {"m": {"sst2": search.out_metric_file.get_path()}}
    assert config["sweeps"] == {"ta": {"0.5": {"sst2": search.out_metric_file.get_path()}}}
    assert job.out_sweep_plot.get_path().endswith("report/sweep.png")
    assert config["own_models"] is None and config["held_in"] is None and config["multitask"] is None


def test_report_job_views_of_merging_papers(setup_dir):
    metrics = EvaluationJob("/m", "sst2", "test").out_metric_file
    results = {"m": {"sst2": metrics}, "ft": {"sst2": metrics}}
    plain = ReportJob(results, title="t")
    # reports without the new arguments keep the id they had before them
    assert plain.job_id() == "model_merging/report/ReportJob." + short_hash({"results": results, "sweeps": None, "title": "t"})
    job = ReportJob(results, title="t", own_models={"sst2": "ft"}, multitask="ft", held_in={"m": ("sst2",)})
    assert job.job_id() != plain.job_id()
    assert ReportJob(results, title="t", own_models={"sst2": "ft"}, multitask="ft", held_in={"m": ("imdb",)}).job_id() != job.job_id()
    _create_files(job, setup_dir)
    config = json.load(open(job.out_config_file.get_path()))
    assert (config["own_models"], config["multitask"], config["held_in"]) == ({"sst2": "ft"}, "ft", {"m": ["sst2"]})
    assert job.out_normalized_csv.get_path().endswith("report/normalized.csv")
    assert not hasattr(job, "out_generalization_plot")  # "m" holds sst2 in: no held-out task
    held_out = ReportJob(results, held_in={"m": []})
    assert held_out.out_generalization_plot.get_path().endswith("report/generalization.png")


def test_multitask_search_job(setup_dir):
    data = DownloadDatasetJob("imdb", data_dir="/data").out_dir
    job = MultiTaskSearchJob("/m", {"sst2": ("sst2", "test"), "imdb": (data, "test[:10]")}, {"batch_size": 4})
    _create_files(job, setup_dir)
    config = json.load(open(job.out_config_file.get_path()))
    assert config == {"mode": "evaluate", "batch_size": 4, "model_name_or_path": "/m",
                      "evaluations": {"sst2": {"dataset_name": "sst2", "split": "test"},
                                      "imdb": {"dataset_name": data.get_path(), "split": "test[:10]"}},
                      "output_dir": job.out_dir.get_path(), "num_threads": 1}
    assert job.out_metric_files["imdb"].get_path() == os.path.join(job.out_dir.get_path(), "imdb", "metrics.json")
    assert sorted(job.out_accuracies) == ["imdb", "sst2"]
    assert MultiTaskSearchJob("/m", {"sst2": ("sst2", "test"), "imdb": (data, "test[:10]")}, {"batch_size": 4},
                              cpu_rqmt=3) is job


def test_lm_eval_job_config(setup_dir):
    from model_merging.search import LmEvalJob

    task_file = tk.Path("/tasks/sentiment_sst2.yaml")
    job = LmEvalJob("/merged", [task_file, "hellaswag"], num_fewshot=2, limit=10, batch_size=4, gpu_rqmt=1)
    assert job.job_id() == LmEvalJob("/merged", [task_file, "hellaswag"], 2, 10, 4).job_id()  # resources left out
    _create_files(job, setup_dir)
    config = json.load(open(job.out_config_file.get_path()))
    assert config == {"model_name_or_path": "/merged", "tasks": ["/tasks/sentiment_sst2.yaml", "hellaswag"],
                      "num_fewshot": 2, "limit": 10, "batch_size": 4, "output_dir": job.out_dir.get_path(), "num_threads": 1}
    assert set(job.out_metric_files) == {"sentiment_sst2", "hellaswag"} == set(job.out_accuracies)
    assert job.out_metric_files["sentiment_sst2"].get_path().endswith("harness_eval/metrics/sentiment_sst2.json")
    from modelmerge.config import load_config  # the program accepts what the job wrote
    from modelmerge.harness import HarnessConfig
    assert load_config(HarnessConfig, job.out_config_file.get_path()).offline is False  # a harness task by name


def test_report_job_shows_each_method_at_its_setting_best_on_validation(setup_dir):
    """`choices`: the report reads the validation metrics when it runs and shows each method's test metrics at
    its best setting by average validation accuracy (ties to the first value), a per-task method at each task's
    own best, a method merged once as it is; `held_in` follows the method under its new label."""
    def metrics(name, accuracy):
        path = setup_dir / "metrics" / f"{name}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({"accuracy": accuracy}))
        return tk.Path(str(path))

    def grid(prefix, accuracies):  # {value: {task: accuracy}} -> {value: {task: metrics.json}}
        return {value: {task: metrics(f"{prefix}-{value}-{task}", a) for task, a in by_task.items()}
                for value, by_task in accuracies.items()}

    validation = {0.1: {"a": 0.9, "b": 0.1}, 0.3: {"a": 0.6, "b": 0.6}, 0.5: {"a": 0.2, "b": 0.9}}  # means .5 .6 .55
    test = grid("test", {value: {"a": 0.0, "b": 0.0} for value in validation})
    per_task_validation = {0.2: {"a": 0.8, "b": 0.5}, 0.4: {"a": 0.8, "b": 0.7}}  # a: tie, to 0.2; b: 0.4
    per_task_test = grid("pt-test", {value: {"a": 0.0, "b": 0.0} for value in per_task_validation})
    tied = {1: {"a": 0.5, "b": 0.5}, 2: {"a": 0.4, "b": 0.6}}
    tied_test = grid("tied-test", {value: {"a": 0.0, "b": 0.0} for value in tied})
    once = grid("once", {None: {"a": 0.3, "b": 0.3}})
    choices = {
        "ties": {"parameter": "density", "per_task": False, "test": test, "validation": grid("val", validation)},
        "tall": {"parameter": "λ", "per_task": True, "test": per_task_test,
                 "validation": grid("pt-val", per_task_validation)},
        "consensus": {"parameter": "k", "per_task": False, "test": tied_test, "validation": grid("tied-val", tied)},
        "average": {"parameter": None, "per_task": False, "test": once, "validation": {}},
    }
    ft = metrics("ft", 0.7)
    job = ReportJob({"ft": {"a": ft, "b": ft}}, choices=choices, held_in={"ties": ["a"], "average": ["a", "b"]})
    assert job.out_generalization_plot.get_path().endswith("generalization.png")  # ties holds b out
    _create_files(job, setup_dir)
    config = json.load(open(job.out_config_file.get_path()))
    paths = {value: {task: path.get_path() for task, path in by_task.items()} for value, by_task in test.items()}
    assert list(config["results"]) == ["ft", "ties (density=0.3)", "tall (λ per task=0.2/0.4)", "consensus (k=1)",
                                       "average"]
    assert config["results"]["ties (density=0.3)"] == paths[0.3]
    assert config["results"]["tall (λ per task=0.2/0.4)"] == {"a": per_task_test[0.2]["a"].get_path(),
                                                             "b": per_task_test[0.4]["b"].get_path()}
    assert config["results"]["consensus (k=1)"] == {task: path.get_path() for task, path in tied_test[1].items()}
    assert config["results"]["average"] == {task: path.get_path() for task, path in once[None].items()}
    assert config["held_in"] == {"ties (density=0.3)": ["a"], "average": ["a", "b"]}
    assert ReportJob({"ft": {"a": ft}}).job_id() != ReportJob({"ft": {"a": ft}}, choices=choices).job_id()
