"""Record chosen modules' inputs in a forward pass, then take the gradients at their outputs.

One ordinary batched forward and backward pass gives, for every recorded call ("site") of a module, the
inputs it saw and the gradient of the loss at its output, both with the batch as leading dimension. That
is all a per-example gradient of a linear, embedding or layer-norm layer needs, and all a Gram matrix needs.

A module whose output has leading dimension 1 while the batch has more examples (BERT's position
embeddings: one [1, tokens, hidden] tensor broadcast over the batch) gets its output expanded to the batch
size, so that the gradient at it stays separate per example instead of being summed over the batch.
"""
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
from torch.autograd.graph import get_gradient_edge


@dataclass
class Site:
    """One call of a recorded module.

    Its outputs are not kept: a hook on each (registered as the layer returns it) puts the gradient at it into
    `grads` when the backward pass reaches it, and calls `on_gradients(site)` once every output that needs one
    has it, so that a consumer can use the gradients and drop them (and the site's inputs) at once rather than
    after the whole backward pass; `edges` tell autograd where those gradients are wanted. Holding the outputs
    and every gradient to the end would keep every layer's output and output gradient alive at once (on a ViT
    at batch size 32, over half of the peak memory). The hook sits on the layer's own node, so the gradient is
    the one at the output as the layer produced it, even if it is changed in place afterwards (an in-place
    activation)."""

    name: str
    module: torch.nn.Module
    args: tuple
    kwargs: dict
    edges: tuple  # of the output tensors (one for ordinary layers), batch-first; None: an output needing no gradient
    shapes: tuple  # (shape, dtype, device) of each output: the zero gradient of an output the loss does not reach
    grads: list = field(default_factory=list)  # the gradient at each output, as it arrives
    on_gradients: Callable | None = None

    def _arrived(self, index, grad):
        self.grads[index] = grad
        if self.on_gradients is not None and all(g is not None or e is None for g, e in zip(self.grads, self.edges)):
            self.on_gradients(self)

    def output_grads(self):
        """The gradient at each output, zeros where the loss does not reach it."""
        return tuple(torch.zeros(shape, dtype=dtype, device=device) if grad is None else grad
                     for grad, (shape, dtype, device) in zip(self.grads, self.shapes))

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
        edges = tuple(get_gradient_edge(t) if t.requires_grad else None for t in outputs)
        site = Site(name, module, args, kwargs, edges, tuple((t.shape, t.dtype, t.device) for t in outputs),
                    [None] * len(outputs))
        for index, tensor in enumerate(outputs):
            if tensor.requires_grad:
                tensor.register_hook(partial(_on_gradient, site, index))
        self.sites.append(site)
        if single:
            return outputs[0]
        return type(output)(outputs)

    def _broadcast(self, tensor):
        if self.batch_size > 1 and tensor.dim() > 0 and tensor.shape[0] == 1 and tensor.requires_grad:
            return tensor.expand(self.batch_size, *tensor.shape[1:])
        return tensor


def _on_gradient(site, index, grad):
    site._arrived(index, grad)  # returns None: the gradient flows on unchanged


def backpropagate(loss, sites):
    """Run the backward pass of `loss` as far as the sites' outputs (no parameter gradients), filling each site's
    `grads` (and calling its `on_gradients`) as the pass reaches it."""
    edges = [edge for site in sites for edge in site.edges if edge is not None]
    if edges and loss.requires_grad:
        torch.autograd.backward(loss, inputs=edges)


def output_gradients(loss, sites):
    """The gradient of `loss` at every output of every site (zeros where the output does not affect the loss)."""
    backpropagate(loss, sites)
    return [site.output_grads() for site in sites]
