"""The merges that need statistics (Fisher, RegMean, MaTS, uncertainty-based gradient matching) on the Fisher and
Gram statistics of every family (tiny T5, GPT-2, ViT, CLIP), computed by predict.py and merged by merge.py, each
against the definition of docs/merging.md written out here from the statistics files and weights.

GPT-2's Conv1D layers store their weights [in, out]: the expectations transpose them by the test's own knowledge
of the module types, and RegMean / MaTS / RegMean++ on GPT-2 must equal the same merges of an equivalent model
whose Conv1D layers are nn.Linear layers holding the transposed weights."""
import json
import os
import shutil

import merge as merge_program
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from modelmerge.data import load_split
from modelmerge.merging.cli import run_cli
from modelmerge.prediction.config import PredictConfig
from modelmerge.prediction.loading import load_for_task
from modelmerge.prediction.program import run
from modelmerge.regmean_plusplus import regmean_plusplus
from modelmerge.statistics import compute_gram, save_gram
from tiny import (COLOURS, colour_images, make_tiny_clip, make_tiny_gpt2, make_tiny_t5, make_tiny_vit, word_tasks,
                  write_jsonl)

CLASSES = list(COLOURS)
MODELS = {"seq2seq": make_tiny_t5, "causal_lm": make_tiny_gpt2, "vit": make_tiny_vit, "clip": make_tiny_clip}
TASK = {"seq2seq": "seq2seq", "causal_lm": "causal_lm", "vit": "image_classification", "clip": "image_classification"}
ALPHA = 0.5  # RegMean's (and here MaTS') scale of the Grams' off-diagonal entries
UBGM_SCALE = 0.5
MATS_ITERATIONS = 10  # of the blockwise-Fisher objective, whose systems are far too ill-conditioned to solve by CG
STATISTICS = {"fisher": "squared_gradients", "gram": "gram"}
MERGES = {  # output name -> (method, the statistics given, extra arguments)
    "fisher": ("fisher", "fisher", []),
    "ubgm": ("uncertainty_based_gradient_matching", "fisher", ["--x:scaling_factor", str(UBGM_SCALE)]),
    "regmean": ("regmean", "gram", ["--x:alpha", str(ALPHA)]),
    "lot": ("lot", "gram", []),
    # in float64: CG's iterates are then compared to the test's own to float64 rounding
    "mats_regmean": ("mats", "gram", ["--x:objective", "regmean", "--x:alpha", str(ALPHA), "--x:iterations", "300",
                                      "--dtype", "float64"]),
    "mats_blockwise": ("mats", "gram", ["--x:objective", "blockwise_fisher", "--x:alpha", str(ALPHA),
                                        "--x:iterations", str(MATS_ITERATIONS), "--dtype", "float64"]),
}


def fine_tune_copy(src, dst, seed):
    """A copy of the model folder `src` with every floating-point weight moved by seeded noise (a fake fine-tune)."""
    shutil.copytree(src, dst)
    generator = torch.Generator().manual_seed(seed)
    weights = load_file(os.path.join(dst, "model.safetensors"))
    moved = {n: t + 0.02 * torch.randn(t.shape, generator=generator) if t.is_floating_point() else t
             for n, t in weights.items()}
    save_file(moved, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return str(dst)


def merge(arguments, output):
    try:
        run_cli(merge_program.main, [*arguments, "--output", output, "--no_progress"])
    except SystemExit as exit_info:
        assert exit_info.code in (0, None), arguments
    return output


@pytest.fixture(scope="module", params=list(MODELS))
def family(request, tmp_path_factory):
    """The ancestor, two fake fine-tunes, their statistics from predict.py and every merge of them."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    if TASK[name] == "image_classification":
        rows = colour_images(str(root / "images"), per_class=3)
    else:
        rows = word_tasks(10, seed=1, kind="reverse")
    data = str(root / "data.jsonl")
    write_jsonl(data, rows)
    (root / "class_names.json").write_text(json.dumps(CLASSES))
    base = MODELS[name](str(root / "base"), seed=2)
    models = [fine_tune_copy(base, root / f"ft{i}", seed=i) for i in (1, 2)]
    stats = {}
    for model in [base, *models]:
        for kind, method in STATISTICS.items():
            if model == base and kind == "gram":
                continue
            out = str(root / f"{os.path.basename(model)}-{kind}")
            run(PredictConfig(model_name_or_path=model, output_dir=out, dataset_name=data, split="train",
                              mode=method, task_type=TASK[name], batch_size=4, num_threads=1, max_length=64))
            stats[model, kind] = out
    merged = {}
    for output, (method, kind, extra) in MERGES.items():
        arguments = ["--merge", method, "--models", *models, "--ancestor", base,
                     "--aux_data", *[stats[m, kind] for m in models], *extra]
        if method == "uncertainty_based_gradient_matching":
            arguments += ["--ancestor_aux_data", stats[base, "fisher"]]
        merged[output] = merge(arguments, str(root / output))
    return dict(name=name, root=root, data=data, base=base, models=models, stats=stats, merged=merged)


def weights(folder):
    return {n: t.double() for n, t in load_file(os.path.join(folder, "model.safetensors")).items()}


def statistic(family, model, kind, file):
    return {n: t.double() for n, t in load_file(os.path.join(family["stats"][model, kind], file)).items()}


def in_out_weights(family):
    """Checkpoint names of the weights stored [in, out]: those of GPT-2's Conv1D modules, found here by type."""
    model, _ = load_for_task(family["base"], TASK[family["name"]], class_names=CLASSES)
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Conv1D)}


