"""Fine-tuning of every model family (`task_type`, modelmerge.families) with the Hugging Face Trainer
(Seq2SeqTrainer for seq2seq): full fine-tuning, LoRA or IA3 (PEFT).

Layout of `output_dir`, Hugging Face's (the Trainer's own `output_dir`, as the paper authors' Jobs read it):
- `checkpoint-<step>/`: Trainer checkpoints, one per epoch (incremental by nature); a rerun of the same
  config resumes from the last complete one. `train_config.json`, written before training starts, records
  the config they were made with; a rerun with a different one is refused, and with `overwrite` it replaces
  the whole previous run: every entry train.py writes (`_is_own_entry`) is removed once the new run has
  loaded its model and data, the user's other files are kept. A folder train.py did not write that holds
  entries of those names is refused even with `overwrite`.
- written atomically at the end: `epoch-<k>/` (model folder of epoch k), `best/` (the epoch that scored
  best on `metric_for_best_model`), `trainer_state.json` (its `log_history` names each epoch's step, so
  `checkpoint-<step>` of any epoch is found from it), `train_results.txt` (the Trainer's `key = value`
  summary of the run), `train_config.json` again (with the resources of the run that finished). Model folders hold the
  tokenizer (or image processor) and load with the task type's Auto class (`AutoModelForSequenceClassification`,
  `AutoModelForSeq2SeqLM`, ...; CLIP as `CLIPModel`) after full fine-tuning, or as a PEFT adapter folder
  (`PeftModel`, base model named inside). With `optimizer_name: "IVON"` also `posterior/`, the variational
  posterior whose mean is best/: its precision in a Fisher statistics folder (modelmerge.variational).
"""
import dataclasses
import json
import logging
import math
import os
import re
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import SchedulerType, Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

import typing

from modelmerge import atomic, data, families, outputs, variational
from modelmerge.io.formats import SAFE_INDEX
from modelmerge.io.reading import open_checkpoint
from modelmerge.offline import offline_model_path
from modelmerge.config import SHARED_PAPER_KEYS, Alias, ConfigError, Ignored, from_dict, to_dict
from modelmerge.prediction.loading import (check_max_length, check_model_path, classifier_num_labels,
                                           config_device, load_for_task, model_loading_errors, to_float32_if_half)
from modelmerge.prediction.metrics import classification_metrics
from modelmerge.threads import default_threads, set_torch_threads

logger = logging.getLogger(__name__)

OLD_CHECKPOINTS = "checkpoints"  # where checkpoints lay before output_dir took Hugging Face's layout
CONFIG_FILE = "train_config.json"
STATE_FILE = "trainer_state.json"
RESULTS_FILE = "train_results.txt"
# Files of a Trainer checkpoint that belong to the optimisation state, not to the model folder.
TRAINER_FILES = {"optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"}
METRICS = ("accuracy", "macro_f1", "loss")  # of classifiers; sequence models: loss
PEFT_TASK_TYPES = {"sequence_classification": "SEQ_CLS", "seq2seq": "SEQ_2_SEQ_LM", "causal_lm": "CAUSAL_LM",
                   "image_classification": None}
# Keys that may change between an interrupted run and its rerun (resources, not results).
RESUMABLE_CHANGES = {"num_threads", "device", "overwrite"}


@dataclasses.dataclass
class LoraSpec:
    """LoRA (Hu et al., 2022, "LoRA: Low-Rank Adaptation of Large Language Models")."""

    type: str
    r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: list[str] | None = None  # None: PEFT's default for the architecture
    modules_to_save: list[str] | None = None  # trained in full besides the classifier head

    def peft_config(self, task_type="SEQ_CLS"):
        from peft import LoraConfig

        return LoraConfig(task_type=task_type, r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=self.target_modules, modules_to_save=self.modules_to_save)


