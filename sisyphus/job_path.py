"""Paths and variables: the files jobs exchange.

`AbstractPath` is the base of `Path` (a file or folder) and `Variable` (a Python value stored in a file); neither
is a subclass of the other, as in the reference Sisyphus. Both are delayed values (`sisyphus.delayed_ops`):
`path.join_right('x')`, `var + 1`, `path.format(...)` work while the graph is built.

A path made by a job (`job.output_path(...)`) lives under that job's `output/` folder and is available once the
job finished (or `job.path_available` says so); a path made from a plain string is an input of the graph,
available when it exists. `Path(..., available=fn)` replaces that test by `fn(path)`.
"""
import ast
import gzip
import logging
import math
import os
import pickle

import sisyphus.global_settings as gs
from sisyphus.delayed_ops import DelayedBase
from sisyphus.hash import sis_hash_helper
from sisyphus.tools import finished_results_cache, write_atomically


class VariableNotSet(Exception):
    """A Variable was read before its job wrote it (raised when gs.RAISE_VARIABLE_NOT_SET_EXCEPTION is set)."""


class NoBackup:
    """Marks a Variable without a backup value."""


class AbstractPath(DelayedBase):
    """What Path and Variable share: the creator job, the path relative to its output folder, the hash."""

    _sis_path = True  # marks Paths and Variables for `tools.extract_paths`
    cacheing_enabled = False

    def __init__(self, path, creator=None, cached=False, hash_overwrite=None, tags=None, available=None):
        """
        :param str path: relative to the creator's output folder if `creator` is given, else to the setup folder
        :param Job|None creator: the job that writes this file
        :param bool cached: read through gs.file_caching when Path.cacheing_enabled
        :param str|tuple|None hash_overwrite: hash as if the path were this string (or (creator, path))
        :param set|None tags: tags of this path (default: its creator's)
        :param available: function(path) -> bool replacing the availability test; must be picklable
        """
        if isinstance(path, AbstractPath) or not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"tk.Path needs a str (or pathlib path), not {type(path).__name__}: {path!r}")
        self.path = os.fspath(path)
        self.creator = creator
        self.users = set()
        self.cached = cached
        self.hash_overwrite = hash_overwrite
        self._tags = tags
        self._available = available

    @property
    def hash_overwrite(self):
        return self._hash_overwrite

    @hash_overwrite.setter
    def hash_overwrite(self, value):
        if value is not None:
            if isinstance(value, tuple):
                if len(value) != 2:
                    raise ValueError(f"hash_overwrite must be a str or a (creator, path) pair, not {value!r}")
            elif isinstance(value, str):
                value = (None, value)
            else:
                raise ValueError(f"hash_overwrite must be a str or a (creator, path) pair, not {value!r}")
        self._hash_overwrite = value

    @property
    def tags(self):
        if self._tags is not None:
            return self._tags
        if self.creator is None or isinstance(self.creator, str):
            return set()
        return self.creator.tags

    @tags.setter
    def tags(self, value):
        self._tags = value

    def keep_value(self, value):
        """Sets the creator's keep value (how important its folder is to `tk.cleaner`)."""
        if self.creator is not None and not isinstance(self.creator, str):
            self.creator.keep_value(value)
        else:
            logging.warning("keep_value set on an input path, which has no job: %s", self)

    def add_user(self, user):
        self.users.add(user)

    def creator_id(self):
        """The creating job's id, or None (a job.save of an older version stores the creator as its id)."""
        if self.creator is None or isinstance(self.creator, str):
            return self.creator
        return self.creator._sis_id()

    def rel_path(self):
        """The path relative to the setup folder (an absolute one as it is)."""
        if self.creator is None:
            return self.path
        if isinstance(self.creator, str):
            return os.path.join(gs.WORK_DIR, self.creator, gs.JOB_OUTPUT, self.path)
        return os.path.join(self.creator._sis_path(gs.JOB_OUTPUT), self.path)

    def get_path(self):
        return os.path.join(gs.BASE_DIR, self.rel_path())

    def get_cached_path(self):
        if AbstractPath.cacheing_enabled and self.cached:
            return gs.file_caching(self.get_path())
        return self.get_path()

    def get(self):
        return self.get_path()

    def is_set(self):
        """A delayed value is set once it can be read: a path once it is available."""
        return self.available()

    @finished_results_cache.caching(get_key=lambda self, debug_info=None: ("available", self.rel_path()))
    def available(self, debug_info=None):
        """True once the file can be used: its job says so (by default: it finished), or (graph input) it exists."""
        if getattr(self, "_available", None):
            return self._available(self)
        if self.creator is not None and not isinstance(self.creator, str):
            return self.creator.path_available(self)
        return os.path.exists(self.get_path())

    def _sis_hash(self):
        """A job's output hashes as ('<job id>/output', path); a creator stored as its id (older job.save, the
        migration) as that job; any other creator object by its value, as in the reference."""
        if self.hash_overwrite is None:
            creator, path = self.creator, self.path
            if isinstance(creator, str):
                creator = f"{creator}/{gs.JOB_OUTPUT}"
        else:
            creator, path = self.hash_overwrite
        if hasattr(creator, "_sis_id"):
            creator = f"{creator._sis_id()}/{gs.JOB_OUTPUT}"
        return b"(Path, " + sis_hash_helper((creator, path)) + b")"

    def _key(self):
        return self.creator_id() or "", self.path

    def __eq__(self, other):
        return type(self) is type(other) and self._key() == other._key()

    def __hash__(self):
        return hash((type(self).__name__,) + self._key())

    def __lt__(self, other):
        if not isinstance(other, AbstractPath):
            return NotImplemented
        return " ".join(self._key()) < " ".join(other._key())

    # A path names a file; copies would only duplicate the reference to its creator.
    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __getstate__(self):
        """Pickled without its users and, unless gs.INCLUDE_CREATOR_STATE, without its creator (as in the
        reference): the path becomes the one relative to the setup folder, so a job.save holds only its own
        job and its folder can move with the setup."""
        state = self.__dict__.copy()
        state.pop("users", None)
        if not gs.INCLUDE_CREATOR_STATE:
            state["path"], state["creator"] = self.rel_path(), None
        return state

    def __setstate__(self, state):
        state = dict(state)
        overwrite = state.pop("hash_overwrite", None)  # saved by versions without the property
        self.__dict__.update({"_tags": None, "_available": None, "cached": False, "_hash_overwrite": None})
        self.__dict__.update(state)
        if overwrite is not None:
            self.hash_overwrite = overwrite
        self.users = set()


