"""RegMean++: RegMean whose Gram matrices of each layer are taken from the inputs that layer receives in
the partly merged model.

Nguyen, Huang, Le, Aljundi & Nguyen, "RegMean++: Enhancing Effectiveness and Generalization of
Regression Mean for Model Merging", 2025 (https://arxiv.org/abs/2508.03121). RegMean (Jin et al., ICLR
2023) computes every layer's Gram matrix G_t = X_tᵀX_t on task model t alone; RegMean++ merges the model
stage by stage (what precedes the transformer layers, each layer, what follows them) and computes the
Grams of stage l on the model whose stages before l are already the merged ones, followed by task model
t's own stage l: X_t^(l) = f_t^(l)-inputs(merged stages < l (data_t)). Each stage is merged by RegMean
(modelmerge.methods.regmean: linear weights from the Grams, everything else averaged).

Implementation: after stage l is merged it is copied into every task model, so task model t is at every
step "merged stages < l, own stages ≥ l", and its Grams of stage l are those of an ordinary Gram pass
(modelmerge.statistics.compute_gram) restricted to stage l's linear layers.
"""
import logging
from contextlib import contextmanager

import torch
from torch import nn
from tqdm import tqdm

from modelmerge.methods.base import MethodDeclaration, Parameter, Sweep, TensorGroup
from modelmerge.methods.regmean import RegMean

logger = logging.getLogger(__name__)


class RegMeanPlusPlus(MethodDeclaration):
    """RegMean++ as the catalogue lists it: run by code/regmean_plusplus.py on each task's statistics split."""

    name = "regmean_plusplus"
    kind = "data-aware"
    paper = 'Nguyen, Huang, Le, Aljundi & Nguyen, "RegMean++", 2025 (https://arxiv.org/abs/2508.03121)'
    parameters = {"alpha": Parameter(0.5, range="[0, 1]", help="α: scale of the Gram matrices' off-diagonal entries")}
    sweeps = (Sweep("regmean++", "alpha", (0.1, 0.5, 0.9)),)
    program = "regmean_plusplus.py"
    task_data = "statistics"


def stages(model: nn.Module) -> list[list[str]]:
    """The model's parameter names in merge order: those before its transformer layers (the longest
    `nn.ModuleList`), those of each layer, those after."""
    layers_name, layers = max(((n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)),
                              key=lambda item: len(item[1]), default=(None, []))
    names = [name for name, _ in model.named_parameters()]
    if not layers:
        return [names]
    index = {f"{layers_name}.{i}.": i for i in range(len(layers))}
    per_layer = [[] for _ in layers]
    before, after = [], []
    for name in names:
        layer = next((i for prefix, i in index.items() if name.startswith(prefix)), None)
        if layer is not None:
            per_layer[layer].append(name)
        else:
            (after if any(per_layer) else before).append(name)
    return [stage for stage in [before, *per_layer, after] if stage]


@contextmanager
def only_trainable(model: nn.Module, names):
    """Inside, exactly the parameters `names` require gradients (so a Gram pass sees only their layers)."""
    parameters = dict(model.named_parameters())
    before = {name: p.requires_grad for name, p in parameters.items()}
    try:
        for name, p in parameters.items():
            p.requires_grad_(name in names)
        yield
    finally:
        for name, p in parameters.items():
            p.requires_grad_(before[name])


def stage_grams(model, tokenizer, dataset, stage, gram_options) -> tuple[dict[str, torch.Tensor], frozenset]:
    """Gram matrices (weight name -> XᵀX) of the linear layers among `stage`'s parameters of `model`, and the
    names of those weights stored [in, out] (GPT-2's Conv1D)."""
    # here, not at the top: modelmerge.statistics imports transformers, and the catalogue (merge.py --help) this module
    from modelmerge.statistics.gram import compute_gram, trainable_linear_layers

    with only_trainable(model, set(stage)):
        if not trainable_linear_layers(model):
            return {}, frozenset()
        result = compute_gram(model, tokenizer, dataset, **gram_options)
        return result.input_gram, result.stored_in_out


def regmean_plusplus(models, tokenizer, datasets, *, alpha=0.5, progress=True, **gram_options) -> dict[str, torch.Tensor]:
    """Merge `models` (same architecture; task model t with its data set `datasets[t]`) by RegMean++.

    The models are changed in place (each ends as the merged model); returns the merged parameters.
    `gram_options` go to compute_gram (batch_size, max_length, num_examples, seed, task_type, empirical).
    """
    if len(models) != len(datasets):
        raise ValueError(f"got {len(datasets)} data sets for {len(models)} models (one per model, same order)")
    method = RegMean()
    parameters = [dict(m.named_parameters()) for m in models]
    merged = {}
    for stage in tqdm(stages(models[0]), desc="RegMean++ stages", disable=not progress):
        grams, stored_in_out = zip(*(stage_grams(m, tokenizer, d, stage, gram_options) for m, d in zip(models, datasets)))
        for name in stage:
            tensors = [p[name].detach() for p in parameters]
            stats = [{"gram": g[name].to(tensors[0].device)} if name in g else {} for g in grams]
            group = TensorGroup(name, tensors, statistics=stats, stored_in_out=name in stored_in_out[0])
            merged[name] = method.merge(group, alpha=alpha)
        with torch.no_grad():
            for p in parameters:
                for name in stage:
                    p[name].copy_(merged[name])
        logger.info("merged %d parameters of a stage", len(stage))
    return merged
