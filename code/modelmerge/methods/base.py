"""The interface every merge method implements.

A method sees one parameter tensor at a time (a `TensorGroup`: that tensor of every model, of the
ancestor, and the statistics that describe it) and returns the merged tensor. Reading files, streaming,
devices, dtypes, validation of names/shapes/finiteness and writing the output live in the merge driver,
once; a method only does arithmetic. Adding a method is one module under `methods/` and one registry line.

Elementwise methods (`elementwise = True`) let the driver merge a tensor in blocks of rows, so a merge
needs memory for a few blocks rather than for whole tensors. A method whose entries also depend on values
of the whole tensor (TIES: the trim threshold of each task vector) computes those in `prepare`, which
reads the tensor block by block (`TensorBlocks`) before `merge` sees the blocks.

A sharded merge (merging/shards.py) gives each of N processes a part of the tensors, balanced by each
method's `cost`; that needs every tensor's merge to depend on its own inputs only. A method whose tensors
depend on each other (a threshold over the whole model, a pass through the partly merged model) says why
in `needs_every_tensor`, and its sharded merges then run whole in the first part.

Every method also declares what the rest of the project derives from it (`MethodDeclaration`: its kind, its
paper, the statistics it needs, its entries in the experiments' sweeps and suites); `modelmerge.catalogue`
collects the declarations into merge.py's --help, recipe/model_merging/catalogue.json and docs/methods.md.
"""
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar, Iterator

import torch

GRAM_KINDS = ("gram", "output_grad_gram")  # the statistics of a linear layer: [in, in] and [out, out]
# What `MergeMethod.cost` counts: the time to read, check, combine and write one entry of one input, in units
# of min(m, n)²·max(m, n), the term of an m x n SVD's time (on one core here ~3 ns per entry against 0.11 s
# for a 768 x 768 SVD and 0.2 s for 3072 x 768: about 20 units per entry).
DECOMPOSITION_UNITS_PER_ENTRY = 20


def entries_cost(shape, inputs: int) -> float:
    """The cost (see `MergeMethod.cost`) of streaming a tensor of `shape` from `inputs` inputs into the output."""
    return math.prod(shape) * (inputs + 1)


def decomposition_cost(shape) -> float:
    """The cost of one SVD or eigendecomposition of a 2-D tensor of `shape` (0 for other shapes)."""
    if len(shape) != 2:
        return 0.0
    return min(shape) ** 2 * max(shape) / DECOMPOSITION_UNITS_PER_ENTRY


def product_cost(flops: float) -> float:
    """The cost of `flops` floating-point operations in matrix products (about 5 per unit: a matmul keeps the
    core busier than an SVD does)."""
    return flops / (5 * DECOMPOSITION_UNITS_PER_ENTRY)


@dataclass
class TensorGroup:
    """Everything one merge step sees for one tensor name (or for one block of its rows)."""

    name: str
    tensors: list[torch.Tensor]  # θ_1..θ_T, working dtype, on the working device
    ancestor: torch.Tensor | None = None  # θ_0 (mergekit's base_model), when given
    # Statistics of each model, by kind: 'fisher' (diagonal, shape of the tensor), 'gram' (X^T X of a
    # linear layer's inputs, [in, in]), 'output_grad_gram' ([out, out]), 'trimmed' (trimmed task vector).
    statistics: list[dict[str, torch.Tensor]] = field(default_factory=list)
    ancestor_statistics: dict[str, torch.Tensor] = field(default_factory=dict)  # statistics of θ_0 (UBGM's H_0)
    initial: torch.Tensor | None = None  # a given starting point (MaTS initialised from another merge)
    prepared: Any = None  # what the method's `prepare` computed from the whole tensor, when this is a block
    first_row: int = 0  # where this block's rows begin in the whole tensor (0 for a whole tensor)
    # The tensor is a linear layer's weight stored [in, out] (GPT-2's Conv1D), not [out, in] as nn.Linear's, as
    # its Gram statistics record; methods that apply Gram matrices transpose it (regmean.weights_out_in).
    stored_in_out: bool = False

    def rows(self, selection) -> "TensorGroup":
        """The same group restricted to `selection` (a slice or an index tensor) of every tensor's rows."""
        first_row = self.first_row + (selection.indices(len(self.tensors[0]))[0] if isinstance(selection, slice) else 0)

        def pick(tensor):
            return None if tensor is None else tensor[selection]

        return replace(
            self, tensors=[pick(t) for t in self.tensors], ancestor=pick(self.ancestor),
            statistics=[{kind: pick(t) for kind, t in stats.items()} for stats in self.statistics],
            ancestor_statistics={kind: pick(t) for kind, t in self.ancestor_statistics.items()},
            initial=pick(self.initial),
            first_row=first_row,
        )

    def part_of(self, flat: torch.Tensor) -> torch.Tensor:
        """The entries of `flat` (one per entry of the whole tensor, in flat order) that this block of rows
        covers, shaped as the block."""
        block = self.tensors[0]
        start = self.first_row * (block[0].numel() if block.dim() else 1)
        return flat[start: start + block.numel()].view(block.shape)


