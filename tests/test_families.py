"""seq2seq (T5), causal LM (GPT-2) and image classifiers (ViT, CLIP zero-shot head) through statistics, evaluation
and training, each against an independent computation written out here from families.md: the batched Fisher
against a one-example loop, Gram matrices against XᵀX of the test's own hooks, metrics against a hand-written
greedy decoding and NLL."""
import json
import math
import os

import datasets
import pytest
import torch
from peft import LoraConfig, get_peft_model
from PIL import Image
from torch import nn

from modelmerge import families
from modelmerge.config import run_program
from modelmerge.prediction import PredictConfig, evaluate_sequences, load_for_task, run
from modelmerge.statistics import compute_fisher, compute_gram
from modelmerge.training import TrainConfig, train
from test_fisher import assert_same_fisher
from tiny import (COLOURS, colour_images, make_tiny_clip, make_tiny_gpt2, make_tiny_t5, make_tiny_vit, word_tasks,
                  write_jsonl)

CLASSES = list(COLOURS)
MODELS = {"seq2seq": make_tiny_t5, "causal_lm": make_tiny_gpt2, "vit": make_tiny_vit, "clip": make_tiny_clip}
TASK = {"seq2seq": "seq2seq", "causal_lm": "causal_lm", "vit": "image_classification", "clip": "image_classification"}


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: make(str(root / name), seed=2) for name, make in MODELS.items()}


@pytest.fixture(scope="module")
def text_rows():
    return word_tasks(10, seed=1, kind="reverse")


@pytest.fixture(scope="module")
def image_rows(tmp_path_factory):
    return colour_images(str(tmp_path_factory.mktemp("images") / "train"), per_class=3)


def rows_of(name, text_rows, image_rows):
    return image_rows if TASK[name] == "image_classification" else text_rows


def load(paths, name, peft=None):
    model, processor = load_for_task(paths[name], TASK[name], class_names=CLASSES)
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


# --- the definitions of families.md, written out one example at a time ------------------------------------------


def example_inputs(name, processor, row):
    """(model inputs of one example, [positions], scored token ids or None for classifiers)."""
    if TASK[name] == "image_classification":
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


def inverse_cdf(logits, uniform):
    cumulative = 0.0
    for token, probability in enumerate(torch.softmax(logits.double(), -1).tolist()):
        cumulative += probability
        if cumulative >= uniform:
            return token
    return len(logits) - 1


