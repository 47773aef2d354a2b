"""EleutherAI's lm-evaluation-harness (`lm_eval`) on a causal language model: the body of `code/harness_eval.py`.

A task is a harness task by name (its data from the Hub, or the Hugging Face cache) or the path of a local task
YAML file in the harness's format (its `task` must be the file's name without `.yaml`; a relative `dataset_path`
or `data_files` is taken from the YAML file's folder, so local jsonl data lies beside it). With only local tasks
the run is offline (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE, TRANSFORMERS_OFFLINE), unless `offline` says otherwise.

Outputs, in `output_dir` (atomically): `harness/<model>/results_<date>.json`, the results as the harness's own
`--output_path` writes them (and `samples_<task>_<date>.jsonl` with `log_samples`); `metrics.json` (the mean
`accuracy` over the tasks, `num_examples`, and each task's metrics) and `metrics/<task>.json` for every task
and group in the results, as predict.py's metrics.json: `accuracy` (the harness's `acc`, else `exact_match`),
`num_examples`, and the harness's metrics by their names (`acc`, `acc_norm`, `acc_stderr`, ...).
"""
import dataclasses
import glob
import json
import logging
import os

from modelmerge.atomic import atomic_dir, write_json
from modelmerge.config import ConfigError
from modelmerge.outputs import claim
from modelmerge.threads import default_threads, set_torch_threads

logger = logging.getLogger(__name__)

OUTPUT_KIND = "harness"
TASK_FILE_SUFFIXES = (".yaml", ".yml")
ACCURACY_METRICS = ("acc", "exact_match")  # the harness's name of a task's accuracy, first found wins
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


@dataclasses.dataclass
class HarnessConfig:
    model_name_or_path: str  # a causal LM: a model folder (a merge's output) or a Hub id
    tasks: list[str]  # harness task names, or paths of local task YAML files
    output_dir: str
    num_fewshot: int | None = None  # None: each task's own default
    limit: int | None = None  # at most this many examples per task; None: all
    batch_size: int = 8
    offline: bool | None = None  # None: offline when every task is a local file
    log_samples: bool = False  # also write each example's requests and scores (samples_*.jsonl)
    seed: int = 0
    num_threads: int | None = None  # torch threads; None: the job's CPU allocation
    device: str | None = None  # cpu, cuda or cuda:N; None: cuda when available
    overwrite: bool = False  # replace an output_dir this program did not write

    def __post_init__(self):
        if not self.tasks:
            raise ConfigError("tasks: name at least one harness task or task YAML file")
        for key in ("batch_size", "limit", "num_threads"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ConfigError(f"num_fewshot must be at least 0, got {self.num_fewshot}")
        if self.num_threads is None:
            self.num_threads = default_threads()
        if self.offline is None:
            self.offline = all(is_task_file(task) for task in self.tasks)

    def output_paths(self):
        return {"output_dir": self.output_dir}


def is_task_file(task):
    return task.endswith(TASK_FILE_SUFFIXES)


def local_task(path):
    """The harness config (a dict) of the task YAML file `path`, its relative data paths made absolute."""
    from lm_eval.tasks._yaml_loader import load_yaml

    if not os.path.isfile(path):
        raise ConfigError(f"tasks: the task file {path} does not exist")
    try:
        config = load_yaml(path)
    except Exception as error:  # the harness's loader raises YAML, import and value errors alike
        raise ConfigError(f"tasks: {path} is not a task YAML file the harness can read "
                          f"({str(error).splitlines()[0]})") from None
    name = os.path.splitext(os.path.basename(path))[0]
    if config.get("task") != name:
        raise ConfigError(f"tasks: {path} defines task {config.get('task')!r}; name the task as its file ({name!r})")
    folder = os.path.dirname(os.path.abspath(path))

    def beside(value):
        candidate = os.path.normpath(os.path.join(folder, value))
        return candidate if not os.path.isabs(value) and os.path.exists(candidate) else value

    if isinstance(config.get("dataset_path"), str):
        config["dataset_path"] = beside(config["dataset_path"])
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, str):
        config["dataset_kwargs"]["data_files"] = beside(files)
    elif isinstance(files, list):
        config["dataset_kwargs"]["data_files"] = [beside(f) for f in files]
    elif isinstance(files, dict):
        config["dataset_kwargs"]["data_files"] = {
            split: [beside(f) for f in f_] if isinstance(f_, list) else beside(f_) for split, f_ in files.items()}
    return config


