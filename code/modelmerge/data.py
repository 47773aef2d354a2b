"""Datasets of the pipeline: resolve a dataset name and split string to a `datasets.Dataset` with the columns
of a task type (docs: families.md): `text`/`label` (sequence classification), `input`/`target` (seq2seq,
causal LM), `image`/`label` (image classification; an image is a file path, made absolute, or bytes).

A dataset name is
- a csv/json/jsonl/parquet file (a file has one split; the split string's name is ignored, its slice applies),
- a folder holding `<split>.<ext>` files (as `download_data.py`, modelmerge.download, writes them), or for images `<split>/<class>/*`
  subfolders (class names: the sorted subfolder names),
- a task name (`sst2`, `imdb`, ...): the folder `<data_dir>/<task>/` when a data directory is configured,
  else the task's Hugging Face Hub dataset (any other name is then taken as a Hub id).
A Hub name may name a configuration after a colon (`nyu-mll/glue:sst2`).
Names joined with `;`, with splits joined the same way, form a mixture (the datasets concatenated in order).
Split strings use the `datasets` slicing syntax: `train`, `train[:20%]`, `test[100:200]`, `train+validation`.
Columns are found under their usual Hub names, or named by a column mapping ({"input": "question", ...}).
The class names of a classification data set are kept as the `label` column's `ClassLabel` names (from the
Hub features, a `class_names.json` list beside the split files, or the image class folders).
"""
import dataclasses
import json
import logging
import os
import re
import typing

import datasets
import torch
from transformers import DataCollatorWithPadding

from modelmerge.config import ConfigError

logger = logging.getLogger(__name__)

HUB_IDS = {
    "imdb": "stanfordnlp/imdb",
    "yelp": "fancyzhx/yelp_polarity",
    "rotten_tomatoes": "cornell-movie-review-data/rotten_tomatoes",
    "sst2": "stanfordnlp/sst2",
    "amazon": "fancyzhx/amazon_polarity",
}
# Builder of `datasets` for each local file type.
FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# Column names that Hub datasets use for the text and the label, in order of preference.
TEXT_COLUMNS = ("text", "sentence", "content", "review", "document", "input")
LABEL_COLUMNS = ("label", "labels")
INPUT_COLUMNS = ("input", "inputs", "source", "question", "prompt", "instruction", "text", "sentence")
TARGET_COLUMNS = ("target", "targets", "output", "answer", "completion", "response", "summary")
IMAGE_COLUMNS = ("image", "img", "image_path", "file", "path")
# The columns of each task type, each with the names it is found under.
TASK_COLUMNS = {
    "sequence_classification": {"text": TEXT_COLUMNS, "label": LABEL_COLUMNS},
    "seq2seq": {"input": INPUT_COLUMNS, "target": TARGET_COLUMNS},
    "causal_lm": {"input": INPUT_COLUMNS, "target": TARGET_COLUMNS},
    "image_classification": {"image": IMAGE_COLUMNS, "label": LABEL_COLUMNS},
}
TASK_TYPES = tuple(TASK_COLUMNS)
COLUMNS = ("text", "input", "target", "image", "label")  # every task type's columns, each renamed by `<column>_column`
CLASS_NAMES_FILE = "class_names.json"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
DATA_DIR_ENV = "MERGE_DATA_DIR"
MIXTURE_SEPARATOR = ";"


class DataError(ConfigError):
    """A dataset name, split or file that cannot be loaded; the message names it and says why."""


def resolve_data_dir(data_dir=None):
    """The configured data directory: `data_dir` if given, else $MERGE_DATA_DIR, else None (use the Hub)."""
    return data_dir or os.environ.get(DATA_DIR_ENV) or None


@dataclasses.dataclass(kw_only=True)
class DataKeys:
    """The config keys of the programs that read a task's data set (train.py's TrainConfig, predict.py's
    PredictConfig inherit them): the task type, the data set's column names, CLIP's classes, the data directory
    and the input length."""

    task_type: typing.Literal[TASK_TYPES] = "sequence_classification"
    # Column names of the data set for the task type's columns (None: the usual names, TASK_COLUMNS).
    text_column: str | None = None
    input_column: str | None = None
    target_column: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    class_names: list[str] | None = None  # CLIP's classes (None: the data set's label names)
    data_dir: str | None = None  # None: $MERGE_DATA_DIR, else the Hub
    max_length: int = 384

    def __post_init__(self):
        self.data_dir = resolve_data_dir(self.data_dir)
        if self.max_length < 1:
            raise ConfigError(f"max_length must be at least 1, got {self.max_length}")

    def columns(self):
        """The `columns` argument of `load_split` from the `<column>_column` keys given."""
        names = {column: getattr(self, f"{column}_column") for column in COLUMNS}
        return {column: name for column, name in names.items() if name is not None}


