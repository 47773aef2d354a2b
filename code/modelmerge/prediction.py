"""Sequence-classification models: loading (full model folders and PEFT adapter folders), prediction, metrics."""
import logging
import os

import numpy as np
import torch
from safetensors import safe_open
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from modelmerge.config import ConfigError

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
