"""Models of every family (`modelmerge.families`): loading (full model folders and PEFT adapter folders),
evaluation, metrics, and `run`, the body of `code/predict.py` (evaluation, or a statistic computed by
`modelmerge.statistics`)."""
import dataclasses
import json
import glob
import logging
import os
import pickle
import tempfile
import typing
from contextlib import contextmanager

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm
from transformers import AutoConfig

from modelmerge import families
from modelmerge.atomic import atomic_dir, atomic_file, releasing_outputs, write_json, write_jsonl
from modelmerge.config import SHARED_PAPER_KEYS, Alias, ConfigError, Ignored
from modelmerge.data import (TASK_TYPES, check_labels, class_names, column_mapping, load_split, local_sources,
                             resolve_data_dir)
from modelmerge.outputs import claim, json_kind
from modelmerge.merging.provenance import model_provenance
from modelmerge import shards
from modelmerge.statistics.fisher import FisherResult, combine_fisher, compute_fisher, save_fisher
from modelmerge.statistics.gram import GramResult, combine_gram, compute_gram, save_gram
from modelmerge.threads import default_threads, set_torch_threads

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Model types whose position ids start after the padding index (so max_position_embeddings overstates the inputs).
OFFSET_POSITION_MODELS = {"roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text", "xmod", "mpnet",
                          "roberta-prelayernorm", "ibert"}
# Config keys naming a file beside output_dir with the run's summary (metrics.json of an evaluation,
# stats.json of a statistic) and its per-example rows (predictions; a Fisher's labels y_i).
SUMMARY_FILES = ("metric_output_file", "prediction_output_file")
# The kinds of output predict.py writes (modelmerge.atomic), and how a file tells its kind.
OUTPUT_KIND = "predict"
FILE_KINDS = {"metric_output_file": ("metrics", json_kind("metrics", "num_examples")),
              "prediction_output_file": ("predictions", json_kind("predictions", "index", "prediction"))}


def is_adapter_folder(path):
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def check_model_path(path, key="model_name_or_path"):
    """Raise ConfigError naming `key` unless `path` is a model folder, an adapter folder or a loadable model id."""
    if os.path.isdir(path):
        if not (os.path.isfile(os.path.join(path, "config.json")) or is_adapter_folder(path)):
            raise ConfigError(f"{key}: folder {path} holds neither config.json nor {ADAPTER_CONFIG}")
        _check_weight_files(path, key)
        return
    if os.path.exists(path):
        raise ConfigError(f"{key}: {path} is a file, not a model folder")
    try:
        AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{key}: {path} is neither a model folder nor a loadable model id ({error})") from None


def _check_weight_files(folder, key):
    """Raise ConfigError naming the file when a safetensors file of `folder` is corrupt (its header cannot be read)."""
    for weights in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        try:
            with safe_open(weights, framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError) as error:
            raise ConfigError(f"{key}: weights file {weights} is corrupt or not a safetensors file ({error})") from None


@contextmanager
def model_loading_errors(path, key="model_name_or_path"):
    """Turn the errors of loading the model folder `path` (bad files, not a bug of ours) into one-line ConfigErrors."""
    try:
        yield
    except pickle.UnpicklingError as error:
        pickles = sorted(os.path.basename(p) for p in glob.glob(os.path.join(path, "*.bin"))) or ["its weights"]
        raise ConfigError(f"{key}: {', '.join(pickles)} in {path} is a pickle checkpoint that torch refuses to load "
                          f"safely ({str(error).splitlines()[0]}); convert it to safetensors") from None
    except (OSError, SafetensorError) as error:
        raise ConfigError(f"{key}: cannot load the model in {path}: {str(error).splitlines()[0]}") from None


def max_input_positions(model, tokenizer):
    """The longest input (in tokens) the model's position embeddings and its tokenizer allow, or None if unbounded."""
    config = model.config
    limits = []
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        # RoBERTa-style models number positions from padding_idx + 1: the first pad_token_id + 1 are never used.
        if config.model_type in OFFSET_POSITION_MODELS and config.pad_token_id is not None:
            positions -= config.pad_token_id + 1
        limits.append(positions)
    if 0 < getattr(tokenizer, "model_max_length", 0) < 10**6:
        limits.append(tokenizer.model_max_length)
    return min(limits) if limits else None


