"""Model families: how each `task_type` loads its model, turns data rows into model inputs, scores an example
and is evaluated (the contract: docs families.md).

| task_type | model | rows | log-likelihood of an example |
|---|---|---|---|
| sequence_classification | AutoModelForSequenceClassification | text, label | log p(label | text) |
| seq2seq | AutoModelForSeq2SeqLM (T5, BART) | input, target | Σ over target tokens of log p(token | input, prefix) |
| causal_lm | AutoModelForCausalLM (GPT-2, Llama) | input, target | Σ over completion tokens (and eos) |
| image_classification | AutoModelForImageClassification, CLIP | image, label | log p(label | image) |

CLIP is a classifier through a zero-shot head (Radford et al., 2021, "Learning Transferable Visual Models From
Natural Language Supervision"): the normalised text embedding of "a photo of a {class}." per class, scaled by
the logit scale, applied to the normalised image embedding. The head is rebuilt from the class names whenever
the model is loaded, so a CLIP model folder stays a plain `CLIPModel` checkpoint (merged like any other);
fine-tuning and statistics cover the vision tower and its projection only (the text tower stays frozen, as
in task arithmetic).
"""
import io
import uuid

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    CLIPModel,
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
)
from transformers.modeling_outputs import ImageClassifierOutput

from modelmerge.config import ConfigError
from modelmerge.data import DataError

IGNORE = -100  # label of a position that is not scored
CLIP_PROMPT = "a photo of a {}."
CLIP_MODEL_TYPES = ("clip",)


class ModelMismatch(ConfigError):
    """A model that the task type cannot load."""


# --- loading ---------------------------------------------------------------------------------------------------


def auto_class(task_type):
    return {
        "sequence_classification": AutoModelForSequenceClassification,
        "seq2seq": AutoModelForSeq2SeqLM,
        "causal_lm": AutoModelForCausalLM,
        "image_classification": AutoModelForImageClassification,
    }[task_type]


def check_task_type(model_config, task_type, where):
    """Raise ModelMismatch unless a model of `model_config` can serve as `task_type`."""
    if task_type == "image_classification" and model_config.model_type in CLIP_MODEL_TYPES:
        return
    cls = auto_class(task_type)
    if type(model_config) not in cls._model_mapping:
        raise ModelMismatch(
            f"task_type {task_type}: the model {where} (model_type {model_config.model_type!r}) is not a "
            f"{task_type} model ({cls.__name__} cannot load it)"
        )


def load_model(path, task_type="sequence_classification", num_labels=None, class_names=None, base_path=None):
    """(model, processor) of a model folder or id; `base_path` is where the processor lives when not in `path`.

    The processor is the tokenizer, the image processor, or for CLIP the CLIPProcessor (both). `num_labels`
    sizes a new classification head; CLIP builds its head from `class_names`.
    """
    model_config = AutoConfig.from_pretrained(path)
    check_task_type(model_config, task_type, path)
    if task_type == "image_classification" and model_config.model_type in CLIP_MODEL_TYPES:
        if not class_names:
            raise ConfigError(f"{path}: a CLIP classifier needs class names (the data set's label names or class_names)")
        model = CLIPZeroShotClassifier.from_pretrained(path)
        processor = load_processor(base_path or path, task_type)
        model.prompt_tokenizer = processor.tokenizer
        model.set_classes(class_names)
        return model, processor
    kwargs = {} if num_labels is None or task_type in ("seq2seq", "causal_lm") else {"num_labels": num_labels}
    if task_type == "image_classification" and num_labels is not None and getattr(model_config, "num_labels", None) != num_labels:
        kwargs["ignore_mismatched_sizes"] = True
    model = auto_class(task_type).from_pretrained(path, **kwargs)
    return model, load_processor(base_path or path, task_type)


def load_processor(path, task_type):
    if task_type == "image_classification":
        if AutoConfig.from_pretrained(path).model_type in CLIP_MODEL_TYPES:
            from transformers import CLIPProcessor

            return CLIPProcessor.from_pretrained(path)
        return AutoImageProcessor.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if task_type == "causal_lm" and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2 has no padding token; padding is masked anyway
    return tokenizer


