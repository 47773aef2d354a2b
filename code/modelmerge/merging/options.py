"""What a merge is asked to do: one frozen `MergeOptions`, built once by the program that read the command
line, a JSON options file (`MergeOptions.read`, what `MergeJob` writes) or names a mergekit YAML
configuration, and handed to the library, which never parses command-line flags.

The fields hold parsed values: paths as strings, `dtype` a torch dtype, `device` a torch device (checked
here, the one place a merge's device is checked), sizes in bytes. Method parameters (`params`) stay as given
(strings from a command line, numbers from JSON or YAML): the method's declared parameters convert and
check them (merging/parameters.py).
"""
import json
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Mapping

import torch

from ..shards import parse_shard
from ..threads import check_threads

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
LORA_PREFIX = "lora-"


class MergeError(ValueError):
    """A merge that cannot be done as asked; the message names the input, file, tensor or value and the cause."""


@dataclass(frozen=True)
class Shard:
    """Part `index` (1-based) of `count`."""

    index: int
    count: int

    @classmethod
    def parse(cls, text):
        """'I/N' -> Shard(I, N); a MergeError unless 1 ≤ I ≤ N."""
        try:
            return cls(*parse_shard(text))
        except ValueError:
            raise MergeError(f"--shard takes I/N with 1 ≤ I ≤ N (part I of N), got {text!r}") from None