def check_max_length(model, tokenizer, max_length, path):
    limit = max_input_positions(model, tokenizer)
    if limit is not None and max_length > limit:
        raise ConfigError(f"max_length {max_length} exceeds the {limit} input positions of the model {path}; "
                          f"set max_length to at most {limit}")


def check_device(device, key="device"):
    """The torch.device the config key `device` names (None: cuda when available, else cpu); ConfigError if unusable."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from modelmerge.merging.options import MergeError, check_device as existing_device

    try:
        return existing_device(device)
    except MergeError as error:
        raise ConfigError(f"{key}: {error}") from None


def load_classifier(path, num_labels=None):
    """(model, tokenizer) of a sequence classifier: `load_for_task(path, "sequence_classification", ...)`."""
    return load_for_task(path, "sequence_classification", num_labels=num_labels)


def load_for_task(path, task_type="sequence_classification", num_labels=None, class_names=None):
    """(model, processor) from a model folder / model id, or from a PEFT adapter folder on top of its base model.

    `num_labels` sets the size of a new classification head (a pretrained encoder); None keeps the
    checkpoint's own (for an adapter: the size of the classifier saved with it). CLIP takes `class_names`.
    """
    if not is_adapter_folder(path):
        return families.load_model(path, task_type, num_labels=num_labels, class_names=class_names)
    from peft import PeftConfig, PeftModel

    base_path = PeftConfig.from_pretrained(path).base_model_name_or_path
    num_labels = num_labels or _adapter_num_labels(path)
    has_tokenizer = any(os.path.isfile(os.path.join(path, f)) for f in
                        ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "preprocessor_config.json"))
    base, processor = families.load_model(base_path, task_type, num_labels=num_labels, class_names=class_names,
                                          base_path=path if has_tokenizer else base_path)
    return PeftModel.from_pretrained(base, path), processor


def to_float32_if_half(model, why):
    """Cast a float16 / bfloat16 `model` to float32 in place (exact) and return the dtype it had.

    Half precision loses what training and statistics need: float16 squares of gradients below about 2e-4
    are 0 (89.7 % of a tiny BERT's Fisher was), and AdamW updates of a half-precision weight either round
    away or, without float32 master weights, blow it up."""
    dtype = next(model.parameters()).dtype
    if dtype in (torch.float16, torch.bfloat16):
        logger.info("the model is %s: loaded in float32 (%s)", str(dtype).removeprefix("torch."), why)
        model.float()
    return dtype


def classifier_num_labels(path):
    """The number of classes of the classification head saved at `path`, or None when it has none (an encoder)."""
    if is_adapter_folder(path):
        return _adapter_num_labels(path)
    config = AutoConfig.from_pretrained(path)
    if any(name.endswith("ForSequenceClassification") for name in config.architectures or []):
        return config.num_labels
    return None


def _adapter_num_labels(path):
    """Rows of the classification head saved in an adapter folder (PEFT saves the head of a SEQ_CLS task), or None."""
    weights = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isfile(weights):
        return None
    with safe_open(weights, framework="pt") as f:
        for name in f.keys():
            if name.endswith(("classifier.weight", "classifier.out_proj.weight", "score.weight")):
                return f.get_slice(name).get_shape()[0]
    return None


@torch.no_grad()
def predict(model, dataloader):
    """(labels, predictions, probabilities) as numpy arrays over every batch of `dataloader`, in order."""
    model.eval()
    device = next(model.parameters()).device
    labels, probabilities = [], []
    for batch in tqdm(dataloader, desc="predicting", unit="batch"):
        batch = {name: tensor.to(device) for name, tensor in batch.items()}
        labels.append(batch.pop("labels").cpu())
        logits = model(**batch).logits
        probabilities.append(torch.softmax(logits.float(), dim=-1).cpu())
    probabilities = torch.cat(probabilities).numpy()
    return torch.cat(labels).numpy(), probabilities.argmax(axis=-1), probabilities


def classification_metrics(labels, predictions):
    """Accuracy, macro-F1 over the classes present in labels or predictions (as scikit-learn), example count."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    f1_scores = []
    for cls in np.union1d(labels, predictions):
        true_positive = np.sum((predictions == cls) & (labels == cls))
        predicted, actual = np.sum(predictions == cls), np.sum(labels == cls)
        f1_scores.append(2 * true_positive / (predicted + actual) if predicted + actual else 0.0)
    return {
        "accuracy": float(np.mean(labels == predictions)) if len(labels) else 0.0,
        "macro_f1": float(np.mean(f1_scores)) if f1_scores else 0.0,
        "num_examples": int(len(labels)),
    }


def prediction_rows(labels, predictions, probabilities):
    """One `{"index", "label", "prediction", "probabilities"}` dict per example."""
    return [
        {"index": i, "label": int(label), "prediction": int(prediction), "probabilities": [float(p) for p in probs]}
        for i, (label, prediction, probs) in enumerate(zip(labels, predictions, probabilities))
    ]


EVALUATE = ("evaluate", "sequence_classification")
FISHER = ("squared_gradients", "sequence_classification_squared_gradients")
GRAM = ("gram", "sequence_classification_gram")


# Training keys of the authors' configs, with their types (HuggingfaceSearchJob receives them too).
TRAINING_ONLY_PAPER_KEYS = {
    "learning_rate": float, "per_device_train_batch_size": int, "gradient_accumulation_steps": int,
    "warmup_steps": int, "min_lr": float, "beta1": float, "beta2": float, "dropout": float | None,
    "max_grad_norm": float, "optimizer_name": str, "num_train_epochs": float,
}


@dataclasses.dataclass
class PredictConfig:
    """Keys of `code/predict.py`; `method` selects evaluation or a statistic (docs/programs.md, families.md)."""

    model_name_or_path: str
    output_dir: str | None = None  # required unless metric_output_file or prediction_output_file is given
    dataset_name: str | None = None
    split: str | None = None
    # Several evaluations of the one model in one run: {name: {"dataset_name": ..., "split": ...}}, each
    # written to output_dir/<name>/ (method evaluate; instead of dataset_name and split).
    evaluations: dict | None = None
    method: typing.Literal[EVALUATE + FISHER + GRAM] = "sequence_classification"
    task_type: typing.Literal[TASK_TYPES] = "sequence_classification"
    # Column names of the data set for the task type's columns (None: the usual names, data.TASK_COLUMNS).
    text_column: str | None = None
    input_column: str | None = None
    target_column: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    class_names: list[str] | None = None  # CLIP's classes (None: the data set's label names)
    max_new_tokens: int = 32  # greedy decoding of seq2seq / causal LM evaluation
    data_dir: str | None = None  # None: $MERGE_DATA_DIR, else the Hub
    max_length: int = 384
    batch_size: int = 32
    num_examples: int | None = None  # use only the first ones of the split
    seed: int = 0  # labels sampled for the statistics
    empirical: bool = False  # statistics with the gold labels instead of sampled ones
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
        "track_fim": Ignored("the authors' code does not read it either; method "
                             "sequence_classification_squared_gradients computes the Fisher", bool),
        # The authors' config/example.py passes its whole training config to HuggingfaceSearchJob.
        **{key: Ignored("a training hyperparameter; evaluation and statistics do not use it", kind)
           for key, kind in TRAINING_ONLY_PAPER_KEYS.items()},
    }

    def __post_init__(self):
        self.data_dir = resolve_data_dir(self.data_dir)
        self._check_datasets()
        if self.num_threads is None:
            self.num_threads = default_threads()
        for key in ("max_length", "batch_size", "num_threads", "num_examples", "max_new_tokens"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"{key} must be at least 1, got {value}")
        check_device(self.device)
        files = [key for key in SUMMARY_FILES if getattr(self, key) is not None]
        if self.output_dir is None and (self.method not in EVALUATE or not files):
            raise ConfigError("missing required key(s) output_dir (an evaluation may give metric_output_file / "
                              "prediction_output_file instead)")
        if files and self.evaluations is not None:
            raise ConfigError(f"{', '.join(files)}: only with one dataset_name and split, not with evaluations")
        if self.prediction_output_file is not None and self.method in GRAM:
            raise ConfigError(f"prediction_output_file: method {self.method} has no per-example rows to write "
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
        if self.method not in EVALUATE:
            raise ConfigError(f"evaluations: only for method evaluate (or sequence_classification), not {self.method}")
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

    def columns(self):
        return column_mapping(self)


@releasing_outputs
def run(config):
    """Compute what `config.method` names and write it into `config.output_dir`, atomically as one folder
    (marked as predict.py's), and the copies the config names.

    Everything is checked (model, data, labels, outputs) before anything is written."""
    set_torch_threads(config.num_threads)
    check_model_path(config.model_name_or_path)
    datasets = [(name, _load(config, dataset_name, split)) for name, dataset_name, split in config.datasets()]
    names = config.class_names or class_names(datasets[0][1])
    with model_loading_errors(config.model_name_or_path):
        model, processor = load_for_task(config.model_name_or_path, config.task_type, class_names=names)
    if config.task_type != "image_classification":
        check_max_length(model, processor, config.max_length, config.model_name_or_path)
    if config.task_type == "sequence_classification" and (config.method in EVALUATE or config.empirical):
        for (_, dataset), (_, dataset_name, split) in zip(datasets, config.datasets()):  # the gold labels are used
            check_labels(dataset, model.config.num_labels, f"dataset {dataset_name!r}, split {split!r}")
    inputs = _check_outputs(config)
    if config.method not in EVALUATE:
        to_float32_if_half(model, "its statistics are computed in float32")
    model.to(check_device(config.device))
    output = (atomic_dir(config.output_dir, OUTPUT_KIND, inputs=inputs, overwrite=config.overwrite)
              if config.output_dir else tempfile.TemporaryDirectory())
    parts = _read_parts(config, datasets)
    with output as tmp:
        slices = {}
        for name, dataset in datasets:
            output_dir = tmp if name is None else os.path.join(tmp, name)
            os.makedirs(output_dir, exist_ok=True)
            families.set_classes(model, config.class_names or class_names(dataset))
            if parts is not None:
                summary = JOINS[config.method](model, [os.path.join(p, name or "") for p in parts], config, output_dir)
                continue
            examples = config.examples(name, dataset)
            slices[name or ""] = shards.slice_info(examples, len(dataset))
            summary = METHODS[config.method](model, processor, dataset, config, output_dir, examples)
        if config.shard is not None:
            shards.write_part_info(tmp, shards.parse_shard(config.shard), shards.identity(config), slices)
        for key, write in zip(SUMMARY_FILES, (write_json, write_jsonl)):
            if getattr(config, key) is not None:
                kind, written_by = FILE_KINDS[key]
                with atomic_file(getattr(config, key), kind, inputs=inputs, overwrite=config.overwrite,
                                 written_by=written_by) as copy:
                    write(copy, summary[key])
                logger.info("wrote %s", getattr(config, key))
    logger.info("wrote %s", config.output_dir)


def _read_parts(config, datasets):
    """The part folders of a join (None unless `config.join`), checked against the config and the data."""
    if config.join is None:
        return None
    totals = {name or "": len(dataset) for name, dataset in datasets}
    try:
        shards.read_parts(config.join, shards.identity(config), totals)
    except (ValueError, OSError, KeyError) as error:
        raise ConfigError(f"join: {error}") from None
    return config.join


def _check_outputs(config):
    """The inputs of the run (model folder, data files or folders), after checking that no output overlaps them
    and that every existing output may be replaced."""
    inputs = [config.model_name_or_path, *(config.join or [])] + [
        path for _, dataset_name, split in config.datasets() for path in local_sources(dataset_name, split, config.data_dir)]
    if config.output_dir is not None:
        claim(config.output_dir, "output_dir", OUTPUT_KIND, inputs=inputs, overwrite=config.overwrite)
    for key, (kind, written_by) in FILE_KINDS.items():
        if getattr(config, key) is not None:
            claim(getattr(config, key), key, kind, inputs=inputs, overwrite=config.overwrite, folder=False,
                  written_by=written_by)
    return inputs


def _load(config, dataset_name, split):
    dataset = load_split(dataset_name, split, config.data_dir, config.task_type, config.columns())
    if config.num_examples is not None:
        dataset = dataset.select(range(min(config.num_examples, len(dataset))))
    return dataset


def _evaluate(model, processor, dataset, config, output_dir, examples):
    """Evaluate on the `examples` (a range of positions) of `dataset`; rows keep their positions as `index`."""
    dataset = dataset if len(examples) == len(dataset) else dataset.select(examples)
    if families.is_sequence(config.task_type):
        _, rows = evaluate_sequences(model, processor, dataset, config.task_type, config.batch_size,
                                     config.max_length, config.max_new_tokens)
    else:
        loader = torch.utils.data.DataLoader(
            families.encode(dataset, processor, config.task_type, config.max_length), batch_size=config.batch_size,
            collate_fn=families.collator(processor, config.task_type),
        )
        rows = prediction_rows(*predict(model, loader))
    for row in rows:
        row["index"] += examples.start
    if config.shard is not None:
        write_jsonl(os.path.join(output_dir, "predictions.jsonl"), rows)
        return {}
    return _write_evaluation(rows, config, output_dir)


def _join_evaluations(model, parts, config, output_dir):
    """The predictions of the parts, concatenated in order, and the metrics of them all."""
    rows = []
    for part in parts:
        with open(os.path.join(part, "predictions.jsonl")) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return _write_evaluation(rows, config, output_dir)


def _write_evaluation(rows, config, output_dir):
    metrics = sequence_metrics(rows) if families.is_sequence(config.task_type) else classification_metrics(
        [row["label"] for row in rows], [row["prediction"] for row in rows])
    logger.info("metrics: %s", metrics)
    write_jsonl(os.path.join(output_dir, "predictions.jsonl"), rows)
    write_json(os.path.join(output_dir, "metrics.json"), metrics)
    return {"metric_output_file": metrics, "prediction_output_file": rows}


@torch.no_grad()
def evaluate_sequences(model, tokenizer, dataset, task_type, batch_size, max_length, max_new_tokens):
    """(metrics, rows) of a seq2seq or causal LM: `loss` (mean NLL per scored target token, teacher forcing),
    `perplexity` = exp(loss), `exact_match` of the greedy decoding (stripped, special tokens skipped)."""
    model.eval()
    device = next(model.parameters()).device
    encoded = families.encode(dataset, tokenizer, task_type, max_length)
    collate = families.collator(tokenizer, task_type)
    nll, counts = [], []
    for start in tqdm(range(0, len(encoded), batch_size), desc="loss", unit="batch"):
        batch = {k: v.to(device) for k, v in collate([encoded[i] for i in range(start, min(start + batch_size, len(encoded)))]).items()}
        logits, labels = families.token_logits(model(**batch).logits, batch["labels"], task_type)
        log_likelihood, _ = families.sequence_log_likelihood(logits, labels)
        nll += (-log_likelihood).tolist()
        counts += (labels != families.IGNORE).sum(1).tolist()
    predictions = greedy_completions(model, tokenizer, dataset, task_type, batch_size, max_length, max_new_tokens)
    correct = [families.exact_match(p, t) for p, t in zip(predictions, dataset["target"])]
    rows = [{"index": i, "target": t, "prediction": p, "exact_match": c, "nll": n, "num_tokens": k}
            for i, (t, p, c, n, k) in enumerate(zip(dataset["target"], predictions, correct, nll, counts))]
    return sequence_metrics(rows), rows


def sequence_metrics(rows):
    """The metrics of `evaluate_sequences` from its per-example rows."""
    correct = [row["exact_match"] for row in rows]
    counts = [row["num_tokens"] for row in rows]
    loss = float(np.sum([row["nll"] for row in rows]) / max(1, np.sum(counts)))
    # `accuracy` is the exact match again, under the name reports and searches read for every family
    return {"exact_match": families.summary(correct), "accuracy": families.summary(correct), "loss": loss,
            "perplexity": float(np.exp(loss)), "num_examples": len(rows), "num_tokens": int(np.sum(counts))}


def greedy_completions(model, tokenizer, dataset, task_type, batch_size, max_length, max_new_tokens):
    """The greedy decoding (num_beams 1) of every input, decoded without special tokens, in dataset order.

    A completion stops at the model's context (`generated_positions`): after at most max_new_tokens tokens,
    and for a causal LM where prompt and completion fill its positions (an empty completion if the prompt
    already does). Causal LM prompts are batched by equal length, so that no prompt needs padding."""
    device = next(model.parameters()).device
    options = {"do_sample": False, "num_beams": 1, "pad_token_id": tokenizer.pad_token_id,
               "eos_token_id": tokenizer.eos_token_id}
    limit = generated_positions(model)
    inputs = dataset["input"]
    texts = [""] * len(inputs)
    if task_type == "seq2seq":
        groups = [list(range(s, min(s + batch_size, len(inputs)))) for s in range(0, len(inputs), batch_size)]
    else:
        prompts = [tokenizer(text, truncation=True, max_length=max_length)["input_ids"] for text in inputs]
        by_length = {}
        for i, ids in enumerate(prompts):
            by_length.setdefault(len(ids), []).append(i)
        groups = [g[s : s + batch_size] for g in by_length.values() for s in range(0, len(g), batch_size)]
    cut = 0
    for group in tqdm(groups, desc="greedy decoding", unit="batch"):
        # the positions a completion may take: a seq2seq decoder's start token takes one, a prompt its length
        taken = 1 if task_type == "seq2seq" else len(prompts[group[0]])
        new_tokens = max_new_tokens if limit is None else min(max_new_tokens, limit - taken)
        if new_tokens < max_new_tokens:
            cut += len(group)
        if new_tokens <= 0:
            continue
        if task_type == "seq2seq":
            batch = tokenizer([inputs[i] for i in group], truncation=True, max_length=max_length, padding=True,
                              return_tensors="pt").to(device)
            generated = model.generate(**batch, max_new_tokens=new_tokens, **options)
        else:
            ids = torch.tensor([prompts[i] for i in group], device=device)
            generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                       **options)[:, ids.shape[1]:]
        for i, tokens in zip(group, generated):
            texts[i] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    if cut:
        logger.warning("%d of %d completions stop at the model's %d positions before max_new_tokens %d (%s)", cut,
                       len(inputs), limit, max_new_tokens,
                       "decoder start token and completion" if task_type == "seq2seq" else "prompt and completion")
    return texts