def split_names(split):
    """The split names a split string refers to: 'train[:20%]+test' -> ['train', 'test']."""
    names = []
    for part in split.split("+"):
        match = re.fullmatch(r"\s*([\w.-]+)\s*(\[[^\]]*\])?\s*", part)
        if match is None:
            raise DataError(f"split {split!r}: expected NAME or NAME[slice] (e.g. 'train[:20%]'), joined with '+'")
        names.append(match.group(1))
    return names


def load_split(dataset_name, split, data_dir=None, task_type="sequence_classification", columns=None):
    """Load `split` of `dataset_name` (`;` mixtures allowed) as a Dataset with the columns of `task_type`
    (`text`/`label` by default); `columns` maps a column of the task type to the data set's name for it."""
    if task_type not in TASK_COLUMNS:
        raise DataError(f"task_type {task_type!r} is not one of {', '.join(TASK_TYPES)}")
    names = dataset_name.split(MIXTURE_SEPARATOR)
    splits = split.split(MIXTURE_SEPARATOR)
    if len(names) != len(splits):
        raise DataError(
            f"dataset {dataset_name!r} names {len(names)} dataset(s) but split {split!r} gives {len(splits)}; "
            f"a mixture needs one split per dataset, both joined with {MIXTURE_SEPARATOR!r} in the same order"
        )
    data_dir = resolve_data_dir(data_dir)
    parts = [_load_one(name.strip(), part.strip(), data_dir, task_type, columns or {}) for name, part in zip(names, splits)]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def local_sources(dataset_name, split, data_dir=None):
    """The local files and folders that `load_split(dataset_name, split, data_dir)` reads (none for Hub datasets)."""
    data_dir = resolve_data_dir(data_dir)
    sources = []
    for name, part in zip(dataset_name.split(MIXTURE_SEPARATOR), split.split(MIXTURE_SEPARATOR)):
        source, builder, _ = locate(_task_of_script(name.strip()), part.strip(), data_dir)
        if builder is not None:
            sources.append(source)
    return sources


def check_labels(dataset, num_classes, what, hint=""):
    """Raise DataError unless every label of `dataset` is a class index of a model with `num_classes` classes
    (`hint`, if any, ends the message: what to change)."""
    labels = set(dataset["label"])
    outside = (["null"] if None in labels else []) + [
        str(label) for label in sorted(labels - {None}) if not 0 <= label < num_classes]
    if outside:
        shown = ", ".join(outside[:5]) + (", ..." if len(outside) > 5 else "")
        raise DataError(f"{what}: labels {shown} are outside the model's {num_classes} classes (0 to {num_classes - 1})"
                        + (f"; {hint}" if hint else ""))


def _task_of_script(name):
    """A dataset script of the paper authors' code (`.../datasets/imdb.py`) names its task (`imdb`); never run here."""
    if not name.endswith(".py"):
        return name
    task = os.path.basename(name)[: -len(".py")]
    if task not in HUB_IDS:
        raise DataError(f"dataset {name!r}: dataset scripts are not run; name a task ({', '.join(sorted(HUB_IDS))}), "
                        "a folder of split files or a data file")
    logger.info("dataset %s: the authors' script for the task %s; reading that task", name, task)
    return task


