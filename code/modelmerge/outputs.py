"""Output paths of the programs under `code/`: what a run may replace, and what killed runs left behind.

A program replaces an existing output only when it wrote it itself before (it carries the program's
marker: the resolved config it saves there, or content only it writes), when it is an empty folder, or
when the config says `overwrite: true` (the paper's configs: `overwrite_output_dir`). An output that is,
holds or lies inside one of the run's inputs (model, data, the config file) is always refused: replacing
it would destroy what the run reads. Nothing else is ever deleted.

Atomic writes (`modelmerge.atomic`) leave hidden `.NAME.tmp-*` siblings when a run is killed mid-write;
`remove_stale_temporaries` deletes those of one output, so the next run of that output cleans up.
"""
import json
import logging
import os
import shutil

from modelmerge.config import ConfigError

logger = logging.getLogger(__name__)

TEMP_INFIX = ".tmp-"  # atomic.py names temporaries `.NAME.tmp-XXXX` (and `.NAME.tmp-old-XXXX`)


def overlapping_input(output, inputs):
    """The first of `inputs` (local paths; others are skipped) that `output` equals, holds or lies inside, else None."""
    target = os.path.realpath(output)
    for path in inputs:
        if not path or not os.path.exists(path):
            continue
        source = os.path.realpath(path)
        if target == source or _inside(target, source) or _inside(source, target):
            return path
    return None


def check_output(path, key, program, *, inputs=(), overwrite=False, is_ours=None, folder=True):
    """Raise ConfigError naming `key` unless `program` may write its output at `path`.

    `is_ours(path)` tells whether an existing output was written by `program` before; `folder` says
    whether the output is a folder (else a file).
    """
    source = overlapping_input(path, inputs)
    if source is not None:
        raise ConfigError(f"{key}: {path} overlaps the input {source} (same path, or one inside the other); "
                          "writing there would destroy what the run reads, choose another path")
    if not os.path.lexists(path):
        return
    if folder and not os.path.isdir(path):
        raise ConfigError(f"{key}: {path} is a file, not a folder; choose another path")
    if not folder and os.path.isdir(path):
        raise ConfigError(f"{key}: {path} is a folder, not a file; choose another path")
    if overwrite or (folder and not os.listdir(path)) or (is_ours is not None and is_ours(path)):
        return
    raise ConfigError(f"{key}: {path} exists and was not written by {program}; set \"overwrite\": true to replace it, "
                      "or choose another path")


def has_marker(marker):
    """`is_ours` for folders that `program` marks with the file `marker` (e.g. the resolved config it saves)."""
    return lambda path: os.path.isfile(os.path.join(path, marker))


def is_json_object_with(*keys):
    """`is_ours` for JSON files whose object (or, for JSON lines, first row) has all of `keys`."""

    def check(path):
        try:
            with open(path) as f:
                text = f.read(1 << 20)
        except (OSError, UnicodeDecodeError):
            return False
        for candidate in (text, text.split("\n", 1)[0]):
            try:
                row = json.loads(candidate)
            except json.JSONDecodeError:
                continue
            return isinstance(row, dict) and all(key in row for key in keys)
        return False

    return check


def remove_stale_temporaries(target):
    """Delete the hidden temporaries (`.NAME.tmp-*`) that killed atomic writes of `target` left beside it."""
    parent, name = os.path.split(os.path.abspath(target))
    if not os.path.isdir(parent):
        return
    prefix = f".{name}{TEMP_INFIX}"
    for entry in os.listdir(parent):
        if entry.startswith(prefix):
            stale = os.path.join(parent, entry)
            logger.info("removing %s, left by an interrupted run", stale)
            if os.path.isdir(stale) and not os.path.islink(stale):
                shutil.rmtree(stale, ignore_errors=True)
            else:
                os.remove(stale)


def remove_stale_temporaries_in(folder):
    """Delete every hidden temporary (`.NAME.tmp-*`) of atomic writes directly inside `folder` (an output of ours)."""
    if not os.path.isdir(folder):
        return
    for entry in os.listdir(folder):
        if entry.startswith(".") and TEMP_INFIX in entry:
            remove_stale_temporaries(os.path.join(folder, entry[1:entry.index(TEMP_INFIX)]))


def _inside(path, folder):
    return path.startswith(folder.rstrip(os.sep) + os.sep)
