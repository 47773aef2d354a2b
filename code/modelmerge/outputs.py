"""Output checks of the config-driven programs (train.py, predict.py, download_data.py) over `modelmerge.atomic`:
the same rules as the merge programs (an existing output is replaced only when this program wrote it, when it
is an empty folder, or with `overwrite`; an output that is, holds or lies inside an input is always refused),
with the errors as ConfigErrors naming the config key, so that the program ends with one line and exit 2
before any work.
"""
import json
import os

from modelmerge import atomic
from modelmerge.config import ConfigError


def claim(path, key, kind, *, inputs=(), overwrite=False, folder=True, written_by=None):
    """Check that the output `path` (config key `key`) may be written as `kind`; remove stale temporaries of it."""
    if folder and os.path.isfile(path):
        raise ConfigError(f"{key}: {path} is a file, not a folder; choose another path")
    if not folder and os.path.isdir(path):
        raise ConfigError(f"{key}: {path} is a folder, not a file; choose another path")
    try:
        atomic.claim_output(path, kind, inputs=[p for p in inputs if p and os.path.exists(p)], overwrite=overwrite,
                            written_by=written_by)
    except atomic.OutputError as error:
        replaceable = os.path.lexists(path) and not overwrite and not isinstance(error, atomic.OutputInUseError)
        hint = ' (set "overwrite": true to replace it)' if replaceable else ""
        raise ConfigError(f"{key}: {error}{hint}") from None


def json_kind(kind, *keys):
    """`written_by` for JSON files of `kind`: the object (or, for JSON lines, the first row) has all of `keys`."""

    def written_by(path):
        try:
            with open(path) as f:
                text = f.read(1 << 20)
        except (OSError, UnicodeDecodeError):
            return None
        for candidate in (text, text.split("\n", 1)[0]):
            try:
                row = json.loads(candidate)
            except json.JSONDecodeError:
                continue
            return kind if isinstance(row, dict) and all(key in row for key in keys) else None
        return None

    return written_by


def remove_stale_temporaries_in(folder):
    """Remove the temporaries of killed atomic writes (`.NAME.tmp-*` of dead processes) directly inside `folder`."""
    if not os.path.isdir(folder):
        return
    for entry in os.listdir(folder):
        if entry.startswith(".") and atomic.TEMP_INFIX in entry:
            atomic.claim_output(os.path.join(folder, entry[1:entry.index(atomic.TEMP_INFIX)]))
