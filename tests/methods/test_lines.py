"""LiNeS (Wang et al., ICLR 2025) as an option of any merge with θ_0: the per-layer factors against the
paper's α + β·ℓ/(L−1), the paper's α = ‖Σ_t τ_t‖₁ / (T·‖τ‖₁) by default, composed with task arithmetic and
TIES through code/merge.py (also merged in blocks of rows), and bad input as one line, nothing written."""
import glob
import re

import merge as merge_program
import pytest
import torch
from safetensors.torch import load_file
from tiny import make_tiny_bert, perturbed_copy

from modelmerge.merging.cli import run_cli
from modelmerge.methods.lines import layer_depths, layer_scales

LAYERS = 3


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("lines")
    base = make_tiny_bert(str(root / "base"), seed=0, num_hidden_layers=LAYERS)
    return base, [perturbed_copy(base, str(root / f"ft{i}"), seed=i, scale=0.05) for i in (1, 2, 3)]


def tensors(folder):
    return {k: v for path in sorted(glob.glob(f"{folder}/*.safetensors")) for k, v in load_file(path).items()}


def merge(zoo, folder, method, *parameters):
    base, models = zoo
    run_cli(merge_program.main, ["--merge", method, "--models", *models, "--ancestor", base, *parameters,
                                 "--output", str(folder), "--no_progress"])
    return tensors(folder)


def depth(name):
    """ℓ/(L−1) of a BERT encoder layer's tensor, written out for this test; None elsewhere."""
    match = re.match(r"bert\.encoder\.layer\.(\d+)\.", name)
    return None if match is None else int(match.group(1)) / (LAYERS - 1)


def test_layer_depths_count_each_stack_of_layers_on_its_own():
    names = ["embed.weight", "encoder.block.0.w", "encoder.block.1.w", "encoder.block.2.layer.1.w",
             "decoder.block.0.w", "decoder.block.1.w", "head.0.w", "head.3.w", "single.0.w"]
    assert layer_depths(names) == {"encoder.block.0.w": 0.0, "encoder.block.1.w": 0.5, "encoder.block.2.layer.1.w": 1.0,
                                   "decoder.block.0.w": 0.0, "decoder.block.1.w": 1.0, "single.0.w": 0.0}
    scales = layer_scales(names, 0.2, 0.6)
    assert scales["embed.weight"] == scales["head.3.w"] == 0.2 and scales["encoder.block.1.w"] == pytest.approx(0.5)
    assert scales["decoder.block.1.w"] == pytest.approx(0.8)


@pytest.mark.parametrize("family,stacks", [
    ("make_tiny_t5", {"encoder.block.", "decoder.block."}), ("make_tiny_gpt2", {"transformer.h."}),
    ("make_tiny_vit", {"vit.encoder.layer."}), ("make_tiny_clip", {"vision_model.encoder.layers.", "text_model.encoder.layers."}),
])
def test_every_familys_layers_are_found(tmp_path, family, stacks):
    import tiny
    names = list(tensors(getattr(tiny, family)(str(tmp_path / family))))
    depths = layer_depths(names)
    assert {re.match(r"^(.*?\.)\d+\.", name).group(1) for name in depths} == stacks
    assert set(depths.values()) == {0.0, 1.0}  # two layers per stack in the tiny models
    assert all(not re.search(r"\.\d+\.", name) for name in set(names) - set(depths))  # the rest: embeddings, heads


@pytest.mark.parametrize("blocks", [False, True])
def test_task_arithmetic_with_lines_scales_each_layer_by_the_papers_factor(zoo, tmp_path, monkeypatch, blocks):
    if blocks:  # elementwise methods then see blocks of rows, and the α pass sums the norms over them
        from modelmerge.merging import execute
        monkeypatch.setattr(execute, "BLOCK_BYTES", 2048)
    base, models = zoo
    ancestor, inputs = tensors(base), [tensors(m) for m in models]
    for alpha in (0.25, None):  # None: the paper's α, which is 1/T for task arithmetic
        out = merge(zoo, tmp_path / f"out{alpha}", "task_arithmetic", "--x:lines_beta", "0.6",
                    *([] if alpha is None else ["--x:lines_alpha", str(alpha)]))
        expected_alpha = 1 / 3 if alpha is None else alpha
        seen_layers = set()
        for name, tensor in out.items():
            if not tensor.is_floating_point():
                continue
            summed = sum(m[name].double() - ancestor[name].double() for m in inputs)
            scale = expected_alpha + 0.6 * (depth(name) or 0.0)
            seen_layers.add(depth(name))
            torch.testing.assert_close(tensor.double(), ancestor[name].double() + scale * summed, rtol=1e-5, atol=1e-6)
        assert seen_layers == {None, 0.0, 0.5, 1.0}


def test_ties_with_lines_scales_the_ties_task_vector_and_its_alpha_is_the_papers(zoo, tmp_path):
    base, models = zoo
    ancestor, inputs = tensors(base), [tensors(m) for m in models]
    plain = merge(zoo, tmp_path / "ties", "ties", "--x:density", "0.3")
    lined = merge(zoo, tmp_path / "lines", "ties", "--x:density", "0.3", "--x:lines_beta", "0.5")
    floats = [name for name, t in plain.items() if t.is_floating_point()]
    summed = sum(float(sum(m[n].double() - ancestor[n].double() for m in inputs).abs().sum()) for n in floats)
    merged = sum(float((plain[n].double() - ancestor[n].double()).abs().sum()) for n in floats)
    alpha = summed / (3 * merged)
    assert 0.34 < alpha < 1  # TIES's disjoint mean is smaller than the sum: α is not 1/T
    for name in floats:
        scale = alpha + 0.5 * (depth(name) or 0.0)
        torch.testing.assert_close(lined[name].double(), ancestor[name].double()
                                   + scale * (plain[name].double() - ancestor[name].double()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arguments,message", [
    (["--merge", "linear", "--x:lines_beta", "0.5"], "LiNeS (lines_beta) scales task vectors θ − θ_0: it needs an --ancestor"),
    (["--merge", "task_arithmetic", "--x:lines_alpha", "0.5", "ANCESTOR"], "parameter 'lines_alpha' is LiNeS's α: give lines_beta too"),
    (["--merge", "ties", "--x:lines_beta", "-1", "ANCESTOR"], "parameter 'lines_beta' of method ties must lie in [0, inf), got -1.0"),
])
def test_bad_lines_input_is_one_line_and_writes_nothing(zoo, tmp_path, capsys, arguments, message):
    base, models = zoo
    arguments = [a for a in arguments if a != "ANCESTOR"] + (["--ancestor", base] if "ANCESTOR" in arguments else [])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(merge_program.main, [*arguments, "--models", *models, "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_help_lists_lines(merge_help):
    assert "LiNeS (Wang et al., ICLR 2025), with any method given θ_0" in merge_help and "--x:lines_beta (float" in merge_help
