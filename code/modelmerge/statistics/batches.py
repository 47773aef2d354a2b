"""The examples a statistic runs over: length-sorted batches and the label of each example.

Both statistics differentiate log p(y|x) of a model of any family (`modelmerge.families`), with y either the
gold label (the "empirical" variant) or a label sampled from the model's own predictive distribution; for
sequences (seq2seq, causal LM) log p(y|x) is the sum over the scored tokens, each token drawn from the
teacher-forced distribution at its position. Sampling is by inverse CDF with uniform numbers drawn up front
from a seeded generator in dataset order (one per example, or one per scored token), so an example's labels
do not depend on how the examples are batched, nor on which slice of the examples a run takes (`examples`: a
shard of a sharded statistic draws the whole dataset's numbers and uses its slice's): a one-example-at-a-time
loop with the same seed and the same rule (`sample_labels`) draws exactly the same labels.
"""
import ctypes
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from tqdm.auto import tqdm

from modelmerge import families


@dataclass
class LabelledBatch:
    indices: torch.Tensor  # positions of the batch's examples in the dataset
    labels: list  # the label y of each example in log p(y|x) (for sequences: the list of its scored tokens)
    loss: torch.Tensor  # Σ over the batch of log p(y|x) (a sum: every example keeps its own gradient)
    masks: list  # [batch, tokens] masks, 1 for real tokens, 0 for padding (encoder's and decoder's for seq2seq)
    sites: list  # what the capture recorded during the forward pass


def release(batch):
    """Drop what `batch` recorded (its layers' inputs and outputs, the graph of its loss) once its gradients are
    used, so that the next batch's forward pass does not run beside them, and hand the freed memory back to the
    system: the allocator otherwise keeps the freed blocks of every batch size it met (glibc: resident memory +150
    MiB over 2,048 sentences at batch size 16)."""
    batch.sites.clear()
    batch.loss = None
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc's; other C libraries have none
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()


def check_examples(examples, dataset):
    """`examples` (a range of positions in `dataset`, None: all of them) as a range; ValueError unless it is a
    non-empty contiguous slice of the dataset."""
    if examples is None:
        return range(len(dataset))
    if not isinstance(examples, range) or examples.step != 1 or not 0 <= examples.start < examples.stop <= len(dataset):
        raise ValueError(f"examples must be a non-empty range of positions within the {len(dataset)} examples, "
                         f"got {examples!r}")
    return examples


def limit_examples(dataset, num_examples):
    """The first `num_examples` examples of `dataset` (all of them when None)."""
    if len(dataset) == 0:
        raise ValueError("the dataset has no examples")
    if num_examples is None or num_examples >= len(dataset):
        return dataset
    if num_examples < 1:
        raise ValueError(f"num_examples must be a positive number or None, got {num_examples}")
    return dataset.select(range(num_examples))


