"""The interface every merge method implements.

A method sees one parameter tensor at a time (a `TensorGroup`: that tensor of every model, of the
ancestor, and the statistics that describe it) and returns the merged tensor. Reading files, streaming,
devices, dtypes, validation of names/shapes/finiteness and writing the output live in the merge driver,
once; a method only does arithmetic. Adding a method is one module under `methods/` and one registry line.
"""
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch


@dataclass
class TensorGroup:
    """Everything one merge step sees for one tensor name."""

    name: str
    tensors: list[torch.Tensor]  # θ_1..θ_T, working dtype, on the working device
    base: torch.Tensor | None = None  # θ_0 (the ancestor / mergekit base_model), when given
    # Statistics of each model, by kind: 'fisher' (diagonal, shape of the tensor), 'gram' (X^T X of a
    # linear layer's inputs, [in, in]), 'output_grad_gram' ([out, out]), 'trimmed' (trimmed task vector).
    stats: list[dict[str, torch.Tensor]] = field(default_factory=list)
    base_stats: dict[str, torch.Tensor] = field(default_factory=dict)  # statistics of θ_0 (UBGM's H_0)
    initial: torch.Tensor | None = None  # a given starting point (MaTS initialised from another merge)


@dataclass(frozen=True)
class Parameter:
    """A method parameter. `per_model` ones arrive as a list with one value per model."""

    default: Any = None
    type: type = float
    per_model: bool = False
    aliases: tuple[str, ...] = ()
    required: bool = False
    help: str = ""


class MergeMethod:
    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    needs_base: ClassVar[bool] = False
    stats: ClassVar[tuple[str, ...]] = ()  # statistic kinds every model must provide for every merged tensor
    optional_stats: ClassVar[tuple[str, ...]] = ()  # kinds used where present (e.g. Gram only for linear weights)
    base_stats: ClassVar[tuple[str, ...]] = ()  # statistic kinds the ancestor must provide
    parameters: ClassVar[dict[str, Parameter]] = {}
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = None

    def merge(self, group: TensorGroup, **params) -> torch.Tensor:
        """Return the merged tensor for `group`; `params` holds every declared parameter, resolved."""
        raise NotImplementedError
