"""Sequence-classification models: loading (full model folders and PEFT adapter folders), prediction, metrics,
and `run`, the body of `code/predict.py` (prediction, or a statistic computed by `modelmerge.statistics`)."""
import dataclasses
import logging
import os
import typing

import numpy as np
import torch
from safetensors import safe_open
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from modelmerge.atomic import atomic_dir, write_json, write_jsonl
from modelmerge.config import ConfigError, default_num_threads
from modelmerge.data import dataloader, load_split, resolve_data_dir
from modelmerge.statistics.fisher import compute_fisher, save_fisher
from modelmerge.statistics.gram import compute_gram, save_gram

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def is_adapter_folder(path):
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def check_model_path(path, key="model_name_or_path"):
    """Raise ConfigError naming `key` unless `path` is a model folder, an adapter folder or a loadable model id."""
    if os.path.isdir(path):
        if not (os.path.isfile(os.path.join(path, "config.json")) or is_adapter_folder(path)):
            raise ConfigError(f"{key}: folder {path} holds neither config.json nor {ADAPTER_CONFIG}")
        return
    if os.path.exists(path):
        raise ConfigError(f"{key}: {path} is a file, not a model folder")
    try:
        AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ConfigError(f"{key}: {path} is neither a model folder nor a loadable model id ({error})") from None


def load_classifier(path, num_labels=None):
    """(model, tokenizer) from a model folder / model id, or from a PEFT adapter folder on top of its base model.

    `num_labels` sets the size of a new classification head (a pretrained encoder); None keeps the
    checkpoint's own (for an adapter: the size of the classifier saved with it).
    """
    label_kwargs = {} if num_labels is None else {"num_labels": num_labels}
    if not is_adapter_folder(path):
        model = AutoModelForSequenceClassification.from_pretrained(path, **label_kwargs)
        return model, AutoTokenizer.from_pretrained(path)
    from peft import PeftConfig, PeftModel

    base_path = PeftConfig.from_pretrained(path).base_model_name_or_path
    num_labels = num_labels or _adapter_num_labels(path)
    base = AutoModelForSequenceClassification.from_pretrained(
        base_path, **({} if num_labels is None else {"num_labels": num_labels})
    )
    model = PeftModel.from_pretrained(base, path)
    has_tokenizer = any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"))
    return model, AutoTokenizer.from_pretrained(path if has_tokenizer else base_path)


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


@dataclasses.dataclass
class PredictConfig:
    """Keys of `code/predict.py`; `method` selects prediction or a statistic (docs/programs.md)."""

    model_name_or_path: str
    output_dir: str
    dataset_name: str | None = None
    split: str | None = None
    # Several evaluations of the one model in one run: {name: {"dataset_name": ..., "split": ...}}, each
    # written to output_dir/<name>/ (method sequence_classification; instead of dataset_name and split).
    evaluations: dict | None = None
    method: typing.Literal[
        "sequence_classification", "sequence_classification_squared_gradients", "sequence_classification_gram"
    ] = "sequence_classification"
    data_dir: str | None = None  # None: $MERGE_DATA_DIR, else the Hub
    max_length: int = 384
    batch_size: int = 32
    num_examples: int | None = None  # use only the first ones of the split
    seed: int = 0  # labels sampled for the statistics
    empirical: bool = False  # statistics with the gold labels instead of sampled ones
    num_threads: int | None = None  # torch threads; None: the job's CPU allocation

    def __post_init__(self):
        self.data_dir = resolve_data_dir(self.data_dir)
        self._check_datasets()
        if self.num_threads is None:
            self.num_threads = default_num_threads()
        for key in ("max_length", "batch_size", "num_threads", "num_examples"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"{key} must be at least 1, got {value}")


    def _check_datasets(self):
        if self.evaluations is None:
            missing = [key for key in ("dataset_name", "split") if getattr(self, key) is None]
            if missing:
                raise ConfigError(f"missing required key(s) {', '.join(missing)} (or give `evaluations`)")
            return
        if self.dataset_name is not None or self.split is not None:
            raise ConfigError("give either dataset_name and split, or evaluations, not both")
        if self.method != "sequence_classification":
            raise ConfigError(f"evaluations: only for method sequence_classification, not {self.method}")
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


def run(config):
    """Compute what `config.method` names and write it into `config.output_dir`, atomically as one folder."""
    torch.set_num_threads(config.num_threads)
    check_model_path(config.model_name_or_path)
    datasets = [(name, _load(config, dataset_name, split)) for name, dataset_name, split in config.datasets()]
    model, tokenizer = load_classifier(config.model_name_or_path)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    with atomic_dir(config.output_dir) as tmp:
        for name, dataset in datasets:
            output_dir = tmp if name is None else os.path.join(tmp, name)
            os.makedirs(output_dir, exist_ok=True)
            METHODS[config.method](model, tokenizer, dataset, config, output_dir)
    logger.info("wrote %s", config.output_dir)


def _load(config, dataset_name, split):
    dataset = load_split(dataset_name, split, config.data_dir)
    if config.num_examples is not None:
        dataset = dataset.select(range(min(config.num_examples, len(dataset))))
    return dataset


def _sequence_classification(model, tokenizer, dataset, config, output_dir):
    loader = dataloader(dataset, tokenizer, config.batch_size, config.max_length)
    labels, predictions, probabilities = predict(model, loader)
    metrics = classification_metrics(labels, predictions)
    logger.info("metrics: %s", metrics)
    write_jsonl(os.path.join(output_dir, "predictions.jsonl"), prediction_rows(labels, predictions, probabilities))
    write_json(os.path.join(output_dir, "metrics.json"), metrics)


def _squared_gradients(model, tokenizer, dataset, config, output_dir):
    result = compute_fisher(model, tokenizer, dataset, empirical=config.empirical, batch_size=config.batch_size,
                            max_length=config.max_length, seed=config.seed)
    save_fisher(result, model, output_dir)


def _gram(model, tokenizer, dataset, config, output_dir):
    result = compute_gram(model, tokenizer, dataset, empirical=config.empirical, batch_size=config.batch_size,
                          max_length=config.max_length, seed=config.seed)
    save_gram(result, model, output_dir)


METHODS = {
    "sequence_classification": _sequence_classification,
    "sequence_classification_squared_gradients": _squared_gradients,
    "sequence_classification_gram": _gram,
}