@dataclasses.dataclass
class IA3Spec:
    """(IA)^3 (Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning")."""

    type: str
    target_modules: list[str] | None = None
    feedforward_modules: list[str] | None = None  # must be a subset of target_modules
    modules_to_save: list[str] | None = None

    def peft_config(self, task_type="SEQ_CLS"):
        from peft import IA3Config

        return IA3Config(task_type=task_type, target_modules=self.target_modules,
                         feedforward_modules=self.feedforward_modules, modules_to_save=self.modules_to_save)


PEFT_SPECS = {"lora": LoraSpec, "ia3": IA3Spec}


@dataclasses.dataclass
class TrainConfig(data.DataKeys):
    """Keys of `code/train.py` (beside the data keys of data.DataKeys). Defaults are the paper's (Daheim et al.,
    2024) fine-tuning hyperparameters."""

    output_dir: str
    dataset_name: str
    model_name_or_path: str = dataclasses.field(default_factory=offline_model_path)
    train_split: str = "train"
    validation_split: str = "validation"
    num_labels: int = 2
    optimizer_name: typing.Literal["AdamW", "IVON"] = "AdamW"
    # IVON's keys (modelmerge.variational.IvonSpec) with optimizer_name IVON; None: its defaults
    ivon: dict | None = None
    learning_rate: float = 1e-5
    warmup_steps: int = 100
    lr_scheduler_type: str = "cosine"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 0.0
    dropout: float | None = 0.0  # every dropout probability of the model; None keeps the model's own
    max_grad_norm: float = 1.0
    per_device_train_batch_size: int = 16
    per_device_eval_batch_size: int = 32
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 1.0
    max_steps: int = -1  # > 0 stops after that many optimiser steps
    seed: int = 42
    metric_for_best_model: str | None = None  # None: accuracy for classifiers, loss for sequence models
    peft: dict | None = None  # {"type": "lora", ...} or {"type": "ia3", ...}, see LoraSpec / IA3Spec
    logging_steps: int = 50
    logging_strategy: typing.Literal["steps", "epoch", "no"] = "steps"
    min_lr: float = 0.0  # > 0: the cosine schedule decays to this learning rate instead of 0
    num_threads: int | None = None  # torch threads; None: the job's CPU allocation
    device: str | None = None  # cpu or cuda; None: cuda when available
    overwrite: bool = False  # write into an output_dir that this program did not write

    # The paper authors' keys (finetune_roberta_imdb.json); see modelmerge.config.
    PAPER_KEYS = {
        **SHARED_PAPER_KEYS,
        "dataset_train_split": Alias("train_split"),
        "dataset_val_split": Alias("validation_split"),
        "beta1": Alias("adam_beta1"),
        "beta2": Alias("adam_beta2"),
        "evaluation_strategy": Ignored("evaluation runs after every epoch (best/ is chosen so)", str, ("epoch",)),
        "save_strategy": Ignored("a checkpoint is saved after every epoch (the epoch-<k>/ folders)", str, ("epoch",)),
        "method": Ignored("the authors' name of task_type sequence_classification", str, ("sequence_classification",)),
    }

    def __post_init__(self):
        super().__post_init__()
        if self.num_threads is None:
            self.num_threads = default_threads()
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be at least 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr < self.learning_rate:
            raise ConfigError(f"min_lr must be in [0, learning_rate {self.learning_rate}), got {self.min_lr}")
        if self.min_lr > 0 and self.lr_scheduler_type != "cosine":
            raise ConfigError(f"min_lr {self.min_lr} needs lr_scheduler_type cosine, not {self.lr_scheduler_type!r}")
        if self.device is not None and config_device(self.device).index:
            raise ConfigError(f"device {self.device!r}: train.py uses the first visible GPU; choose one with "
                              "CUDA_VISIBLE_DEVICES")
        if self.lr_scheduler_type not in {s.value for s in SchedulerType}:
            raise ConfigError(f"lr_scheduler_type {self.lr_scheduler_type!r} is not one of {[s.value for s in SchedulerType]}")
        sequence = families.is_sequence(self.task_type)
        if self.metric_for_best_model is None:
            self.metric_for_best_model = "loss" if sequence else "accuracy"
        allowed = ("loss",) if sequence else METRICS
        if self.metric_for_best_model not in allowed:
            raise ConfigError(f"metric_for_best_model {self.metric_for_best_model!r} is not one of {allowed} "
                              f"(task_type {self.task_type})")
        for key in ("num_labels", "per_device_train_batch_size", "per_device_eval_batch_size",
                    "gradient_accumulation_steps", "num_threads", "logging_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.learning_rate <= 0 or self.num_train_epochs <= 0:
            raise ConfigError("learning_rate and num_train_epochs must be positive")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.peft is not None:
            kind = self.peft.get("type")
            if kind not in PEFT_SPECS:
                raise ConfigError(f"peft.type must be one of {sorted(PEFT_SPECS)}, got {kind!r}")
            self.peft = dataclasses.asdict(from_dict(PEFT_SPECS[kind], self.peft, where="peft"))
        if self.optimizer_name == "IVON":
            self.ivon = dataclasses.asdict(from_dict(variational.IvonSpec, self.ivon or {}, where="ivon"))
        variational.check_training_config(self, _defaults())

    def ivon_spec(self):
        return None if self.ivon is None else variational.IvonSpec(**self.ivon)

    def peft_spec(self):
        return None if self.peft is None else PEFT_SPECS[self.peft["type"]](**self.peft)

    def output_paths(self):
        return {"output_dir": self.output_dir}


@atomic.releasing_outputs
def train(config, callbacks=()):
    """Fine-tune as `config` says and write the folders described in the module docstring.

    Everything is checked (model, data, labels, output_dir) before anything is written."""
    set_torch_threads(config.num_threads)
    check_model_path(config.model_name_or_path)
    train_data = data.load_split(config.dataset_name, config.train_split, config.data_dir, config.task_type, config.columns())
    eval_data = data.load_split(config.dataset_name, config.validation_split, config.data_dir, config.task_type,
                                config.columns())
    if config.task_type == "sequence_classification":
        for split, dataset in ((config.train_split, train_data), (config.validation_split, eval_data)):
            data.check_labels(dataset, config.num_labels, f"dataset {config.dataset_name!r}, split {split!r}",
                              "num_labels sets the classes of a new classifier")
        _check_num_labels(config)
    # train.py writes into output_dir entry by entry: a folder holding its config is its own.
    outputs.claim(config.output_dir, "output_dir", "train", inputs=_inputs(config),
                  overwrite=config.overwrite or _is_training_output(config.output_dir))
    _check_no_lookalikes(config.output_dir)
    set_seed(config.seed)
    model, processor = _build_model(config, config.class_names or data.class_names(train_data))
    # float32 master weights (pure float16 AdamW blew a tiny BERT's embeddings from 0.07 to 203 in 13 steps);
    # checkpoints stay float32 for resuming, the model folders are saved in the model's own dtype
    saved_dtype = to_float32_if_half(model, "trained with float32 weights, saved in its own dtype")

    _move_old_layout(config.output_dir)
    _remove_leftovers(config.output_dir)
    _check_previous_run(config)
    sequence = families.is_sequence(config.task_type)
    trainer_class, ivon_arguments = Seq2SeqTrainer if config.task_type == "seq2seq" else Trainer, {}
    if config.optimizer_name == "IVON":
        trainer_class = variational.IvonSeq2SeqTrainer if config.task_type == "seq2seq" else variational.IvonTrainer
        spec = config.ivon_spec()
        ivon_arguments = {"ivon_spec": spec, "ess": spec.ess or len(train_data)}
    trainer = trainer_class(
        model=model,
        args=_training_arguments(config),
        train_dataset=families.encode(train_data, processor, config.task_type, config.max_length),
        eval_dataset=families.encode(eval_data, processor, config.task_type, config.max_length),
        processing_class=processor,
        data_collator=families.collator(processor, config.task_type),
        compute_metrics=None if sequence else _compute_metrics,
        callbacks=list(callbacks),
        **ivon_arguments,
    )
    resume_from = _last_complete_checkpoint(config.output_dir)
    if resume_from:
        logger.info("resuming from %s", resume_from)
    else:
        atomic.write_json(os.path.join(config.output_dir, CONFIG_FILE), to_dict(config))
    with atomic.naming_a_full_disk(config.output_dir):
        result = trainer.train(resume_from_checkpoint=resume_from)
    _write_outputs(trainer, result, config, saved_dtype)
    return trainer


def _inputs(config):
    """The local paths the run reads: the model folder and the data files or folders."""
    return [config.model_name_or_path] + [path for split in (config.train_split, config.validation_split)
                                          for path in data.local_sources(config.dataset_name, split, config.data_dir)]


def _is_training_output(path):
    """Whether the folder `path` was written by train.py (it holds the config train.py saves)."""
    return any(os.path.isfile(os.path.join(path, *parts)) for parts in ((CONFIG_FILE,), (OLD_CHECKPOINTS, CONFIG_FILE)))


def _is_own_entry(name):
    """Whether an entry of output_dir named `name` is one that train.py (or its Trainer) writes."""
    return (name in ("best", variational.POSTERIOR, STATE_FILE, CONFIG_FILE, RESULTS_FILE)
            or re.fullmatch(rf"(epoch|{PREFIX_CHECKPOINT_DIR})-\d+", name) is not None)


def _check_no_lookalikes(output_dir):
    """Refuse a folder train.py did not write that holds entries named as train.py's (it would replace them)."""
    if _is_training_output(output_dir) or not os.path.isdir(output_dir):
        return
    clashing = sorted(name for name in os.listdir(output_dir) if _is_own_entry(name))
    if clashing:
        raise ConfigError(f"output_dir: {output_dir} holds {', '.join(clashing)} but was not written by train.py "
                          f"(it has no {CONFIG_FILE}); train.py would replace them: move them or choose another "
                          "output_dir")


def _check_num_labels(config):
    with model_loading_errors(config.model_name_or_path):
        head = classifier_num_labels(config.model_name_or_path)
    if head is not None and head != config.num_labels:
        raise ConfigError(f"num_labels {config.num_labels} does not match the {head} classes of the classifier "
                          f"{config.model_name_or_path}; set num_labels to {head}")


def _move_old_layout(output_dir):
    """Move the checkpoints and their config from `output_dir/checkpoints/` (the layout before Hugging Face's)
    into `output_dir`, so that an interrupted run of the old layout resumes."""
    old = os.path.join(output_dir, OLD_CHECKPOINTS)
    if not os.path.isfile(os.path.join(old, CONFIG_FILE)):
        return
    outputs.remove_stale_temporaries_in(old)
    for name in os.listdir(old):
        if name == CONFIG_FILE or name.startswith(PREFIX_CHECKPOINT_DIR + "-"):
            os.replace(os.path.join(old, name), os.path.join(output_dir, name))
    logger.info("moved the checkpoints of %s into %s (Hugging Face's layout)", old, output_dir)
    try:
        os.rmdir(old)
    except OSError:  # something else lies there: left as it is
        pass


def _remove_leftovers(output_dir):
    """Delete what killed runs left in `output_dir`: temporaries of atomic writes, checkpoints cut off mid-write."""
    outputs.remove_stale_temporaries_in(output_dir)
    for checkpoint in _checkpoint_folders(output_dir):
        if _read_state(checkpoint) is None:
            logger.info("removing %s, a checkpoint an interrupted run did not finish", checkpoint)
            shutil.rmtree(checkpoint)


def _build_model(config, class_names):
    num_labels = len(class_names) if class_names and config.task_type == "image_classification" else config.num_labels
    with model_loading_errors(config.model_name_or_path):
        model, processor = load_for_task(config.model_name_or_path, config.task_type, num_labels=num_labels,
                                         class_names=class_names)
    if config.task_type != "image_classification":
        check_max_length(model, processor, config.max_length, config.model_name_or_path)
    if config.dropout is not None:
        _set_dropout(model, config.dropout)
    spec = config.peft_spec()
    if spec is not None:
        from peft import get_peft_model

        try:
            model = get_peft_model(model, spec.peft_config(PEFT_TASK_TYPES[config.task_type]))
        except ValueError as error:
            raise ConfigError(f"peft: {error}") from None
        trainable, total = model.get_nb_trainable_parameters()
        logger.info("%s: %d of %d parameters trainable", spec.type, trainable, total)
    return model, processor


def _set_dropout(model, probability):
    """Set every dropout probability of the model's config and every Dropout module to `probability`."""
    for key, value in vars(model.config).items():
        if "dropout" in key and (isinstance(value, float) or key == "classifier_dropout"):
            setattr(model.config, key, probability)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = probability


def _training_arguments(config):
    arguments = Seq2SeqTrainingArguments if config.task_type == "seq2seq" else TrainingArguments
    schedule = {"lr_scheduler_type": config.lr_scheduler_type}
    if config.min_lr > 0:
        schedule = {"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr": config.min_lr}}
    return arguments(
        output_dir=config.output_dir,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        **schedule,
        adam_beta1=config.adam_beta1,
        adam_beta2=config.adam_beta2,
        weight_decay=config.weight_decay,
        # IVON has averaged the gradients of its draws before the Trainer would clip them (it clips with clip_radius)
        max_grad_norm=0.0 if config.optimizer_name == "IVON" else config.max_grad_norm,
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=config.per_device_eval_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        seed=config.seed,
        eval_strategy="epoch",
        save_strategy="epoch",
        load_best_model_at_end=True,
        metric_for_best_model=config.metric_for_best_model,
        logging_strategy=config.logging_strategy,
        logging_steps=config.logging_steps,
        use_cpu=config.device == "cpu",
        report_to="none",
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        prediction_loss_only=families.is_sequence(config.task_type),  # no [examples, tokens, vocab] logits kept
        remove_unused_columns=config.task_type != "image_classification",  # images are opened by the collator
    )


