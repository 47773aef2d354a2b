"""Data loading, the download program and the atomic output helpers, against rows read directly from the files."""
import json
import os
import re

import pandas as pd
import pytest

from modelmerge import atomic
from modelmerge.config import run_program
from modelmerge.data import DataError, dataloader, load_split
from modelmerge.download import DownloadConfig, download
from tiny import make_tiny_bert, read_jsonl, tiny_data_dir


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tiny_data_dir(tmp_path_factory.mktemp("data"))


def rows(dataset):
    return [{"text": r["text"], "label": r["label"]} for r in dataset]


def test_task_split_and_slices(data_dir):
    train = read_jsonl(os.path.join(data_dir, "sst2", "train.jsonl"))
    assert rows(load_split("sst2", "train", data_dir)) == train
    assert rows(load_split("sst2", "train[:10]", data_dir)) == train[:10]
    assert rows(load_split("sst2", "train[40:]", data_dir)) == train[40:]
    assert rows(load_split("sst2", "train[:25%]", data_dir)) == train[:12]


def test_data_dir_from_environment(data_dir, monkeypatch):
    monkeypatch.setenv("MERGE_DATA_DIR", data_dir)
    expected = read_jsonl(os.path.join(data_dir, "rotten_tomatoes", "test.jsonl"))[:3]
    assert rows(load_split("rotten_tomatoes", "test[:3]")) == expected


def test_mixture_concatenates_in_order(data_dir):
    sst2 = read_jsonl(os.path.join(data_dir, "sst2", "train.jsonl"))
    rt = read_jsonl(os.path.join(data_dir, "rotten_tomatoes", "validation.jsonl"))
    mixture = load_split("sst2;rotten_tomatoes", "train[:5];validation[2:4]", data_dir)
    assert rows(mixture) == sst2[:5] + rt[2:4]