def resolve_tasks(tasks):
    """(what simple_evaluate takes: local task dicts and harness names, the TaskManager); ConfigError for a name
    that is neither a task file nor a task of the installed harness."""
    from lm_eval.tasks import TaskManager

    names = [task for task in tasks if not is_task_file(task)]
    manager = TaskManager(include_defaults=bool(names))  # indexing the harness's own tasks takes seconds
    for name in names:
        if name not in manager.all_tasks:
            raise ConfigError(f"tasks: {name!r} is neither a task of lm-eval {harness_version()} nor a task YAML file "
                              f"(ending {' or '.join(TASK_FILE_SUFFIXES)})")
    return [local_task(task) if is_task_file(task) else task for task in tasks], manager


def harness_version():
    from importlib.metadata import version

    return version("lm_eval")


def check_causal_lm(path):
    """Raise ConfigError unless `path` (a folder or id) is a causal language model (its saved architecture a
    causal LM class, or, without one, a model type AutoModelForCausalLM can load)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from modelmerge import families
    from modelmerge.prediction.loading import check_model_path

    check_model_path(path)
    config = AutoConfig.from_pretrained(path)
    causal = {name for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
              for name in ([names] if isinstance(names, str) else names)}
    if config.architectures:
        if not set(config.architectures) & causal:
            raise ConfigError(f"model_name_or_path: {path} is a {', '.join(config.architectures)}, not a causal "
                              "language model; harness tasks need one (AutoModelForCausalLM)")
        return
    try:
        families.check_task_type(config, "causal_lm", path)
    except families.ModelMismatch as error:
        raise ConfigError(f"model_name_or_path: {error}") from None


def task_metrics(results, counts):
    """{task: {metric: value}} from the harness's results ({task: {"acc,none": ...}}): metric names without their
    filter (the first filter of each metric kept), `accuracy` (ACCURACY_METRICS) and `num_examples` added."""
    metrics = {}
    for task, values in results.items():
        named = {}
        for key, value in values.items():
            metric, _, _ = key.partition(",")
            if "," in key and isinstance(value, (int, float)) and metric not in named:
                named[metric] = value
        accuracy = next((named[m] for m in ACCURACY_METRICS if m in named), None)
        if accuracy is not None:
            named["accuracy"] = float(accuracy)
        if task in counts:
            named["num_examples"] = int(counts[task]["effective"])
        metrics[task] = named
    return metrics


def summary(metrics, tasks):
    """metrics.json of the run: the mean accuracy over the requested `tasks` that have one, the examples, each task."""
    accuracies = [metrics[t]["accuracy"] for t in tasks if "accuracy" in metrics.get(t, {})]
    result = {"num_examples": sum(metrics[t].get("num_examples", 0) for t in tasks if t in metrics), "tasks": metrics}
    if accuracies:
        result = {"accuracy": sum(accuracies) / len(accuracies), **result}
    return result


def run(config):
    """Check the model, the tasks and the output; run the harness; write its results and the metrics."""
    if config.offline:
        os.environ.update({name: "1" for name in OFFLINE_VARIABLES})  # before datasets and the hub are imported
    from modelmerge.prediction.loading import config_device

    set_torch_threads(config.num_threads)
    device = config_device(config.device)
    check_causal_lm(config.model_name_or_path)
    tasks, manager = resolve_tasks(config.tasks)
    claim(config.output_dir, "output_dir", OUTPUT_KIND, inputs=[config.model_name_or_path], overwrite=config.overwrite)

    import lm_eval
    from lm_eval.loggers import EvaluationTracker

    with atomic_dir(config.output_dir, OUTPUT_KIND, inputs=[config.model_name_or_path],
                    overwrite=config.overwrite) as tmp:
        tracker = EvaluationTracker(output_path=os.path.join(tmp, "harness"))
        results = lm_eval.simple_evaluate(
            model="hf", model_args={"pretrained": config.model_name_or_path}, device=str(device),
            batch_size=config.batch_size, tasks=tasks, num_fewshot=config.num_fewshot, limit=config.limit, task_manager=manager,
            log_samples=config.log_samples, evaluation_tracker=tracker, random_seed=config.seed,
            numpy_random_seed=config.seed, torch_random_seed=config.seed, fewshot_random_seed=config.seed)
        samples = results.pop("samples", None)
        tracker.save_results_aggregated(results=results, samples=samples)
        for task in samples or {}:
            tracker.save_results_samples(task_name=task, samples=samples[task])
        if not glob.glob(os.path.join(tmp, "harness", "*", "results_*.json")):
            raise RuntimeError("the harness wrote no results file (see its log above)")
        metrics = task_metrics(results["results"], results.get("n-samples", {}))
        names = [task["task"] if isinstance(task, dict) else task for task in tasks]
        write_json(os.path.join(tmp, "metrics.json"), summary(metrics, names))
        os.makedirs(os.path.join(tmp, "metrics"))
        for task, values in metrics.items():
            write_json(os.path.join(tmp, "metrics", f"{task}.json"), values)
    for task in names:
        logger.info("%s: %s", task, json.dumps(metrics.get(task, {})))
    logger.info("wrote %s", config.output_dir)
