"""Paths and variables: the files jobs exchange.

A Path made by a job (`job.output_path(...)`) lives under that job's `output/` folder and is available once
the job finished; a Path made from a plain string is an input of the graph, available when it exists.
"""
import ast
import gzip
import math
import os
import pickle

import sisyphus.global_settings as gs
from sisyphus.hash import sis_hash_helper
from sisyphus.tools import write_atomically


class Path:
    """A file or folder; `str(path)` / `path.get_path()` give its absolute path."""

    _sis_path = True  # marks Paths and Variables for `tools.extract_paths`
    path_type = "Path"

    def __init__(self, path, creator=None, cached=False, hash_overwrite=None):
        """
        :param str path: relative to the creator's output folder if `creator` is given, else to the setup folder
        :param Job|None creator: the job that writes this file
        :param bool cached: kept for compatibility (file caching is not supported); no effect
        :param str|tuple|None hash_overwrite: hash as if the path were this string (or (creator, path))
        """
        if isinstance(path, Path) or not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"tk.Path needs a str (or pathlib path), not {type(path).__name__}: {path!r}")
        path = os.fspath(path)
        self.path = path
        self.creator = creator
        self.cached = cached
        self.hash_overwrite = hash_overwrite

    def creator_id(self):
        """The creating job's id, or None (after unpickling in a worker the creator is stored as its id)."""
        if self.creator is None or isinstance(self.creator, str):
            return self.creator
        return self.creator.job_id()

    def rel_path(self):
        creator_id = self.creator_id()
        if creator_id is None:
            return self.path
        return os.path.join(gs.WORK_DIR, creator_id, gs.JOB_OUTPUT, self.path)

    def get_path(self):
        return os.path.join(gs.BASE_DIR, self.rel_path())

    def get_cached_path(self):
        return self.get_path()

    def get(self):
        return self.get_path()

    def available(self):
        """True once the file can be used: its job finished, or (graph input) it exists."""
        if self.creator is not None and not isinstance(self.creator, str):
            return self.creator._sis_finished()
        return os.path.exists(self.get_path())

    def _sis_hash(self):
        if self.hash_overwrite is None:
            creator_id, path = self.creator_id(), self.path
        elif isinstance(self.hash_overwrite, tuple):
            creator_id, path = self.hash_overwrite
        else:
            creator_id, path = None, self.hash_overwrite
        if creator_id is not None and not isinstance(creator_id, str):
            creator_id = creator_id.job_id()
        creator = None if creator_id is None else os.path.join(creator_id, gs.JOB_OUTPUT)
        return b"(Path, " + sis_hash_helper((creator, path)) + b")"

    def _key(self):
        return self.creator_id() or "", self.path

    def __eq__(self, other):
        return type(self) is type(other) and self._key() == other._key()

    def __hash__(self):
        return hash((type(self).__name__,) + self._key())

    def __lt__(self, other):
        return " ".join(self._key()) < " ".join(other._key())

    def __str__(self):
        return self.get_path()

    def __repr__(self):
        return repr(str(self))

    def __fspath__(self):
        return self.get_path()

    # A Path names a file; copies would only duplicate the reference to its creator.
    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self

    def __getstate__(self):
        """Pickled with the creator's id in place of the creator, so a job.save holds only its own job."""
        state = self.__dict__.copy()
        state["creator"] = self.creator_id()
        return state


class Variable(Path):
    """A Python value stored in a job's output file: `set(v)` writes it, `get()` reads it back."""

    path_type = "Variable"

    def __init__(self, path, creator=None, pickle=False, backup=None):
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
            return f"<UNFINISHED VARIABLE: {self.get_path()}>" if self.backup is None else self.backup
        if self.pickle:
            with gzip.open(self.get_path(), "rb") as f:
                return pickle.load(f)
        with open(self.get_path(), encoding="utf-8") as f:
            text = f.read()
        try:
            return ast.literal_eval(text)
        except ValueError:  # repr() of nan and inf are names, which literal_eval refuses
            return eval(text, {"__builtins__": {}, "nan": math.nan, "inf": math.inf})

    def set(self, value):
        if self.pickle:
            data = gzip.compress(pickle.dumps(value))
        else:
            data = f"{value!r}\n".encode()
        write_atomically(self.get_path(), data)

    def __str__(self):
        return str(self.get())

    def __repr__(self):
        return str(self.get())
