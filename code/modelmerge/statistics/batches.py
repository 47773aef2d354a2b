"""The examples a statistic runs over: length-sorted batches and the label of each example.

Both statistics differentiate log p(y|x) of a sequence classifier, with y either the gold label (the
"empirical" variant) or a label sampled from the model's own predictive distribution. Sampling is by
inverse CDF with one uniform number per example, drawn up front from a seeded generator in dataset order,
so an example's label does not depend on how the examples are batched: a one-example-at-a-time loop with
the same seed and the same rule (`sample_labels`) draws exactly the same labels.
"""
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from modelmerge import data


@dataclass
class LabelledBatch:
    indices: torch.Tensor  # positions of the batch's examples in the dataset
    labels: torch.Tensor  # the label y of each example in log p(y|x)
    loss: torch.Tensor  # Σ over the batch of log p(y|x) (a sum: every example keeps its own gradient)
    attention_mask: torch.Tensor  # [batch, tokens], 1 for real tokens, 0 for padding
    sites: list  # what the capture recorded during the forward pass


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


def sample_labels(logits, uniforms):
    """Inverse-CDF samples from softmax(logits): the first class whose cumulative probability reaches the uniform."""
    cdf = logits.detach().double().softmax(-1).cumsum(-1)
    below = (cdf < uniforms.to(cdf.device)[:, None]).sum(-1)
    return below.clamp(max=logits.shape[-1] - 1)


def length_sorted_batches(dataset, tokenizer, batch_size, max_length):
    """Yield (indices, inputs): the examples longest first, `batch_size` at a time, right-padded to the batch's longest.

    Sorting by length keeps padding (wasted work) small; longest first makes the peak memory show at once.
    `inputs` holds the tokenizer's model inputs and `labels` (the gold labels).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if tokenizer.padding_side != "right":
        raise ValueError(
            f"the tokenizer pads on the {tokenizer.padding_side!r}; statistics need right padding "
            "(left padding shifts the position ids of BERT-like models and changes their outputs)"
        )
    encodings = tokenizer(list(dataset["text"]), truncation=True, max_length=max_length)
    labels = list(dataset["label"])
    order = sorted(range(len(labels)), key=lambda i: -len(encodings["input_ids"][i]))
    collate = data.collator(tokenizer)
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        examples = [{**{key: values[i] for key, values in encodings.items()}, "label": labels[i]} for i in indices]
        yield torch.tensor(indices), collate(examples)


def labelled_batches(model, tokenizer, dataset, capture, *, empirical, batch_size, max_length, seed, desc):
    """Run `model` over `dataset` in length-sorted batches, recording `capture`'s sites; yield a `LabelledBatch` each.

    The caller takes gradients of `loss` before asking for the next batch. The model must be in eval mode.
    """
    num_labels = None
    uniforms = None if empirical else sampling_uniforms(len(dataset), seed)
    device = next(model.parameters()).device
    with torch.enable_grad(), tqdm(total=len(dataset), desc=desc, unit="ex") as progress:
        for indices, inputs in length_sorted_batches(dataset, tokenizer, batch_size, max_length):
            gold = inputs.pop("labels")
            inputs = inputs.to(device)
            with capture.recording(len(indices)) as sites:
                logits = model(**inputs).logits
            if num_labels is None:
                num_labels = _check_logits(logits, len(indices))
            if empirical:
                labels = _check_gold(gold, num_labels, indices).to(device)
            else:
                labels = sample_labels(logits, uniforms[indices])
            loss = logits.log_softmax(-1).gather(1, labels[:, None]).sum()
            yield LabelledBatch(indices, labels.cpu(), loss, inputs["attention_mask"], sites)
            progress.update(len(indices))


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