class Path(AbstractPath):
    """A file or folder; `str(path)` / `path.get_path()` give its absolute path."""

    path_type = "Path"

    def __str__(self):
        return self.get_cached_path()

    def __repr__(self):
        if gs.LEGACY_PATH_CONVERSION:
            return repr(str(self))
        return f"<Path {self.get_path()}>"

    def __fspath__(self):
        return self.get_cached_path()

    def copy(self):
        """A new Path object equal to this one (same creator, path and hash)."""
        new = Path.__new__(Path)
        new.__dict__.update(self.__dict__)
        new.users = set()
        return new

    def copy_append(self, suffix):
        """A copy with `suffix` appended to the path (and to its hash_overwrite, if any)."""
        new = self.copy()
        if self.hash_overwrite is not None:
            creator, path = self.hash_overwrite
            new.hash_overwrite = (creator, path + suffix)
        new.path = self.path + suffix
        return new

    def join_right(self, other):
        """A copy of this path with '/' + other appended: `out_dir.join_right('model.bin')`."""
        return self.copy_append("/" + other)

    def size(self):
        """The file's size in bytes."""
        if not self.available():
            raise FileNotFoundError(f"Path not ready: {self.get_path()}")
        return os.path.getsize(self.get_path())

    def is_zipped(self):
        """True if the file starts with the gzip magic bytes, None while it is not available."""
        if not self.available():
            return None
        with open(self.get_path(), "rb") as f:
            return f.read(2) == b"\x1f\x8b"

    def estimate_text_size(self):
        """The file's size, times 3.5 for a gzipped file."""
        return int(self.size() * 3.5) if self.is_zipped() else self.size()

    def lines(self):
        """Number of lines of the (possibly gzipped) text file."""
        opener = gzip.open if self.is_zipped() else open
        with opener(self.get_path(), "rb") as f:
            return sum(1 for _ in f)


