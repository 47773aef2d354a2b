"""seq2seq (T5), causal LM (GPT-2) and image classifiers (ViT, CLIP zero-shot head) through evaluation and
training, each against an independent computation written out here from families.md: metrics against a
hand-written greedy decoding and NLL. (Their statistics: tests/statistics/test_family_statistics.py.)"""
import json
import math
import os

import datasets
import pytest
import torch
from PIL import Image

from modelmerge import families
from modelmerge.config import run_program
from modelmerge.prediction.config import PredictConfig
from modelmerge.prediction.decoding import evaluate_sequences
from modelmerge.prediction.loading import load_for_task
from modelmerge.prediction.program import run
from modelmerge.training import TrainConfig, train
from tiny import CLASSES, FAMILY_TASKS, colour_images, example_inputs, load_family_model, word_tasks, write_jsonl


# --- evaluation ----------------------------------------------------------------------------------------------------


def greedy(name, model, processor, row, max_new_tokens):
    """Greedy decoding by hand: argmax, one token at a time, until eos."""
    eos = processor.eos_token_id
    if name == "seq2seq":
        encoder = {"input_ids": torch.tensor([processor(row["input"])["input_ids"]])}
        tokens = [model.config.decoder_start_token_id]
        for _ in range(max_new_tokens):
            logits = model(**encoder, decoder_input_ids=torch.tensor([tokens])).logits[0, -1]
            tokens.append(int(logits.argmax()))
            if tokens[-1] == eos:
                break
        new = tokens[1:]
    else:
        tokens = processor(row["input"])["input_ids"]
        start = len(tokens)
        for _ in range(max_new_tokens):
            tokens.append(int(model(input_ids=torch.tensor([tokens])).logits[0, -1].argmax()))
            if tokens[-1] == eos:
                break
        new = tokens[start:]
    return processor.decode(new, skip_special_tokens=True).strip()


@pytest.mark.parametrize("name", ["seq2seq", "causal_lm"])
def test_sequence_metrics_equal_a_hand_computation(family_paths, text_rows, name):
    model, processor = load_family_model(family_paths, name)
    # some targets the model's greedy output: exact match is then neither 0 nor 1
    rows = [dict(r) for r in text_rows]
    for row in rows[:4]:
        row["target"] = greedy(name, model, processor, row, 5)
    metrics, predicted = evaluate_sequences(model, processor, datasets.Dataset.from_list(rows), name, batch_size=3,
                                            max_length=64, max_new_tokens=5)
    nll, tokens, correct = 0.0, 0, 0
    with torch.no_grad():
        for row, out in zip(rows, predicted):
            inputs, positions, scored = example_inputs(name, processor, row)
            logits = model(**inputs).logits[0].log_softmax(-1)
            nll -= sum(float(logits[p, t]) for p, t in zip(positions, scored))
            tokens += len(scored)
            prediction = greedy(name, model, processor, row, 5)
            assert out["prediction"] == prediction
            correct += prediction == row["target"].strip()
    assert metrics["num_tokens"] == tokens
    assert metrics["loss"] == pytest.approx(nll / tokens, rel=1e-9)
    assert metrics["perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-9)
    assert metrics["exact_match"] == correct / len(rows) and 0 < correct < len(rows)


@pytest.mark.parametrize("name", ["vit", "clip"])
def test_image_accuracy_equals_the_argmax_of_a_hand_computation(family_paths, image_rows, tmp_path, name):
    folder = tmp_path / "data"
    write_jsonl(str(folder / "test.jsonl"), [{"image": os.path.relpath(r["image"], folder), "label": r["label"]}
                                             for r in image_rows])
    (folder / "class_names.json").write_text(json.dumps(CLASSES))
    config = PredictConfig(model_name_or_path=family_paths[name], output_dir=str(tmp_path / "out"), dataset_name=str(folder),
                           split="test", mode="evaluate", task_type="image_classification", batch_size=4)
    run(config)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    model, processor = load_for_task(family_paths[name], "image_classification", class_names=CLASSES)
    with torch.no_grad():
        predictions = [int(model(**example_inputs(name, processor, r)[0]).logits.argmax())
                       if name == "vit" else int(clip_logits(model, processor, r).argmax()) for r in image_rows]
    accuracy = sum(p == r["label"] for p, r in zip(predictions, image_rows)) / len(image_rows)
    assert metrics["accuracy"] == pytest.approx(accuracy) and metrics["num_examples"] == len(image_rows)


def clip_logits(model, processor, row):
    """CLIP's zero-shot logits from the parts of a plain CLIPModel: scale · cos(image, 'a photo of a {c}.')."""
    image = Image.open(row["image"]).convert("RGB")
    pixels = processor(images=[image], return_tensors="pt")["pixel_values"]
    text = processor.tokenizer([f"a photo of a {c}." for c in CLASSES], padding=True, return_tensors="pt")
    plain = families.CLIPModel.forward(model, input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                                       pixel_values=pixels)
    return plain.logits_per_image[0]


# --- training -------------------------------------------------------------------------------------------------------


def text_data(tmp_path):
    folder = tmp_path / "words"
    write_jsonl(str(folder / "train.jsonl"), word_tasks(24, seed=4, kind="copy"))
    write_jsonl(str(folder / "validation.jsonl"), word_tasks(8, seed=5, kind="copy"))
    return str(folder)


@pytest.mark.parametrize("name, peft", [("seq2seq", None), ("causal_lm", {"type": "lora", "r": 4, "target_modules": ["c_attn"]}),
                                        ("vit", None), ("clip", None)])
def test_training_lowers_the_loss_and_writes_loadable_models(family_paths, image_rows, tmp_path, name, peft):
    if FAMILY_TASKS[name] == "image_classification":
        data = str(tmp_path / "images")
        colour_images(os.path.join(data, "train"), per_class=4, seed=1)
        colour_images(os.path.join(data, "validation"), per_class=2, seed=2)
    else:
        data = text_data(tmp_path)
    config = TrainConfig(output_dir=str(tmp_path / "run"), dataset_name=data, model_name_or_path=family_paths[name],
                         task_type=FAMILY_TASKS[name], learning_rate=3e-3, warmup_steps=0, num_train_epochs=3,
                         per_device_train_batch_size=4, lr_scheduler_type="constant", logging_steps=1, peft=peft,
                         num_threads=1, max_length=64)  # the tiny GPT-2 has 64 positions
    trainer = train(config)
    losses = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
    assert len(losses) == 3 and losses[-1] < losses[0]
    model, _ = load_for_task(str(tmp_path / "run" / "best"), FAMILY_TASKS[name], class_names=CLASSES)
    assert (peft is None) == (not hasattr(model, "peft_config"))
    if name == "clip":  # the text tower is frozen: unchanged in the saved model
        before, _ = load_for_task(family_paths[name], FAMILY_TASKS[name], class_names=CLASSES)
        assert torch.equal(model.text_model.embeddings.token_embedding.weight,
                           before.text_model.embeddings.token_embedding.weight)
        assert not torch.equal(model.visual_projection.weight, before.visual_projection.weight)


# --- bad input -------------------------------------------------------------------------------------------------------


def predict_program(tmp_path, **keys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"output_dir": str(tmp_path / "out"), "split": "test", **keys}))
    return run_program(PredictConfig, run, "predict", [str(path)])


