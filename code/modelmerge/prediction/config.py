"""The keys of `code/predict.py` (`PredictConfig`), checked before anything runs, the paper authors' keys among
them (docs/programs.md)."""
import dataclasses
import os
import typing

from modelmerge import shards
from modelmerge.config import SHARED_PAPER_KEYS, Alias, ConfigError, Ignored
from modelmerge.data import DataKeys
from modelmerge.prediction.loading import config_device
from modelmerge.threads import default_threads

# Config keys naming a file beside output_dir with the run's summary (metrics.json of an evaluation,
# stats.json of a statistic) and its per-example rows (predictions; a Fisher's labels y_i).
SUMMARY_FILES = ("metric_output_file", "prediction_output_file")


# What predict.py computes (`mode`); the authors' configs name two of them by the key `method` (AUTHORS_MODES).
MODES = ("evaluate", "squared_gradients", "gram", "gradient_magnitude")
AUTHORS_MODES = {"sequence_classification": "evaluate",
                 "sequence_classification_squared_gradients": "squared_gradients"}


# Training keys of the authors' configs, with their types (the authors' HuggingfaceSearchJob,
# ukp.huggingface.search, receives them too).
TRAINING_ONLY_PAPER_KEYS = {
    "learning_rate": float, "per_device_train_batch_size": int, "gradient_accumulation_steps": int,
    "warmup_steps": int, "min_lr": float, "beta1": float, "beta2": float, "dropout": float | None,
    "max_grad_norm": float, "optimizer_name": str, "num_train_epochs": float,
}


