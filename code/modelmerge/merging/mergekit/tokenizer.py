"""`tokenizer_source`: the folder whose tokenizer files the merged model carries (the union tokenizer, the base
model's or a named model's), after checking that vocabularies that are not permuted agree."""
import atexit
import os
import shutil
import tempfile

from modelmerge.merging.options import MergeError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")


def tokenizer_source(value, references, donor, union=None):
    """The folder whose tokenizer files replace the donor's: the union tokenizer written to a temporary
    folder, or an input's after checking that the vocabularies need no permuting."""
    if value is None:
        return None
    if union is not None:
        folder = tempfile.mkdtemp(prefix="union-tokenizer-")
        atexit.register(shutil.rmtree, folder, True)
        union.save_pretrained(folder)
        return folder
    if value == "base":
        folders = [c.folder for c in references.all() if c.folder]
        _check_same_vocabulary(folders, value)
        return donor.folder
    path = value[len("model:"):] if value.startswith("model:") else value
    folder = references.get(path).folder
    _check_same_vocabulary([c.folder for c in references.all() if c.folder], f"model:{path}")
    return folder


def tokenizer_files(folder):
    """{file name: path} of the tokenizer files in `folder` (none when `folder` is None)."""
    if not folder:
        return {}
    return {name: os.path.join(folder, name) for name in TOKENIZER_FILES if os.path.isfile(os.path.join(folder, name))}


def _check_same_vocabulary(folders, source):
    from transformers import AutoTokenizer

    vocabularies = {folder: AutoTokenizer.from_pretrained(folder).get_vocab() for folder in folders}
    reference = next(iter(vocabularies.values()), None)
    for folder, vocabulary in vocabularies.items():
        if vocabulary != reference:
            raise MergeError(
                f"tokenizer_source {source}: the vocabulary of {folder} differs from the others; "
                "merging models with different vocabularies (embedding permutation) is not supported"
            )
