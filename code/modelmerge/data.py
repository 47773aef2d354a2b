"""Datasets of the pipeline: resolve a dataset name and split string to a `datasets.Dataset` of `text`/`label`.

A dataset name is
- a csv/json/jsonl/parquet file (a file has one split; the split string's name is ignored, its slice applies),
- a folder holding `<split>.<ext>` files (as `download_data.py` writes them),
- a task name (`sst2`, `imdb`, ...): the folder `<data_dir>/<task>/` when a data directory is configured,
  else the task's Hugging Face Hub dataset (any other name is then taken as a Hub id).
Names joined with `;`, with splits joined the same way, form a mixture (the datasets concatenated in order).
Split strings use the `datasets` slicing syntax: `train`, `train[:20%]`, `test[100:200]`, `train+validation`.
"""
import dataclasses
import logging
import os
import re

import datasets
import torch
from transformers import DataCollatorWithPadding

from modelmerge.atomic import atomic_dir
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
TEXT_COLUMNS = ("text", "sentence", "content", "review", "document")
LABEL_COLUMNS = ("label", "labels")
DATA_DIR_ENV = "MERGE_DATA_DIR"
MIXTURE_SEPARATOR = ";"


class DataError(ConfigError):
    """A dataset name, split or file that cannot be loaded; the message names it and says why."""


def resolve_data_dir(data_dir=None):
    """The configured data directory: `data_dir` if given, else $MERGE_DATA_DIR, else None (use the Hub)."""
    return data_dir or os.environ.get(DATA_DIR_ENV) or None


def split_names(split):
    """The split names a split string refers to: 'train[:20%]+test' -> ['train', 'test']."""
    names = []
    for part in split.split("+"):
        match = re.fullmatch(r"\s*([\w.-]+)\s*(\[[^\]]*\])?\s*", part)
        if match is None:
            raise DataError(f"split {split!r}: expected NAME or NAME[slice] (e.g. 'train[:20%]'), joined with '+'")
        names.append(match.group(1))
    return names


def load_split(dataset_name, split, data_dir=None):
    """Load `split` of `dataset_name` (`;` mixtures allowed) as a Dataset with columns `text` (str), `label` (int)."""
    names = dataset_name.split(MIXTURE_SEPARATOR)
    splits = split.split(MIXTURE_SEPARATOR)
    if len(names) != len(splits):
        raise DataError(
            f"dataset {dataset_name!r} names {len(names)} dataset(s) but split {split!r} gives {len(splits)}; "
            f"a mixture needs one split per dataset, both joined with {MIXTURE_SEPARATOR!r} in the same order"
        )
    data_dir = resolve_data_dir(data_dir)
    parts = [_load_one(name.strip(), part.strip(), data_dir) for name, part in zip(names, splits)]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _load_one(name, split, data_dir):
    split_names(split)  # validates the syntax before anything is read
    source, builder, data_files = _locate(name, split, data_dir)
    try:
        if builder is None:
            dataset = datasets.load_dataset(source, split=split)
        else:
            dataset = datasets.load_dataset(builder, data_files=data_files, split=split)
    except (ValueError, KeyError, FileNotFoundError, OSError) as error:
        raise DataError(f"dataset {name!r} ({source}), split {split!r}: {error}") from error
    dataset = _normalise_columns(dataset, f"dataset {name!r} ({source}), split {split!r}")
    if len(dataset) == 0:
        raise DataError(f"dataset {name!r} ({source}), split {split!r} has no examples")
    logger.info("loaded %d examples of %s, split %s, from %s", len(dataset), name, split, source)
    return dataset


def _locate(name, split, data_dir):
    """(source, builder, data_files): builder None means `source` is a Hub dataset id."""
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
    data_files = {}
    for split_name in split_names(split):
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


def _normalise_columns(dataset, what):
    text_column = next((c for c in TEXT_COLUMNS if c in dataset.column_names), None)
    label_column = next((c for c in LABEL_COLUMNS if c in dataset.column_names), None)
    if text_column is None or label_column is None:
        raise DataError(
            f"{what}: needs a text column (one of {TEXT_COLUMNS}) and a label column (one of {LABEL_COLUMNS}), "
            f"found {dataset.column_names}"
        )
    dataset = dataset.select_columns([text_column, label_column])
    if text_column != "text":
        dataset = dataset.rename_column(text_column, "text")
    if label_column != "label":
        dataset = dataset.rename_column(label_column, "label")
    if dataset.features["label"] == datasets.Value("int64"):
        return dataset
    try:
        return dataset.cast_column("label", datasets.Value("int64"))
    except (ValueError, TypeError) as error:
        raise DataError(f"{what}: labels must be integers ({error})") from error


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


@dataclasses.dataclass
class DownloadConfig:
    """Keys of `code/download_data.py`: materialise splits of a dataset as `output_dir/<split>.jsonl`."""

    dataset_name: str
    splits: list[str]
    output_dir: str
    data_dir: str | None = None  # None: $MERGE_DATA_DIR, else the Hub

    def __post_init__(self):
        self.data_dir = resolve_data_dir(self.data_dir)
        if not self.splits:
            raise ConfigError("splits: give at least one split")
        files = [output_split_name(split) for split in self.splits]
        if len(set(files)) != len(files):
            raise ConfigError(f"splits {self.splits} would write the same file twice ({files})")


def output_split_name(split):
    """The file stem a split string is written under: its split name ('train[:20%]' -> 'train').

    For a mixture every part must name the same split ('train[:10];train' -> 'train')."""
    names = {"+".join(split_names(part.strip())) for part in split.split(MIXTURE_SEPARATOR)}
    if len(names) != 1:
        raise DataError(f"split {split!r}: the parts of a mixture name different splits {sorted(names)}; cannot name one file")
    return names.pop()


def download(config):
    """Write every split of `config` to `output_dir/<split>.jsonl` (rows `{"text", "label"}`); the folder appears atomically."""
    loaded = {output_split_name(split): load_split(config.dataset_name, split, config.data_dir) for split in config.splits}
    with atomic_dir(config.output_dir) as tmp:
        for name, dataset in loaded.items():
            dataset.to_json(os.path.join(tmp, f"{name}.jsonl"), lines=True, force_ascii=False)
            logger.info("wrote %d examples to %s/%s.jsonl", len(dataset), config.output_dir, name)