@dataclasses.dataclass
class PredictConfig(DataKeys):
    """Keys of `code/predict.py` (beside the data keys of DataKeys); `mode` selects evaluation or a statistic
    (docs/programs.md, families.md)."""

    model_name_or_path: str
    output_dir: str | None = None  # required unless metric_output_file or prediction_output_file is given
    dataset_name: str | None = None
    split: str | None = None
    # Several evaluations of the one model in one run: {name: {"dataset_name": ..., "split": ...}}, each
    # written to output_dir/<name>/ (mode evaluate; instead of dataset_name and split).
    evaluations: dict | None = None
    mode: typing.Literal[MODES] = "evaluate"
    max_new_tokens: int = 32  # greedy decoding of seq2seq / causal LM evaluation
    batch_size: int = 32
    num_examples: int | None = None  # use only the first ones of the split
    seed: int = 0  # labels sampled for the statistics
    # statistics with the gold labels instead of sampled ones (None: gold for gradient_magnitude, as TATR's)
    empirical: bool | None = None
    num_threads: int | None = None  # torch threads; None: the job's CPU allocation
    device: str | None = None  # cpu, cuda or cuda:N; None: cuda when available
    overwrite: bool = False  # replace outputs that this program did not write
    # Copies of metrics.json / predictions.jsonl at these paths (the paper's evaluation config names them).
    metric_output_file: str | None = None
    prediction_output_file: str | None = None
    # A sharded run (modelmerge.shards): "I/N" computes the I-th of N consecutive slices of the examples and writes a
    # part into output_dir; `join` (the N part folders, in order) writes from them what the unsharded run writes.
    shard: str | None = None
    join: list[str] | None = None

    # The paper authors' keys (evaluate_roberta_imdb.json, fisher_roberta_imdb.json); see modelmerge.config.
    PAPER_KEYS = {
        **SHARED_PAPER_KEYS,
        "per_device_eval_batch_size": Alias("batch_size"),
        "dataset_test_split": Alias("split"),
        "method": Alias("mode", AUTHORS_MODES),
        "track_fim": Ignored("the authors' code does not read it either; mode squared_gradients (their method "
                             "sequence_classification_squared_gradients) computes the Fisher", bool),
        # The authors' config/example.py passes its whole training config to HuggingfaceSearchJob.
        **{key: Ignored("a training hyperparameter; evaluation and statistics do not use it", kind)
           for key, kind in TRAINING_ONLY_PAPER_KEYS.items()},
    }

    def __post_init__(self):
        super().__post_init__()
        if self.empirical is None:
            self.empirical = self.mode == "gradient_magnitude"
        self._check_datasets()
        if self.num_threads is None:
            self.num_threads = default_threads()
        for key in ("batch_size", "num_threads", "num_examples", "max_new_tokens"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"{key} must be at least 1, got {value}")
        config_device(self.device)
        files = [key for key in SUMMARY_FILES if getattr(self, key) is not None]
        if self.output_dir is None and (self.mode != "evaluate" or not files):
            raise ConfigError("missing required key(s) output_dir (an evaluation may give metric_output_file / "
                              "prediction_output_file instead)")
        if files and self.evaluations is not None:
            raise ConfigError(f"{', '.join(files)}: only with one dataset_name and split, not with evaluations")
        if self.prediction_output_file is not None and self.mode == "gram":
            raise ConfigError(f"prediction_output_file: mode {self.mode} has no per-example rows to write "
                              "(metric_output_file takes its stats.json)")
        self._check_sharding(files)

    def _check_sharding(self, files):
        if self.shard is not None and self.join is not None:
            raise ConfigError("give shard (compute one part) or join (join the parts), not both")
        if self.shard is not None:
            try:
                shards.parse_shard(self.shard)
            except ValueError as error:
                raise ConfigError(str(error)) from None
            if files:
                raise ConfigError(f"{', '.join(files)}: not with shard (a part has no summary; the join writes it)")
        if self.join is not None and (not self.join or not all(isinstance(p, str) and p for p in self.join)):
            raise ConfigError("join must be a non-empty list of the part folders of a sharded run")

    def examples(self, name, dataset):
        """The positions of `dataset` (the evaluation `name`'s) this run computes: a shard's slice, else all."""
        if self.shard is None:
            return range(len(dataset))
        index, count = shards.parse_shard(self.shard)
        examples = shards.shard_range(len(dataset), index, count)
        if not examples:
            raise ConfigError(f"shard {self.shard}: the {len(dataset)} examples{f' of {name}' if name else ''} "
                              f"leave shard {index} none; use at most {len(dataset)} shards")
        return examples

    def output_paths(self):
        return {key: getattr(self, key) for key in ("output_dir", *SUMMARY_FILES) if getattr(self, key) is not None}

    def _check_datasets(self):
        if self.evaluations is None:
            missing = [key for key in ("dataset_name", "split") if getattr(self, key) is None]
            if missing:
                raise ConfigError(f"missing required key(s) {', '.join(missing)} (or give `evaluations`)")
            return
        if self.dataset_name is not None or self.split is not None:
            raise ConfigError("give either dataset_name and split, or evaluations, not both")
        if self.mode != "evaluate":
            raise ConfigError(f"evaluations: only for mode evaluate, not {self.mode}")
        if not isinstance(self.evaluations, dict) or not self.evaluations:
            raise ConfigError("evaluations must be a non-empty object {name: {dataset_name, split}}")
        for name, spec in self.evaluations.items():
            if not name or name != os.path.basename(name) or name.startswith("."):
                raise ConfigError(f"evaluations: {name!r} is not usable as a folder name")
            if not isinstance(spec, dict) or set(spec) != {"dataset_name", "split"} or not all(
                    isinstance(v, str) for v in spec.values()):
                raise ConfigError(f"evaluations.{name} must be {{\"dataset_name\": str, \"split\": str}}, got {spec!r}")

    def datasets(self):
        """(output subfolder or None for output_dir itself, dataset name, split) of each evaluation."""
        if self.evaluations is None:
            return [(None, self.dataset_name, self.split)]
        return [(name, spec["dataset_name"], spec["split"]) for name, spec in self.evaluations.items()]
