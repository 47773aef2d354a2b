"""Inputs of the graph that no job makes (a packaged model, the shipped data), as tk.Paths hashed by what they
are, not by where they lie: a job id must not change when the virtual environment or the repository moves.

- `package_path`: a file or folder inside an installed Python package, hashed as
  `package:<name>==<version>/<path inside the package>`.
- `content_folder`: a folder of files, hashed as `content-sha256:<digest of its files' names and bytes>`.

Both are ordinary Paths otherwise (`get_path()` is the absolute path), so they run unchanged under upstream
Sisyphus, whose `Path(..., hash_overwrite=str)` hashes the same way.
"""
import hashlib
import importlib.metadata
import importlib.util
import os

from sisyphus import tk

PACKAGE_PREFIX = "package:"
CONTENT_PREFIX = "content-sha256:"
# Files that describe a data folder but are not data: left out of its content hash.
NOT_CONTENT = ("README.md",)


def package_path(distribution, path):
    """`path`, a file or folder inside the installed distribution `distribution` (import name: '-' read as '_')."""
    spec = importlib.util.find_spec(distribution.replace("-", "_"))
    if spec is None or spec.origin is None:
        raise RuntimeError(f"the package {distribution} is not installed (pip install -r requirements.txt)")
    path, package = os.fspath(path), os.path.dirname(spec.origin)
    inside = os.path.relpath(os.path.abspath(path), os.path.abspath(package))
    if inside.startswith(os.pardir):  # one of them reached through a symbolic link
        inside = os.path.relpath(os.path.realpath(path), os.path.realpath(package))
    if inside.startswith(os.pardir) or not os.path.exists(path):
        raise RuntimeError(f"{path} is not inside the installed package {distribution}")
    version = importlib.metadata.version(distribution)
    return tk.Path(path, hash_overwrite=f"{PACKAGE_PREFIX}{distribution}=={version}/{inside.replace(os.sep, '/')}")


def content_digest(folder):
    """SHA-256 over every file under `folder` (relative name and bytes, in sorted order), README.md left out."""
    digest = hashlib.sha256()
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [os.path.join(root, n) for n in names if not n.startswith(".") and n not in NOT_CONTENT]
    for path in sorted(files, key=lambda p: os.path.relpath(p, folder)):
        name = os.path.relpath(path, folder).replace(os.sep, "/").encode()
        digest.update(len(name).to_bytes(8, "big") + name)
        with open(path, "rb") as f:
            data = f.read()
        digest.update(len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()


def content_folder(folder):
    """`folder` (must exist) as a Path hashed by its content."""
    folder = os.path.abspath(os.fspath(folder))
    if not os.path.isdir(folder):
        raise ValueError(f"the data folder {folder} does not exist")
    return tk.Path(folder, hash_overwrite=CONTENT_PREFIX + content_digest(folder))


def identity(path):
    """The identity a Path made by `package_path` or `content_folder` is hashed by; None for any other Path."""
    overwrite = getattr(path, "hash_overwrite", None)
    if isinstance(overwrite, tuple) and overwrite[0] is None:  # Sisyphus keeps a str overwrite as (None, str)
        overwrite = overwrite[1]
    if isinstance(overwrite, str) and overwrite.startswith((PACKAGE_PREFIX, CONTENT_PREFIX)):
        return overwrite
    return None
