"""Small helpers shared by the manager, the worker and the engines."""
import enum
import inspect
import os
import tempfile


def write_atomically(path, data):
    """Write bytes to `path` through a temporary file and a rename: readers see the old or the new file, whole."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def extract_paths(obj):
    """Every Path/Variable reachable from `obj` through containers and object attributes.

    Attributes and dict keys starting with `_sis_` are skipped (a job's own bookkeeping), as are enums.
    """
    found = set()
    seen = {}  # id -> object, keeps the objects alive so ids stay unique
    todo = [obj]
    while todo:
        item = todo.pop()
        if id(item) in seen:
            continue
        seen[id(item)] = item
        if item is None or isinstance(item, (bool, int, float, complex, str, bytes, enum.Enum)):
            continue
        if getattr(item, "_sis_path", False) is True and not inspect.isclass(item):
            found.add(item)
        elif isinstance(item, (list, tuple, set, frozenset)):
            todo.extend(item)
        elif isinstance(item, dict):
            todo.extend(v for k, v in item.items() if not (isinstance(k, str) and k.startswith("_sis_")))
        elif inspect.isclass(item) or inspect.isroutine(item) or inspect.ismodule(item):
            continue
        elif hasattr(item, "__sis_state__"):
            todo.append(item.__sis_state__())
        elif hasattr(item, "__dict__"):
            todo.extend(v for k, v in vars(item).items() if not k.startswith("_sis_"))
        elif hasattr(item, "__slots__"):
            todo.extend(getattr(item, k) for k in item.__slots__ if hasattr(item, k) and not k.startswith("_sis_"))
    return found


def str_to_gb(value):
    """Memory as GB: a number (GB) or a string with a unit suffix K, M, G or T."""
    try:
        return float(value)
    except ValueError:
        pass
    text = str(value).strip().upper().rstrip("B")
    factors = {"K": 1 / 1024**2, "M": 1 / 1024, "G": 1.0, "T": 1024.0}
    if text and text[-1] in factors:
        return float(text[:-1]) * factors[text[-1]]
    raise ValueError(f"memory requirement {value!r} is neither a number of GB nor a size like '500M' or '4G'")


def str_to_hours(value):
    """Time as hours: a number (hours) or a string 'H:MM:SS' / 'H:MM'."""
    try:
        return float(value)
    except ValueError:
        pass
    fields = str(value).split(":")
    if len(fields) in (2, 3) and all(f.strip().isdigit() for f in fields):
        seconds = sum(int(f) * 60**i for i, f in enumerate(reversed(fields if len(fields) == 3 else fields + ["0"])))
        return seconds / 3600
    raise ValueError(f"time requirement {value!r} is neither a number of hours nor 'H:MM:SS'")


def tail(path, lines):
    """The last `lines` lines of a text file ('' if it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 200 * lines))
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
