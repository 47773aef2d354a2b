"""Gather metrics into a table (Markdown, CSV) and plots (PNG).

    python code/report.py report_config.json

Config keys: `results` ({model: {task: metrics.json}}), optional `sweeps`
({method: {scaling factor: {task: metrics.json}}}), `output_dir`, optional `title`.
Writes `output_dir/` atomically: results.md, results.csv, accuracy.png (+ sweep.csv, sweep.png).
"""
import dataclasses
import logging
import sys

from modelmerge.atomic import atomic_dir
from modelmerge.config import ConfigError, run_program
from modelmerge.report import write_report

logger = logging.getLogger("report")


@dataclasses.dataclass
class ReportConfig:
    results: dict
    output_dir: str
    sweeps: dict | None = None
    title: str | None = None

    def __post_init__(self):
        _check_nesting(self.results, "results", depth=2)
        if self.sweeps is not None:
            _check_nesting(self.sweeps, "sweeps", depth=3)


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
            rows = write_report(tmp, config.results, config.sweeps, config.title)
        except (OSError, ValueError) as error:
            raise ConfigError(str(error)) from None
    for row in rows:
        logger.info("%s: average accuracy %.4f", row[0], row[-1])


if __name__ == "__main__":
    sys.exit(run_program(ReportConfig, run, __doc__.splitlines()[0]))