def loop_fisher(name, model, processor, rows, empirical, seed=0):
    """Batch of one, log-likelihood summed over the scored tokens, backward, square, accumulate."""
    examples = [example_inputs(name, processor, row) for row in rows]
    if examples[0][2] is None:
        uniforms = torch.rand(len(rows), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)[:, None]
    else:
        most = max(len(tokens) for _, _, tokens in examples)
        uniforms = torch.rand(len(rows), most, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    parameters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    sums = {n: torch.zeros_like(p) for n, p in parameters.items()}
    labels = []
    for i, ((inputs, positions, tokens), row) in enumerate(zip(examples, rows)):
        model.zero_grad()
        logits = model(**inputs).logits[0]
        if tokens is None:
            label = row["label"] if empirical else inverse_cdf(logits.detach(), uniforms[i, 0])
            log_likelihood = logits.log_softmax(-1)[label]
            labels.append(label)
        else:
            chosen = [t if empirical else inverse_cdf(logits[p].detach(), uniforms[i, j])
                      for j, (p, t) in enumerate(zip(positions, tokens))]
            log_likelihood = sum(logits[p].log_softmax(-1)[t] for p, t in zip(positions, chosen))
            labels.append(chosen)
        log_likelihood.backward()
        for n, p in parameters.items():
            if p.grad is not None:
                sums[n] += p.grad**2
    return {n: s / len(rows) for n, s in sums.items()}, labels


@pytest.mark.parametrize("name, empirical, peft", [
    ("seq2seq", False, None), ("seq2seq", True, None), ("seq2seq", False, "lora"),
    ("causal_lm", False, None), ("causal_lm", True, None), ("causal_lm", False, "lora"),
    ("vit", False, None), ("vit", True, "lora"), ("clip", False, None), ("clip", False, "lora"),
])
def test_batched_fisher_equals_the_one_example_loop(paths, text_rows, image_rows, name, empirical, peft):
    rows = rows_of(name, text_rows, image_rows)
    model, processor = load(paths, name, peft)
    result = compute_fisher(model, processor, datasets.Dataset.from_list(rows), empirical=empirical, batch_size=4,
                            seed=3, task_type=TASK[name])
    expected, labels = loop_fisher(name, model, processor, rows, empirical, seed=3)
    labels_found = result.labels.tolist() if torch.is_tensor(result.labels) else result.labels
    assert labels_found == labels
    if name == "clip":  # the text tower and the logit scale are frozen: the Fisher covers the vision side
        assert expected and all(n.startswith(("vision_model", "visual_projection", "base_model.model.vision_model"))
                                for n in expected)
    if peft:
        assert any("lora_" in n for n in expected)
    assert_same_fisher(result.fisher, expected)


def test_t5_relative_position_bias_gets_its_per_example_share(paths, text_rows):
    """The bias embedding is shared by the batch; its Fisher is a sum of per-example squares, not the square of
    the batch's sum (which a shared [1, heads, q, k] bias would give)."""
    model, processor = load(paths, "seq2seq")
    dataset = datasets.Dataset.from_list(text_rows)
    fisher = compute_fisher(model, processor, dataset, batch_size=5, task_type="seq2seq").fisher
    name = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    expected, _ = loop_fisher("seq2seq", model, processor, text_rows, empirical=False)
    torch.testing.assert_close(fisher[name], expected[name], rtol=1e-6, atol=0)
    assert fisher[name].abs().sum() > 0


@pytest.mark.parametrize("name", ["seq2seq", "causal_lm", "vit"])
def test_gram_equals_x_transpose_x_over_the_non_padding_positions(paths, text_rows, image_rows, name):
    rows = rows_of(name, text_rows, image_rows)
    model, processor = load(paths, name)
    result = compute_gram(model, processor, datasets.Dataset.from_list(rows), batch_size=4, task_type=TASK[name],
                          empirical=True)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}
    # a tied output layer's Gram is saved under its weight's parameter name (T5's lm_head under shared.weight)
    weight_names = {id(p): n for n, p in model.named_parameters()}
    key = {n: weight_names[id(m.weight)] for n, m in layers.items()}
    expected = {key[n]: 0 for n in layers}
    seen = {}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: seen.setdefault(n, []).append(a[0].detach()))
             for n, m in layers.items()]
    for row in rows:  # one example at a time: no padding at all
        seen.clear()
        inputs, _, _ = example_inputs(name, processor, row)
        with torch.no_grad():
            model(**inputs)
        for n, xs in seen.items():
            for x in xs:
                x = x.reshape(-1, x.shape[-1]).double()
                expected[key[n]] = expected[key[n]] + x.T @ x
    for hook in hooks:
        hook.remove()
    assert set(result.input_gram) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(result.input_gram[key], value, rtol=1e-9, atol=1e-9, msg=key)


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
def test_sequence_metrics_equal_a_hand_computation(paths, text_rows, name):
    model, processor = load(paths, name)
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
def test_image_accuracy_equals_the_argmax_of_a_hand_computation(paths, image_rows, tmp_path, name):
    folder = tmp_path / "data"
    write_jsonl(str(folder / "test.jsonl"), [{"image": os.path.relpath(r["image"], folder), "label": r["label"]}
                                             for r in image_rows])
    (folder / "class_names.json").write_text(json.dumps(CLASSES))
    config = PredictConfig(model_name_or_path=paths[name], output_dir=str(tmp_path / "out"), dataset_name=str(folder),
                           split="test", method="evaluate", task_type="image_classification", batch_size=4)
    run(config)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    model, processor = load_for_task(paths[name], "image_classification", class_names=CLASSES)
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
def test_training_lowers_the_loss_and_writes_loadable_models(paths, image_rows, tmp_path, name, peft):
    if TASK[name] == "image_classification":
        data = str(tmp_path / "images")
        colour_images(os.path.join(data, "train"), per_class=4, seed=1)
        colour_images(os.path.join(data, "validation"), per_class=2, seed=2)
    else:
        data = text_data(tmp_path)
    config = TrainConfig(output_dir=str(tmp_path / "run"), dataset_name=data, model_name_or_path=paths[name],
                         task_type=TASK[name], learning_rate=3e-3, warmup_steps=0, num_train_epochs=3,
                         per_device_train_batch_size=4, lr_scheduler_type="constant", logging_steps=1, peft=peft,
                         num_threads=1, max_length=64)  # the tiny GPT-2 has 64 positions
    trainer = train(config)
    losses = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
    assert len(losses) == 3 and losses[-1] < losses[0]
    model, _ = load_for_task(str(tmp_path / "run" / "best"), TASK[name], class_names=CLASSES)
    assert (peft is None) == (not hasattr(model, "peft_config"))
    if name == "clip":  # the text tower is frozen: unchanged in the saved model
        before, _ = load_for_task(paths[name], TASK[name], class_names=CLASSES)
        assert torch.equal(model.text_model.embeddings.token_embedding.weight,
                           before.text_model.embeddings.token_embedding.weight)
        assert not torch.equal(model.visual_projection.weight, before.visual_projection.weight)


