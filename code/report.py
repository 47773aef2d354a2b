"""Gather metrics into a table (Markdown, CSV) and plots (PNG).

    python code/report.py report_config.json

Config keys: `results` ({model: {task: metrics.json}}), optional `sweeps`
({method: {scaling factor: {task: metrics.json}}}), `output_dir`, optional `title`; optional, for the
views merging papers report: `own_models` ({task: the model label of the task's own fine-tuned model}:
normalized accuracy), `multitask` (the multitask model's label: the gap to it), `held_in` ({model label:
[tasks the models that went into its merge were trained on]}: the others are its held-out tasks).
Writes `output_dir/` atomically: results.md, results.csv, accuracy.png (+ normalized.csv, normalized.png
with `own_models`; generalization.png where a model has held-out tasks; sweep.csv, sweep.png with sweeps).
"""
import dataclasses
import logging
import sys

from modelmerge.atomic import atomic_dir
from modelmerge.config import ConfigError, run_program
from modelmerge.report import average, write_report

logger = logging.getLogger("report")


@dataclasses.dataclass
class ReportConfig:
    results: dict
    output_dir: str
    sweeps: dict | None = None
    title: str | None = None
    own_models: dict | None = None
    multitask: str | None = None
    held_in: dict | None = None

    def __post_init__(self):
        _check_nesting(self.results, "results", depth=2)
        if self.sweeps is not None:
            _check_nesting(self.sweeps, "sweeps", depth=3)
        for task, model in (self.own_models or {}).items():
            if not isinstance(model, str):
                raise ConfigError(f"own_models.{task} must be a model label (str), got {model!r}")
        for model, tasks in (self.held_in or {}).items():
            if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
                raise ConfigError(f"held_in.{model} must be a list of task names, got {tasks!r}")


def _check_nesting(mapping, where, depth):
    """Every value `depth` levels down must be a path (str); every level above it a non-empty object."""
    if depth == 0:
        if not isinstance(mapping, str):
            raise ConfigError(f"{where} must be the path of a metrics.json, got {mapping!r}")
        return
    if not isinstance(mapping, dict) or not mapping:
        raise ConfigError(f"{where} must be a non-empty JSON object, got {mapping!r}")
    for key, value in mapping.items():
        _check_nesting(value, f"{where}.{key}", depth - 1)


def run(config):
    with atomic_dir(config.output_dir) as tmp:
        try:
            table = write_report(tmp, config.results, config.sweeps, config.title, own_models=config.own_models,
                                multitask=config.multitask, held_in=config.held_in)
        except (OSError, ValueError) as error:
            raise ConfigError(str(error)) from None
    for model, accuracies in table.items():
        logger.info("%s: average accuracy %.4f", model, average(accuracies.values()))


if __name__ == "__main__":
    sys.exit(run_program(ReportConfig, run, __doc__.splitlines()[0]))
