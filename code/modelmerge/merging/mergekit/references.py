"""What a mergekit configuration names: model references (`PATH` or `PATH+LORA_PATH`), each opened once, the
slices of layers the output is built from, and where a checkpoint's layers are (found by tensor name)."""
import os
import re
from dataclasses import dataclass
from typing import Any

from modelmerge.io.formats import CheckpointError
from modelmerge.io.json_files import read_json_object
from modelmerge.io.reading import open_checkpoint
from modelmerge.lora_merge import LoraDeltaView
from modelmerge.merging.options import MergeError
from modelmerge.merging.plan import check_same_tensors
from modelmerge.vocabulary import unify

_EMBEDDINGS = re.compile(r"embed|(^|\.)(wte|wpe)\.")
_LAYER = re.compile(r"^(.*?\.)(\d+)\.(.+)$")


class References:
    """Checkpoints by mergekit model reference (`PATH` or `PATH+LORA_PATH`), each opened once."""

    def __init__(self):
        self._open = {}

    def get(self, reference):
        if not isinstance(reference, str):
            raise MergeError(f"model reference {reference!r}: expected a path")
        if reference not in self._open:
            self._open[reference] = self._open_reference(reference)
        return self._open[reference]

    @staticmethod
    def _open_reference(reference):
        try:
            if "+" in reference and not os.path.exists(reference):
                model, adapter = reference.split("+", 1)
                return LoraDeltaView(open_checkpoint(adapter), base=open_checkpoint(model))
            return open_checkpoint(reference)
        except CheckpointError as error:
            raise MergeError(f"model {reference}: {error}") from None

    def all(self):
        return list(self._open.values())

    def unify(self, references, base_reference):
        """Replace the checkpoints of `references` by views with the union vocabulary (modelmerge.vocabulary);
        return the union tokenizer."""
        references = list(dict.fromkeys(references))
        checkpoints = [self.get(reference) for reference in references]
        if any(c.folder is None for c in checkpoints):
            raise MergeError("tokenizer_source union: every model must be a model folder with its tokenizer")
        base_index = references.index(base_reference) if base_reference in references else None
        views, tokenizer = unify(checkpoints, base_index)
        self._open.update(zip(references, views))
        return tokenizer

    def paths(self):
        """Every file or folder the references name (`PATH+LORA_PATH` names two)."""
        return [path for reference in self._open
                for path in ([reference] if os.path.exists(reference) else reference.split("+", 1))]


def model_references(config):
    """Every model reference of the configuration: base_model first, then the models in order."""
    found = [config["base_model"]] if config.get("base_model") else []
    for entry in config.get("models") or []:
        found.append(entry.get("model") if isinstance(entry, dict) else None)
    for entry in config.get("slices") or []:
        for source in (entry.get("sources") or []) if isinstance(entry, dict) else []:
            found.append(source.get("model") if isinstance(source, dict) else None)
    return [reference for reference in found if isinstance(reference, str)]


@dataclass
class SliceSource:
    reference: str
    checkpoint: Any
    layers: "LayerLayout"
    start: int
    stop: int
    parameters: dict


@dataclass
class Slice:
    sources: list[SliceSource]
    base_reference: str | None
    parameters: dict
    length: int

    def __len__(self):
        return self.length


def slices(config, references, base_ref):
    """The configuration's slices: its `slices`, or `models` (with `base_model`) as one slice of all layers."""
    if "models" in config:
        models = list(config["models"])
        if base_ref is not None and base_ref not in [m.get("model") for m in models]:
            models.append({"model": base_ref})
        sources = []
        for entry in models:
            checkpoint = references.get(entry["model"])
            layers = LayerLayout.of(checkpoint)
            parameters = entry.get("parameters") or {}
            sources.append(SliceSource(entry["model"], checkpoint, layers, 0, layers.count, parameters))
        check_same_tensors([s.checkpoint for s in sources], "models")
        return [Slice(sources, base_ref, {}, sources[0].layers.count)]
    found = []
    for index, entry in enumerate(config["slices"]):
        sources = []
        for j, source in enumerate(entry["sources"]):
            where = f"slices[{index}].sources[{j}]"
            checkpoint = references.get(source["model"])
            layers = LayerLayout.of(checkpoint)
            start, stop = _layer_range(source["layer_range"], layers, where)
            parameters = source.get("parameters") or {}
            sources.append(SliceSource(source["model"], checkpoint, layers, start, stop, parameters))
        lengths = {s.stop - s.start for s in sources}
        if len(lengths) != 1:
            raise MergeError(f"slices[{index}]: all sources must span the same number of layers, got {sorted(lengths)}")
        found.append(Slice(sources, entry.get("base_model", base_ref), entry.get("parameters") or {}, lengths.pop()))
    return found


def _layer_range(value, layers, where):
    """The layer range [first, end] (types checked by schema.check_types) within the model's layers."""
    start, stop = value
    if stop > layers.count:
        raise MergeError(f"{where}.layer_range: {value} is outside the model's {layers.count} layers")
    return start, stop


class LayerLayout:
    """Where a checkpoint's layers are: tensors `<prefix><i>.<rest>` for i in 0..count−1."""

    def __init__(self, prefix, count, suffixes):
        self.prefix, self.count, self.suffixes = prefix, count, suffixes

    @classmethod
    def of(cls, checkpoint):
        expected = _config_layers(checkpoint)
        indices = {}
        for name in checkpoint.names:
            match = _LAYER.match(name)
            if match:
                indices.setdefault(match.group(1), set()).add(int(match.group(2)))
        candidates = [(len(found), prefix) for prefix, found in indices.items()
                      if found == set(range(len(found))) and (expected is None or len(found) == expected)]
        if not candidates:
            if expected:
                raise MergeError(f"{checkpoint.path}: cannot find its {expected} layers among the tensor names")
            return cls(None, 0, [])
        count, prefix = max(candidates)
        suffixes = [name[len(prefix) + 2:] for name in checkpoint.names if name.startswith(prefix + "0.")]
        return cls(prefix, count, suffixes)

    def index(self, name):
        """The layer index of tensor `name`, or None outside the layers."""
        if self.prefix is None or not name.startswith(self.prefix):
            return None
        head = name[len(self.prefix):].split(".", 1)[0]
        return int(head) if head.isdigit() and int(head) < self.count else None

    def name(self, index, suffix):
        return f"{self.prefix}{index}.{suffix}"


def outside_layers(source):
    """(the tensors before the layers: embeddings, those after them) of a slice source's checkpoint."""
    others = [n for n in source.checkpoint.names if source.layers.index(n) is None]
    pre = [n for n in others if _EMBEDDINGS.search(n)]
    return pre, [n for n in others if not _EMBEDDINGS.search(n)]


def _config_layers(checkpoint):
    config = os.path.join(checkpoint.folder or "", "config.json")
    if not checkpoint.folder or not os.path.isfile(config):
        return None
    return read_json_object(config).get("num_hidden_layers")
