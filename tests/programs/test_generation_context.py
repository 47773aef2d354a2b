"""Greedy evaluation stops at the model's context: a causal LM's prompt plus max_new_tokens beyond its positions
(GPT-2's n_positions) ended in IndexError from the position embedding; a seq2seq decoder with learned positions
(BART) has the same bound, T5's relative positions none. Predictions are compared with greedy decoding by hand."""
import json

import pytest
import torch

from modelmerge.prediction.config import PredictConfig
from modelmerge.prediction.loading import load_for_task
from modelmerge.prediction.program import run
from tiny import WORDS, make_tiny_gpt2, make_tiny_t5, word_tokenizer, write_jsonl

CONTEXT = 12


def make_tiny_bart(path, max_position_embeddings):
    from transformers import BartConfig, BartForConditionalGeneration

    tokenizer = word_tokenizer("t5")
    config = BartConfig(vocab_size=len(tokenizer), d_model=16, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                        max_position_embeddings=max_position_embeddings, dropout=0.0, pad_token_id=0, eos_token_id=1,
                        bos_token_id=0, decoder_start_token_id=0, forced_bos_token_id=None, forced_eos_token_id=None)
    torch.manual_seed(0)
    BartForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def hand_greedy(task_type, model, tokenizer, prompt, max_new_tokens, positions):
    """Argmax one token at a time until eos, max_new_tokens or the `positions` (None: unbounded) are filled."""
    eos = tokenizer.eos_token_id
    if task_type == "seq2seq":
        encoder = torch.tensor([tokenizer(prompt, truncation=True, max_length=CONTEXT)["input_ids"]])
        tokens, start = [model.config.decoder_start_token_id], 1
        step = lambda: model(input_ids=encoder, decoder_input_ids=torch.tensor([tokens])).logits[0, -1]  # noqa: E731
    else:
        tokens = tokenizer(prompt, truncation=True, max_length=CONTEXT)["input_ids"]
        start = len(tokens)
        step = lambda: model(input_ids=torch.tensor([tokens])).logits[0, -1]  # noqa: E731
    with torch.no_grad():
        while len(tokens) - start < max_new_tokens and (positions is None or len(tokens) < positions):
            tokens.append(int(step().argmax()))
            if tokens[-1] == eos:
                break
    return tokenizer.decode(tokens[start:], skip_special_tokens=True).strip(), len(tokens) - start


def evaluate(tmp_path, model, task_type, prompts, max_new_tokens, max_length):
    write_jsonl(str(tmp_path / "data" / "test.jsonl"), [{"input": p, "target": "a"} for p in prompts])
    run(PredictConfig(model_name_or_path=model, output_dir=str(tmp_path / "out"), dataset_name=str(tmp_path / "data"),
                      split="test", mode="evaluate", task_type=task_type, batch_size=2, max_length=max_length,
                      max_new_tokens=max_new_tokens))
    return [json.loads(line)["prediction"] for line in open(tmp_path / "out" / "predictions.jsonl")]


PROMPTS = [" ".join(WORDS[i : i + length]) for i, length in ((0, 3), (5, 8), (2, 11), (1, 12), (7, 8))]


@pytest.mark.parametrize("family", ["gpt2", "bart", "t5"])
def test_completions_stop_at_the_context(tmp_path, caplog, family):
    if family == "gpt2":
        model, task_type, positions = make_tiny_gpt2(tmp_path / "m", n_positions=CONTEXT), "causal_lm", CONTEXT
    elif family == "bart":
        model, task_type, positions = make_tiny_bart(tmp_path / "m", CONTEXT), "seq2seq", CONTEXT
    else:  # relative positions: completions run to max_new_tokens
        model, task_type, positions = make_tiny_t5(tmp_path / "m"), "seq2seq", None
    max_new_tokens = 3 * CONTEXT
    predictions = evaluate(tmp_path, model, task_type, PROMPTS, max_new_tokens, max_length=CONTEXT)
    loaded, tokenizer = load_for_task(model, task_type)
    expected = [hand_greedy(task_type, loaded, tokenizer, p, max_new_tokens, positions) for p in PROMPTS]
    assert predictions == [text for text, _ in expected]
    lengths = [length for _, length in expected]
    if family == "gpt2":  # prompt + completion fill the context unless eos came first; a full prompt gets none
        assert lengths[3] == 0 and max(lengths) <= CONTEXT - 3
        assert all(length == CONTEXT - len(p.split()) for length, p in zip(lengths, PROMPTS) if length < max_new_tokens)
    elif family == "bart":
        assert max(lengths) <= CONTEXT - 1
    assert ("stop at the model's 12 positions before max_new_tokens 36" in caplog.text) == (positions is not None)
    assert max(lengths) > 0