def out_in(tensor, name, transposed):
    return tensor.T if name in transposed else tensor


def assert_close(found, expected, name, rtol=1e-5, atol=1e-7):
    torch.testing.assert_close(found.double(), expected.double(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def regmean_closed_form(thetas, grams, alpha):
    """W = (Σ G̃_t)⁻¹ Σ G̃_t W_tᵀ (transposed back) for weights [out, in], solved on the non-zero block of Σ G̃_t;
    unconstrained input features (zero rows) keep the average."""
    scaled = [alpha * g + (1 - alpha) * torch.diag(torch.diag(g)) for g in grams]
    lhs, rhs = sum(scaled), sum(g @ w.T for g, w in zip(scaled, thetas))
    merged = (sum(thetas) / len(thetas)).T.clone()
    keep = (lhs != 0).any(1).numpy()
    merged[keep] = torch.from_numpy(np.linalg.solve(lhs.numpy()[np.ix_(keep, keep)], rhs.numpy()[keep]))
    return merged.T


def test_fisher_merge_is_the_fisher_weighted_average(family):
    thetas = [weights(m) for m in family["models"]]
    fishers = [statistic(family, m, "fisher", "fisher.safetensors") for m in family["models"]]
    merged = weights(family["merged"]["fisher"])
    weighted = 0
    for name, theta in thetas[0].items():
        if not theta.is_floating_point():
            continue
        total = sum(f[name] for f in fishers)
        expected = sum(f[name] * t[name] for f, t in zip(fishers, thetas)) / torch.where(total == 0, 1.0, total)
        if not total.any():  # no Fisher mass at all: the average (Matena & Raffel's floor)
            expected = sum(t[name] for t in thetas) / len(thetas)
        weighted += bool(total.any())
        assert_close(merged[name], expected, name)
    assert weighted >= 2


def test_uncertainty_based_gradient_matching_follows_the_authors_formula(family):
    base, thetas = weights(family["base"]), [weights(m) for m in family["models"]]
    h0 = statistic(family, family["base"], "fisher", "fisher.safetensors")
    hs = [statistic(family, m, "fisher", "fisher.safetensors") for m in family["models"]]
    merged = weights(family["merged"]["ubgm"])
    delta, c0, ct = 1e-12, 1.0, 1.0
    checked = 0
    for name in h0:
        precision = 1 / (sum(UBGM_SCALE * ct * h[name] for h in hs) + c0 * h0[name] + delta)
        expected = base[name] + UBGM_SCALE * sum(precision * (ct * h[name] + delta + c0 * h0[name]) * (t[name] - base[name])
                                                 for h, t in zip(hs, thetas))
        assert_close(merged[name], expected, name)
        checked += 1
    assert checked > 0


def test_regmean_is_its_closed_form_with_conv1d_weights_transposed(family):
    thetas = [weights(m) for m in family["models"]]
    grams = [statistic(family, m, "gram", "gram.safetensors") for m in family["models"]]
    merged = weights(family["merged"]["regmean"])
    transposed = in_out_weights(family)
    if family["name"] == "causal_lm":  # GPT-2: Conv1D weights, square (attn c_proj) and not (c_attn)
        shapes = {thetas[0][n].shape[0] == thetas[0][n].shape[1] for n in transposed}
        assert transposed <= set(grams[0]) and shapes == {True, False}
    else:
        assert not transposed
    for model in family["models"]:  # what predict.py records
        for file in ("gram.safetensors", "output_grad_gram.safetensors"):
            with safe_open(os.path.join(family["stats"][model, "gram"], file), "pt") as handle:
                assert json.loads(handle.metadata()["weights_stored_in_out"]) == sorted(transposed)
    away_from_the_average = 0
    for name, theta in thetas[0].items():
        if not theta.is_floating_point():
            continue
        average = sum(t[name] for t in thetas) / len(thetas)
        expected = average
        if name in grams[0]:
            ws = [out_in(t[name], name, transposed) for t in thetas]
            expected = out_in(regmean_closed_form(ws, [g[name] for g in grams], ALPHA), name, transposed)
            away_from_the_average += not torch.allclose(expected, average, rtol=1e-3, atol=1e-5)
        assert_close(merged[name], expected, name)
    assert away_from_the_average >= 2  # the Grams matter


def test_lot_is_the_minimum_norm_task_vector_of_the_gram_system(family):
    """W_0 + τ, τᵀ the minimum-norm solution of (Σ_t G_t) τᵀ = Σ_t G_t τ_tᵀ (NumPy's lstsq), on every weight with a
    Gram statistic (transposed where stored [in, out]); the mean task vector elsewhere."""
    base, thetas = weights(family["base"]), [weights(m) for m in family["models"]]
    grams = [statistic(family, m, "gram", "gram.safetensors") for m in family["models"]]
    merged = weights(family["merged"]["lot"])
    transposed = in_out_weights(family)
    for name, theta in base.items():
        if not theta.is_floating_point():
            continue
        if name not in grams[0]:
            assert_close(merged[name], sum(t[name] for t in thetas) / len(thetas), name)
            continue
        w0 = out_in(theta, name, transposed)
        lhs = sum(g[name] for g in grams).numpy()
        rhs = sum(g[name] @ (out_in(t[name], name, transposed) - w0).T for g, t in zip(grams, thetas)).numpy()
        tau_t, *_ = np.linalg.lstsq(lhs, rhs, rcond=None)
        assert_close(merged[name], out_in(w0 + torch.from_numpy(tau_t).T, name, transposed), name, rtol=1e-4, atol=1e-6)


def test_mats_regmean_converges_to_the_regmean_solution(family):
    regmean, mats = weights(family["merged"]["regmean"]), weights(family["merged"]["mats_regmean"])
    for name, tensor in regmean.items():
        if tensor.is_floating_point():
            assert_close(mats[name], tensor, name, rtol=1e-4, atol=1e-6)


def conjugate_gradient(matrix, rhs, x, iterations):
    """The textbook conjugate-gradient iterations for matrix · x = rhs."""
    residual = rhs - matrix @ x
    direction = residual.clone()
    for _ in range(iterations):
        product = matrix @ direction
        step = residual @ residual / (direction @ product)
        x = x + step * direction
        new_residual = residual - step * product
        direction = new_residual + (new_residual @ new_residual) / (residual @ residual) * direction
        residual = new_residual
    return x


def test_mats_blockwise_fisher_is_conjugate_gradient_on_the_kronecker_system(family):
    """k CG iterations from the ancestor on (Σ_t S_t ⊗ G̃_t) vec(W) = Σ_t vec(S_t W_t G̃_t), the system written out
    as one dense matrix on the row-major vec of the [out, in] weight (transposed where stored [in, out])."""
    base, thetas = weights(family["base"]), [weights(m) for m in family["models"]]
    grams = [statistic(family, m, "gram", "gram.safetensors") for m in family["models"]]
    out_grams = [statistic(family, m, "gram", "output_grad_gram.safetensors") for m in family["models"]]
    merged = weights(family["merged"]["mats_blockwise"])
    transposed = in_out_weights(family)
    for name in grams[0]:
        scaled = [ALPHA * g[name] + (1 - ALPHA) * torch.diag(torch.diag(g[name])) for g in grams]
        matrix = sum(torch.kron(s[name], g) for s, g in zip(out_grams, scaled))  # vec(S W G) = (S ⊗ Gᵀ) vec(W)
        rhs = sum(s[name] @ out_in(t[name], name, transposed) @ g for s, t, g in zip(out_grams, thetas, scaled))
        start = out_in(base[name], name, transposed)
        expected = conjugate_gradient(matrix, rhs.reshape(-1), start.reshape(-1), MATS_ITERATIONS)
        assert_close(merged[name], out_in(expected.reshape(start.shape), name, transposed), name, rtol=1e-6, atol=1e-9)
    regmean = weights(family["merged"]["regmean"])
    for name, tensor in regmean.items():  # the rest: averaged
        if name not in grams[0] and tensor.is_floating_point():
            assert_close(merged[name], tensor, name)


def test_merged_models_load_and_run(family):
    name = family["name"]
    rows = load_split(family["data"], "train", task_type=TASK[name])
    for output in family["merged"].values():
        model, processor = load_for_task(output, TASK[name], class_names=CLASSES)
        model.float().eval()
        row = rows[0]
        with torch.no_grad():
            if TASK[name] == "image_classification":
                from PIL import Image
                inputs = processor(images=Image.open(row["image"]).convert("RGB"), return_tensors="pt")
                logits = model(pixel_values=inputs["pixel_values"]).logits
            elif name == "seq2seq":
                inputs = processor(row["input"], return_tensors="pt")
                labels = processor(text_target=row["target"], return_tensors="pt").input_ids
                logits = model(**inputs, labels=labels).logits
            else:
                logits = model(**processor(row["input"], return_tensors="pt")).logits
        assert torch.isfinite(logits).all() and logits.abs().sum() > 0, output


# --- GPT-2 against the same model with nn.Linear layers ---------------------------------------------------------


def linearised(model):
    """`model` with every Conv1D replaced by the nn.Linear computing the same function (weight transposed)."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                linear = nn.Linear(child.weight.shape[0], child.weight.shape[1])
                with torch.no_grad():
                    linear.weight.copy_(child.weight.T)
                    linear.bias.copy_(child.bias)
                setattr(parent, child_name, linear)
    return model


@pytest.mark.parametrize("family", ["causal_lm"], indirect=True)
def test_gpt2_merges_equal_those_of_the_model_with_linear_layers(family, tmp_path):
    dataset = load_split(family["data"], "train", task_type="causal_lm")
    transposed = in_out_weights(family)
    files, stats = [], []
    for i, path in enumerate(family["models"]):
        model, tokenizer = load_for_task(path, "causal_lm")
        model = linearised(model)
        result = compute_gram(model, tokenizer, dataset, batch_size=4, max_length=64, task_type="causal_lm")
        assert not result.stored_in_out
        save_gram(result, model, str(tmp_path / f"stats{i}"))
        state = {n: t.contiguous() for n, t in model.state_dict().items() if n != "lm_head.weight"}  # tied to wte
        save_file(state, str(tmp_path / f"linear{i}.safetensors"))
        files.append(str(tmp_path / f"linear{i}.safetensors"))
        stats.append(str(tmp_path / f"stats{i}"))
        with safe_open(os.path.join(stats[-1], "gram.safetensors"), "pt") as handle:
            assert json.loads(handle.metadata()["weights_stored_in_out"]) == []
    base = weights(family["base"])
    save_file({n: out_in(t, n, transposed).float().contiguous() for n, t in base.items()}, str(tmp_path / "base.safetensors"))
    for output in ("regmean", "mats_blockwise"):
        method, _, extra = MERGES[output]
        found = merge(["--merge", method, "--models", *files, "--ancestor", str(tmp_path / "base.safetensors"),
                       "--aux_data", *stats, *extra], str(tmp_path / f"{output}.safetensors"))
        linear = {n: t.double() for n, t in load_file(found).items()}
        conv1d = weights(family["merged"][output])
        assert set(linear) == set(conv1d)
        for name, tensor in conv1d.items():
            assert_close(out_in(linear[name], name, transposed), tensor, f"{output} {name}", rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["causal_lm"], indirect=True)
def test_gpt2_regmean_plusplus_equals_that_of_the_model_with_linear_layers(family):
    dataset = load_split(family["data"], "train", task_type="causal_lm")
    transposed = in_out_weights(family)
    merged = {}
    for kind in ("conv1d", "linear"):
        loaded = [load_for_task(path, "causal_lm") for path in family["models"]]
        models = [model if kind == "conv1d" else linearised(model) for model, _ in loaded]
        merged[kind] = regmean_plusplus(models, loaded[0][1], [dataset, dataset], alpha=ALPHA, progress=False,
                                        batch_size=4, max_length=64, task_type="causal_lm")
    assert transposed <= set(merged["conv1d"])
    for name, tensor in merged["conv1d"].items():
        assert_close(out_in(merged["linear"][name], name, transposed), tensor, name, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ["causal_lm"], indirect=True)
@pytest.mark.parametrize("metadata, only, expected", [
    # written before the layout was recorded: [out, in] weights, which GPT-2's c_attn [16, 48] does not fit
    ({"format": "pt"}, None, "it fits a weight stored [in, out]"),
    # square weights fit both layouts: the statistics of the two models must agree
    ({"format": "pt"}, "c_proj", "disagree on its layout: [in, out] in"),
    ({"format": "pt", "weights_stored_in_out": "c_attn"}, None, "metadata weights_stored_in_out is not a JSON list"),
])
def test_gram_layouts_that_do_not_fit_are_one_line_errors(family, tmp_path, capsys, metadata, only, expected):
    models, stats = family["models"], [family["stats"][m, "gram"] for m in family["models"]]
    other = tmp_path / "other"
    shutil.copytree(stats[0], other)
    for file in ("gram.safetensors", "output_grad_gram.safetensors"):
        save_file(load_file(other / file), str(other / file), metadata=metadata)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(merge_program.main, ["--merge", "regmean", "--models", *models, "--aux_data", str(other), stats[1],
                                     *(["--include", only] if only else []), "--output", str(tmp_path / "out"),
                                     "--no_progress"])
    message = capsys.readouterr().err
    assert exit_info.value.code == 2 and expected in message and len(message.strip().splitlines()) == 1, message
    assert not (tmp_path / "out").exists()
