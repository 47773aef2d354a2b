"""Running a model over a data set: a classifier's predicted classes and probabilities, a sequence model's loss
under teacher forcing and its greedy decoding (`modelmerge.families` encodes the examples)."""
import logging

import torch
from tqdm import tqdm

from modelmerge import families
from modelmerge.prediction.metrics import sequence_metrics

logger = logging.getLogger(__name__)


@torch.no_grad()
def predict(model, dataloader):
    """(labels, predictions, probabilities) as numpy arrays over every batch of `dataloader`, in order."""
    model.eval()
    device = next(model.parameters()).device
    labels, probabilities = [], []
    for batch in tqdm(dataloader, desc="predicting", unit="batch"):
        batch = {name: tensor.to(device) for name, tensor in batch.items()}
        labels.append(batch.pop("labels").cpu())
        logits = model(**batch).logits
        probabilities.append(torch.softmax(logits.float(), dim=-1).cpu())
    probabilities = torch.cat(probabilities).numpy()
    return torch.cat(labels).numpy(), probabilities.argmax(axis=-1), probabilities


@torch.no_grad()
def evaluate_sequences(model, tokenizer, dataset, task_type, batch_size, max_length, max_new_tokens):
    """(metrics, rows) of a seq2seq or causal LM: `loss` (mean NLL per scored target token, teacher forcing),
    `perplexity` = exp(loss), `exact_match` of the greedy decoding (stripped, special tokens skipped)."""
    model.eval()
    device = next(model.parameters()).device
    encoded = families.encode(dataset, tokenizer, task_type, max_length)
    collate = families.collator(tokenizer, task_type)
    nll, counts = [], []
    for start in tqdm(range(0, len(encoded), batch_size), desc="loss", unit="batch"):
        batch = {k: v.to(device) for k, v in collate([encoded[i] for i in range(start, min(start + batch_size, len(encoded)))]).items()}
        logits, labels = families.token_logits(model(**batch).logits, batch["labels"], task_type)
        log_likelihood, _ = families.sequence_log_likelihood(logits, labels)
        nll += (-log_likelihood).tolist()
        counts += (labels != families.IGNORE).sum(1).tolist()
    predictions = greedy_completions(model, tokenizer, dataset, task_type, batch_size, max_length, max_new_tokens)
    correct = [families.exact_match(p, t) for p, t in zip(predictions, dataset["target"])]
    rows = [{"index": i, "target": t, "prediction": p, "exact_match": c, "nll": n, "num_tokens": k}
            for i, (t, p, c, n, k) in enumerate(zip(dataset["target"], predictions, correct, nll, counts))]
    return sequence_metrics(rows), rows


def greedy_completions(model, tokenizer, dataset, task_type, batch_size, max_length, max_new_tokens):
    """The greedy decoding (num_beams 1) of every input, decoded without special tokens, in dataset order.

    A completion stops at the model's context (`generated_positions`): after at most max_new_tokens tokens,
    and for a causal LM where prompt and completion fill its positions (an empty completion if the prompt
    already does). Causal LM prompts are batched by equal length, so that no prompt needs padding."""
    device = next(model.parameters()).device
    options = {"do_sample": False, "num_beams": 1, "pad_token_id": tokenizer.pad_token_id,
               "eos_token_id": tokenizer.eos_token_id}
    limit = generated_positions(model)
    inputs = dataset["input"]
    texts = [""] * len(inputs)
    if task_type == "seq2seq":
        groups = [list(range(s, min(s + batch_size, len(inputs)))) for s in range(0, len(inputs), batch_size)]
    else:
        prompts = [tokenizer(text, truncation=True, max_length=max_length)["input_ids"] for text in inputs]
        by_length = {}
        for i, ids in enumerate(prompts):
            by_length.setdefault(len(ids), []).append(i)
        groups = [g[s : s + batch_size] for g in by_length.values() for s in range(0, len(g), batch_size)]
    cut = 0
    for group in tqdm(groups, desc="greedy decoding", unit="batch"):
        # the positions a completion may take: a seq2seq decoder's start token takes one, a prompt its length
        taken = 1 if task_type == "seq2seq" else len(prompts[group[0]])
        new_tokens = max_new_tokens if limit is None else min(max_new_tokens, limit - taken)
        if new_tokens < max_new_tokens:
            cut += len(group)
        if new_tokens <= 0:
            continue
        if task_type == "seq2seq":
            batch = tokenizer([inputs[i] for i in group], truncation=True, max_length=max_length, padding=True,
                              return_tensors="pt").to(device)
            generated = model.generate(**batch, max_new_tokens=new_tokens, **options)
        else:
            ids = torch.tensor([prompts[i] for i in group], device=device)
            generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                       **options)[:, ids.shape[1]:]
        for i, tokens in zip(group, generated):
            texts[i] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    if cut:
        logger.warning("%d of %d completions stop at the model's %d positions before max_new_tokens %d (%s)", cut,
                       len(inputs), limit, max_new_tokens,
                       "decoder start token and completion" if task_type == "seq2seq" else "prompt and completion")
    return texts


def generated_positions(model):
    """The positions a generated sequence may fill: a causal LM's prompt and completion together, a seq2seq
    decoder's start token and completion (BART's learned positions); None for relative positions (T5)."""
    positions = getattr(model.config, "max_position_embeddings", None)
    return positions if isinstance(positions, int) and positions > 0 else None
