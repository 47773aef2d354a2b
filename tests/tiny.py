"""Tiny random BERT models and data built at test time (the suite never loads real weights)."""
import json
import os
import re
from collections import Counter

import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

# The sentiment data shipped with the project (data/sentiment), or $MERGE_DATA_DIR.
SHARED_DATA = os.environ.get(
    "MERGE_DATA_DIR", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "sentiment"))
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def read_jsonl(path, limit=None):
    rows = []
    with open(path) as f:
        for line in f:
            rows.append(json.loads(line))
            if limit is not None and len(rows) >= limit:
                break
    return rows


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def tiny_data_dir(root, tasks=("sst2", "rotten_tomatoes"), sizes=None):
    """Copy the first rows of each task's splits into `root/<task>/<split>.jsonl` and return `root`."""
    sizes = sizes or {"train": 48, "validation": 16, "test": 16}
    for task in tasks:
        for split, n in sizes.items():
            write_jsonl(os.path.join(root, task, f"{split}.jsonl"), read_jsonl(os.path.join(SHARED_DATA, task, f"{split}.jsonl"), n))
    return str(root)


def tiny_vocab(size=400, task="sst2"):
    words = Counter()
    for row in read_jsonl(os.path.join(SHARED_DATA, task, "train.jsonl"), 3000):
        words.update(re.findall(r"\w+|[^\w\s]", row["text"].lower()))
    return SPECIAL_TOKENS + [w for w, _ in words.most_common(size - len(SPECIAL_TOKENS))]


def tiny_bert_config(vocab_size=400, num_labels=2, **overrides):
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    kwargs.update(overrides)
    return BertConfig(**kwargs)


def make_tiny_bert(path, seed=0, num_labels=2, vocab_size=400, **config_overrides):
    """Save a random BertForSequenceClassification with a matching WordPiece tokenizer to `path`."""
    os.makedirs(path, exist_ok=True)
    vocab = {token: i for i, token in enumerate(tiny_vocab(vocab_size))}
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True)
    torch.manual_seed(seed)
    model = BertForSequenceClassification(tiny_bert_config(vocab_size, num_labels, **config_overrides))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def perturbed_copy(src, dst, seed, scale=0.01):
    """Save a copy of the model at `src` with every floating-point parameter moved by seeded noise (a fake fine-tune)."""
    model = BertForSequenceClassification.from_pretrained(src)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    model.save_pretrained(dst)
    BertTokenizerFast.from_pretrained(src).save_pretrained(dst)
    return str(dst)
