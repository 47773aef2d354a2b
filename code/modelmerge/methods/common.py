"""Helpers the merge methods share: working precision, per-model values, statistics lookup, weighted mean,
order statistics."""
import torch

from .base import TensorGroup


def upcast_dtype(dtype: torch.dtype, minimum: torch.dtype = torch.float32) -> torch.dtype:
    """The precision to compute in: `dtype` raised to at least `minimum` (half types become float32)."""
    if not dtype.is_floating_point:
        raise TypeError(f"merge methods need floating-point tensors, got {dtype}")
    return torch.promote_types(dtype, minimum)


def as_numbers(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as 1/0 in `dtype`, converted through its bytes (uint8): on the CPU several times faster
    than converting the bool tensor itself."""
    return mask.view(torch.uint8).to(dtype)


def per_model(values, group: TensorGroup, name: str) -> list[float]:
    """Check that a per-model parameter holds one number per model of `group` and return them as floats."""
    if len(values) != len(group.tensors):
        raise ValueError(
            f"{name}: got {len(values)} values for {len(group.tensors)} models (tensor {group.name})"
        )
    return [float(v) for v in values]


def stat(group: TensorGroup, index: int, kind: str) -> torch.Tensor:
    """Statistic `kind` of model `index`, or a ValueError naming the tensor when it is missing."""
    stats = group.statistics[index] if index < len(group.statistics) else {}
    if kind not in stats:
        raise ValueError(f"statistic '{kind}' of model {index + 1} is missing for tensor {group.name}")
    return stats[kind]


def base_tensor(group: TensorGroup) -> torch.Tensor:
    if group.ancestor is None:
        raise ValueError(f"this method needs the ancestor θ_0 (tensor {group.name})")
    return group.ancestor


def weighted_mean(tensors, weights, dtype, group: TensorGroup) -> torch.Tensor:
    """Σ w_t x_t / Σ w_t in `dtype`; a zero Σ w_t is an error naming the tensor."""
    total = sum(weights)
    if total == 0:
        raise ValueError(f"the weights sum to zero, so the weighted mean is undefined (tensor {group.name})")
    out = torch.zeros(tensors[0].shape, dtype=dtype, device=tensors[0].device)
    for x, w in zip(tensors, weights):
        out.add_(x.to(dtype), alpha=w)
    return out.div_(total)


def optional_stats(group: TensorGroup, kind: str) -> list[torch.Tensor] | None:
    """Statistic `kind` of every model, or None when no model has it; some but not all is an error."""
    present = [index < len(group.statistics) and kind in group.statistics[index] for index in range(len(group.tensors))]
    if not any(present):
        return None
    if not all(present):
        missing = [str(i + 1) for i, p in enumerate(present) if not p]
        raise ValueError(f"statistic '{kind}' is missing for tensor {group.name} in model(s) {', '.join(missing)}")
    return [group.statistics[index][kind] for index in range(len(group.tensors))]


def order_statistic(values: torch.Tensor, index: int) -> torch.Tensor:
    """The `index`-th smallest entry of `values` (from 0; negative counts from the largest, as Python's)."""
    flat = values.flatten()
    return flat.kthvalue(index % flat.numel() + 1).values
