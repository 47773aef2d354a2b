"""Atomic outputs: write into a temporary file or folder next to the target, rename it into place on success.

An interrupted or failing program therefore never leaves a target that looks finished: the temporary
sibling (a hidden `.NAME.tmp-*` entry) is removed on error and the target keeps its previous state.

    with atomic_dir("out/model") as tmp:      # tmp: an empty folder beside out/model
        model.save_pretrained(tmp)
    with atomic_file("out/metrics.json") as tmp:
        write_something(tmp)
"""
import json
import os
import shutil
import tempfile
from contextlib import contextmanager


def _temp_sibling_name(target):
    parent, name = os.path.split(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    return parent, f".{name}.tmp-"


@contextmanager
def atomic_dir(target):
    """Yield a fresh temporary folder; on success it replaces `target` (an existing one is removed)."""
    parent, prefix = _temp_sibling_name(target)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace_dir(tmp, target)


def _replace_dir(tmp, target):
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 folders; give the usual permissions
    if not os.path.lexists(target):
        os.rename(tmp, target)
        return
    # A folder cannot be renamed over a non-empty one: move the old one aside first, then delete it.
    parent, prefix = _temp_sibling_name(target)
    old = tempfile.mkdtemp(prefix=prefix + "old-", dir=parent)
    os.rename(target, os.path.join(old, "previous"))
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_file(target):
    """Yield a temporary file path beside `target`; on success it is renamed onto `target`."""
    parent, prefix = _temp_sibling_name(target)
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=parent)
    os.close(fd)
    try:
        yield tmp
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, target)


def write_json(path, obj):
    """Write `obj` as indented JSON to `path`, atomically."""
    with atomic_file(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")


def write_jsonl(path, rows):
    """Write one JSON object per line to `path`, atomically."""
    with atomic_file(path) as tmp:
        with open(tmp, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