@dataclass(frozen=True)
class MergeOptions:
    """One merge: `method` (a registered name, or `lora-NAME` to merge LoRA adapters as weight changes
    B·A) of the checkpoints `models` into `output`, or the merge a mergekit YAML file `config` describes
    (see `merging.merge`)."""

    method: str | None = None
    models: tuple[str, ...] = ()
    output: str = ""
    statistics: tuple[str, ...] | None = None  # statistics of each model, same order
    ancestor: str | None = None  # θ_0
    ancestor_statistics: str | None = None  # statistics of θ_0
    initial: str | None = None  # where iterative methods start (MaTS)
    params: Mapping[str, Any] = field(default_factory=dict)  # method parameters by name or alias
    include: str | None = None  # regular expression (re.search): only matching tensors are merged
    exclude: str | None = None  # regular expression: matching tensors are copied from θ_0 (else model 1)
    dtype: torch.dtype | None = None  # working and output precision (None: execute.output_entries's rule)
    device: torch.device = torch.device("cpu")
    max_shard_bytes: int = 5 * 10**9
    lora_rank: int | None = None  # rank of the adapter a lora- merge without ancestor writes (None: largest input)
    overwrite: bool = False  # replace an existing output that a merge did not write
    allow_statistics_mismatch: bool = False  # merge statistics recording another model than theirs (merging.provenance)
    progress: bool = True
    shard: Shard | None = None  # merge only this part of the tensors into a part file (merging/shards.py)
    threads: int | None = None  # torch threads on the CPU (None: one, or OMP_NUM_THREADS where set)
    config: str | None = None  # a mergekit YAML configuration: it names the method, models and parameters

    def __post_init__(self):
        def set_(name, value):
            object.__setattr__(self, name, value)

        set_("models", tuple(self.models or ()))
        self._check_request()
        set_("statistics", None if self.statistics is None else tuple(self.statistics))
        set_("params", MappingProxyType(dict(self.params)))
        set_("device", check_device(self.device))
        if self.dtype is not None and self.dtype not in DTYPES.values():
            raise MergeError(f"dtype {self.dtype} is not one of {', '.join(DTYPES)}")
        if not isinstance(self.max_shard_bytes, int) or self.max_shard_bytes < 1:
            raise MergeError(f"the largest output shard must be a positive number of bytes, got {self.max_shard_bytes!r}")
        if self.threads is not None:
            try:
                check_threads(self.threads, "the number of threads")
            except ValueError as error:
                raise MergeError(str(error)) from None
        if self.lora_rank is not None and self.lora_rank < 1:
            raise MergeError(f"the LoRA rank must be at least 1, got {self.lora_rank}")

    def _check_request(self):
        if not self.output:
            raise MergeError("a merge needs an output path")
        if self.config is None:
            if not self.method or not self.models:
                raise MergeError("a merge needs a method and models, or a mergekit configuration")
            return
        given = [f.name for f in fields(self) if f.name in _MERGE_FIELDS and getattr(self, f.name) != f.default]
        if given or self.params:
            raise MergeError(f"the mergekit configuration {self.config} names the whole merge; drop "
                             f"{', '.join(given or ['params'])}")
        if self.shard is not None:
            raise MergeError(f"the mergekit configuration {self.config} is merged whole: a shard needs a method")

    def to_json(self) -> dict:
        """The options as JSON values (`from_json` reads them back): dtype by name, device and shard as text."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(models=list(self.models), statistics=self.statistics and list(self.statistics),
                      params=dict(self.params), device=str(self.device),
                      dtype=self.dtype and str(self.dtype).removeprefix("torch."),
                      shard=self.shard and f"{self.shard.index}/{self.shard.count}")
        return values

    @classmethod
    def from_json(cls, values, where="the options"):
        """MergeOptions from `to_json`'s values (keys left out keep their defaults); a MergeError naming
        `where` for an unknown key or a value of the wrong kind."""
        if not isinstance(values, dict):
            raise MergeError(f"{where}: expected a JSON object of merge options")
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise MergeError(f"{where}: unknown key(s) {', '.join(unknown)}")
        values = dict(values)
        if values.get("dtype") is not None:
            if values["dtype"] not in DTYPES:
                raise MergeError(f"{where}: dtype {values['dtype']!r} is not one of {', '.join(DTYPES)}")
            values["dtype"] = DTYPES[values["dtype"]]
        if isinstance(values.get("shard"), str):
            values["shard"] = Shard.parse(values["shard"])
        for key in ("models", "statistics"):
            if values.get(key) is not None and not isinstance(values[key], list):
                raise MergeError(f"{where}: {key} must be a list of paths")
        if not isinstance(values.get("params", {}), dict):
            raise MergeError(f"{where}: params must be an object of method parameters")
        try:
            return cls(**values)
        except TypeError as error:  # e.g. a number where a path belongs
            raise MergeError(f"{where}: {error}") from None

    @classmethod
    def read(cls, path, **overrides):
        """The options in the JSON file `path` (as `MergeJob` writes them), with `overrides` set."""
        try:
            with open(path) as f:
                values = json.load(f)
        except (OSError, ValueError) as error:
            raise MergeError(f"options {path}: cannot read them ({error})") from None
        if isinstance(values, dict):
            values.update(overrides)
        return cls.from_json(values, f"options {path}")

    @property
    def lora(self) -> bool:
        return bool(self.method) and self.method.startswith(LORA_PREFIX)

    @property
    def method_name(self) -> str:
        """The method's registered name (without the lora- prefix)."""
        return self.method[len(LORA_PREFIX):] if self.lora else self.method

    @property
    def inputs(self) -> list[str]:
        """Every path the merge reads."""
        paths = [*self.models, *(self.statistics or ()), self.ancestor, self.ancestor_statistics, self.initial]
        return [path for path in paths if path]


# What a mergekit configuration names itself: given with `config`, they are a mistake.
_MERGE_FIELDS = ("method", "models", "statistics", "ancestor", "ancestor_statistics", "initial", "include", "exclude",
                 "dtype", "lora_rank", "allow_statistics_mismatch")


def check_device(device) -> torch.device:
    """`device` (a torch.device or its name) as a torch.device that exists here, else a MergeError."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise MergeError(f"device {device!r} is not a torch device (cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MergeError(f"device {device}: no CUDA device is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise MergeError(f"device {device}: there are only {torch.cuda.device_count()} CUDA devices")
    if device.type not in ("cpu", "cuda"):
        raise MergeError(f"device {device}: only cpu or cuda devices are supported")
    return device