def test_bad_input_is_one_line_and_leaves_no_output(family_paths, image_rows, tmp_path, caplog):
    words = tmp_path / "w.jsonl"
    write_jsonl(str(words), word_tasks(4))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    images = tmp_path / "i.jsonl"
    write_jsonl(str(images), [{"image": str(broken), "label": 0}] + image_rows[:2])
    cases = [
        ({"model_name_or_path": family_paths["seq2seq"], "task_type": "causal_lm", "dataset_name": str(words)},
         "task_type causal_lm: the model"),
        ({"model_name_or_path": family_paths["vit"], "task_type": "seq2seq", "dataset_name": str(words)}, "model_type 'vit'"),
        ({"model_name_or_path": family_paths["seq2seq"], "task_type": "seq2seq", "dataset_name": str(images)},
         "seq2seq data needs a input column"),
        ({"model_name_or_path": family_paths["vit"], "task_type": "image_classification", "dataset_name": str(images),
          "mode": "evaluate"}, f"image {str(broken)!r} cannot be opened"),
    ]
    for keys, message in cases:
        caplog.clear()
        assert predict_program(tmp_path, **keys) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and message in errors[0] and "\n" not in errors[0], errors
        assert not os.path.exists(tmp_path / "out")


# --- data ---------------------------------------------------------------------------------------------------------


def test_image_data_from_folders_parquet_bytes_and_the_download_program(image_rows, tmp_path):
    from modelmerge.data import class_names, load_split
    from modelmerge.download import DownloadConfig, download

    folder = os.path.dirname(os.path.dirname(os.path.dirname(image_rows[0]["image"])))  # <root>/train/<class>/<i>.png
    from_folders = load_split(folder, "train", task_type="image_classification")
    assert class_names(from_folders) == sorted(CLASSES)
    by_name = {os.path.basename(os.path.dirname(r["image"])) + "/" + os.path.basename(r["image"]): r for r in image_rows}
    for row in from_folders:
        key = "/".join(row["image"].split(os.sep)[-2:])
        assert sorted(CLASSES)[row["label"]] == CLASSES[by_name[key]["label"]]
    assert len(load_split(folder, "train[:4]", task_type="image_classification")) == 4

    # a Hub-style parquet file: image bytes under other column names, mapped by `columns`
    hub = datasets.Dataset.from_dict(
        {"img": [{"bytes": open(r["image"], "rb").read(), "path": None} for r in image_rows],
         "fine_label": [r["label"] for r in image_rows]},
        features=datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=CLASSES)}))
    hub.to_parquet(str(tmp_path / "hub.parquet"))
    columns = {"image": "img", "label": "fine_label"}
    out = tmp_path / "materialised"
    download(DownloadConfig(dataset_name=str(tmp_path / "hub.parquet"), splits=["test"], output_dir=str(out),
                            task_type="image_classification", columns=columns))
    assert json.loads((out / "class_names.json").read_text()) == CLASSES
    loaded = load_split(str(out), "test", task_type="image_classification")
    assert class_names(loaded) == CLASSES and loaded["label"] == [r["label"] for r in image_rows]
    for row, original in zip(loaded, image_rows):
        assert os.path.isabs(row["image"]) and open(row["image"], "rb").read() == open(original["image"], "rb").read()


def test_sequence_columns_are_mapped(tmp_path):
    from modelmerge.data import load_split

    write_jsonl(str(tmp_path / "qa.jsonl"), [{"question": "copy red", "answer": "red", "id": 1}])
    assert list(load_split(str(tmp_path / "qa.jsonl"), "train", task_type="seq2seq")) == [{"input": "copy red", "target": "red"}]
    write_jsonl(str(tmp_path / "x.jsonl"), [{"q": "copy red", "a": "red"}])
    rows = load_split(str(tmp_path / "x.jsonl"), "train", task_type="causal_lm", columns={"input": "q", "target": "a"})
    assert list(rows) == [{"input": "copy red", "target": "red"}]
