"""Safe outputs: written into a temporary sibling, put in place in one atomic step on success, never over
the user's own files or an input.

    with atomic_dir("out/model", kind="merge", inputs=[model_a, model_b]) as tmp:   # tmp: an empty folder
        model.save_pretrained(tmp)
    with atomic_file("out/metrics.json", kind="metrics") as tmp:
        write_something(tmp)

- While writing, the output lives in a hidden sibling `.NAME.tmp-HOST-PID-*`; a failing program removes
  it, a killed one leaves it, and the next run of the same output removes those of dead processes on this
  host (and those of older versions, without HOST-PID).
- An existing output is replaced in one step: a file by rename, a folder by exchanging it with the new one
  (Linux renameat2 RENAME_EXCHANGE), after which the old one, now under the temporary name, is removed.
  At every instant the old or the new output exists; a kill in between leaves the complete new output
  and a stale temporary that the next run removes.
- With a `kind` (what the program writes, e.g. "merge"), an existing output is replaced only if it was
  written as that kind (folders carry a `.written-by` file; a file tells its kind through `written_by`),
  if it is an empty folder, or with `overwrite=True`; and an output that is, holds or lies inside one of
  `inputs` is refused even then (`OutputError`, one line). Without a `kind`, any existing output is
  replaced (the older behaviour).
"""
import ctypes
import errno
import json
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager

MARKER = ".written-by"  # in folder outputs: {"kind": ...}, what wrote the folder
TEMP_INFIX = ".tmp-"  # temporaries are `.NAME.tmp-HOST-PID-XXXXXXXX`


class OutputError(ValueError):
    """An output path that may not be written; the message names it and the reason."""


@contextmanager
def atomic_dir(target, kind=None, *, inputs=(), overwrite=False):
    """Yield a fresh temporary folder; on success it replaces `target` (see the module doc)."""
    claim_output(target, kind, inputs=inputs, overwrite=overwrite)
    parent, prefix = _temp_prefix(target)
    tmp = tempfile.mkdtemp(prefix=prefix + _owner_tag(), dir=parent)
    try:
        yield tmp
        if kind is not None:
            with open(os.path.join(tmp, MARKER), "w") as f:
                json.dump({"kind": kind}, f)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 folders; give the usual permissions
        _put_in_place(tmp, target)
    except BaseException:
        _remove(tmp)
        raise


@contextmanager
def atomic_file(target, kind=None, *, inputs=(), overwrite=False, written_by=None):
    """Yield a temporary file path beside `target`; on success it is renamed onto `target`.

    `written_by(path)` tells the kind that wrote an existing file (None: unknown); without it an existing
    file counts as the user's."""
    claim_output(target, kind, inputs=inputs, overwrite=overwrite, written_by=written_by)
    parent, prefix = _temp_prefix(target)
    fd, tmp = tempfile.mkstemp(prefix=prefix + _owner_tag(), dir=parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        _put_in_place(tmp, target)
    except BaseException:
        _remove(tmp)
        raise


def claim_output(target, kind=None, *, inputs=(), overwrite=False, written_by=None):
    """Check that `target` may be written (see the module doc; OutputError if not) and remove the stale
    temporaries of killed runs of it. The context managers call it first; a program may call it earlier,
    before any work."""
    parent, prefix = _temp_prefix(target)
    if kind is not None:
        _check_not_an_input(target, inputs)
        if os.path.lexists(target) and not overwrite and not _empty_folder(target):
            found = written_kind(target, written_by)
            if found != kind:
                what = "not an output of this program" if found is None else f"written as {found!r}"
                raise OutputError(f"output {target} exists and is {what}; it is only replaced when asked to overwrite it")
    for name in os.listdir(parent):
        if name.startswith(prefix) and _is_stale(name[len(prefix):]):
            _remove(os.path.join(parent, name))


def written_kind(path, written_by=None):
    """The kind that wrote the output at `path`, or None."""
    if os.path.isdir(path) and not os.path.islink(path):
        try:
            with open(os.path.join(path, MARKER)) as f:
                return json.load(f).get("kind")
        except (OSError, ValueError, AttributeError):
            return None
    return written_by(path) if written_by is not None and os.path.isfile(path) else None


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


def _empty_folder(path):
    """An empty folder (not a link to one) holds nothing to lose: it may be replaced."""
    return os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)


def _check_not_an_input(target, inputs):
    out = os.path.realpath(target)
    for path in inputs:
        if not path:
            continue
        source = os.path.realpath(path)
        if out == source:
            raise OutputError(f"output {target} is the input {path}")
        if source.startswith(out.rstrip(os.sep) + os.sep):
            raise OutputError(f"output {target} holds the input {path}")
        if out.startswith(source.rstrip(os.sep) + os.sep):
            raise OutputError(f"output {target} lies inside the input {path}")


def _temp_prefix(target):
    """(the folder of `target`, created if missing; the prefix of its temporaries `.NAME.tmp-`)."""
    parent, name = os.path.split(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    return parent, f".{name}{TEMP_INFIX}"


def _owner_tag():
    return f"{_host()}-{os.getpid()}-"


def _host():
    return socket.gethostname().replace("-", "_")


def _is_stale(suffix):
    """Whether the temporary with this suffix (after `.NAME.tmp-`) belongs to no running process: one of a
    dead process of this host, or one of an older version (`XXXXXXXX` or `old-XXXXXXXX`, mkdtemp's names)."""
    if re.fullmatch(r"(old-)?[A-Za-z0-9_]{8}", suffix):
        return True
    parts = suffix.split("-")
    if len(parts) < 3 or not parts[1].isdigit() or parts[0] != _host():
        return False  # not ours, or another host's whose process may be running
    pid = int(parts[1])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _put_in_place(tmp, target):
    """Move `tmp` to `target` in one step; an existing target is exchanged with it, then removed."""
    if not os.path.lexists(target) or (os.path.isfile(tmp) and not os.path.isdir(target)):
        os.replace(tmp, target)  # atomic for a file over a file, or onto nothing
        return
    if _exchange(tmp, target):
        _remove(tmp)  # the old output, now under the temporary name
        return
    # No exchange on this file system: move the old one aside, then the new one in (two steps).
    parent, prefix = _temp_prefix(target)
    aside = tempfile.mkdtemp(prefix=prefix + _owner_tag() + "old-", dir=parent)
    os.rename(target, os.path.join(aside, "previous"))
    os.rename(tmp, target)
    _remove(aside)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_libc = None


def _exchange(a, b):
    """Swap the paths `a` and `b` atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = _libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(error, os.strerror(error), b)


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask
