"""Inputs of the graph that no job makes (a packaged model, the shipped data), as tk.Paths hashed by what they
are, not by where they lie: a job id must not change when the virtual environment or the repository moves.

- `package_folder`: a folder inside an installed Python package, hashed as `package:<name>==<version>/<folder>`.
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


def package_folder(distribution, folder):
    """`folder` inside the installed distribution `distribution` (its import name: '-' read as '_')."""
    module = distribution.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"the package {distribution} is not installed (pip install -r requirements.txt)")
    path = os.path.join(os.path.dirname(spec.origin), folder)
    if not os.path.isdir(path):
        raise RuntimeError(f"the package {distribution} has no folder {folder!r} ({path})")
    version = importlib.metadata.version(distribution)
    return tk.Path(path, hash_overwrite=f"{PACKAGE_PREFIX}{distribution}=={version}/{folder}")


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


def is_stable(path):
    """True for a Path made by `package_folder` or `content_folder`."""
    overwrite = getattr(path, "hash_overwrite", None)
    return isinstance(overwrite, str) and overwrite.startswith((PACKAGE_PREFIX, CONTENT_PREFIX))
