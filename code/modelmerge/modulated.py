"""Modulated merges (EMR-Merging, TALL masks): one unified model plus, for each task, a binary mask and a
rescaler that give the task its own model back:

    θ_t = θ_0 + r_t · m_t ⊙ (θ_uni − θ_0)

EMR (Huang et al., NeurIPS 2024): θ_uni = θ_0 + λ·τ_uni, m_t the sign agreement with τ_uni, and
r_t = Σ_n mean|τ_t,n| / Σ_n mean|m_t,n ⊙ (θ_uni − θ_0)_n| over all floating-point tensors n (the authors'
rescaler, one number per task). TALL masks (Wang et al., ICML 2024): θ_uni = θ_0 + λ·Σ_t τ_t,
m_t = |τ_t| ≥ λ_t |τ_MTL − τ_t|, r_t = 1.

`write` streams tensor by tensor (one tensor of each model at a time: the merge driver's executor,
modelmerge.merging.execute, whose extra-outputs hook writes the masks) into the folder OUT:

    unified/                 the unified model folder (what `code/merge.py --merge emr` writes)
    masks_<t>.safetensors    task t's masks, t = 1..T in the order of the models (bool, floating-point tensors)
    modulators.json          {"method", "parameters", "models", "ancestor", "rescalers": [r_1, ..., r_T]}

`materialise` writes task t's model from OUT and θ_0. Both outputs appear only when complete.
"""
import json
import logging
import os
from contextlib import ExitStack

import torch

from modelmerge.atomic import atomic_dir
from modelmerge.io.formats import TensorInfo
from modelmerge.io.reading import open_checkpoint
from modelmerge.io.writing import open_output
from modelmerge.merging.execute import execute
from modelmerge.merging.plan import Source, TensorTask
from modelmerge.methods import MERGE_METHODS, get_method
from modelmerge.methods.common import upcast_dtype

logger = logging.getLogger(__name__)

MODULATED_METHODS = tuple(sorted({cls.name for cls in MERGE_METHODS.values() if cls.kind == "per-task"}))
OUTPUT_KIND = "modulated_merge"


def write(method_name, models, ancestor, output, params, device="cpu", progress=True, check=None, overwrite=False):
    """Write the unified model, the masks and the rescalers of `models` (paths) about `ancestor` into `output`.

    `params` are the method's resolved parameters; `check(checkpoints)` validates the inputs (the merge
    driver's same-tensors check) before anything is written. The unified model is merged by the driver's
    executor (merging.execute), the masks and the rescalers' sums taken by its extra-outputs hook (`_Masks`)."""
    if method_name not in MODULATED_METHODS:
        raise ValueError(f"modulated merges are {', '.join(MODULATED_METHODS)}, not {method_name!r}")
    method = get_method(method_name)()
    base = open_checkpoint(ancestor)
    checkpoints = [open_checkpoint(path) for path in models]
    if check is not None:
        check(checkpoints + [base])
    entries = [(name, base.info(name)) for name in base.names]
    tasks = [TensorTask(name, [Source(c, name) for c in checkpoints], ancestor=Source(base, name), params=params,
                        merge=info.dtype.is_floating_point) for name, info in entries]
    floats = [(name, TensorInfo(info.shape, torch.bool)) for name, info in entries if info.dtype.is_floating_point]
    with atomic_dir(output, OUTPUT_KIND, inputs=[*models, ancestor], overwrite=overwrite) as tmp, ExitStack() as stack:
        unified = stack.enter_context(open_output(os.path.join(tmp, "unified"), entries, "model",
                                                  files_from=base.folder))
        masks = _Masks(method, params, [stack.enter_context(open_output(
            os.path.join(tmp, f"masks_{t + 1}.safetensors"), floats, "file")) for t in range(len(models))])
        execute(method, tasks, unified, entries, device=device, progress=progress, threads=torch.get_num_threads(),
                extra_outputs=masks)
        rescalers = masks.rescalers() if method_name == "emr" else [1.0] * len(models)
        description = {"method": method_name, "parameters": params, "models": [os.path.abspath(m) for m in models],
                       "ancestor": os.path.abspath(ancestor), "rescalers": rescalers}
        with open(os.path.join(tmp, "modulators.json"), "w") as f:
            json.dump(description, f, indent=2)
    logger.info("wrote %s (rescalers %s)", output, ", ".join(f"{r:.4f}" for r in rescalers))
    return rescalers


class _Masks:
    """The executor's extra outputs of a modulated merge: each task's mask m_t of every merged tensor, written to
    its file, and the sums of EMR's rescaler r_t = Σ_n mean|τ_t,n| / Σ_n mean|m_t,n ⊙ (θ_uni − θ_0)_n|."""

    def __init__(self, method, params, writers):
        self.method, self.params, self.writers = method, params, writers
        self.own = torch.zeros(len(writers), dtype=torch.float64)
        self.kept = torch.zeros(len(writers), dtype=torch.float64)

    def __call__(self, task, group, merged):
        taus = [x - group.ancestor for x in group.tensors]
        change = merged - group.ancestor
        for t, (tau, mask) in enumerate(zip(taus, self.method.masks(taus, **self.params))):
            self.writers[t].write(task.name, mask.cpu())
            self.own[t] += tau.abs().mean(dtype=torch.float64).item()
            self.kept[t] += (change * mask).abs().mean(dtype=torch.float64).item()

    def rescalers(self):
        return [float(o / k) if k > 0 else 1.0 for o, k in zip(self.own, self.kept)]


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
