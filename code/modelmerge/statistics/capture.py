"""Record chosen modules' inputs and outputs in a forward pass, then take the gradients at those outputs.

One ordinary batched forward and backward pass gives, for every recorded call ("site") of a module, the
inputs it saw and the gradient of the loss at its output, both with the batch as leading dimension. That
is all a per-example gradient of a linear, embedding or layer-norm layer needs, and all a Gram matrix needs.

A module whose output has leading dimension 1 while the batch has more examples (BERT's position
embeddings: one [1, tokens, hidden] tensor broadcast over the batch) gets its output expanded to the batch
size, so that the gradient at it stays separate per example instead of being summed over the batch.
"""
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch


@dataclass
class Site:
    """One call of a recorded module."""

    name: str
    module: torch.nn.Module
    args: tuple
    kwargs: dict
    outputs: tuple  # the output tensors (one for ordinary layers), batch-first
    versions: tuple  # their version counters when recorded, to detect in-place changes

    def first_input(self):
        return self.args[0] if self.args else next(iter(self.kwargs.values()))


def batch_first(tensor, batch_size, what):
    """`tensor` with leading dimension `batch_size` (a leading 1 is broadcast); anything else is refused."""
    if tensor.dim() > 0 and tensor.shape[0] == batch_size:
        return tensor
    if tensor.dim() > 0 and tensor.shape[0] == 1:
        return tensor.expand(batch_size, *tensor.shape[1:])
    raise ValueError(
        f"{what} has shape {tuple(tensor.shape)}: its leading dimension is neither the batch size {batch_size} nor 1; "
        "per-example statistics need batch-first tensors"
    )


class ModuleCapture:
    """Forward hooks on `modules` (name → module) recording a `Site` per call while `recording()` is active."""

    def __init__(self, modules):
        self.sites = None
        self.batch_size = None
        self.handles = [
            module.register_forward_hook(partial(self._record, name), with_kwargs=True)
            for name, module in modules.items()
        ]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def remove(self):
        for handle in self.handles:
            handle.remove()
        self.handles = []

    @contextmanager
    def recording(self, batch_size):
        """Record the sites of one forward pass over `batch_size` examples into the yielded list."""
        self.sites, self.batch_size = [], batch_size
        try:
            yield self.sites
        finally:
            self.sites = None

    @contextmanager
    def paused(self):
        """Record nothing inside (a module re-run under torch.func must not add sites)."""
        saved, self.sites = self.sites, None
        try:
            yield
        finally:
            self.sites = saved

    def _record(self, name, module, args, kwargs, output):
        if self.sites is None or not torch.is_grad_enabled():
            return None
        single = torch.is_tensor(output)
        outputs = (output,) if single else tuple(output) if isinstance(output, (tuple, list)) else None
        if outputs is None or not all(torch.is_tensor(t) for t in outputs):
            returned = type(output).__name__
            raise TypeError(f"module {name} ({type(module).__name__}) returned {returned}; expected tensors")
        outputs = tuple(self._broadcast(t) for t in outputs)
        self.sites.append(Site(name, module, args, kwargs, outputs, tuple(t._version for t in outputs)))
        if single:
            return outputs[0]
        return type(output)(outputs)

    def _broadcast(self, tensor):
        if self.batch_size > 1 and tensor.dim() > 0 and tensor.shape[0] == 1 and tensor.requires_grad:
            return tensor.expand(self.batch_size, *tensor.shape[1:])
        return tensor


def output_gradients(loss, sites):
    """The gradient of `loss` at every output of every site (zeros where the output does not affect the loss)."""
    outputs = []
    for site in sites:
        for tensor, version in zip(site.outputs, site.versions):
            if tensor._version != version:
                raise RuntimeError(
                    f"the output of {site.name} ({type(site.module).__name__}) was modified in place after the layer "
                    "ran; the gradient at it cannot be taken"
                )
            outputs.append(tensor)
    differentiable = [i for i, tensor in enumerate(outputs) if tensor.requires_grad]
    found = torch.autograd.grad(loss, [outputs[i] for i in differentiable], allow_unused=True, materialize_grads=True)
    grads = [None] * len(outputs)
    for i, grad in zip(differentiable, found):
        grads[i] = grad
    grads = [torch.zeros_like(tensor) if grad is None else grad for tensor, grad in zip(outputs, grads)]
    per_site, start = [], 0
    for site in sites:
        per_site.append(tuple(grads[start : start + len(site.outputs)]))
        start += len(site.outputs)
    return per_site