class CLIPZeroShotClassifier(CLIPModel):
    """CLIP as an image classifier: logits = scale · normalise(image embedding) · Tᵀ, T the normalised class
    prompt embeddings (a buffer, not saved). The text tower and the logit scale are frozen."""

    prompt_tokenizer = None  # set by `load_model`

    def set_classes(self, class_names):
        prompts = [CLIP_PROMPT.format(name) for name in class_names]
        with torch.no_grad():
            tokens = self.prompt_tokenizer(prompts, padding=True, return_tensors="pt").to(self.device)
            text = self.get_text_features(**tokens)
            text = getattr(text, "pooler_output", text)
            head = text / text.norm(dim=-1, keepdim=True) * self.logit_scale.exp()
        self.register_buffer("zero_shot_head", head.detach(), persistent=False)
        self.config.num_labels = len(class_names)
        for parameter in [*self.text_model.parameters(), *self.text_projection.parameters(), self.logit_scale]:
            parameter.requires_grad_(False)

    def forward(self, pixel_values=None, labels=None, **kwargs):
        vision = self.vision_model(pixel_values=pixel_values)
        image = self.visual_projection(vision.pooler_output)
        logits = (image / image.norm(dim=-1, keepdim=True)) @ self.zero_shot_head.T
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits, labels)
        return ImageClassifierOutput(loss=loss, logits=logits)

    def save_pretrained(self, *args, **kwargs):
        self.config.architectures = ["CLIPModel"]
        return super().save_pretrained(*args, **kwargs)


def set_classes(model, class_names):
    """Give a CLIP classifier (or a PEFT model of one) the zero-shot head of `class_names`; other models: nothing."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if isinstance(base, CLIPZeroShotClassifier):
        if not class_names:
            raise ConfigError("a CLIP classifier needs class names (the data set's label names or class_names)")
        base.set_classes(class_names)


# --- data rows → model inputs -------------------------------------------------------------------------------------


def encode(dataset, processor, task_type, max_length):
    """Per-example model inputs with `labels` (a datasets.Dataset; images stay rows, opened per batch)."""
    if task_type == "sequence_classification":
        return dataset.map(lambda b: processor(b["text"], truncation=True, max_length=max_length),
                           batched=True, remove_columns=["text"], desc="tokenising", new_fingerprint=_fingerprint())
    if task_type == "seq2seq":
        def seq2seq(batch):
            encoded = processor(batch["input"], truncation=True, max_length=max_length)
            encoded["labels"] = processor(text_target=batch["target"], truncation=True, max_length=max_length)["input_ids"]
            return encoded
        return dataset.map(seq2seq, batched=True, remove_columns=dataset.column_names, desc="tokenising",
                           new_fingerprint=_fingerprint())
    if task_type == "causal_lm":
        return dataset.map(lambda b: causal_lm_examples(processor, b["input"], b["target"], max_length), batched=True,
                           remove_columns=dataset.column_names, desc="tokenising", new_fingerprint=_fingerprint())
    return dataset


def _fingerprint():
    """A fresh fingerprint for a `map`: `datasets` would otherwise hash the function, tokenizer included (pickled,
    a fixed cost of about half a second per call), to name a cache these in-memory datasets never use."""
    return uuid.uuid4().hex


def causal_lm_examples(tokenizer, prompts, completions, max_length):
    """input_ids = prompt + " " completion + eos (truncated to `max_length`); labels only on the completion."""
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    completions = tokenizer([" " + c for c in completions], add_special_tokens=False)["input_ids"]
    for prompt_ids, completion_ids in zip(tokenizer(prompts)["input_ids"], completions):
        completion_ids = completion_ids + [tokenizer.eos_token_id]
        input_ids = (prompt_ids + completion_ids)[:max_length]
        rows["input_ids"].append(input_ids)
        rows["attention_mask"].append([1] * len(input_ids))
        rows["labels"].append(([IGNORE] * len(prompt_ids) + completion_ids)[:max_length])
    return rows


def collator(processor, task_type):
    """Batches of encoded examples: right-padded (labels with -100), images opened and processed."""
    if task_type == "sequence_classification":
        return DataCollatorWithPadding(processor)
    if task_type == "seq2seq":
        return DataCollatorForSeq2Seq(processor, label_pad_token_id=IGNORE)
    if task_type == "causal_lm":
        return CausalLMCollator(processor)
    return ImageCollator(processor)


class CausalLMCollator:
    def __init__(self, tokenizer):
        self.pad = tokenizer.pad_token_id

    def __call__(self, examples):
        length = max(len(e["input_ids"]) for e in examples)

        def padded(key, value):
            return torch.tensor([list(e[key]) + [value] * (length - len(e[key])) for e in examples])

        return {"input_ids": padded("input_ids", self.pad), "attention_mask": padded("attention_mask", 0),
                "labels": padded("labels", IGNORE)}


class ImageCollator:
    def __init__(self, image_processor):
        self.image_processor = image_processor

    def __call__(self, examples):
        images = [open_image(e["image"]) for e in examples]
        pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixel_values, "labels": torch.tensor([int(e["label"]) for e in examples])}


def open_image(value):
    """A PIL RGB image from a path, bytes, a {"bytes", "path"} dict or a PIL image; DataError naming it if not."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    what = f"image {value!r}" if isinstance(value, str) else f"image bytes ({len(value or b'')} bytes)"
    try:
        with Image.open(value if isinstance(value, str) else io.BytesIO(value)) as image:
            return image.convert("RGB")
    except (OSError, ValueError, TypeError, AttributeError) as error:
        raise DataError(f"{what} cannot be opened: {error}") from None