def generated_positions(model):
    """The positions a generated sequence may fill: a causal LM's prompt and completion together, a seq2seq
    decoder's start token and completion (BART's learned positions); None for relative positions (T5)."""
    positions = getattr(model.config, "max_position_embeddings", None)
    return positions if isinstance(positions, int) and positions > 0 else None


def _squared_gradients(model, processor, dataset, config, output_dir, examples):
    result = compute_fisher(model, processor, dataset, empirical=config.empirical, batch_size=config.batch_size,
                            max_length=config.max_length, seed=config.seed, task_type=config.task_type,
                            examples=examples)
    if config.shard is not None:
        shards.save_result(result, output_dir)
        return {}
    return _write_fisher(result, model, config, output_dir)


def _join_fisher(model, parts, config, output_dir):
    return _write_fisher(combine_fisher([shards.load_result(FisherResult, part) for part in parts]), model, config,
                         output_dir)


def _write_fisher(result, model, config, output_dir):
    stats = save_fisher(result, model, output_dir, _provenance(config))
    labels = result.labels.tolist() if isinstance(result.labels, torch.Tensor) else result.labels
    return {"metric_output_file": stats,
            "prediction_output_file": [{"index": i, "prediction": label, "variant": result.variant}
                                       for i, label in enumerate(labels)]}


def _gram(model, processor, dataset, config, output_dir, examples):
    result = compute_gram(model, processor, dataset, empirical=config.empirical, batch_size=config.batch_size,
                          max_length=config.max_length, seed=config.seed, task_type=config.task_type,
                          examples=examples)
    if config.shard is not None:
        shards.save_result(result, output_dir)
        return {}
    return {"metric_output_file": save_gram(result, model, output_dir, _provenance(config))}


def _join_gram(model, parts, config, output_dir):
    result = combine_gram([shards.load_result(GramResult, part) for part in parts])
    return {"metric_output_file": save_gram(result, model, output_dir, _provenance(config))}


def _provenance(config):
    """What statistics record about their origin (modelmerge.merging.provenance): the model, the data set and split."""
    return {**model_provenance(config.model_name_or_path), "dataset": config.dataset_name, "split": config.split}


METHODS = {
    **dict.fromkeys(EVALUATE, _evaluate),
    **dict.fromkeys(FISHER, _squared_gradients),
    **dict.fromkeys(GRAM, _gram),
}
JOINS = {
    **dict.fromkeys(EVALUATE, _join_evaluations),
    **dict.fromkeys(FISHER, _join_fisher),
    **dict.fromkeys(GRAM, _join_gram),
}
