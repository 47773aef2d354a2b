"""Which model a statistics file describes: recorded in its safetensors metadata when it is written, and
checked when a merge pairs it with a model.

Metadata keys (strings): `model` (the model's path, absolute for a local one) and `model_fingerprint`
(`fingerprint`); predict.py's statistics add `dataset`, `split`, `variant` (sampled or empirical), `seed` and
`num_examples`; trim.py's trimmed task vectors add `ancestor` and `ancestor_fingerprint`. Files written
before these keys existed merge as before, with a warning that they could not be checked.
"""
import hashlib
import logging
import os

import torch

from modelmerge.io.formats import CheckpointError
from modelmerge.io.reading import open_checkpoint
from modelmerge.merging.options import MergeError

logger = logging.getLogger(__name__)

# A model's fingerprint hashes every tensor's name, dtype and shape and SAMPLES evenly spaced pieces of PIECE_BYTES
# of its data (all of a tensor up to SAMPLES * PIECE_BYTES). Fine-tuning changes nearly every entry of a trained
# tensor, so two fine-tunes differ in their samples, and a small trained head is hashed whole. At most 64 KiB
# read per tensor (memory-mapped) takes milliseconds where hashing all of a 7B model's 14 GB takes about a
# minute; and unlike a path or an mtime, the fingerprint survives copying, moving and resharding the files
# (a model cast to another dtype gets another one: its statistics differ too).
SAMPLES = 16
PIECE_BYTES = 4096
ALLOW_HINT = "set allow_statistics_mismatch (--allow_statistics_mismatch) to merge them anyway"


def fingerprint(checkpoint):
    """The fingerprint (hex SHA-256) of an open checkpoint (modelmerge.io.reading)."""
    digest = hashlib.sha256()
    for name in checkpoint.names:
        info = checkpoint.info(name)
        digest.update(f"{name} {info.dtype} {list(info.shape)}\n".encode())
        data = checkpoint.get(name).reshape(-1).view(torch.uint8)
        for start in _piece_starts(len(data)):
            digest.update(data[start : start + PIECE_BYTES].numpy().tobytes())
    checkpoint.release()
    return digest.hexdigest()


def _piece_starts(size):
    if size <= SAMPLES * PIECE_BYTES:
        return range(0, size, PIECE_BYTES)
    step = (size - PIECE_BYTES) / (SAMPLES - 1)
    return [round(i * step) for i in range(SAMPLES)]


def model_provenance(path, role="model"):
    """{role: path, role_fingerprint: fingerprint} of the model folder or file at `path` (a Hub id: the id only)."""
    try:
        checkpoint = open_checkpoint(path)
    except CheckpointError:
        return {role: path}
    return {role: os.path.abspath(path), f"{role}_fingerprint": fingerprint(checkpoint)}


def check_statistics_pairing(models, stats, base=None, base_stats=None, allow_mismatch=False):
    """A MergeError where statistics record another model than the one they are paired with (`stats[i]` with
    `models[i]`, `base_stats` with `base`), or a trimmed task vector another ancestor than `base`; with
    `allow_mismatch`, a warning. Statistics that record no model are merged with a warning."""
    fingerprints = {}

    def of(checkpoint):
        if id(checkpoint) not in fingerprints:
            fingerprints[id(checkpoint)] = fingerprint(checkpoint)
        return fingerprints[id(checkpoint)]

    pairs = [(s, m, f"model {i + 1}") for i, (s, m) in enumerate(zip(stats or [], models))]
    if base_stats is not None and base is not None:
        pairs.append((base_stats, base, "the ancestor"))
    candidates = [(f"model {i + 1}", m) for i, m in enumerate(models)] + ([("the ancestor", base)] if base else [])
    for statistics, model, role in pairs:
        metadata = [c.metadata() for c in statistics.checkpoints()]
        if not any("model_fingerprint" in m for m in metadata):
            logger.warning("statistics %s record no model they were computed on (written before that was recorded): "
                           "not checked against %s", statistics.path, model.path)
            continue
        for recorded in metadata:
            problem = _mismatch(recorded, "model", model, role, of, candidates)
            if problem is None and base is not None:
                problem = _mismatch(recorded, "ancestor", base, "the ancestor", of, [])
            if problem is None:
                continue
            message = f"statistics {statistics.path} {problem}"
            if not allow_mismatch:
                raise MergeError(f"{message}; {ALLOW_HINT}")
            logger.warning("%s (allowed)", message)
            break


def _mismatch(recorded, key, checkpoint, role, of, candidates):
    """Why the statistics' recorded `key` (model or ancestor) is not `checkpoint`, or None."""
    expected = recorded.get(f"{key}_fingerprint")
    if expected is None or expected == of(checkpoint):
        return None
    owner = next((name for name, other in candidates if other is not checkpoint and of(other) == expected), None)
    hint = f": they are those of {owner}, so the statistics are not in the order of the models" if owner else ""
    verb = "were computed on" if key == "model" else "were taken against the ancestor"
    return f"{verb} {recorded.get(key, '?')}, not {checkpoint.path} ({role}) that they are paired with{hint}"