def _compute_metrics(eval_prediction):
    predictions = eval_prediction.predictions.argmax(axis=-1)
    metrics = classification_metrics(eval_prediction.label_ids, predictions)
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}


def _check_previous_run(config):
    """Go on from a previous run of the same config in output_dir; refuse one of a different config, or with
    `overwrite` remove all of it (every entry train.py writes) before this run starts.

    A run without a checkpoint or an exported result (one that failed early) binds nothing."""
    output_dir = config.output_dir
    config_path = os.path.join(output_dir, CONFIG_FILE)
    own = sorted(name for name in os.listdir(output_dir) if _is_own_entry(name)) if os.path.isdir(output_dir) else []
    if not os.path.isfile(config_path) or own == [CONFIG_FILE]:  # unfinished checkpoints are gone already
        return
    with open(config_path) as f:
        previous = json.load(f)
    resolved = to_dict(config)
    defaults = _defaults()  # a key newer than the saved config counts as unchanged while it keeps its default
    changed = sorted(k for k in set(previous) | set(resolved)
                     if k not in RESUMABLE_CHANGES and previous.get(k, defaults.get(k)) != resolved.get(k))
    if not changed:
        return
    if not config.overwrite:
        raise ConfigError(
            f"output_dir: {output_dir} holds a run of a different config (keys {', '.join(changed)} differ); "
            "use another output_dir, delete that folder or set \"overwrite\": true"
        )
    logger.warning("overwrite: removing the run of a different config (keys %s differ) from %s: %s", ", ".join(changed),
                   output_dir, ", ".join(own))
    for name in own:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def _defaults():
    return {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}


def _last_complete_checkpoint(folder):
    complete = [path for path in _checkpoint_folders(folder) if _read_state(path) is not None]
    return complete[-1] if complete else None


def _checkpoint_folders(folder):
    """The Trainer checkpoint folders (`checkpoint-<step>`) in `folder`, by step."""
    if not os.path.isdir(folder):
        return []
    prefix = PREFIX_CHECKPOINT_DIR + "-"
    names = [n for n in os.listdir(folder) if n.startswith(prefix) and n[len(prefix):].isdigit()]
    return [os.path.join(folder, n) for n in sorted(names, key=lambda n: int(n[len(prefix):]))]


def _read_state(checkpoint):
    """The trainer state of a checkpoint, or None when the checkpoint is incomplete (written last by the Trainer)."""
    try:
        with open(os.path.join(checkpoint, STATE_FILE)) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _write_outputs(trainer, result, config, dtype):
    for checkpoint in _checkpoint_folders(config.output_dir):
        state = _read_state(checkpoint)
        if state is not None:
            epoch = max(1, math.ceil(state["epoch"] - 1e-6))
            _export_model_folder(checkpoint, os.path.join(config.output_dir, f"epoch-{epoch}"), dtype)
    best = trainer.state.best_model_checkpoint
    if best is None:
        raise RuntimeError(f"training in {config.output_dir} ended without an evaluated checkpoint")
    logger.info("best checkpoint %s (%s = %s)", best, config.metric_for_best_model, trainer.state.best_metric)
    _export_model_folder(best, os.path.join(config.output_dir, "best"), dtype)
    if config.optimizer_name == "IVON":
        variational.write_posterior(trainer.model, best, os.path.join(config.output_dir, "best"),
                                    os.path.join(config.output_dir, variational.POSTERIOR),
                                    {"dataset": config.dataset_name, "split": config.train_split}, config.seed)
    with atomic.atomic_file(os.path.join(config.output_dir, STATE_FILE)) as tmp:
        trainer.state.save_to_json(tmp)
    with atomic.atomic_file(os.path.join(config.output_dir, RESULTS_FILE)) as tmp, open(tmp, "w") as f:
        f.writelines(f"{key} = {value}\n" for key, value in sorted(result.metrics.items()))
    atomic.write_json(os.path.join(config.output_dir, CONFIG_FILE), to_dict(config))