def sampling_uniforms(num_examples, seed):
    """One uniform number in [0, 1) per example, in dataset order; float64 so that ties are impossible in practice."""
    return torch.rand(num_examples, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


sample_labels = families.sample_tokens


def length_sorted_batches(encoded, processor, batch_size, task_type="sequence_classification"):
    """Yield (indices, inputs): the examples longest first, right-padded to the batch's longest.

    A batch holds about `batch_size` × the mean length tokens (padding included): fewer than `batch_size` of the
    longest examples, up to 4 × `batch_size` of the shortest, so that memory follows the tokens, not the count.
    Sorting by length keeps padding (wasted work) small; longest first makes the peak memory show at once.
    `inputs` holds the model inputs and `labels` (the gold labels or target tokens, -100 where not scored).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if getattr(processor, "padding_side", "right") != "right":
        raise ValueError(
            f"the tokenizer pads on the {processor.padding_side!r}; statistics need right padding "
            "(left padding shifts the position ids of BERT-like models and changes their outputs)"
        )
    lengths = families.example_lengths(encoded, task_type)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    collate = families.collator(processor, task_type)
    budget = batch_size * max(1.0, sum(lengths) / max(1, len(lengths)))
    start = 0
    while start < len(order):
        longest = max(1, lengths[order[start]])
        count = int(min(4 * batch_size, max(1, budget // longest), len(order) - start))
        indices = order[start : start + count]
        start += count
        inputs = collate([encoded[i] for i in indices])
        if task_type == "seq2seq":
            inputs = _distinct_decoder_length(inputs)
        yield torch.tensor(indices), inputs


def _distinct_decoder_length(inputs):
    """Pad the targets by one unscored position when they are as long as the inputs, so that a [batch, tokens]
    tensor tells by its length whether the encoder's or the decoder's padding mask applies (causal decoder:
    the extra last position changes nothing before it)."""
    labels = inputs["labels"]
    if labels.shape[1] == inputs["input_ids"].shape[1]:
        inputs["labels"] = torch.cat([labels, torch.full_like(labels[:, :1], families.IGNORE)], 1)
    return inputs


def padding_masks(inputs, task_type):
    """The [batch, tokens] masks of the positions that are not padding (the decoder's too, for seq2seq)."""
    masks = [inputs["attention_mask"]] if "attention_mask" in inputs else []
    if task_type == "seq2seq":
        labels = inputs["labels"]
        last = (labels != families.IGNORE).long().cumsum(1).argmax(1)  # the last scored position
        masks.append((torch.arange(labels.shape[1])[None, :] <= last[:, None]).long())
    return masks


def labelled_batches(model, processor, dataset, capture, *, empirical, batch_size, max_length, seed, desc,
                     task_type="sequence_classification", examples=None):
    """Run `model` over the `examples` (a range of positions; None: all) of `dataset` in length-sorted batches,
    recording `capture`'s sites; yield a `LabelledBatch` each, its `indices` positions in `dataset`.

    The caller takes gradients of `loss` before asking for the next batch. The model must be in eval mode.
    """
    num_labels = None
    sequence = families.is_sequence(task_type)
    examples = check_examples(examples, dataset)
    whole = len(examples) == len(dataset)
    encoded = families.encode(dataset if whole else dataset.select(examples), processor, task_type, max_length)
    uniforms = None
    if not empirical:  # the whole dataset's numbers, so that a slice draws what the whole run draws for it
        if sequence:
            everything = encoded if whole else families.encode(dataset, processor, task_type, max_length)
            uniforms = sequence_uniforms(everything, task_type, seed)[examples.start : examples.stop]
        else:
            uniforms = sampling_uniforms(len(dataset), seed)[examples.start : examples.stop]
    device = next(model.parameters()).device
    with torch.enable_grad(), tqdm(total=len(examples), desc=desc, unit="ex") as progress:
        for indices, inputs in length_sorted_batches(encoded, processor, batch_size, task_type):
            masks = padding_masks(inputs, task_type)
            gold = inputs["labels"] if sequence else inputs.pop("labels")
            inputs = {name: tensor.to(device) for name, tensor in inputs.items()}
            with capture.recording(len(indices)) as sites, per_example_position_bias(model, len(indices)):
                logits = model(**inputs).logits
            if sequence:
                logits, targets = families.token_logits(logits, inputs["labels"], task_type)
                per_example, labels = families.sequence_log_likelihood(
                    logits, targets, None if empirical else uniforms[indices]
                )
                loss = per_example.sum()
            else:
                if num_labels is None:
                    num_labels = _check_logits(logits, len(indices))
                if empirical:
                    labels = _check_gold(gold, num_labels, indices + examples.start).to(device)
                else:
                    labels = sample_labels(logits, uniforms[indices])
                loss = logits.log_softmax(-1).gather(1, labels[:, None]).sum()
                labels = labels.cpu().tolist()
            yield LabelledBatch(indices + examples.start, labels, loss, [m.to(device) for m in masks], sites)
            progress.update(len(indices))


def sequence_uniforms(encoded, task_type, seed):
    """[examples, most labelled tokens of an example] uniform numbers in [0, 1), float64, from one seeded
    generator in dataset order: example i's j-th labelled token is drawn with [i, j]."""
    counts = families.scored_counts(encoded, task_type)
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(len(counts), max(counts + [1]), generator=generator, dtype=torch.float64)


@contextmanager
def per_example_position_bias(model, batch_size):
    """T5's relative position bias is computed once as [1, heads, q, k] and broadcast over the batch, so the
    gradient at its embedding mixes the examples; inside, it is computed per example ([batch, heads, q, k],
    the same values) so that the capture sees every example's share."""
    attentions = [m for m in model.modules() if hasattr(m, "compute_bias") and hasattr(m, "relative_attention_bias")
                  and getattr(m, "has_relative_attention_bias", False)]
    for attention in attentions:
        attention.compute_bias = partial(_batched_bias, attention, batch_size)
    try:
        yield
    finally:
        for attention in attentions:
            del attention.compute_bias


def _batched_bias(attention, batch_size, query_length, key_length, device=None, past_seen_tokens=0):
    device = device or attention.relative_attention_bias.weight.device
    context = torch.arange(query_length, dtype=torch.long, device=device)[:, None] + past_seen_tokens
    memory = torch.arange(key_length, dtype=torch.long, device=device)[None, :]
    buckets = attention._relative_position_bucket(
        memory - context, bidirectional=not attention.is_decoder,
        num_buckets=attention.relative_attention_num_buckets, max_distance=attention.relative_attention_max_distance,
    )
    values = attention.relative_attention_bias(buckets.expand(batch_size, *buckets.shape))  # [batch, q, k, heads]
    return values.permute(0, 3, 1, 2)
def _check_logits(logits, batch_size):
    if logits.dim() != 2 or logits.shape[0] != batch_size or logits.shape[1] < 2:
        raise ValueError(
            f"the model's logits have shape {tuple(logits.shape)}; statistics need a classifier's [batch, classes] "
            "logits with at least 2 classes"
        )
    return logits.shape[1]


def _check_gold(gold, num_labels, indices):
    bad = (gold < 0) | (gold >= num_labels)
    if bad.any():
        example = int(indices[bad.nonzero()[0, 0]])
        raise ValueError(f"example {example} has label {int(gold[bad][0])}, outside the model's {num_labels} classes")
    return gold
