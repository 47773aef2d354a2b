"""train.py's and predict.py's configs share the data keys (modelmerge.data.DataKeys): the same keys, defaults,
accepted and refused values, and JSON round trips for both."""
import dataclasses
import json
import typing

import pytest

from modelmerge.config import ConfigError, from_dict, to_dict
from modelmerge.prediction.config import PredictConfig
from modelmerge.training import TrainConfig

DATA_KEYS = ("task_type", "text_column", "input_column", "target_column", "image_column", "label_column",
             "class_names", "data_dir", "max_length")
REQUIRED = {TrainConfig: {"output_dir": "out", "dataset_name": "sst2"},
            PredictConfig: {"model_name_or_path": "model", "output_dir": "out", "dataset_name": "sst2", "split": "test"}}
GIVEN = {"task_type": "image_classification", "image_column": "img", "label_column": "y", "class_names": ["cat", "dog"],
         "data_dir": "/data", "max_length": 77}
REFUSED = [("task_type", "regression"), ("text_column", 3), ("class_names", "cat"), ("class_names", [1, 2]),
           ("max_length", 0), ("max_length", 1.5), ("data_dir", False)]


def _build(cls, **keys):
    return from_dict(cls, {**REQUIRED[cls], **keys}, where="config")


@pytest.fixture(autouse=True)
def _no_data_dir(monkeypatch):
    monkeypatch.delenv("MERGE_DATA_DIR", raising=False)


def test_same_keys_types_and_defaults():
    for cls in (TrainConfig, PredictConfig):
        fields = {field.name: field.default for field in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        assert {key: fields[key] for key in DATA_KEYS} == {
            "task_type": "sequence_classification", "text_column": None, "input_column": None, "target_column": None,
            "image_column": None, "label_column": None, "class_names": None, "data_dir": None, "max_length": 384}
        assert hints["max_length"] is int and hints["class_names"] == list[str] | None


def test_both_accept_the_same_values_and_map_the_columns_alike():
    for cls in (TrainConfig, PredictConfig):
        config = _build(cls, **GIVEN)
        assert {key: getattr(config, key) for key in GIVEN} == GIVEN
        assert config.columns() == {"image": "img", "label": "y"}
        assert _build(cls, max_input_length=12).max_length == 12  # the authors' name of max_length


@pytest.mark.parametrize("key, value", REFUSED)
def test_both_refuse_the_same_values_with_the_same_message(key, value):
    messages = []
    for cls in (TrainConfig, PredictConfig):
        with pytest.raises(ConfigError) as error:
            _build(cls, **{key: value})
        messages.append(str(error.value))
    assert messages[0] == messages[1] and key in messages[0]


def test_data_dir_from_the_environment_in_both(monkeypatch):
    monkeypatch.setenv("MERGE_DATA_DIR", "/env/data")
    assert _build(TrainConfig).data_dir == _build(PredictConfig).data_dir == "/env/data"
    assert _build(TrainConfig, data_dir="/own").data_dir == _build(PredictConfig, data_dir="/own").data_dir == "/own"


def test_json_round_trip_of_both():
    for cls in (TrainConfig, PredictConfig):
        config = _build(cls, **GIVEN)
        written = json.loads(json.dumps(to_dict(config)))
        assert set(DATA_KEYS) <= set(written)
        assert from_dict(cls, written) == config
