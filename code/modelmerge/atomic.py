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
- One writer per output: claiming an output with a `kind` takes its lock, an OS lock (flock) on the hidden
  sibling `.NAME.lock`, which records the holder's pid, host, start time and command; a second process
  claiming it meanwhile is refused at once (`OutputError` naming the holder). The lock is given back when
  the atomic write ends (or with `release_output`, `release_outputs`), and by the OS when the process
  dies, so a killed run never blocks its rerun (its `.NAME.lock` stays, unlocked, until the next run of
  the output takes and removes it).
- Running out of space while writing (ENOSPC, a quota) is an `OutputError` naming the output and its folder.
"""
import ctypes
import errno
import fcntl
import functools
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from contextlib import contextmanager

MARKER = ".written-by"  # in folder outputs: {"kind": ...}, what wrote the folder
TEMP_INFIX = ".tmp-"  # temporaries are `.NAME.tmp-HOST-PID-XXXXXXXX`
LOCK_SUFFIX = ".lock"  # the lock of an output is `.NAME.lock` beside it
_held_locks = {}  # lock path -> file descriptor, the outputs this process is writing


class OutputError(ValueError):
    """An output path that may not be written; the message names it and the reason."""


class OutputInUseError(OutputError):
    """An output that another live process is writing; the message names that process."""


class DiskFullError(OutputError):
    """No space left on the device while writing an output; the message names it, its folder and the cause."""

    def __init__(self, target, cause):
        self.target, self.cause = target, cause
        folder = os.path.dirname(os.path.abspath(target))
        super().__init__(f"no space left on the device of {folder} while writing {target} "
                         f"({_first_line(cause)}); free some space or choose another output")


@contextmanager
def atomic_dir(target, kind=None, *, inputs=(), overwrite=False):
    """Yield a fresh temporary folder; on success it replaces `target` (see the module doc)."""
    with _writing(target, kind, inputs=inputs, overwrite=overwrite) as (parent, prefix):
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
    with _writing(target, kind, inputs=inputs, overwrite=overwrite, written_by=written_by) as (parent, prefix):
        fd, tmp = tempfile.mkstemp(prefix=prefix + _owner_tag(), dir=parent)
        os.close(fd)
        try:
            yield tmp
            os.chmod(tmp, 0o666 & ~_umask())
            _put_in_place(tmp, target)
        except BaseException:
            _remove(tmp)
            raise


@contextmanager
def _writing(target, kind, **claim):
    """Claim `target` (claim_output), name a full disk while the body writes it, give its lock back at the end;
    yields the folder and name prefix of its temporaries."""
    claim_output(target, kind, **claim)
    try:
        with naming_a_full_disk(target):
            yield _temp_prefix(target)
    finally:
        release_output(target)


def claim_output(target, kind=None, *, inputs=(), overwrite=False, written_by=None):
    """Check that `target` may be written (see the module doc; OutputError if not) and remove the stale
    temporaries of killed runs of it. With a `kind`, this process takes the output's lock (see the module
    doc), held until the atomic write of `target` ends or `release_output(target)`. The context managers
    call it first; a program may call it earlier, before any work."""
    parent, prefix = _temp_prefix(target)
    if kind is not None:
        taken = lock_output(target)
        try:
            _check_may_replace(target, kind, inputs, overwrite, written_by)
        except OutputError:
            if taken:
                release_output(target)
            raise
    for name in os.listdir(parent):
        if name.startswith(prefix) and _is_stale(name[len(prefix):]):
            _remove(os.path.join(parent, name))


def _check_may_replace(target, kind, inputs, overwrite, written_by):
    _check_not_an_input(target, inputs)
    if os.path.lexists(target) and not overwrite and not _empty_folder(target):
        found = written_kind(target, written_by)
        if found != kind:
            what = "not an output of this program" if found is None else f"written as {found!r}"
            raise OutputError(f"output {target} exists and is {what}; it is only replaced when asked to overwrite it")


def lock_output(target):
    """Take the lock of the output `target` for this process (nothing if it holds it already); OutputError
    naming the other process if a live one holds it. Returns whether it took the lock now."""
    path = _lock_path(target)
    if path in _held_locks:
        return False
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as error:
            raise OutputError(f"output {target}: cannot create its lock file {path} ({error.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(fd)
            os.close(fd)
            raise OutputInUseError(f"output {target} is being written by another process ({holder}); wait for it "
                                   "to end, or choose another output") from None
        if _is_file_at(fd, path):
            break
        os.close(fd)  # its holder removed that lock file as we opened it: take the one at the path now
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(record).encode())
    _held_locks[path] = fd
    return True


def release_output(target):
    """Give back the lock of `target` if this process holds it."""
    _release(_lock_path(target))


def release_outputs():
    """Give back every output lock this process holds (a program calls it when it ends)."""
    for path in list(_held_locks):
        _release(path)


def releasing_outputs(function):
    """Decorate `function` so that the output locks it takes are given back when it returns or fails."""

    @functools.wraps(function)
    def call(*args, **kwargs):
        before = set(_held_locks)
        try:
            return function(*args, **kwargs)
        finally:
            for path in set(_held_locks) - before:
                _release(path)

    return call


def _release(path):
    fd = _held_locks.pop(path, None)
    if fd is None:
        return
    if _is_file_at(fd, path):
        os.remove(path)  # while still locked, so that no other process holds a lock on a removed file
    os.close(fd)


@contextmanager
def naming_a_full_disk(target):
    """Turn running out of space while writing `target` into an OutputError naming it and its folder
    (an OSError ENOSPC or EDQUOT carries no path, and libraries such as safetensors or torch.save
    report it in their own words)."""
    try:
        yield
    except DiskFullError as error:
        raise DiskFullError(target, error.cause) from error.__cause__  # an inner write: name the whole output
    except Exception as error:
        if not _is_out_of_space(error, target):
            raise
        raise DiskFullError(target, error) from error


def _is_out_of_space(error, target):
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if any(text in str(error) for text in (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))):
        return True  # e.g. safetensors' "I/O error: No space left on device (os error 28)"
    if not isinstance(error, (OSError, RuntimeError)):
        return False
    try:  # e.g. torch.save's "unexpected pos": a writer that lost the errno on a full disk
        return shutil.disk_usage(os.path.dirname(os.path.abspath(target))).free < 1 << 20
    except OSError:
        return False


def _first_line(error):
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _lock_path(target):
    parent, name = os.path.split(os.path.abspath(target))
    return os.path.join(os.path.realpath(parent), f".{name}{LOCK_SUFFIX}")


def _is_file_at(fd, path):
    """Whether the open file `fd` is still the file at `path`."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _describe_holder(fd):
    try:
        record = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
    except (OSError, ValueError):
        record = {}
    if not isinstance(record, dict) or "pid" not in record:
        return "it has not recorded itself yet"
    command = " ".join(str(record.get("command", "")).split())[:300]
    return f"pid {record['pid']} on {record.get('host')}, started {record.get('started')}: {command}"


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