def _export_model_folder(checkpoint, target, dtype=torch.float32):
    """Copy the model and tokenizer files of a Trainer checkpoint to the folder `target`, atomically; the
    float32 weights of a model trained from `dtype` (float16 or bfloat16) are cast back to it."""
    with atomic.atomic_dir(target) as tmp:
        for name in os.listdir(checkpoint):
            if name not in TRAINER_FILES and os.path.isfile(os.path.join(checkpoint, name)):
                if dtype != torch.float32 and name.endswith(".safetensors"):
                    _save_cast(os.path.join(checkpoint, name), os.path.join(tmp, name), dtype)
                else:
                    shutil.copy2(os.path.join(checkpoint, name), os.path.join(tmp, name))
        if dtype != torch.float32:
            _set_config_dtype(tmp, dtype)


def _save_cast(source, target, dtype):
    with safe_open(source, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(source)
    save_file({k: v.to(dtype) if v.dtype == torch.float32 else v for k, v in tensors.items()}, target, metadata)


def _set_config_dtype(folder, dtype):
    """config.json's `dtype` (and the older `torch_dtype`, if present) say `dtype`; a shard index its total size."""
    name = str(dtype).removeprefix("torch.")
    path = os.path.join(folder, "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            config = json.load(f)
        config.update({key: name for key in ("dtype", "torch_dtype") if key == "dtype" or key in config})
        atomic.write_json(path, config)
    index = os.path.join(folder, SAFE_INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            content = json.load(f)
        weights = open_checkpoint(folder)
        content.setdefault("metadata", {})["total_size"] = sum(weights.info(name).nbytes for name in weights.names)
        atomic.write_json(index, content)
