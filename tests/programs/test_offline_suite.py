"""code/make_offline_suite.py (modelmerge.offline): the small models and synthetic tasks of the offline presets of
config/t5_tasks.py and config/vit_tasks.py. Every row is checked against the rule of its task, recomputed here
from the lexicon or the image; the models load with their tokenizer / image processor and know every word."""
import json
import os

import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer, T5ForConditionalGeneration

from modelmerge import offline
from modelmerge.config import run_program
from modelmerge.offline import SuiteConfig, make_suite


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def t5_suite(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("suite") / "t5")
    make_suite(SuiteConfig("t5_text_tasks", folder, seed=3))
    return folder


def test_text_rows_follow_their_lexicon(t5_suite):
    tasks = [offline.PRETRAINING_TASK, *offline.TEXT_TASKS]
    lexicons = {}
    for task in tasks:
        with open(os.path.join(t5_suite, "data", task, "lexicon.json")) as f:
            lexicons[task] = json.load(f)
        assert len(lexicons[task]) == offline.LEXICON_SIZE
        assert sum(lexicons[task].values()) == offline.LEXICON_SIZE // 2  # half positive
    all_keywords = [w for lexicon in lexicons.values() for w in lexicon]
    assert len(set(all_keywords)) == len(all_keywords)  # every task has words of its own
    for task in tasks:
        sizes = offline.PRETRAINING_SPLIT_SIZES if task == offline.PRETRAINING_TASK else offline.TEXT_SPLIT_SIZES
        for split, size in sizes.items():
            rows = read_jsonl(os.path.join(t5_suite, "data", task, f"{split}.jsonl"))
            assert len(rows) == size
            for row in rows:
                prefix = f"{task} sentence: "
                assert row["input"].startswith(prefix)
                words = row["input"][len(prefix):].split()
                keywords = [w for w in words if w in set(all_keywords)]
                assert len(keywords) == 1 and keywords[0] in lexicons[task] and 3 <= len(words) <= 7
                assert row["target"] == ["negative", "positive"][lexicons[task][keywords[0]]]
        targets = [r["target"] for r in read_jsonl(os.path.join(t5_suite, "data", task, "train.jsonl"))]
        assert 0.35 < targets.count("positive") / len(targets) < 0.65


def test_t5_knows_every_word_of_the_tasks(t5_suite):
    model_dir = os.path.join(t5_suite, "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = T5ForConditionalGeneration.from_pretrained(model_dir)
    assert model.config.vocab_size == len(tokenizer)
    rows = read_jsonl(os.path.join(t5_suite, "data", offline.TEXT_TASKS[0], "train.jsonl"))
    for row in rows[:50]:
        ids = tokenizer(row["input"]).input_ids
        assert tokenizer.unk_token_id not in ids and ids[-1] == tokenizer.eos_token_id
        assert len(ids) == len(row["input"].replace(":", " :").split()) + 1  # one token per word, then </s>
        target = tokenizer(text_target=row["target"]).input_ids
        assert len(target) == 2 and tokenizer.decode(target, skip_special_tokens=True) == row["target"]


def test_the_suite_is_a_function_of_its_seed(t5_suite, tmp_path):
    again, other = str(tmp_path / "again"), str(tmp_path / "other")
    make_suite(SuiteConfig("t5_text_tasks", again, seed=3))
    make_suite(SuiteConfig("t5_text_tasks", other, seed=4))
    def text(suite, task, name):
        with open(os.path.join(suite, "data", task, name)) as f:
            return f.read()

    for task in (offline.PRETRAINING_TASK, *offline.TEXT_TASKS):
        for name in ("lexicon.json", "train.jsonl", "test.jsonl"):
            assert text(t5_suite, task, name) == text(again, task, name)
    assert json.loads(text(t5_suite, "alpha", "lexicon.json")) != json.loads(text(other, "alpha", "lexicon.json"))


def test_images_show_their_class(tmp_path, monkeypatch):
    monkeypatch.setattr(offline, "IMAGE_SPLIT_SIZES", {"train": 8, "validation": 4, "test": 40})
    folder = str(tmp_path / "clip")
    make_suite(SuiteConfig("clip_image_tasks", folder, seed=1))
    for task, classes in offline.IMAGE_TASKS.items():
        with open(os.path.join(folder, "data", task, "class_names.json")) as f:
            assert json.load(f) == classes
        for split, size in offline.IMAGE_SPLIT_SIZES.items():
            rows = read_jsonl(os.path.join(folder, "data", task, f"{split}.jsonl"))
            assert len(rows) == size and {r["label"] for r in rows} <= set(range(len(classes)))
    # Three properties recomputed from the pixels: the strongest channel of `colour`, the brightness of
    # `brightness`, and for `shape` the centre pixel, inside a disc and in the hole of a ring.
    for row in read_jsonl(os.path.join(folder, "data", "colour", "test.jsonl")):
        image = np.asarray(Image.open(os.path.join(folder, "data", "colour", row["image"])), dtype=float)
        assert image.shape == (offline.IMAGE_SIZE, offline.IMAGE_SIZE, 3)
        assert image.mean(axis=(0, 1)).argmax() == row["label"]
    for row in read_jsonl(os.path.join(folder, "data", "brightness", "test.jsonl")):
        image = np.asarray(Image.open(os.path.join(folder, "data", "brightness", row["image"])), dtype=float)
        assert (image.mean() > 95) == (row["label"] == 1)
    for row in read_jsonl(os.path.join(folder, "data", "shape", "test.jsonl")):
        image = np.asarray(Image.open(os.path.join(folder, "data", "shape", row["image"])))
        centre = image[offline.IMAGE_SIZE // 2, offline.IMAGE_SIZE // 2]
        assert (centre == 20).all() == (row["label"] == 0)


def test_unknown_suite_is_refused_before_anything_is_written(tmp_path, caplog):
    config = tmp_path / "suite.json"
    config.write_text(json.dumps({"suite": "resnet_tasks", "output_dir": str(tmp_path / "out")}))
    assert run_program(SuiteConfig, make_suite, "make_offline_suite", [str(config)]) == 2
    assert "resnet_tasks" in caplog.text and not (tmp_path / "out").exists()
