"""mergekit's `tokenizer_source: union`: merge models whose vocabularies differ, by rebuilding every
model's vocabulary-indexed tensors (token embeddings, LM head) for the union vocabulary.

As mergekit 0.1.5 (`tokenizer/build.py`, `tokenizer/embed.py`) does it:
- the union tokenizer is the base model's (else the first model's) with every token of the other models
  it lacks added, in the order they are first met (base first, then the models in configuration order;
  within a model by token id, where mergekit follows a hash map's order, which varies between runs),
  then the other tokenizers' added (special) tokens;
- for each model and union token: its own row where it has the token; where it lacks it, the row of the
  only model that has it, else the base model's row (when the base is among the inputs and has it), else
  the mean of the rows of the models that have it (no model at all: zeros).
The rebuilt tensors are then merged like any others. Vocabulary tensors are told by name (`word_embeddings`,
`embed_tokens`, `wte`, `lm_head`) and by their first dimension being the model's vocabulary size.
"""
import json
import os
import re
import tempfile

import torch

from modelmerge.io.formats import TensorInfo

VOCABULARY_TENSOR = re.compile(r"(^|\.)(word_embeddings|embed_tokens|wte|lm_head)\.weight$")


def load_tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def config_vocab_size(folder):
    path = os.path.join(folder or "", "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f).get("vocab_size")


def union_tokenizer(base, others):
    """The union of tokenizer `base` and tokenizers `others` (each with its model's vocabulary size, or None)."""
    ordered, special = {}, {}
    for tokenizer, size in [base] + others:
        size = size or tokenizer.vocab_size
        added = tokenizer.added_tokens_decoder
        added_contents = {info.content for info in added.values()}
        for token, index in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
            if index < size and token not in added_contents:
                ordered.setdefault(token, len(ordered))
        for index, info in added.items():
            if index < size:
                special.setdefault(info.content, info)
    with tempfile.TemporaryDirectory() as folder:  # a copy, so that `base` itself is left unchanged
        base[0].save_pretrained(folder)
        result = load_tokenizer(folder)
    base_vocabulary = base[0].get_vocab()
    for token in ordered:
        if token not in special and token not in base_vocabulary:
            result.add_tokens(token)
    for info in special.values():
        result.add_tokens(info)
    return result


class UnionVocabulary:
    """The models' vocabulary tensors rebuilt for the union vocabulary, one tensor name at a time."""

    def __init__(self, checkpoints, base_index, vocabulary, model_vocabularies, model_sizes):
        self.checkpoints = checkpoints
        self.base_index = base_index
        self.size = len(vocabulary)
        self.sources = []  # per model: union index -> own row index, or -1
        for own, size in zip(model_vocabularies, model_sizes):
            rows = [-1] * self.size
            for token, index in vocabulary.items():
                if own.get(token, size) < size:
                    rows[index] = own[token]
            self.sources.append(torch.tensor(rows))
        self.model_sizes = model_sizes
        self._cached = (None, None)

    def is_vocabulary(self, index, name):
        return bool(VOCABULARY_TENSOR.search(name)) and self.checkpoints[index].info(name).shape[0] == self.model_sizes[index]

    def rows(self, name):
        """Every model's tensor `name` with one row per union token (see the module docstring)."""
        if self._cached[0] == name:
            return self._cached[1]
        tensors = [c.get(name) for c in self.checkpoints]
        dtype = tensors[0].dtype
        for tensor in tensors[1:]:
            dtype = torch.promote_types(dtype, tensor.dtype)
        present = torch.stack([s >= 0 for s in self.sources])  # [models, union tokens]
        fallback = torch.zeros((self.size, *tensors[0].shape[1:]), dtype=dtype)
        counts = present.sum(dim=0)
        for m, (tensor, source) in enumerate(zip(tensors, self.sources)):
            has = source >= 0
            fallback[has] += tensor[source[has]].to(dtype)
        fallback /= counts.clamp(min=1).view(-1, *([1] * (fallback.dim() - 1)))
        if self.base_index is not None:
            base_has = self.sources[self.base_index] >= 0
            fallback[base_has] = tensors[self.base_index][self.sources[self.base_index][base_has]].to(dtype)
        single = counts == 1  # the only model that has the token gives it to all (it also is "the mean")
        for m, (tensor, source) in enumerate(zip(tensors, self.sources)):
            chosen = single & (source >= 0)
            fallback[chosen] = tensor[source[chosen]].to(dtype)
        rebuilt = []
        for tensor, source in zip(tensors, self.sources):
            out = fallback.clone()
            has = source >= 0
            out[has] = tensor[source[has]].to(dtype)
            rebuilt.append(out)
        self._cached = (name, rebuilt)
        return rebuilt


class VocabularyView:
    """A checkpoint whose vocabulary tensors are those of the union vocabulary (a stand-in for it when planning)."""

    def __init__(self, union, index):
        self.union, self.index = union, index
        self.checkpoint = union.checkpoints[index]
        self.path, self.folder, self.kind = self.checkpoint.path, self.checkpoint.folder, self.checkpoint.kind
        self.names = self.checkpoint.names

    def __contains__(self, name):
        return name in self.checkpoint

    def info(self, name):
        info = self.checkpoint.info(name)
        if not self.union.is_vocabulary(self.index, name):
            return info
        return TensorInfo((self.union.size, *info.shape[1:]), info.dtype)

    def get(self, name):
        if not self.union.is_vocabulary(self.index, name):
            return self.checkpoint.get(name)
        return self.union.rows(name)[self.index].to(self.checkpoint.info(name).dtype)

    def file_of(self, name):
        return self.checkpoint.file_of(name)

    def release(self):
        self.checkpoint.release()

    def __repr__(self):
        return f"VocabularyView({self.path!r})"


def unify(checkpoints, base_index):
    """(views of `checkpoints` with the union vocabulary, the union tokenizer). `base_index`: which
    checkpoint is the base model (its tokenizer is the starting point and its rows are preferred), or None."""
    first = base_index if base_index is not None else 0
    tokenizers = [load_tokenizer(c.folder) for c in checkpoints]
    sizes = [config_vocab_size(c.folder) or t.vocab_size for c, t in zip(checkpoints, tokenizers)]
    others = [(t, s) for i, (t, s) in enumerate(zip(tokenizers, sizes)) if i != first]
    tokenizer = union_tokenizer((tokenizers[first], sizes[first]), others)
    union = UnionVocabulary(checkpoints, base_index, tokenizer.get_vocab(), [t.get_vocab() for t in tokenizers], sizes)
    return [VocabularyView(union, i) for i in range(len(checkpoints))], tokenizer