def test_local_files_and_hub_column_names(tmp_path):
    source = [{"sentence": f"sentence {i}", "label": i % 2, "idx": i} for i in range(10)]
    frame = pd.DataFrame(source)
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet")
    with open(tmp_path / "d.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in source)
    expected = [{"text": r["sentence"], "label": r["label"]} for r in source]
    for name in ("d.csv", "d.parquet", "d.jsonl"):
        assert rows(load_split(str(tmp_path / name), "train")) == expected
        assert rows(load_split(str(tmp_path / name), "test[3:5]")) == expected[3:5]  # a file's one split


def test_folder_of_splits(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "validation.jsonl").write_text('{"content": "good", "label": 1}\n{"content": "bad", "label": 0}\n')
    assert rows(load_split(str(folder), "validation")) == [{"text": "good", "label": 1}, {"text": "bad", "label": 0}]


@pytest.mark.parametrize("name, split, message", [
    ("sst2", "nosuch", "has no split 'nosuch'"),
    ("nosuch", "train", "dataset 'nosuch'"),
    ("sst2;rotten_tomatoes", "train", "needs one split per dataset"),
    ("sst2", "train[abc]", "'train[abc]'"),
    ("sst2", "train[1000:]", "train[1000:]"),
    ("sst2", "train[:5", "expected NAME or NAME[slice]"),
])
def test_bad_names_and_splits(data_dir, name, split, message):
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_split(name, split, data_dir)


@pytest.mark.parametrize("labels, message", [
    (['"1"', '"0"'], "column 'sentiment' holds string labels ('0', '1'), not class indices"),
    (["true", "false"], "column 'sentiment' holds bool labels (False, True), not class indices"),
    (['"positive"', '"negative"'], "column 'sentiment' holds string labels ('negative', 'positive')"),
    (["1.5", "0"], "column 'sentiment': labels must be whole numbers"),
])
def test_labels_that_are_not_class_indices_are_refused(tmp_path, labels, message):
    """Issue 21: "1"/"0" and booleans were cast to 1/0 silently."""
    lines = [f'{{"text": "t{i}", "sentiment": {label}}}' for i, label in enumerate(labels)]
    (tmp_path / "x.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=re.escape(message)) as error:
        load_split(str(tmp_path / "x.jsonl"), "train", columns={"label": "sentiment"})
    assert "\n" not in str(error.value)


def test_integer_and_whole_float_labels_are_class_indices(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"text": "a", "label": 1.0}\n{"text": "b", "label": 0.0}\n')
    dataset = load_split(str(tmp_path / "x.jsonl"), "train")
    assert dataset["label"] == [1, 0] and dataset.features["label"].dtype == "int64"


def test_missing_columns_named(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"words": "a", "label": 1}\n')
    with pytest.raises(DataError, match="needs a text column.*found \\['words', 'label'\\]"):
        load_split(str(tmp_path / "x.jsonl"), "train")


def test_dataloader_pads_and_keeps_labels(data_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(make_tiny_bert(tmp_path / "m"))
    dataset = load_split("sst2", "validation[:6]", data_dir)
    batches = list(dataloader(dataset, tokenizer, batch_size=4, max_length=8))
    assert [len(b["labels"]) for b in batches] == [4, 2]
    assert [int(v) for b in batches for v in b["labels"]] == dataset["label"]
    first = batches[0]
    for i, text in enumerate(dataset["text"][:4]):
        ids = tokenizer(text, truncation=True, max_length=8)["input_ids"]
        assert first["input_ids"][i, : len(ids)].tolist() == ids
        assert first["attention_mask"][i].tolist() == [1] * len(ids) + [0] * (first["input_ids"].shape[1] - len(ids))


def test_download_writes_split_files(data_dir, tmp_path):
    out = tmp_path / "out"
    download(DownloadConfig("sst2;rotten_tomatoes", ["train[:4];train[:2]", "test[:3];test[:1]"], str(out), data_dir))
    sst2 = lambda s: read_jsonl(os.path.join(data_dir, "sst2", s))  # noqa: E731
    rt = lambda s: read_jsonl(os.path.join(data_dir, "rotten_tomatoes", s))  # noqa: E731
    assert sorted(os.listdir(out)) == [".written-by", "test.jsonl", "train.jsonl"]
    assert read_jsonl(out / "train.jsonl") == sst2("train.jsonl")[:4] + rt("train.jsonl")[:2]
    assert read_jsonl(out / "test.jsonl") == sst2("test.jsonl")[:3] + rt("test.jsonl")[:1]
    assert rows(load_split(str(out), "train")) == read_jsonl(out / "train.jsonl")  # usable as a dataset name


@pytest.mark.parametrize("config, message", [
    ({"dataset_name": "sst2", "splits": ["train"], "output_dir": "OUT", "extra": 1}, "unknown key(s) extra"),
    ({"dataset_name": "sst2", "output_dir": "OUT"}, "missing required key(s) splits"),
    ({"dataset_name": "sst2", "splits": "train", "output_dir": "OUT"}, "splits must be a list"),
    ({"dataset_name": "sst2", "splits": ["train", "validation", "nosuch"], "output_dir": "OUT"}, "no split 'nosuch'"),
    ({"dataset_name": "sst2", "splits": ["train[:2]", "train[2:]"], "output_dir": "OUT"}, "same file twice"),
])
def test_download_bad_configs_leave_nothing(data_dir, tmp_path, caplog, config, message):
    out = tmp_path / "out"
    config = {k: str(out) if v == "OUT" else v for k, v in config.items()} | {"data_dir": data_dir}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert run_program(DownloadConfig, download, "download", [str(path)]) == 2
    assert message in caplog.text
    assert os.listdir(tmp_path) == ["config.json"]


def test_atomic_dir_replaces_on_success_and_keeps_old_on_failure(tmp_path):
    target = tmp_path / "folder"
    with atomic.atomic_dir(target) as tmp:
        (open(os.path.join(tmp, "a"), "w")).write("1")
    with pytest.raises(RuntimeError):
        with atomic.atomic_dir(target) as tmp:
            open(os.path.join(tmp, "b"), "w").write("2")
            raise RuntimeError("interrupted")
    assert os.listdir(target) == ["a"]
    with atomic.atomic_dir(target) as tmp:
        open(os.path.join(tmp, "c"), "w").write("3")
    assert os.listdir(target) == ["c"]
    atomic.write_json(tmp_path / "x.json", {"k": 1})
    with pytest.raises(ValueError):
        with atomic.atomic_file(tmp_path / "x.json") as tmp:
            open(tmp, "w").write("partial")
            raise ValueError
    assert json.loads((tmp_path / "x.json").read_text()) == {"k": 1}
    assert sorted(os.listdir(tmp_path)) == ["folder", "x.json"]  # no temporary leftovers