class TensorBlocks:
    """One tensor's inputs, readable in consecutive blocks of rows: what `MergeMethod.prepare` sees.

    Iterating reads the blocks in order (again on every iteration); `sample` reads a few rows spread over
    the tensor. `read(selection)` returns the TensorGroup of the rows `selection` (None: all of them).
    """

    def __init__(self, name: str, shape: tuple[int, ...], read: Callable[[Any], TensorGroup], blocks: list):
        self.name = name
        self.shape = tuple(shape)
        self.numel = math.prod(self.shape)
        self._read = read
        self._blocks = blocks

    @classmethod
    def of(cls, group: TensorGroup) -> "TensorBlocks":
        """A group already in memory, as a single block."""
        def read(rows):
            return group if rows is None else group.rows(rows)

        return cls(group.name, tuple(group.tensors[0].shape), read, [None])

    def __iter__(self) -> Iterator[TensorGroup]:
        for rows in self._blocks:
            yield self._read(rows)

    def sample(self, size: int) -> TensorGroup:
        """About `size` entries of every tensor: evenly spaced rows, or the whole tensor if not larger."""
        if self.numel <= size or not self.shape:
            return self._read(None)
        rows = self.shape[0]
        count = min(rows, math.ceil(size * rows / self.numel))
        return self._read(torch.linspace(0, rows - 1, count).round().long().unique())


@dataclass(frozen=True)
class Parameter:
    """A method parameter. `per_model` ones arrive as a list with one value per model.

    `range` is the interval a number must lie in, written as in mathematics: "(0, 1]", "[0, inf)"; numbers
    without one must be finite. `choices` lists the values a string may take. The driver checks every
    value given (not None) against them before any tensor is read.
    """

    default: Any = None
    type: type = float
    per_model: bool = False
    aliases: tuple[str, ...] = ()
    required: bool = False
    help: str = ""
    range: str | None = None
    choices: tuple = ()

    def problem(self, value) -> str | None:
        """Why `value` (converted to `type`, not None) is not allowed, or None."""
        if self.choices and value not in self.choices:
            return f"must be one of {', '.join(map(str, self.choices))}"
        if self.type not in (int, float):
            return None
        if self.range is None:
            return None if math.isfinite(value) else "must be finite"
        low_open, low, high, high_open = _interval(self.range)
        below = value < low or (low_open and value == low)
        above = value > high or (high_open and value == high)
        return f"must lie in {self.range}" if below or above or math.isnan(value) else None


def _interval(text: str) -> tuple[bool, float, float, bool]:
    """'(0, 1]' -> (low open, low, high, high open)."""
    low, high = text[1:-1].split(",")
    return text[0] == "(", float(low), float(high), text[-1] == ")"


# What a method is, for the catalogue: "element-wise" and "whole-tensor" merges (code/merge.py; which of the two
# follows `MergeMethod.elementwise`), "per-task" ones (a unified model plus each task's mask and rescaler:
# code/modulated_merge.py), "data-aware" ones that run each task's data through the models (their own program),
# and "modifier"s, options of any merge with an ancestor (LiNeS, KnOTS).
KINDS = ("element-wise", "whole-tensor", "per-task", "data-aware", "modifier")
SCALING_FACTORS = "scaling_factors"  # a `Sweep.grid` meaning the experiment preset's grid of α


