"""Modulated merges (EMR-Merging, TALL masks): one unified model plus, for each task, a binary mask and a
rescaler that give the task its own model back:

    θ_t = θ_0 + r_t · m_t ⊙ (θ_uni − θ_0)

EMR (Huang et al., NeurIPS 2024): θ_uni = θ_0 + λ·τ_uni, m_t the sign agreement with τ_uni, and
r_t = Σ_n mean|τ_t,n| / Σ_n mean|m_t,n ⊙ (θ_uni − θ_0)_n| over all floating-point tensors n (the authors'
rescaler, one number per task). TALL masks (Wang et al., ICML 2024): θ_uni = θ_0 + λ·Σ_t τ_t,
m_t = |τ_t| ≥ λ_t |τ_MTL − τ_t|, r_t = 1.

`write` streams tensor by tensor (one tensor of each model at a time) into the folder OUT:

    unified/                 the unified model folder (what `code/merge.py --merge emr` writes)
    masks_<t>.safetensors    task t's masks, t = 1..T in the order of the models (bool, floating-point tensors)
    modulators.json          {"method", "parameters", "models", "ancestor", "rescalers": [r_1, ..., r_T]}

`materialise` writes task t's model from OUT and θ_0. Both outputs appear only when complete.
"""
import json
import logging
import os
import sys
from contextlib import ExitStack

import torch
from tqdm import tqdm

from modelmerge.atomic import atomic_dir
from modelmerge.io.formats import TensorInfo
from modelmerge.io.reading import open_checkpoint
from modelmerge.io.writing import open_output
from modelmerge.methods import MERGE_METHODS, get_method
from modelmerge.methods.base import TensorGroup
from modelmerge.methods.common import upcast_dtype

logger = logging.getLogger(__name__)

MODULATED_METHODS = tuple(sorted({cls.name for cls in MERGE_METHODS.values() if cls.kind == "per-task"}))
RELEASE_EVERY = 32  # tensors read before the files' memory maps are closed (their pages stop counting as resident)
OUTPUT_KIND = "modulated_merge"


def write(method_name, models, ancestor, output, params, device="cpu", progress=True, check=None, overwrite=False):
    """Write the unified model, the masks and the rescalers of `models` (paths) about `ancestor` into `output`.

    `params` are the method's resolved parameters; `check(checkpoints)` validates the inputs (the merge
    driver's same-tensors check) before anything is written."""
    if method_name not in MODULATED_METHODS:
        raise ValueError(f"modulated merges are {', '.join(MODULATED_METHODS)}, not {method_name!r}")
    method = get_method(method_name)()
    base = open_checkpoint(ancestor)
    checkpoints = [open_checkpoint(path) for path in models]
    if check is not None:
        check(checkpoints + [base])
    names = base.names
    floats = [(n, TensorInfo(base.info(n).shape, torch.bool)) for n in names if base.info(n).dtype.is_floating_point]
    own, kept = torch.zeros(len(models), dtype=torch.float64), torch.zeros(len(models), dtype=torch.float64)
    inputs = [*models, ancestor]
    with atomic_dir(output, OUTPUT_KIND, inputs=inputs, overwrite=overwrite) as tmp, ExitStack() as stack:
        unified = stack.enter_context(open_output(os.path.join(tmp, "unified"), [(n, base.info(n)) for n in names],
                                                  "model", files_from=base.folder))
        masks = [stack.enter_context(open_output(os.path.join(tmp, f"masks_{t + 1}.safetensors"), floats, "file"))
                 for t in range(len(models))]
        for index, name in enumerate(tqdm(names, desc=f"modulated merge ({method_name})", disable=not progress,
                                          file=sys.stderr)):
            theta_0 = base.get(name)
            if not theta_0.dtype.is_floating_point:
                unified.write(name, theta_0)
                continue
            dtype = upcast_dtype(theta_0.dtype)
            group = TensorGroup(name, [c.get(name).to(device, dtype) for c in checkpoints], ancestor=theta_0.to(device, dtype))
            merged = method.merge(group, **params)
            taus = [x - group.ancestor for x in group.tensors]
            task_masks = method.masks(taus, **params)
            change = merged - group.ancestor
            for t, (tau, mask) in enumerate(zip(taus, task_masks)):
                masks[t].write(name, mask.cpu())
                own[t] += tau.abs().mean(dtype=torch.float64).item()
                kept[t] += (change * mask).abs().mean(dtype=torch.float64).item()
            unified.write(name, merged.to("cpu", theta_0.dtype))
            if index % RELEASE_EVERY == RELEASE_EVERY - 1:
                for checkpoint in checkpoints + [base]:
                    checkpoint.release()
        rescalers = [1.0] * len(models)
        if method_name == "emr":
            rescalers = [float(o / k) if k > 0 else 1.0 for o, k in zip(own, kept)]
        description = {"method": method_name, "parameters": params, "models": [os.path.abspath(m) for m in models],
                       "ancestor": os.path.abspath(ancestor), "rescalers": rescalers}
        with open(os.path.join(tmp, "modulators.json"), "w") as f:
            json.dump(description, f, indent=2)
    logger.info("wrote %s (rescalers %s)", output, ", ".join(f"{r:.4f}" for r in rescalers))
    return rescalers


def materialise(modulated, ancestor, task, output, device="cpu", overwrite=False):
    """Write task `task`'s model (1-based, in the order of the models) from the modulated merge `modulated`."""
    with open(os.path.join(modulated, "modulators.json")) as f:
        description = json.load(f)
    count = len(description["rescalers"])
    if not 1 <= task <= count:
        raise ValueError(f"--task: {modulated} holds tasks 1..{count}, got {task}")
    rescaler = description["rescalers"][task - 1]
    unified = open_checkpoint(os.path.join(modulated, "unified"))
    masks = open_checkpoint(os.path.join(modulated, f"masks_{task}.safetensors"))
    base = open_checkpoint(ancestor)
    entries = [(name, unified.info(name)) for name in unified.names]
    with open_output(output, entries, "model", files_from=unified.folder, kind=OUTPUT_KIND,
                     inputs=[modulated, ancestor], overwrite=overwrite) as writer:
        for name in unified.names:
            theta_uni = unified.get(name)
            if name not in masks:
                writer.write(name, theta_uni)
                continue
            dtype = upcast_dtype(theta_uni.dtype)
            theta_0 = base.get(name).to(device, dtype)
            change = (theta_uni.to(device, dtype) - theta_0) * masks.get(name).to(device)
            writer.write(name, (theta_0 + rescaler * change).to("cpu", theta_uni.dtype))
    logger.info("wrote task %d's model to %s", task, output)
