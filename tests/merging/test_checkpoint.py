"""Reading every checkpoint layout lazily and writing safetensors incrementally (modelmerge.io)."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from modelmerge.io.formats import CheckpointError, TensorInfo
from modelmerge.io.reading import open_checkpoint, open_statistics
from modelmerge.io.shards import parse_size
from modelmerge.io.writing import open_output


def _tensors(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(4, 3, generator=generator),
        "b.bias": torch.randn(5, generator=generator),
        "c.half": torch.randn(2, 2, generator=generator).to(torch.bfloat16),
        "d.ids": torch.arange(7),
        "e.scalar": torch.tensor(3.5, dtype=torch.float64),
    }


def _assert_reads(checkpoint, expected):
    assert sorted(checkpoint.names) == sorted(expected)
    for name, tensor in expected.items():
        assert checkpoint.info(name) == TensorInfo(tuple(tensor.shape), tensor.dtype)
        assert torch.equal(checkpoint.get(name), tensor)


def test_reads_bare_files_and_model_folders(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / "bare.safetensors")
    torch.save(tensors, tmp_path / "bare.pt")
    torch.save({"state_dict": tensors}, tmp_path / "wrapped.pt")
    (tmp_path / "bin").mkdir()
    torch.save(tensors, tmp_path / "bin" / "pytorch_model.bin")
    for path, kind in (("bare.safetensors", "file"), ("bare.pt", "file"), ("wrapped.pt", "file"), ("bin", "model")):
        checkpoint = open_checkpoint(str(tmp_path / path))
        assert checkpoint.kind == kind
        _assert_reads(checkpoint, tensors)


def test_reads_sharded_folders_through_their_index(tmp_path):
    tensors = _tensors()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    for file, members in shards.items():
        save_file({n: tensors[n] for n in members}, tmp_path / file)
    weight_map = {n: file for file, members in shards.items() for n in members}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    checkpoint = open_checkpoint(str(tmp_path))
    _assert_reads(checkpoint, tensors)
    assert checkpoint.file_of(names[3]).endswith("model-00002-of-00002.safetensors")


def test_release_closes_the_mapping_and_reading_reopens_it(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / "m.safetensors")
    checkpoint = open_checkpoint(str(tmp_path / "m.safetensors"))
    first = checkpoint.get("a.weight")
    checkpoint.release()
    assert torch.equal(first, tensors["a.weight"])  # a tensor read before keeps its data
    assert torch.equal(checkpoint.get("b.bias"), tensors["b.bias"])


def test_adapter_folders_and_statistics_folders(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file({"base_model.model.x.lora_A.weight": torch.ones(2, 3)}, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 2, "peft_type": "LORA"}))
    checkpoint = open_checkpoint(str(adapter))
    assert checkpoint.kind == "adapter" and checkpoint.adapter_config["r"] == 2

    fisher = tmp_path / "fisher"
    (fisher / "hessian").mkdir(parents=True)
    save_file({"w": torch.ones(2)}, fisher / "fisher.safetensors")
    save_file({"w": torch.full((2,), 9.0)}, fisher / "hessian" / "model.safetensors")
    statistics = open_statistics(str(fisher))
    assert torch.equal(statistics.get("fisher", primary="fisher").get("w"), torch.ones(2))
    assert statistics.get("gram", primary="fisher") is None
    # the hessian/ subfolder, or a folder holding only it, serves as the Fisher too
    assert torch.equal(open_statistics(str(fisher / "hessian")).get("fisher", "fisher").get("w"), torch.full((2,), 9.0))
    os.remove(fisher / "fisher.safetensors")
    assert torch.equal(open_statistics(str(fisher)).get("fisher", "fisher").get("w"), torch.full((2,), 9.0))

    gram = tmp_path / "gram"
    gram.mkdir()
    save_file({"w": torch.eye(2, dtype=torch.float64)}, gram / "gram.safetensors")
    save_file({"w": torch.eye(3, dtype=torch.float64)}, gram / "output_grad_gram.safetensors")
    statistics = open_statistics(str(gram))
    assert statistics.get("output_grad_gram", primary="gram").info("w").shape == (3, 3)
    assert statistics.get("fisher", primary="gram") is None


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "no such file or folder"),
    (lambda p: p.mkdir(), "no weights found"),
    (lambda p: p.write_bytes(b"not a safetensors file"), "not a readable safetensors file"),
])
def test_unreadable_inputs_name_the_path(tmp_path, make, message):
    path = tmp_path / ("broken.safetensors" if "readable" in message else "missing")
    make(path)
    with pytest.raises(CheckpointError, match=message) as error:
        open_checkpoint(str(path))
    assert str(path) in str(error.value)


class Payload:  # anything but tensors and plain containers needs unpickling code, which weights_only refuses
    pass


def test_torch_files_are_loaded_with_weights_only(tmp_path):
    torch.save({"x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="evil.pt"):
        open_checkpoint(str(tmp_path / "evil.pt"))


def test_stream_written_files_read_back_exactly(tmp_path):
    tensors = _tensors()
    entries = [(n, TensorInfo(tuple(t.shape), t.dtype)) for n, t in tensors.items()]
    with open_output(str(tmp_path / "out.safetensors"), entries, "file") as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    loaded = load_file(tmp_path / "out.safetensors")
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[n], t) for n, t in tensors.items())
    with safe_open(tmp_path / "out.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_model_folders_are_sharded_with_an_index_and_get_the_other_files(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"num_hidden_layers": 4, "dtype": "float32"}))
    (source / "tokenizer.json").write_text("{}")
    save_file({"ignored": torch.zeros(1)}, source / "model.safetensors")
    tensors = {f"t{i}": torch.full((10,), float(i)) for i in range(5)}  # 40 bytes each
    entries = [(n, TensorInfo((10,), torch.float32)) for n in tensors]
    with open_output(str(tmp_path / "out"), entries, "model", files_from=str(source), max_shard_bytes=100,
                     json_updates={"config.json": {"num_hidden_layers": 2}}) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == ["config.json", "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                                       "model-00003-of-00003.safetensors", "model.safetensors.index.json", "tokenizer.json"]
    assert json.loads((out / "config.json").read_text()) == {"num_hidden_layers": 2, "dtype": "float32"}
    checkpoint = open_checkpoint(str(out))
    assert all(torch.equal(checkpoint.get(n), t) for n, t in tensors.items())


def test_a_failed_or_incomplete_write_leaves_nothing(tmp_path):
    entries = [("a", TensorInfo((2,), torch.float32)), ("b", TensorInfo((2,), torch.float32))]
    with pytest.raises(RuntimeError, match="before every output tensor"):
        with open_output(str(tmp_path / "out"), entries, "model") as writer:
            writer.write("a", torch.zeros(2))
    with pytest.raises(ZeroDivisionError):
        with open_output(str(tmp_path / "out.safetensors"), entries, "file") as writer:
            writer.write("a", torch.zeros(2))
            1 / 0
    with pytest.raises(RuntimeError, match="expected tensor b"):
        with open_output(str(tmp_path / "out"), entries, "model") as writer:
            writer.write("a", torch.zeros(2))
            writer.write("b", torch.zeros(3))
    assert os.listdir(tmp_path) == []


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("500mb") == 500 * 10**6
    assert parse_size(1234) == 1234
    with pytest.raises(ValueError, match="not a size"):
        parse_size("lots")


def test_tensors_can_be_written_in_blocks_of_rows(tmp_path):
    big, small = torch.arange(12.0).reshape(6, 2), torch.ones(3)
    entries = [("big", TensorInfo((6, 2), torch.float32)), ("small", TensorInfo((3,), torch.float32))]
    with open_output(str(tmp_path / "out.safetensors"), entries, "file") as writer:
        for start in (0, 4):
            writer.write("big", big[start:start + 4])
        writer.write("small", small)
    loaded = load_file(tmp_path / "out.safetensors")
    assert torch.equal(loaded["big"], big) and torch.equal(loaded["small"], small)
    with pytest.raises(RuntimeError, match="from row 4"):
        with open_output(str(tmp_path / "bad.safetensors"), entries, "file") as writer:
            writer.write("big", big[:4])
            writer.write("big", big[:3])  # more rows than are left
