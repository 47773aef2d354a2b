"""`run`, the body of `code/predict.py`: load the model and data a `PredictConfig` names, compute what its mode
names (an evaluation or a statistic) or join the parts of a sharded run, and write the outputs atomically."""
import logging
import os
import tempfile

from modelmerge import families, shards
from modelmerge.atomic import atomic_dir, atomic_file, releasing_outputs, write_json, write_jsonl
from modelmerge.config import ConfigError
from modelmerge.data import check_labels, class_names, load_split, local_sources
from modelmerge.outputs import claim, json_kind
from modelmerge.prediction.config import SUMMARY_FILES
from modelmerge.prediction.evaluation import evaluate, join_evaluations
from modelmerge.prediction.loading import (check_max_length, check_model_path, config_device, load_for_task,
                                           model_loading_errors, to_float32_if_half)
from modelmerge.prediction.statistics import (gradient_magnitude, gram, join_gradient_magnitude, join_gram,
                                             join_squared_gradients, squared_gradients)
from modelmerge.threads import set_torch_threads

logger = logging.getLogger(__name__)

# The kinds of output predict.py writes (modelmerge.atomic), and how a file tells its kind.
OUTPUT_KIND = "predict"
FILE_KINDS = {"metric_output_file": ("metrics", json_kind("metrics", "num_examples")),
              "prediction_output_file": ("predictions", json_kind("predictions", "index", "prediction"))}


@releasing_outputs
def run(config):
    """Compute what `config.mode` names and write it into `config.output_dir`, atomically as one folder
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
    if config.task_type == "sequence_classification" and (config.mode == "evaluate" or config.empirical):
        for (_, dataset), (_, dataset_name, split) in zip(datasets, config.datasets()):  # the gold labels are used
            check_labels(dataset, model.config.num_labels, f"dataset {dataset_name!r}, split {split!r}")
    inputs = _check_outputs(config)
    if config.mode != "evaluate":
        to_float32_if_half(model, "its statistics are computed in float32")
    model.to(config_device(config.device))
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
                summary = JOINS[config.mode](model, [os.path.join(p, name or "") for p in parts], config, output_dir)
                continue
            examples = config.examples(name, dataset)
            slices[name or ""] = shards.slice_info(examples, len(dataset))
            summary = MODES[config.mode](model, processor, dataset, config, output_dir, examples)
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


# What each mode computes, and how it joins the parts of a sharded run.
MODES = {"evaluate": evaluate, "squared_gradients": squared_gradients, "gram": gram,
         "gradient_magnitude": gradient_magnitude}
JOINS = {"evaluate": join_evaluations, "squared_gradients": join_squared_gradients, "gram": join_gram,
         "gradient_magnitude": join_gradient_magnitude}
