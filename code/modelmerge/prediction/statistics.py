"""Predict's statistics modes: the squared-gradient Fisher, the Gram matrices and the mean absolute gradient (TATR's)
of a model on (a shard of) a data set, computed by `modelmerge.statistics` and written with their provenance; the join of a sharded run's parts."""
import torch

from modelmerge import shards
from modelmerge.merging.provenance import model_provenance
from modelmerge.statistics.fisher import FisherResult, combine_fisher, compute_fisher, save_fisher
from modelmerge.statistics.gradient_magnitude import (GradientMagnitudeResult, combine_gradient_magnitude,
                                                      compute_gradient_magnitude, save_gradient_magnitude)
from modelmerge.statistics.gram import GramResult, combine_gram, compute_gram, save_gram


def squared_gradients(model, processor, dataset, config, output_dir, examples):
    result = _compute(compute_fisher, model, processor, dataset, config, examples)
    if config.shard is not None:
        shards.save_result(result, output_dir)
        return {}
    return _write_fisher(result, model, config, output_dir)


def join_squared_gradients(model, parts, config, output_dir):
    return _write_fisher(combine_fisher([shards.load_result(FisherResult, part) for part in parts]), model, config,
                         output_dir)


def _write_fisher(result, model, config, output_dir):
    return _with_labels(save_fisher(result, model, output_dir, _provenance(config)), result)


def gradient_magnitude(model, processor, dataset, config, output_dir, examples):
    result = _compute(compute_gradient_magnitude, model, processor, dataset, config, examples)
    if config.shard is not None:
        shards.save_result(result, output_dir)
        return {}
    return _write_gradient_magnitude(result, model, config, output_dir)


def join_gradient_magnitude(model, parts, config, output_dir):
    result = combine_gradient_magnitude([shards.load_result(GradientMagnitudeResult, part) for part in parts])
    return _write_gradient_magnitude(result, model, config, output_dir)


def _write_gradient_magnitude(result, model, config, output_dir):
    return _with_labels(save_gradient_magnitude(result, model, output_dir, _provenance(config)), result)


def _with_labels(stats, result):
    """What a gradient statistic's run writes: stats.json's content and the label y_i of each example."""
    labels = result.labels.tolist() if isinstance(result.labels, torch.Tensor) else result.labels
    return {"metric_output_file": stats,
            "prediction_output_file": [{"index": i, "prediction": label, "variant": result.variant}
                                       for i, label in enumerate(labels)]}


def gram(model, processor, dataset, config, output_dir, examples):
    result = _compute(compute_gram, model, processor, dataset, config, examples)
    if config.shard is not None:
        shards.save_result(result, output_dir)
        return {}
    return {"metric_output_file": save_gram(result, model, output_dir, _provenance(config))}


def join_gram(model, parts, config, output_dir):
    result = combine_gram([shards.load_result(GramResult, part) for part in parts])
    return {"metric_output_file": save_gram(result, model, output_dir, _provenance(config))}


def _compute(statistic, model, processor, dataset, config, examples):
    """`compute_fisher`, `compute_gram` or `compute_gradient_magnitude` with predict's keys."""
    return statistic(model, processor, dataset, empirical=config.empirical, batch_size=config.batch_size,
                     max_length=config.max_length, seed=config.seed, task_type=config.task_type, examples=examples)


def _provenance(config):
    """What statistics record about their origin (modelmerge.merging.provenance): the model, the data set and split."""
    return {**model_provenance(config.model_name_or_path), "dataset": config.dataset_name, "split": config.split}
