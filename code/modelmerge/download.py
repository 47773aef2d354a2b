"""The body of `code/download_data.py`: materialise splits of a dataset (loaded by `modelmerge.data`) as a folder
`output_dir/<split>.jsonl` that later steps name as a dataset, images copied beside the rows, optionally as
text-to-text rows from a classification data set (FusionBench's GLUE format)."""
import dataclasses
import io
import json
import logging
import os
import shutil

import datasets

from modelmerge.atomic import atomic_dir
from modelmerge.config import ConfigError
from modelmerge.data import (CLASS_NAMES_FILE, MIXTURE_SEPARATOR, TASK_COLUMNS, TASK_TYPES, DataError, class_names,
                             load_split, local_sources, locate, resolve_data_dir, split_names)
from modelmerge.outputs import claim

logger = logging.getLogger(__name__)

DOWNLOAD_KIND = "download_data"  # the kind of output download_data.py writes (modelmerge.atomic)


@dataclasses.dataclass
class DownloadConfig:
    """Keys of `code/download_data.py`: materialise splits of a dataset as `output_dir/<split>.jsonl`."""

    dataset_name: str
    splits: list[str]
    output_dir: str
    data_dir: str | None = None  # None: $MERGE_DATA_DIR, else the Hub
    task_type: str = "sequence_classification"  # which columns are kept (TASK_COLUMNS)
    columns: dict | None = None  # {column of the task type: the data set's name for it}
    # Text-to-text rows from a classification data set (FusionBench's GLUE format): input = the template
    # filled with the row's columns, target = class_words[label].
    input_template: str | None = None
    class_words: list[str] | None = None
    overwrite: bool = False  # replace an output_dir that this program did not write

    def output_paths(self):
        return {"output_dir": self.output_dir}

    def __post_init__(self):
        self.data_dir = resolve_data_dir(self.data_dir)
        if self.task_type not in TASK_COLUMNS:
            raise ConfigError(f"task_type {self.task_type!r} is not one of {', '.join(TASK_TYPES)}")
        unknown = sorted(set(self.columns or {}) - set(TASK_COLUMNS[self.task_type]))
        if unknown:
            raise ConfigError(f"columns: {unknown} are not columns of {self.task_type} ({sorted(TASK_COLUMNS[self.task_type])})")
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
    """Write every split of `config` to `output_dir/<split>.jsonl` (rows with the task type's columns; images as
    files `images/<split>/<index>.<format>` named relative to the folder), `class_names.json` when the labels
    have names; the folder appears atomically, marked as this program's (`.written-by`, modelmerge.atomic)."""
    if config.input_template is not None:
        loaded = {output_split_name(split): _text_to_text(config, split) for split in config.splits}
    else:
        loaded = {output_split_name(split): load_split(config.dataset_name, split, config.data_dir, config.task_type,
                                                       config.columns) for split in config.splits}
    inputs = [path for split in config.splits for path in local_sources(config.dataset_name, split, config.data_dir)]
    claim(config.output_dir, "output_dir", DOWNLOAD_KIND, inputs=inputs, overwrite=config.overwrite)
    with atomic_dir(config.output_dir, DOWNLOAD_KIND, inputs=inputs, overwrite=config.overwrite) as tmp:
        for name, dataset in loaded.items():
            if "image" in dataset.column_names:
                dataset = _materialise_images(dataset, tmp, name)
            dataset.to_json(os.path.join(tmp, f"{name}.jsonl"), lines=True, force_ascii=False)
            logger.info("wrote %d examples to %s/%s.jsonl", len(dataset), config.output_dir, name)
        names = [class_names(dataset) for dataset in loaded.values()]
        if names[0] and all(n == names[0] for n in names):
            with open(os.path.join(tmp, CLASS_NAMES_FILE), "w") as f:
                json.dump(names[0], f)


def _text_to_text(config, split):
    """{input, target} rows: the input template filled with each row's columns, the label's class word as target."""
    source, builder, data_files = locate(config.dataset_name, split, config.data_dir)
    hub_id, _, subset = source.partition(":")
    try:
        if builder is None:
            raw = datasets.load_dataset(hub_id, subset or None, split=split)
        else:
            raw = datasets.load_dataset(builder, data_files=data_files, split=split)
    except (ValueError, KeyError, FileNotFoundError, OSError) as error:
        raise DataError(f"dataset {config.dataset_name!r}, split {split!r}: {error}") from error
    words = config.class_words or []

    def convert(row):
        try:
            return {"input": config.input_template.format(**row), "target": words[int(row["label"])]}
        except (KeyError, IndexError, ValueError) as error:
            raise DataError(f"input_template / class_words do not fit the row {row}: {error!r}") from None

    return raw.map(convert, remove_columns=raw.column_names, desc="text-to-text")


def _materialise_images(dataset, folder, split):
    """Copy every image (bytes or file) to `folder/images/<split>/`, checking that it opens; rows name it relatively."""
    from PIL import Image

    os.makedirs(os.path.join(folder, "images", split))
    paths = []
    for index, value in enumerate(dataset["image"]):
        data = value.get("bytes") if isinstance(value, dict) else value if isinstance(value, bytes) else None
        source = value.get("path") if isinstance(value, dict) and data is None else value if data is None else None
        try:
            with Image.open(io.BytesIO(data) if data is not None else source) as image:
                extension = (image.format or "png").lower()
        except (OSError, ValueError, TypeError) as error:
            raise DataError(f"example {index} of split {split}: image {source or f'({len(data)} bytes)'} cannot be opened: {error}") from None
        relative = os.path.join("images", split, f"{index:07d}.{extension}")
        if data is not None:
            with open(os.path.join(folder, relative), "wb") as f:
                f.write(data)
        else:
            shutil.copyfile(source, os.path.join(folder, relative))
        paths.append(relative)
    return dataset.remove_columns("image").add_column("image", paths).select_columns(["image", "label"])
