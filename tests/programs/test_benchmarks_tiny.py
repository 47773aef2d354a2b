"""The benchmarks in a tiny mode, so that they cannot rot unseen, and the Fisher's parity with the peer libraries a
user would otherwise pick: BackPACK, Opacus and torch.func compute the same empirical Fisher as `compute_fisher`
(to float32 rounding) on every tensor they handle correctly; the tensors where a library is known to go wrong (a
position embedding broadcast over the batch: its gradient reaches the layer summed over the examples) are named."""
import importlib.util
import os
import subprocess
import sys

import datasets
import pytest
import torch

from safetensors.torch import load_file

from modelmerge.methods import TensorGroup, get_method
from modelmerge.statistics import compute_fisher
from sis_util import REPO
from tiny import (COLOURS, colour_images, make_tiny_bert, make_tiny_gpt2, make_tiny_t5, make_tiny_vit, perturbed_copy,
                  tiny_data_dir, word_tasks)

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import fisher_bench  # noqa: E402
import fisher_peers  # noqa: E402
import merge_bench  # noqa: E402

LIBRARIES = {"BackPACK": "backpack", "Opacus": "opacus", "torch.func": "torch"}
TASK = {"bert": "sequence_classification", "t5": "seq2seq", "gpt2": "causal_lm", "vit": "image_classification"}
# Where a library's result is known to differ from the per-example gradients' (tensors by name).
KNOWN_WRONG = {
    ("BackPACK", "bert"): {"bert.embeddings.position_embeddings.weight"},  # [1, tokens] ids broadcast over the batch
    ("Opacus", "bert"): {"bert.embeddings.position_embeddings.weight"},
    ("BackPACK", "gpt2"): {"transformer.wpe.weight", "transformer.wte.weight"},  # and tied to the LM head: each call
    ("Opacus", "gpt2"): {"transformer.wpe.weight"},  # squared on its own, the second overwriting the first
    ("BackPACK", "t5"): {"encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",  # [1, heads, q, k]
                         "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                         "shared.weight"},  # the encoder's and the decoder's embedding
    ("Opacus", "t5"): {"encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                       "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"},
}


def need(peer):
    if importlib.util.find_spec(LIBRARIES.get(peer, "torch")) is None:
        pytest.skip(f"{peer} is not installed (pip install --no-deps -r .ci/fisher_peers.txt)")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name → (model, processor, dataset) of a tiny model of each family and a few examples."""
    from modelmerge.data import load_split
    from modelmerge.prediction.loading import load_for_task

    root = tmp_path_factory.mktemp("peers")
    paths = {"bert": make_tiny_bert(str(root / "bert"), seed=1), "t5": make_tiny_t5(str(root / "t5"), seed=1),
             "gpt2": make_tiny_gpt2(str(root / "gpt2"), seed=1), "vit": make_tiny_vit(str(root / "vit"), seed=1)}
    text = datasets.Dataset.from_list(word_tasks(5, seed=2, kind="reverse"))
    data = {"bert": load_split("sst2", "train[:5]", tiny_data_dir(str(root / "data"))), "t5": text, "gpt2": text,
            "vit": datasets.Dataset.from_list(colour_images(str(root / "images"), per_class=2)[:5])}
    loaded = {}
    for name, path in paths.items():
        model, processor = load_for_task(path, TASK[name], class_names=list(COLOURS))
        loaded[name] = (model.eval(), processor, data[name])
    return loaded


@pytest.mark.parametrize("family", list(TASK))
@pytest.mark.parametrize("peer", list(fisher_peers.PEERS))
def test_peer_fisher_equals_ours(models, family, peer):
    need(peer)
    model, processor, dataset = models[family]
    ours = compute_fisher(model, processor, dataset, empirical=True, batch_size=2, task_type=TASK[family]).fisher
    found = fisher_peers.PEERS[peer](model, processor, dataset, TASK[family], 2, 64)
    assert not any(p.requires_grad is False for p in model.parameters()) and not model.training  # left as found
    covered, _, wrong = fisher_bench.compare(found, ours)
    assert {name for name, _ in wrong} == KNOWN_WRONG.get((peer, family), set())
    if peer == "BackPACK":  # its layers only: no LayerNorm, no GPT-2 Conv1D, no embedding with a padding index
        assert 0 < covered < len(ours)
    else:
        assert covered == len(ours)
    assert all(torch.isfinite(value).all() for value in found.values())


def test_peer_mode_runs_and_agrees(capsys):
    """fisher_bench --peers --tiny: every side's Fisher next to ours; torch.func and the authors' loop exact."""
    tables = fisher_bench.main(["--peers", "--tiny", "--models", "t5", "gpt2", "vit", "--family-examples", "4",
                                "--rounds", "1", "--batch-size", "2"])
    assert set(tables) == {"t5", "gpt2", "vit"}
    for name, (_, examples, results) in tables.items():
        assert examples == 4 and set(results) == {"ours", *fisher_peers.PEERS}
        ours = results["ours"]["fisher"]
        for side in ("authors' loop", "torch.func"):
            covered, difference, wrong = fisher_bench.compare(results[side]["fisher"], ours)
            assert (covered, wrong) == (len(ours), []) and difference < fisher_bench.EXACT
        assert all(result["seconds"] and result["error"] is None for result in results.values())
    table = capsys.readouterr().out
    assert table.count("| ours |") == 3 and "fastest exact peer library" in table


@pytest.mark.slow
def test_peer_processes_write_predict_format():
    """fisher_bench --peers --process: predict.py and a peer program, each a process writing fisher.safetensors."""
    need("Opacus")
    tables = fisher_bench.main(["--peers", "opacus", "--process", "--tiny", "--models", "vit", "--family-examples",
                                "3", "--rounds", "1", "--batch-size", "2"])
    _, _, results = tables["vit"]
    covered, difference, wrong = fisher_bench.compare(results["Opacus"]["fisher"], results["ours"]["fisher"])
    assert (covered, wrong) == (len(results["ours"]["fisher"]), []) and difference < fisher_bench.EXACT
    assert all(result["mib"][0] > 50 for result in results.values())  # peak RSS of a process that imports torch


def test_fusion_bench_tatr_is_ours_over_the_flattened_model(tmp_path):
    """fusion_bench_merge.py's TATR entry (its data-free form) on tiny BERT checkpoints: FusionBench takes the
    conflict's quantile over the whole model at once, so its merge is our TATR of the model as one flat tensor."""
    if not os.path.isdir(os.path.join(merge_bench.FUSION_BENCH, "fusion_bench")):
        pytest.skip(f"FusionBench is not installed in {merge_bench.FUSION_BENCH} (bash .ci/install.sh)")
    base = make_tiny_bert(str(tmp_path / "base"), seed=1)
    models = [perturbed_copy(base, str(tmp_path / f"ft{t}"), seed=t) for t in (1, 2, 3)]
    done = subprocess.run([sys.executable, merge_bench.FUSION_BENCH_DRIVER, "tatr", "--pretrained", base,
                           "--models", *models, "--output", str(tmp_path / "out")],
                          env=dict(os.environ, PYTHONPATH=merge_bench.FUSION_BENCH), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = load_file(str(tmp_path / "out" / "model.safetensors"))
    inputs = [load_file(os.path.join(path, "model.safetensors")) for path in (base, *models)]
    names = sorted(inputs[0])
    flat = [torch.cat([tensors[name].flatten() for name in names]) for tensors in inputs]
    sizes = [inputs[0][name].numel() for name in names]
    ours = get_method("tatr")().merge(TensorGroup("model", flat[1:], ancestor=flat[0]), merge_lambda=0.3,
                                      threshold_quantile=0.99).split(sizes)
    for name, merged in zip(names, ours):
        torch.testing.assert_close(theirs[name], merged.reshape(inputs[0][name].shape), rtol=0, atol=1e-7)
    kept = torch.cat(ours) != flat[0]
    assert 0.9 < float(kept.float().mean()) < 1  # q = 0.99 of the whole model: a few entries dropped


def test_merge_bench_reports_the_whole_last_exception():
    """A peer's failure is reported by its exception's message, also where Rich wraps it over several lines."""
    rich = ("│ ❱ 107 │   u, s, v = torch.linalg.svd(w_ts)   │\n╰──────────╯\n"
            "_LinAlgError: linalg.svd: The algorithm failed to converge because the input \n"
            "matrix is ill-conditioned (error code: \n1).")
    assert merge_bench.last_exception(rich) == ("_LinAlgError: linalg.svd: The algorithm failed to converge because "
                                                "the input matrix is ill-conditioned (error code: 1).")
    plain = "Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: one\nKeyError: 'two'"
    assert merge_bench.last_exception(plain) == "KeyError: 'two'"
    assert merge_bench.last_exception("Killed") == "Killed"
