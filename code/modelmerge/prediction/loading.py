"""Loading the model a config names: a model folder or id of any family (`modelmerge.families`), or a PEFT adapter
folder on top of its base model; the checks before loading (the path, corrupt weight files, the input length the
model allows, the device) and the one-line errors of a model that cannot be loaded."""
import glob
import logging
import os
import pickle
from contextlib import contextmanager

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig

from modelmerge import families
from modelmerge.config import ConfigError
from modelmerge.io.formats import ADAPTER_CONFIG, ADAPTER_SAFE_WEIGHTS

logger = logging.getLogger(__name__)

# Model types whose position ids start after the padding index (so max_position_embeddings overstates the inputs).
OFFSET_POSITION_MODELS = {"roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text", "xmod", "mpnet",
                          "roberta-prelayernorm", "ibert"}


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


def config_device(device, key="device"):
    """The torch.device the config key `key` names (None: cuda when available, else cpu): merging's `check_device`
    with its error as a ConfigError."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from modelmerge.merging.options import MergeError, check_device

    try:
        return check_device(device)
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
    weights = os.path.join(path, ADAPTER_SAFE_WEIGHTS)
    if not os.path.isfile(weights):
        return None
    with safe_open(weights, framework="pt") as f:
        for name in f.keys():
            if name.endswith(("classifier.weight", "classifier.out_proj.weight", "score.weight")):
                return f.get_slice(name).get_shape()[0]
    return None
