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


def dtype_copy(src, dst, dtype):
    """Save the model folder `src` (tokenizer included) with its weights cast to `dtype` (config.json says so)."""
    model = BertForSequenceClassification.from_pretrained(src, dtype=torch.float32).to(dtype)
    model.save_pretrained(dst)
    BertTokenizerFast.from_pretrained(src).save_pretrained(dst)
    return str(dst)


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


# --- other families: tiny T5, GPT-2, ViT and CLIP models with their own tokenizer / image processor -----------

WORDS = ["red", "green", "blue", "one", "two", "three", "four", "cat", "dog", "bird", "yes", "no", "copy",
         "reverse", "first", "last", "word", "a", "photo", "of", "the", "is", "."]
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def word_tokenizer(kind):
    """A word-level fast tokenizer over WORDS (made offline with `tokenizers`): `t5` appends </s> to every text,
    `gpt2` adds nothing and has <|endoftext|> as eos, `clip` appends that eos (CLIP pools the text there)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"] if kind == "t5" else ["<|endoftext|>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "t5":
        tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    if kind == "clip":
        tokenizer.post_processor = processors.TemplateProcessing(single="$A <|endoftext|>",
                                                                 special_tokens=[("<|endoftext|>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<unk>")


def make_tiny_t5(path, seed=0, **overrides):
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = word_tokenizer("t5")
    kwargs = dict(vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                  relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
                  pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, feed_forward_proj="gated-gelu",
                  tie_word_embeddings=False)
    config = T5Config(**{**kwargs, **overrides})
    torch.manual_seed(seed)
    T5ForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def make_tiny_gpt2(path, seed=0, **overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = word_tokenizer("gpt2")
    kwargs = dict(vocab_size=len(tokenizer), n_positions=64, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    config = GPT2Config(**{**kwargs, **overrides})
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def image_processor(size=16):
    from transformers import ViTImageProcessor

    return ViTImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def make_tiny_vit(path, num_labels=3, seed=0, **overrides):
    from transformers import ViTConfig, ViTForImageClassification

    kwargs = dict(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=32, num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config = ViTConfig(**{**kwargs, **overrides})
    torch.manual_seed(seed)
    ViTForImageClassification(config).save_pretrained(path)
    image_processor(config.image_size).save_pretrained(path)
    return str(path)


def make_tiny_clip(path, seed=0, **overrides):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = word_tokenizer("clip")
    text = dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=16, eos_token_id=0, bos_token_id=0, pad_token_id=0)
    vision = dict(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2)
    text.update({k: v for k, v in overrides.items() if k in ("hidden_size", "intermediate_size", "num_hidden_layers")})
    vision.update(overrides)
    torch.manual_seed(seed)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).save_pretrained(path)
    size = vision["image_size"]
    images = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    tokenizer.pad_token = "<|endoftext|>"
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(path)
    return str(path)


def colour_images(folder, per_class=4, seed=0, size=20):
    """PNG images of COLOURS with noise, in `folder/<colour>/<i>.png`; returns rows {"image": path, "label"}."""
    import numpy as np
    from PIL import Image

    generator = np.random.default_rng(seed)
    rows = []
    for label, (name, rgb) in enumerate(COLOURS.items()):
        os.makedirs(os.path.join(folder, name), exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(np.array(rgb) + generator.normal(0, 40, (size, size, 3)), 0, 255).astype("uint8")
            path = os.path.join(folder, name, f"{i}.png")
            Image.fromarray(pixels).save(path)
            rows.append({"image": path, "label": label})
    return rows


def word_tasks(n=24, seed=0, kind="copy"):
    """Rows {"input", "target"}: `copy` repeats a word, `reverse` reverses a pair."""
    import random

    rng = random.Random(seed)
    words = WORDS[:10]
    rows = []
    for _ in range(n):
        pair = rng.sample(words, 2)
        if kind == "copy":
            rows.append({"input": f"copy {pair[0]}", "target": pair[0]})
        else:
            rows.append({"input": f"reverse {pair[0]} {pair[1]}", "target": f"{pair[1]} {pair[0]}"})
    return rows


# --- one tiny model of each family (families.md): the family tests' fixtures are in conftest.py ---------------------

CLASSES = list(COLOURS)  # the class names of colour_images
FAMILY_TASKS = {"seq2seq": "seq2seq", "causal_lm": "causal_lm", "vit": "image_classification",
                "clip": "image_classification"}
FAMILY_MODELS = {"seq2seq": make_tiny_t5, "causal_lm": make_tiny_gpt2, "vit": make_tiny_vit, "clip": make_tiny_clip}


def load_family_model(family_paths, name, peft=None):
    """The model of family `name` in float64 for evaluation, with LoRA adapters moved off the identity if `peft`."""
    from peft import LoraConfig, get_peft_model

    from modelmerge.prediction.loading import load_for_task

    model, processor = load_for_task(family_paths[name], FAMILY_TASKS[name], class_names=CLASSES)
    if peft:
        targets = {"seq2seq": ["q", "v"], "causal_lm": ["c_attn"], "vit": ["q_proj", "v_proj"], "clip": r".*vision_model.*\.(q_proj|v_proj)"}
        task = {"seq2seq": "SEQ_2_SEQ_LM", "causal_lm": "CAUSAL_LM"}.get(name)
        model = get_peft_model(model, LoraConfig(task_type=task, r=2, lora_alpha=4, target_modules=targets[name]))
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():  # LoRA starts as the identity (B = 0): move it so that gradients are generic
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model.double().eval(), processor


def example_inputs(name, processor, row):
    """(model inputs of one example, [positions], scored token ids or None for classifiers)."""
    if FAMILY_TASKS[name] == "image_classification":
        from PIL import Image

        image = Image.open(row["image"]).convert("RGB")
        pixels = processor(images=[image], return_tensors="pt")["pixel_values"].double()
        return {"pixel_values": pixels}, None, None
    if name == "seq2seq":
        ids = processor(row["input"])["input_ids"]
        target = processor(text_target=row["target"])["input_ids"]
        inputs = {"input_ids": torch.tensor([ids]), "labels": torch.tensor([target])}
        return inputs, list(range(len(target))), target
    prompt = processor(row["input"])["input_ids"]
    completion = processor(" " + row["target"], add_special_tokens=False)["input_ids"] + [processor.eos_token_id]
    inputs = {"input_ids": torch.tensor([prompt + completion])}
    # the logits at position t predict token t + 1
    return inputs, list(range(len(prompt) - 1, len(prompt) + len(completion) - 1)), completion