def _load_one(name, split, data_dir, task_type, columns):
    split_names(split)  # validates the syntax before anything is read
    name = _task_of_script(name)
    source, builder, data_files = locate(name, split, data_dir)
    what = f"dataset {name!r} ({source}), split {split!r}"
    for path in (data_files or {}).values():
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            raise DataError(f"dataset {name!r}: file {path} is empty")
    try:
        if builder is None:
            hub_id, _, subset = source.partition(":")  # 'nyu-mll/glue:sst2': a data set's configuration
            dataset = datasets.load_dataset(hub_id, subset or None, split=split)
        elif builder == IMAGE_FOLDER:
            dataset = _image_folder_split(data_files, split)
        else:
            dataset = datasets.load_dataset(builder, data_files=data_files, split=split)
    except (ValueError, KeyError, FileNotFoundError, OSError) as error:
        raise DataError(f"{what}: {error}") from error
    except datasets.exceptions.DatasetGenerationError as error:
        cause = str(error.__cause__ or error).splitlines()[0]
        files = ", ".join(sorted(set((data_files or {}).values()))) or source
        raise DataError(f"dataset {name!r}, split {split!r}: {files} cannot be parsed as {builder or 'a dataset'} "
                        f"({cause})") from error
    dataset = _normalise_columns(dataset, what, task_type, columns)
    if "label" in dataset.column_names and builder not in (None, IMAGE_FOLDER):
        dataset = _with_class_names(dataset, os.path.dirname(next(iter(data_files.values()))), what)
    if "image" in dataset.column_names and builder is not None:
        dataset = _absolute_image_paths(dataset, os.path.dirname(next(iter(data_files.values()))))
    if len(dataset) == 0:
        raise DataError(f"dataset {name!r} ({source}), split {split!r} has no examples")
    logger.info("loaded %d examples of %s, split %s, from %s", len(dataset), name, split, source)
    return dataset


def locate(name, split, data_dir):
    """(source, builder, data_files) of dataset `name`'s `split`: builder None means `source` is a Hub dataset id."""
    if os.path.isfile(name):
        return name, _builder_for(name), {split_name: name for split_name in split_names(split)}
    if os.path.isdir(name):
        return name, *_folder_files(name, split)
    if data_dir:
        folder = os.path.join(data_dir, name)
        if not os.path.isdir(folder):
            raise DataError(
                f"dataset {name!r}: neither a file or folder nor a task folder of the data directory ({folder} does not exist)"
            )
        return folder, *_folder_files(folder, split)
    return HUB_IDS.get(name, name), None, None


def _builder_for(path):
    extension = os.path.splitext(path)[1].lower()
    if extension not in FILE_BUILDERS:
        raise DataError(f"dataset file {path}: unsupported type {extension!r}; use one of {sorted(FILE_BUILDERS)}")
    return FILE_BUILDERS[extension]


def _folder_files(folder, split):
    wanted = split_names(split)
    if all(os.path.isdir(os.path.join(folder, name)) for name in wanted):
        return IMAGE_FOLDER, {name: os.path.join(folder, name) for name in wanted}
    data_files = {}
    for split_name in wanted:
        found = [os.path.join(folder, split_name + ext) for ext in FILE_BUILDERS]
        found = [path for path in found if os.path.isfile(path)]
        if not found:
            present = sorted(f for f in os.listdir(folder) if os.path.splitext(f)[1] in FILE_BUILDERS)
            raise DataError(f"dataset folder {folder} has no split {split_name!r} (files there: {present})")
        data_files[split_name] = found[0]
    builders = {_builder_for(path) for path in data_files.values()}
    if len(builders) > 1:
        raise DataError(f"dataset folder {folder}: the splits of {split!r} are files of different types {data_files}")
    return builders.pop(), data_files


def _normalise_columns(dataset, what, task_type, mapping):
    """The task type's columns only, under their standard names; labels as integers."""
    found = {}
    for column, candidates in TASK_COLUMNS[task_type].items():
        if column in mapping:
            if mapping[column] not in dataset.column_names:
                raise DataError(f"{what}: column {mapping[column]!r} (given for {column!r}) is missing; found {dataset.column_names}")
            found[column] = mapping[column]
            continue
        found[column] = next((c for c in candidates if c in dataset.column_names), None)
    missing = [column for column, name in found.items() if name is None]
    if missing:
        wanted = " and a ".join(f"{column} column (one of {TASK_COLUMNS[task_type][column]}, or name it with "
                                f"{column}_column)" for column in missing)
        raise DataError(f"{what}: {task_type} data needs a {wanted}, found {dataset.column_names}")
    dataset = dataset.select_columns(list(found.values()))
    dataset = dataset.rename_columns({name: column for column, name in found.items() if name != column})
    if "image" in dataset.column_names and isinstance(dataset.features["image"], datasets.Image):
        dataset = dataset.cast_column("image", datasets.Image(decode=False))  # opened when used, errors named
    if "label" not in dataset.column_names or isinstance(dataset.features["label"], datasets.ClassLabel):
        return dataset
    return _integer_labels(dataset, what, found["label"])