class Variable(AbstractPath):
    """A Python value stored in a job's output file: `set(v)` writes it, `get()` reads it back."""

    path_type = "Variable"

    def __init__(self, path, creator=None, pickle=False, backup=NoBackup):
        """
        :param bool pickle: store with gzip+pickle instead of repr() (for values repr cannot express)
        :param backup: returned by get() while the value is not written yet
        """
        super().__init__(path, creator)
        self.pickle = pickle
        self.backup = backup

    def is_set(self):
        return os.path.isfile(self.get_path())

    def get(self):
        if not self.is_set():
            if self.backup is not NoBackup:
                return self.backup
            if gs.RAISE_VARIABLE_NOT_SET_EXCEPTION:
                raise VariableNotSet(f"Variable is not set: {self.get_path()}")
            return f"<UNFINISHED VARIABLE: {self.get_path()}>"
        if self.pickle:
            with gzip.open(self.get_path(), "rb") as f:
                return pickle.load(f)
        with open(self.get_path(), encoding="utf-8") as f:
            text = f.read()
        try:
            return parse_literal(text)
        except ValueError as e:
            raise ValueError(f"{self.get_path()}: not a Python literal: {e}") from None

    def set(self, value):
        if self.pickle:
            data = gzip.compress(pickle.dumps(value))
        else:
            data = f"{value!r}\n".encode()
        write_atomically(self.get_path(), data)

    def __str__(self):
        return str(self.get())

    def __repr__(self):
        if gs.LEGACY_VARIABLE_CONVERSION:
            return repr(self.get())
        value = f" {self.get()}" if self.is_set() else ""
        return f"<Variable {self.rel_path()}{value}>"


_NAMED_CONSTANTS = {"nan": math.nan, "inf": math.inf, "True": True, "False": False, "None": None}
_EMPTY_CALLS = {"set": set, "frozenset": frozenset, "tuple": tuple, "list": list, "dict": dict}


def parse_literal(text):
    """The value a `repr()` wrote: Python literals (numbers, strings, bytes, tuples, lists, dicts, sets), the names
    nan and inf (with signs), and empty set()/frozenset(); never evaluated as code."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"syntax error at line {e.lineno}") from None
    return _literal(tree.body)


def _literal(node):
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name) and node.id in _NAMED_CONSTANTS:
        return _NAMED_CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = _literal(node.operand)
        if isinstance(operand, (int, float, complex)) and not isinstance(operand, bool):
            return -operand if isinstance(node.op, ast.USub) else operand
    elif isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):
        left, right = _literal(node.left), _literal(node.right)  # complex numbers: 1+2j
        if isinstance(left, (int, float)) and isinstance(right, complex):
            return left + right if isinstance(node.op, ast.Add) else left - right
    elif isinstance(node, ast.Tuple):
        return tuple(_literal(item) for item in node.elts)
    elif isinstance(node, ast.List):
        return [_literal(item) for item in node.elts]
    elif isinstance(node, ast.Set):
        return {_literal(item) for item in node.elts}
    elif isinstance(node, ast.Dict) and None not in node.keys:
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values)}
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _EMPTY_CALLS \
            and not node.keywords and len(node.args) <= 1:
        return _EMPTY_CALLS[node.func.id](_literal(node.args[0]) if node.args else ())
    raise ValueError(f"{ast.dump(node)[:80]} is not a literal")