def example_lengths(encoded, task_type):
    """The sort key of each example for length-sorted batches (0 for images: all the same size)."""
    if task_type == "image_classification":
        return [0] * len(encoded)
    lengths = [len(ids) for ids in encoded["input_ids"]]
    if task_type == "seq2seq":
        return [n + len(labels) for n, labels in zip(lengths, encoded["labels"])]
    return lengths


def scored_counts(encoded, task_type):
    """Number of labelled tokens of each example (sequence families), else None."""
    if task_type not in ("seq2seq", "causal_lm"):
        return None
    return [sum(1 for t in labels if t != IGNORE) for labels in encoded["labels"]]


# --- log-likelihoods ----------------------------------------------------------------------------------------------


def is_sequence(task_type):
    return task_type in ("seq2seq", "causal_lm")


def token_logits(logits, labels, task_type):
    """(logits, labels) aligned position by position: a causal LM's logits at t predict the token at t+1."""
    if task_type == "causal_lm":
        return logits[:, :-1], labels[:, 1:]
    return logits, labels


def sample_tokens(logits, uniforms):
    """Inverse-CDF samples from softmax(logits) [n, classes]: the first class whose cumulative probability
    reaches the uniform."""
    cdf = logits.detach().double().softmax(-1).cumsum(-1)
    below = (cdf < uniforms.to(cdf.device)[:, None]).sum(-1)
    return below.clamp(max=logits.shape[-1] - 1)


def sequence_log_likelihood(logits, labels, uniforms=None):
    """Σ over the labelled positions (label ≠ -100) of log p(y_t), per example, and the tokens y scored.

    y is the label, or with `uniforms` [batch, ≥ labelled positions] the token drawn at each labelled position
    from the teacher-forced distribution there, the j-th labelled position of example b using uniforms[b, j].
    """
    mask = labels != IGNORE
    chosen = labels.clone()
    if uniforms is not None:
        rank = (mask.cumsum(1) - 1).clamp(min=0)
        u = uniforms.to(logits.device).gather(1, rank)
        chosen[mask] = sample_tokens(logits[mask], u[mask])
    return scored_log_likelihood(logits, chosen), [row[m].tolist() for row, m in zip(chosen.cpu(), mask.cpu())]


def scored_log_likelihood(logits, labels):
    """Σ over the labelled positions (label ≠ -100) of log p(label), per example: [batch, positions, vocabulary]
    logits → [batch] (no data-dependent steps, so that torch.func can vmap it)."""
    log_probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
    log_probs = log_probs.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (log_probs * (labels != IGNORE)).sum(1)


# --- evaluation helpers ---------------------------------------------------------------------------------------------


def exact_match(prediction, target):
    return prediction.strip() == target.strip()


def summary(values):
    return float(np.mean(values)) if len(values) else 0.0