def _integer_labels(dataset, what, column):
    """The labels as int64. Labels are class indices (integers, or a ClassLabel), as for datasets and
    transformers: whole-number floats (a CSV column with a gap) are cast exactly; strings ("1", "positive")
    and booleans are refused rather than parsed, since which class a string means is not ours to guess."""
    dtype = getattr(dataset.features["label"], "dtype", None)
    if dtype == "int64":
        return dataset
    if dtype is None or not dtype.startswith(("int", "uint", "float")):
        found = sorted({repr(value) for value in dataset["label"]})
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        raise DataError(f"{what}: column {column!r} holds {dtype or 'non-scalar'} labels ({shown}), not class "
                        "indices; give integers 0, 1, ... or a ClassLabel")
    try:
        return dataset.cast_column("label", datasets.Value("int64"))
    except (ValueError, TypeError) as error:
        raise DataError(f"{what}: column {column!r}: labels must be whole numbers ({error})") from None


IMAGE_FOLDER = "imagefolder"


def _image_folder_split(folders, split):
    """The images of `<split>/<class>/*` folders as rows {image: path, label}, classes sorted by name; each part
    of `split` ('train[:10]+test') sliced as `datasets` would."""
    parts = []
    for part in split.split("+"):
        folder = folders[split_names(part)[0]]
        classes = sorted(c for c in os.listdir(folder) if os.path.isdir(os.path.join(folder, c)))
        if not classes:
            raise DataError(f"image folder {folder} has no class subfolders")
        rows = {"image": [], "label": []}
        for label, name in enumerate(classes):
            for file in sorted(os.listdir(os.path.join(folder, name))):
                if file.lower().endswith(IMAGE_EXTENSIONS):
                    rows["image"].append(os.path.abspath(os.path.join(folder, name, file)))
                    rows["label"].append(label)
        features = datasets.Features({"image": datasets.Value("string"), "label": datasets.ClassLabel(names=classes)})
        dataset = datasets.Dataset.from_dict(rows, features=features)
        instruction = datasets.ReadInstruction.from_spec(part.strip())
        absolute = instruction.to_absolute({split_names(part)[0]: len(dataset)})[0]
        parts.append(dataset.select(range(absolute.from_ or 0, len(dataset) if absolute.to is None else absolute.to)))
    if len({tuple(p.features["label"].names) for p in parts}) > 1:
        raise DataError(f"image folders {sorted(folders.values())} have different classes")
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _with_class_names(dataset, folder, what):
    """Attach the names of `class_names.json` in `folder` (if any) to the integer labels."""
    path = os.path.join(folder, CLASS_NAMES_FILE)
    if isinstance(dataset.features["label"], datasets.ClassLabel) or not os.path.isfile(path):
        return dataset
    with open(path) as f:
        names = json.load(f)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DataError(f"{path} must hold a JSON list of class names")
    labels = dataset["label"]
    if labels and not 0 <= min(labels) <= max(labels) < len(names):
        raise DataError(f"{what}: labels outside the {len(names)} classes of {path}")
    return dataset.cast_column("label", datasets.ClassLabel(names=names))


def _absolute_image_paths(dataset, folder):
    """Image paths relative to the data file are made absolute (bytes and absolute paths stay)."""
    if dataset.features["image"] != datasets.Value("string"):
        return dataset
    return dataset.map(lambda row: {"image": os.path.join(folder, row["image"])}, desc="image paths")


def class_names(dataset):
    """The class names of a data set's labels (ClassLabel names), or None."""
    feature = dataset.features.get("label")
    return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def tokenize(dataset, tokenizer, max_length):
    """Tokenise `text` (truncated to `max_length` tokens, not padded); keeps `label`, drops `text`."""

    def encode(batch):
        return tokenizer(batch["text"], truncation=True, max_length=max_length)

    return dataset.map(encode, batched=True, remove_columns=["text"], desc="tokenising")


def collator(tokenizer):
    """Pads a list of tokenised examples to the longest one; `label` becomes `labels`."""
    return DataCollatorWithPadding(tokenizer)


def dataloader(dataset, tokenizer, batch_size, max_length, shuffle=False, seed=0):
    """Batches of `dataset` (text/label) as model inputs with `labels`, padded per batch, in order unless `shuffle`."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return torch.utils.data.DataLoader(
        tokenize(dataset, tokenizer, max_length),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=collator(tokenizer),
    )