@dataclass(frozen=True)
class Sweep:
    """One entry of the experiments' method suites: merged at every value of `grid` for the parameter
    `parameter` (None: merged once) with the `fixed` parameters, and the value best on validation data reported
    (config/merging_methods.py); the family suites (recipe/model_merging/families.py) merge it once, at the
    middle of `grid` (at the suite's α for `SCALING_FACTORS`).

    `statistics`: the kind each model is given where the method's required `stats` do not name it (RegMean's
    optional Gram); `initial`: the label of the entry whose merge it starts from (MaTS from task arithmetic);
    `method`: the method merged, for the entries a modifier declares (default: the declaring method).
    """

    label: str
    parameter: str | None = None
    grid: tuple | str = ()
    fixed: dict = field(default_factory=dict)
    statistics: str | None = None
    initial: str | None = None
    method: str | None = None


@dataclass(frozen=True)
class Mergekit:
    """How mergekit (0.1.5) has a method of the same name, for its YAML configurations (modelmerge.merging.mergekit):
    the role of `base_model` ("ancestor": θ_0 of the method; "first": the first of the models, as slerp's t = 0
    end; "input": one more model), the parameter defaults that make ours compute what mergekit's implementation
    does, and the parameters mergekit accepts but its implementation ignores."""

    base_role: str
    defaults: dict = field(default_factory=dict)
    ignored: tuple = ()


# mergekit elects the + sign where the weighted sum of task vectors is exactly 0.
MERGEKIT_PLUS_ON_TIES = {"global_majority_sign": 1}


class MethodDeclaration:
    """What a method says about itself, for `modelmerge.catalogue`: everything but its arithmetic.

    `kind` is one of `KINDS` (None: element-wise or whole-tensor, as `MergeMethod.elementwise` says); `paper`
    the work it follows; `sweeps` its entries in the experiments' suites; `dataset_sizes` the parameters an
    experiment sets from the training set sizes, {parameter: "ancestor" or "models"} (θ_0's size, or one per
    model); `program` the code/ program that runs it, where it is not code/merge.py; `task_data` which split
    of each task's data a data-aware method runs on ("statistics" or "validation"); `mergekit` how mergekit has
    the method (None: it has not).
    """

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    kind: ClassVar[str | None] = None
    paper: ClassVar[str] = ""
    needs_base: ClassVar[bool] = False
    stats: ClassVar[tuple[str, ...]] = ()  # statistic kinds every model must provide for every merged tensor
    optional_stats: ClassVar[tuple[str, ...]] = ()  # kinds used where present (e.g. Gram only for linear weights)
    base_stats: ClassVar[tuple[str, ...]] = ()  # statistic kinds the ancestor must provide
    parameters: ClassVar[dict[str, Parameter]] = {}
    sweeps: ClassVar[tuple[Sweep, ...]] = ()
    dataset_sizes: ClassVar[dict[str, str]] = {}
    program: ClassVar[str] = "merge.py"
    task_data: ClassVar[str | None] = None
    mergekit: ClassVar[Mergekit | None] = None


class MergeMethod(MethodDeclaration):
    min_models: ClassVar[int] = 1
    max_models: ClassVar[int | None] = None
    # True: each output entry depends only on the same entry of every input (and on what `prepare` computes),
    # so `merge` may be given any block of rows (the same rows of every tensor and statistic of that shape).
    elementwise: ClassVar[bool] = False
    # Why a tensor's merge depends on other tensors (None: on its own inputs only, so merges can be sharded).
    needs_every_tensor: ClassVar[str | None] = None

    def cost(self, name: str, shape: tuple[int, ...], models: int, params: dict) -> float:
        """The relative time of merging tensor `name` of `shape` from `models` models (and an ancestor) with
        the resolved `params`, which a sharded merge balances: by default the entries streamed
        (`entries_cost`); methods that decompose matrices add `decomposition_cost` per decomposition."""
        return entries_cost(shape, models + 1)

    def prepare(self, blocks: TensorBlocks, **params) -> Any:
        """Values of the whole tensor that `merge` needs when it sees only a block (`group.prepared`);
        called only for tensors merged in blocks, with every parameter, resolved. `merge` computes them
        itself (e.g. with `self.prepare(TensorBlocks.of(group), ...)`) when `group.prepared` is None."""
        return None

    def merge(self, group: TensorGroup, **params) -> torch.Tensor:
        """Return the merged tensor for `group`; `params` holds every declared parameter, resolved."""
        raise NotImplementedError
