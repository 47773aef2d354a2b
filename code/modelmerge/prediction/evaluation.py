"""Predict's `evaluate` mode: a model's predictions on (a shard of) a data set, written as predictions.jsonl and
metrics.json; the join of a sharded evaluation's parts."""
import json
import logging
import os

import torch

from modelmerge import families
from modelmerge.atomic import write_json, write_jsonl
from modelmerge.prediction.decoding import evaluate_sequences, predict
from modelmerge.prediction.metrics import classification_metrics, prediction_rows, sequence_metrics

logger = logging.getLogger(__name__)


def evaluate(model, processor, dataset, config, output_dir, examples):
    """Evaluate on the `examples` (a range of positions) of `dataset`; rows keep their positions as `index`."""
    dataset = dataset if len(examples) == len(dataset) else dataset.select(examples)
    if families.is_sequence(config.task_type):
        _, rows = evaluate_sequences(model, processor, dataset, config.task_type, config.batch_size,
                                     config.max_length, config.max_new_tokens)
    else:
        loader = torch.utils.data.DataLoader(
            families.encode(dataset, processor, config.task_type, config.max_length), batch_size=config.batch_size,
            collate_fn=families.collator(processor, config.task_type),
        )
        rows = prediction_rows(*predict(model, loader))
    for row in rows:
        row["index"] += examples.start
    if config.shard is not None:
        write_jsonl(os.path.join(output_dir, "predictions.jsonl"), rows)
        return {}
    return _write_evaluation(rows, config, output_dir)


def join_evaluations(model, parts, config, output_dir):
    """The predictions of the parts, concatenated in order, and the metrics of them all."""
    rows = []
    for part in parts:
        with open(os.path.join(part, "predictions.jsonl")) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return _write_evaluation(rows, config, output_dir)


def _write_evaluation(rows, config, output_dir):
    metrics = sequence_metrics(rows) if families.is_sequence(config.task_type) else classification_metrics(
        [row["label"] for row in rows], [row["prediction"] for row in rows])
    logger.info("metrics: %s", metrics)
    write_jsonl(os.path.join(output_dir, "predictions.jsonl"), rows)
    write_json(os.path.join(output_dir, "metrics.json"), metrics)
    return {"metric_output_file": metrics, "prediction_output_file": rows}
