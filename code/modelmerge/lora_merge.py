"""LoRA adapters seen as the weight changes they make, and merged changes written back as an adapter.

A LoRA adapter (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models") changes each
adapted weight W [out, in] by ΔW = s·B·A with A [r, in], B [out, r] and s = lora_alpha / r
(lora_alpha / √r with rsLoRA). The `lora-<method>` merges apply <method> to ΔW instead of to A and B
separately (A and B of different adapters live in unrelated bases, so averaging them is not averaging
the changes). `LoraDeltaView` presents an adapter as a checkpoint holding `<module>.weight` = ΔW (or
W_0 + ΔW when the base model is given) under the base model's tensor names; `factorize` turns a merged
ΔW back into the best rank-r pair (truncated SVD, Eckart–Young) for an output adapter.
"""
import math
import re

import torch

from modelmerge.io.formats import CheckpointError, TensorInfo

ADAPTER_PREFIX = "base_model.model."
_PAIR = re.compile(r"(.*)\.lora_([AB])\.weight")


def base_name(adapter_name):
    """`base_model.model.X` (a name in a saved adapter) -> `X` (the name in the base model)."""
    return adapter_name[len(ADAPTER_PREFIX):] if adapter_name.startswith(ADAPTER_PREFIX) else adapter_name


def adapter_name(name):
    return ADAPTER_PREFIX + name


class LoraDeltaView:
    """An adapter checkpoint as the weights it changes (see the module docstring).

    Without `base`: `<module>.weight` = s·B·A for every adapted module, and the adapter's other tensors
    (`modules_to_save`, e.g. a classification head) under their base-model names. With `base` (a model
    checkpoint): every tensor of the base model, with W_0 + s·B·A for adapted weights and the adapter's
    other tensors in place of the base model's.
    """

    def __init__(self, adapter, base=None):
        if adapter.kind != "adapter":
            raise CheckpointError(f"{adapter.path}: a lora- merge needs PEFT adapter folders, this is a {adapter.kind}")
        config = adapter.adapter_config
        if config.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(f"{adapter.path}: a lora- merge needs LoRA adapters, this is {config.get('peft_type')}")
        if config.get("use_dora"):
            raise CheckpointError(f"{adapter.path}: DoRA adapters cannot be merged as B·A (their magnitude vector is not additive)")
        self.adapter, self.base = adapter, base
        self.path = adapter.path
        self.folder = base.folder if base is not None else adapter.folder  # where the output's other files come from
        self.kind = "model" if base is not None else "lora_delta"
        self.fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
        self.pairs = {}  # base-model weight name -> (A name, B name, scale)
        self.others = {}  # base-model name -> adapter name
        for name in adapter.names:
            match = _PAIR.fullmatch(name)
            if match is None:
                if "lora_" in name:
                    raise CheckpointError(f"{adapter.path}: tensor {name} is not a LoRA A/B weight this merge understands")
                self.others[base_name(name)] = name
                continue
            module = base_name(match.group(1))
            a_name, b_name = f"{match.group(1)}.lora_A.weight", f"{match.group(1)}.lora_B.weight"
            if a_name not in adapter or b_name not in adapter:
                raise CheckpointError(f"{adapter.path}: {name} has no partner {a_name if match.group(2) == 'B' else b_name}")
            rank = adapter.info(a_name).shape[0]
            self.pairs[module + ".weight"] = (a_name, b_name, _scale(config, module, rank))
        self._infos = {}
        for name, (a_name, b_name, _) in self.pairs.items():
            shape = (adapter.info(b_name).shape[0], adapter.info(a_name).shape[1])
            self._infos[name] = TensorInfo(shape[::-1] if self.fan_in_fan_out else shape, adapter.info(b_name).dtype)
        for name, stored in self.others.items():
            self._infos[name] = adapter.info(stored)
        if base is not None:
            self._check_against_base()
            self.names = list(base.names)
        else:
            self.names = sorted(self._infos)

    def _check_against_base(self):
        for name, info in self._infos.items():
            if name not in self.base:
                raise CheckpointError(f"{self.adapter.path}: adapts {name}, which the base model {self.base.path} lacks")
            if self.base.info(name).shape != info.shape:
                raise CheckpointError(
                    f"{self.adapter.path}: {name} has shape {info.shape}, the base model {self.base.path} "
                    f"has {self.base.info(name).shape}"
                )

    def __contains__(self, name):
        return name in self._infos or (self.base is not None and name in self.base)

    def info(self, name):
        if self.base is not None:
            return self.base.info(name)
        return self._infos[name]

    def get(self, name):
        if name in self.pairs:
            delta = self.delta(name)
            if self.base is None:
                return delta
            weight = self.base.get(name)
            return (weight.to(delta.dtype) + delta).to(weight.dtype)
        if name in self.others:
            return self.adapter.get(self.others[name])
        return self.base.get(name)

    def delta(self, name):
        """s·B·A of the adapted weight `name`, in the weight's own layout, at least in float32."""
        a_name, b_name, scale = self.pairs[name]
        a, b = self.adapter.get(a_name), self.adapter.get(b_name)
        dtype = torch.promote_types(a.dtype, torch.float32)
        delta = (b.to(dtype) @ a.to(dtype)) * scale
        return delta.T if self.fan_in_fan_out else delta

    def file_of(self, name):
        if name in self.pairs:
            return self.adapter.file_of(self.pairs[name][0])
        if name in self.others:
            return self.adapter.file_of(self.others[name])
        return self.base.file_of(name)

    def release(self):
        self.adapter.release()
        if self.base is not None:
            self.base.release()

    def __repr__(self):
        return f"LoraDeltaView({self.adapter.path!r}, base={self.base.path if self.base else None!r})"


def _scale(config, module, rank):
    alpha = config.get("lora_alpha", 8)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):  # PEFT's own rule (peft.utils.other.get_pattern_key)
            alpha = value
            break
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


class ZeroView:
    """The zero change: the ancestor of LoRA weight changes when no base model is given."""

    def __init__(self, like):
        self.like, self.path, self.folder, self.kind = like, "(zero change)", None, "lora_delta"
        self.names = like.names

    def __contains__(self, name):
        return name in self.like

    def info(self, name):
        return self.like.info(name)

    def get(self, name):
        info = self.like.info(name)
        return torch.zeros(info.shape, dtype=info.dtype)

    def file_of(self, name):
        return self.path

    def release(self):
        pass


def factorize(delta, rank, fan_in_fan_out=False):
    """(A [rank, in], B [out, rank]) with B·A the best rank-`rank` approximation of `delta` [out, in]
    (transposed first when the adapter stores weights as [in, out]); the singular values are split evenly,
    B = U·√S, A = √S·Vᵀ, and missing components are zero when `rank` exceeds min(out, in)."""
    matrix = delta.T if fan_in_fan_out else delta
    work = matrix.to(torch.promote_types(matrix.dtype, torch.float32))
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    keep = min(rank, s.numel())
    root = s[:keep].sqrt()
    a = torch.zeros(rank, work.shape[1], dtype=work.dtype, device=work.device)
    b = torch.zeros(work.shape[0], rank, dtype=work.dtype, device=work.device)
    a[:keep] = root[:, None] * vh[:keep]
    b[:, :keep] = u[:, :keep] * root[None, :]
    return a, b


def output_adapter_config(rank):
    """adapter_config.json keys of an adapter written by `factorize`: rank `rank`, scale 1."""
    return {"r": rank, "lora_alpha": rank, "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False}