# --- bad input -------------------------------------------------------------------------------------------------------


def predict_program(tmp_path, **keys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"output_dir": str(tmp_path / "out"), "split": "test", **keys}))
    return run_program(PredictConfig, run, "predict", [str(path)])


def test_bad_input_is_one_line_and_leaves_no_output(paths, image_rows, tmp_path, caplog):
    words = tmp_path / "w.jsonl"
    write_jsonl(str(words), word_tasks(4))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    images = tmp_path / "i.jsonl"
    write_jsonl(str(images), [{"image": str(broken), "label": 0}] + image_rows[:2])
    cases = [
        ({"model_name_or_path": paths["seq2seq"], "task_type": "causal_lm", "dataset_name": str(words)},
         "task_type causal_lm: the model"),
        ({"model_name_or_path": paths["vit"], "task_type": "seq2seq", "dataset_name": str(words)}, "model_type 'vit'"),
        ({"model_name_or_path": paths["seq2seq"], "task_type": "seq2seq", "dataset_name": str(images)},
         "seq2seq data needs a input column"),
        ({"model_name_or_path": paths["vit"], "task_type": "image_classification", "dataset_name": str(images),
          "method": "evaluate"}, f"image {str(broken)!r} cannot be opened"),
    ]
    for keys, message in cases:
        caplog.clear()
        assert predict_program(tmp_path, **keys) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and message in errors[0] and "\n" not in errors[0], errors
        assert not os.path.exists(tmp_path / "out")


# --- data ---------------------------------------------------------------------------------------------------------


def test_image_data_from_folders_parquet_bytes_and_the_download_program(image_rows, tmp_path):
    from modelmerge.data import DownloadConfig, class_names, download, load_split

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


# --- merges of every family's statistics: tests/test_family_merges.py ----------------------------------------------


def test_della_ranks_a_conv_kernel_within_each_filter():
    """ViT/CLIP patch embeddings are 4-D [filters, channels, h, w]: DELLA ranks |δ| within each filter."""
    from modelmerge.methods.della import keep_probabilities

    delta = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    found = keep_probabilities(delta, density=0.5, epsilon=0.1)
    flat = delta.reshape(4, -1).abs()
    ranks = flat.argsort(1).argsort(1).double()
    torch.testing.assert_close(found, (0.4 + ranks / 11 * 0.2).reshape(delta.shape).to(found.dtype))
