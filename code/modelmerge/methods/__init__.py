"""The merge methods, by name: `MERGE_METHODS` maps every name and alias to its class; `get_method` looks one up.

Adding a method is one module in this folder and one entry in `_CLASSES`.
"""
from .base import MergeMethod, Parameter, TensorGroup
from .arcee_fusion import ArceeFusion
from .breadcrumbs import Breadcrumbs, BreadcrumbsTies
from .cart import Cart
from .consensus import Consensus, TallMasks
from .dare import DareLinear, DareTies
from .emr import Emr
from .della import Della, DellaLinear
from .fisher import Fisher
from .isotropic import IsoC, IsoCts
from .karcher import Karcher
from .linear import Linear
from .lot import Lot
from .magmax import MagMax
from .mats import Mats
from .mlerp import Mlerp
from .model_stock import ModelStock
from .multislerp import MultiSlerp
from .nearswap import NearSwap
from .nuslerp import NuSlerp
from .passthrough import Passthrough
from .pcb import Pcb
from .ram import Ram, RamPlusTensorLocal
from .regmean import RegMean
from .sce import Sce
from .slerp import Slerp
from .task_arithmetic import TaskArithmetic
from .trust_region import GradientTrustRegion, TrustRegion
from .tsv_m import TsvM
from .ties import Ties
from .uncertainty_based_gradient_matching import UncertaintyBasedGradientMatching
from .wudi import Wudi

_CLASSES: tuple[type[MergeMethod], ...] = (
    Linear, TaskArithmetic, Ties, DareLinear, DareTies, Breadcrumbs, BreadcrumbsTies, Mlerp, Fisher, RegMean, Mats,
    Slerp, UncertaintyBasedGradientMatching, Passthrough,
    # mergekit 0.1.5's newer methods
    ModelStock, Della, DellaLinear, Sce, NuSlerp, MultiSlerp, Karcher, NearSwap, ArceeFusion, Ram, RamPlusTensorLocal,
    # data-free methods of the current field
    TsvM, IsoC, IsoCts, Wudi, MagMax, Consensus, TallMasks, Emr, Cart, Pcb, TrustRegion,
    # data-aware closed forms of the current field
    Lot, GradientTrustRegion,
)


def _registry() -> dict[str, type[MergeMethod]]:
    methods: dict[str, type[MergeMethod]] = {}
    for cls in _CLASSES:
        for key in (cls.name, *cls.aliases):
            if key in methods:
                raise RuntimeError(f"merge method name {key!r} is used by {methods[key].__name__} and {cls.__name__}")
            methods[key] = cls
    return methods


MERGE_METHODS: dict[str, type[MergeMethod]] = _registry()


def get_method(name: str) -> type[MergeMethod]:
    """The method class registered under `name` (a name or an alias)."""
    try:
        return MERGE_METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; known: {', '.join(sorted(MERGE_METHODS))}") from None

__all__ = ["MERGE_METHODS", "get_method", "MergeMethod", "Parameter", "TensorGroup"]
