"""Sums over examples of squared per-example gradients, from one ordinary batched backward pass.

The per-example gradient of a layer's parameters follows from what the layer saw and the gradient at its
output (`capture.py`), layer by layer, without a backward pass per example:
- nn.Linear, inputs x and output gradients g of example b ([tokens, in], [tokens, out]):
  ∇W_b = Σ_tokens outer(g, x) = g_bᵀ x_b (one batched matmul), ∇bias_b = Σ_tokens g; GPT-2's Conv1D alike
  (its weight is [in, out]: x_bᵀ g_b), and nn.Conv2d on its unfolded patches (ViT/CLIP patch embeddings);
- nn.Embedding: ∇W_b touches only the rows of the ids example b uses: row v gets Σ of g over b's tokens with
  id v (the padding_idx row gets no gradient, as in `F.embedding`); kept sparse, never [vocab, dim] per example;
- nn.LayerNorm: ∇weight_b = Σ_tokens g ⊙ x̂ with x̂ the normalised input, ∇bias_b = Σ_tokens g; T5's RMS norm
  alike (x̂ = x / sqrt(mean(x²) + eps)).
Every other trainable parameter (PEFT's IA3 vectors, custom layers) is handled generically with
`torch.func`: the vector-Jacobian product of its module, vmapped over the examples, at each example's
captured inputs and output gradient. This is the approach of BackPACK (Dangel et al., ICLR 2020) and of
Goodfellow's "Efficient per-example gradient computations" (2015), specialised to the squared gradient.

A parameter used in several calls (a module applied twice, tied weights) has its per-example gradients
summed over the calls before squaring. Examples must not interact (eval mode, no batch statistics): the
gradient at an example's outputs then depends on that example alone.
"""
import sys
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from modelmerge.statistics.capture import ModuleCapture, backpropagate, batch_first

# Containers are never called themselves; a parameter they hold belongs to the module that uses them.
CONTAINERS = (nn.ModuleDict, nn.ModuleList, nn.ParameterDict, nn.ParameterList)


# How Σ_b (g_bᵀ x_b)² of a linear layer is formed (`OuterProductGradients.add_squares_to`):
# - when every example has at most PAIRED_POSITIONS positions whose output gradient and input are not zero (a
#   classifier or pooler on one token, BERT's last layer past its attention keys and values, a language-model head
#   on the few scored tokens): (Σ_t g_t x_tᵀ)² = Σ_{t,s} (g_t ⊙ g_s)(x_t ⊙ x_s)ᵀ, one matrix product for the whole
#   batch over the examples' position pairs, with no per-example gradient formed at all;
# - otherwise on a CPU, a per-example gradient of at least PER_EXAMPLE_BYTES is formed one example at a time, in
#   tiles of output rows of about TILE_BYTES, each squared and added at once (`addcmul_`) while it is in the
#   core's L2 cache; smaller ones for the whole batch in tiles of BATCH_TILE_BYTES (fewer, larger operations).
#   On a GPU, memory is fast and operations are costly to launch: whole batches at once.
PAIRED_POSITIONS = 4
PER_EXAMPLE_BYTES = 128 << 10
TILE_BYTES = 512 << 10
BATCH_TILE_BYTES = {"cpu": 1 << 20}
DEFAULT_BATCH_TILE_BYTES = 256 << 20
PAIRED_CHUNK_BYTES = 32 << 20  # the position-pair products of a chunk of examples


@dataclass
class DenseGradients:
    values: torch.Tensor  # [batch, *parameter shape]

    def add_squares_to(self, total):
        # squared in the sums' precision: squares of half-precision gradients underflow (float16: below 6e-8)
        total += self.values.reshape(len(self.values), *total.shape).to(total.dtype).square().sum(0)

    def add_absolutes_to(self, total):
        total += self.values.reshape(len(self.values), *total.shape).to(total.dtype).abs().sum(0)

    def as_rows(self, num_rows):
        batch = len(self.values)
        entries = torch.arange(batch * num_rows, device=self.values.device)
        return RowGradients(entries // num_rows, entries % num_rows, self.values.reshape(batch * num_rows, -1))


@dataclass
class OuterProductGradients:
    """Per-example gradients g_bᵀ x_b of a linear layer's weight; g: [batch, tokens, out], x: [batch, tokens, in]."""

    g: torch.Tensor
    x: torch.Tensor
    live: torch.Tensor | None = None  # [batch, tokens], False where the layer's output gradient is zero (None: nowhere)

    def add_squares_to(self, total):
        g, x = self.g.to(total.dtype), self.x.to(total.dtype)
        live = torch.ones(g.shape[:2], dtype=torch.bool, device=g.device) if self.live is None else self.live
        most = int(live.sum(1).max())
        if most == 0:
            return
        if most <= PAIRED_POSITIONS:
            _add_paired_squares(total, *_live_positions(g, x, live, most))
        elif g.device.type == "cpu" and total.numel() * total.element_size() >= PER_EXAMPLE_BYTES:
            lengths = (live * torch.arange(1, live.shape[1] + 1)).amax(1).tolist()  # up to the last live position
            _add_squares_per_example(total, g, x, lengths)
        else:
            _add_squares_in_batch_tiles(total, g, x)

    def add_absolutes_to(self, total):
        """total += Σ_b |g_bᵀ x_b|: no product identity applies to |·|, so every example's gradient is formed, in
        tiles of output rows (the routes of `add_squares_to` but the paired one)."""
        g, x = self.g.to(total.dtype), self.x.to(total.dtype)
        live = torch.ones(g.shape[:2], dtype=torch.bool, device=g.device) if self.live is None else self.live
        if not live.any():
            return
        if g.device.type == "cpu" and total.numel() * total.element_size() >= PER_EXAMPLE_BYTES:
            lengths = (live * torch.arange(1, live.shape[1] + 1)).amax(1).tolist()
            _add_per_example(total, g, x, lengths, torch.Tensor.abs_)
        else:
            _add_in_batch_tiles(total, g, x, torch.Tensor.abs_)

    def as_rows(self, num_rows):
        return DenseGradients(torch.bmm(self.g.transpose(1, 2), self.x)).as_rows(num_rows)

    def rows_of(self, examples, rows):
        """Row `rows[e]` of example `examples[e]`'s gradient, for each entry e: Σ_tokens g[:, row] x."""
        values = self.g.new_empty(len(rows), self.x.shape[2])
        for b in examples.unique().tolist():
            entries = (examples == b).nonzero()[:, 0]
            values[entries] = self.g[b][:, rows[entries]].T @ self.x[b]
        return values


def nonzero_positions(g):
    """[batch, tokens]: whether the output gradient g ([batch, tokens, features]) is not zero at the position. Zero
    positions add nothing to an example's weight gradient: padding, and the positions a layer's output does not reach
    the loss from (BERT's last layer past its attention keys and values, a language-model head off the scored tokens)."""
    return g.amax(2).ne(0) | g.amin(2).ne(0)  # two reductions: faster than g.ne(0).any(2)


def _live_positions(g, x, live, most):
    """g and x at each example's first `most` live positions (then positions whose gradient is zero)."""
    order = torch.argsort(live.to(torch.int8), dim=1, descending=True, stable=True)[:, :most]
    return (g.gather(1, order[:, :, None].expand(-1, -1, g.shape[2])),
            x.gather(1, order[:, :, None].expand(-1, -1, x.shape[2])))


def _add_paired_squares(total, g, x):
    """total += Σ_b (g_bᵀ x_b)² as Σ_b Σ_{t<=s} c_ts (g_bt ⊙ g_bs)ᵀ (x_bt ⊙ x_bs), c = 1 on the diagonal, else 2.

    g is scaled by a power of two (exact) to a largest value near 1 first: products of two small gradients would
    otherwise be subnormal numbers, which CPUs multiply a hundred times slower."""
    batch, positions, out = g.shape
    _, exponent = torch.frexp(g.abs().amax())
    g = torch.ldexp(g, -exponent)
    first, second = torch.triu_indices(positions, positions, device=g.device)
    weights = torch.where(first == second, 1.0, 2.0).to(g.dtype)[None, :, None]
    chunk = max(1, PAIRED_CHUNK_BYTES // (len(first) * (out + x.shape[2]) * g.element_size()))
    for start in range(0, batch, chunk):
        g_, x_ = g[start : start + chunk], x[start : start + chunk]
        gg = (g_[:, first] * g_[:, second] * weights).reshape(-1, out)
        xx = (x_[:, first] * x_[:, second]).reshape(-1, x.shape[2])
        total.addmm_(gg.T, xx, alpha=2.0 ** (2 * int(exponent)))


def _add_squares_per_example(total, g, x, lengths):
    """total += Σ_b (g_bᵀ x_b)², each example's product formed and squared in tiles of output rows in cache."""
    _add_per_example(total, g, x, lengths, None)


def _add_per_example(total, g, x, lengths, elementwise):
    """total += Σ_b f(g_bᵀ x_b) (f: the in-place `elementwise`; None: the square, fused into `addcmul_`), each
    example's product formed in tiles of output rows in cache."""
    out, in_ = total.shape
    tiles = -(-total.numel() * total.element_size() // TILE_BYTES)
    rows = -(-out // tiles)
    examples = [(g[b, :length].T, x[b, :length]) for b, length in enumerate(lengths) if length]
    buffer = total.new_empty(min(rows, out), in_)
    for start in range(0, out, rows):
        tile, product = total[start : start + rows], buffer[: min(rows, out - start)]
        for g_b, x_b in examples:
            torch.mm(g_b[start : start + rows], x_b, out=product)
            if elementwise is None:
                tile.addcmul_(product, product)
            else:
                tile += elementwise(product)


def _add_squares_in_batch_tiles(total, g, x):
    """total += Σ_b (g_bᵀ x_b)² in tiles of output rows for the whole batch: the products [batch, rows, in] and the
    tile of the sums they are added to stay in cache, and `total` is passed over once per batch."""
    _add_in_batch_tiles(total, g, x, torch.Tensor.square_)


def _add_in_batch_tiles(total, g, x, elementwise):
    """total += Σ_b f(g_bᵀ x_b), f the in-place `elementwise`, in tiles of output rows for the whole batch."""
    g = g.transpose(1, 2)
    batch, out, in_ = len(g), g.shape[1], x.shape[2]
    block_bytes = BATCH_TILE_BYTES.get(g.device.type, DEFAULT_BATCH_TILE_BYTES)
    rows = max(1, min(out, block_bytes // (batch * in_ * g.element_size())))
    products = torch.empty(batch, rows, in_, dtype=g.dtype, device=g.device)
    reduced = torch.empty(rows, in_, dtype=g.dtype, device=g.device)
    for start in range(0, out, rows):
        n = min(rows, out - start)
        product = torch.bmm(g[:, start : start + n], x, out=products[:, :n])
        total[start : start + n] += torch.sum(elementwise(product), 0, out=reduced[:n])


@dataclass
class RowGradients:
    """Per-example gradients that are non-zero in a few rows only: one entry per distinct (example, row)."""

    examples: torch.Tensor  # [entries]
    rows: torch.Tensor  # [entries]
    values: torch.Tensor  # [entries, *parameter shape[1:]]

    def add_squares_to(self, total):
        total.index_add_(0, self.rows, self.values.reshape(len(self.rows), -1).to(total.dtype).square())

    def add_absolutes_to(self, total):
        total.index_add_(0, self.rows, self.values.reshape(len(self.rows), -1).to(total.dtype).abs())

    def as_rows(self, num_rows):
        return self


def _has_stock_forward(module, cls):
    return isinstance(module, cls) and type(module).forward is cls.forward


def linear_gradients(module, x, g, batch_size):
    x = batch_first(x, batch_size, "the input of a linear layer").reshape(batch_size, -1, module.in_features)
    g = batch_first(g, batch_size, "the output of a linear layer").reshape(batch_size, -1, module.out_features)
    gradients = {"weight": lambda: OuterProductGradients(g, x, nonzero_positions(g)),
                 "bias": lambda: DenseGradients(g.sum(1))}
    return _wanted(module, gradients)


def conv1d_gradients(module, x, g, batch_size):
    """GPT-2's Conv1D is a linear layer with its weight stored as [in, out]: ∇W_b = x_bᵀ g_b."""
    in_, out = module.weight.shape
    x = batch_first(x, batch_size, "the input of a Conv1D layer").reshape(batch_size, -1, in_)
    g = batch_first(g, batch_size, "the output of a Conv1D layer").reshape(batch_size, -1, out)
    gradients = {"weight": lambda: OuterProductGradients(x, g, nonzero_positions(g)),
                 "bias": lambda: DenseGradients(g.sum(1))}
    return _wanted(module, gradients)


def conv2d_gradients(module, x, g, batch_size):
    """A 2-D convolution is a linear layer on the unfolded patches (ViT/CLIP patch embeddings): ∇W_b = g_bᵀ cols_b."""
    x = batch_first(x, batch_size, "the input of a Conv2d layer")
    g = batch_first(g, batch_size, "the output of a Conv2d layer").flatten(2).transpose(1, 2)  # [batch, places, out]
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
    gradients = {"weight": lambda: OuterProductGradients(g, cols.transpose(1, 2)), "bias": lambda: DenseGradients(g.sum(1))}
    return _wanted(module, gradients)


def embedding_gradients(module, ids, g, batch_size):
    ids = batch_first(ids, batch_size, "the ids of an embedding").reshape(batch_size, -1)
    g = batch_first(g, batch_size, "the output of an embedding").reshape(-1, module.embedding_dim)
    keys = (torch.arange(batch_size, device=ids.device)[:, None] * module.num_embeddings + ids).reshape(-1)
    unique, inverse = torch.unique(keys, return_inverse=True)
    values = g.new_zeros(len(unique), module.embedding_dim).index_add_(0, inverse, g)
    examples, rows = unique // module.num_embeddings, unique % module.num_embeddings
    if module.padding_idx is not None:
        keep = rows != module.padding_idx
        examples, rows, values = examples[keep], rows[keep], values[keep]
    return _wanted(module, {"weight": lambda: RowGradients(examples, rows, values)})


def layer_norm_gradients(module, x, g, batch_size):
    shape = tuple(module.normalized_shape)
    x = batch_first(x, batch_size, "the input of a layer norm")
    g = batch_first(g, batch_size, "the output of a layer norm").reshape(batch_size, -1, *shape)
    gradients = {
        "weight": lambda: DenseGradients((g * F.layer_norm(x, shape, eps=module.eps).reshape(g.shape)).sum(1)),
        "bias": lambda: DenseGradients(g.sum(1)),
    }
    return _wanted(module, gradients)


def t5_layer_norm_gradients(module, x, g, batch_size):
    """T5's RMS norm, weight ⊙ x / sqrt(mean(x²) + eps) (float32 statistics): ∇weight_b = Σ_tokens g ⊙ x̂."""
    x = batch_first(x, batch_size, "the input of a T5 layer norm")
    g = batch_first(g, batch_size, "the output of a T5 layer norm").reshape(batch_size, -1, x.shape[-1])
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    normalised = (x * torch.rsqrt(variance + module.variance_epsilon)).to(g.dtype).reshape(g.shape)
    return _wanted(module, {"weight": lambda: DenseGradients((g * normalised).sum(1))})


def _is_t5_layer_norm(module):
    t5 = sys.modules.get("transformers.models.t5.modeling_t5")  # not imported: no T5 model exists
    return t5 is not None and _has_stock_forward(module, t5.T5LayerNorm)


def _wanted(module, gradients):
    """Compute only the gradients of the module's trainable parameters: (parameter, gradients) pairs."""
    wanted = []
    for name, compute in gradients.items():
        parameter = getattr(module, name, None)
        if parameter is not None and parameter.requires_grad:
            wanted.append((parameter, compute()))
    return wanted


def layer_rule(module):
    """The layer-wise rule for `module`, or None when it needs the generic torch.func route."""
    if _has_stock_forward(module, nn.Linear):
        return linear_gradients
    if _has_stock_forward(module, Conv1D):
        return conv1d_gradients
    if (_has_stock_forward(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"
            and not isinstance(module.padding, str)):
        return conv2d_gradients
    if _has_stock_forward(module, nn.Embedding) and module.max_norm is None and not module.scale_grad_by_freq:
        return embedding_gradients
    if _has_stock_forward(module, nn.LayerNorm):
        return layer_norm_gradients
    if _is_t5_layer_norm(module):
        return t5_layer_norm_gradients
    return None


def functional_gradients(site, output_grads, parameters, batch_size):
    """Per-example gradients of `parameters` (name relative to the site's module → parameter) via torch.func.

    Each example's inputs are the slices of the site's tensor arguments whose leading dimension is the batch
    size (the other arguments are shared); the module runs on one example at a time under `vmap`, and the
    vector-Jacobian product with that example's output gradient gives its parameter gradients.
    """
    names = list(parameters)
    arguments = list(site.args) + list(site.kwargs.values())
    keywords = list(site.kwargs)
    batched = [torch.is_tensor(a) and a.dim() > 0 and a.shape[0] == batch_size for a in arguments]

    def run(parameter_values, example_arguments):
        examples = iter(example_arguments)
        values = [next(examples).unsqueeze(0) if is_batched else a for a, is_batched in zip(arguments, batched)]
        args, kwargs = values[: len(site.args)], dict(zip(keywords, values[len(site.args) :]))
        output = torch.func.functional_call(site.module, dict(zip(names, parameter_values)), tuple(args), kwargs)
        return (output,) if torch.is_tensor(output) else tuple(output)

    def one_example(example_arguments, example_output_grads):
        _, vjp = torch.func.vjp(lambda *p: run(p, example_arguments), *[parameters[n].detach() for n in names])
        return vjp(tuple(g.unsqueeze(0) for g in example_output_grads))

    try:
        gradients = torch.func.vmap(one_example)(
            tuple(a for a, is_batched in zip(arguments, batched) if is_batched), tuple(output_grads)
        )
    except Exception as error:
        module = f"{site.name} ({type(site.module).__name__})"
        raise RuntimeError(f"per-example gradients of {names} in {module} via torch.func failed: {error}") from error
    return [(parameters[name], DenseGradients(grad)) for name, grad in zip(names, gradients)]


class SquaredGradientSums:
    """Σ over examples of the squared per-example gradient of every trainable parameter of `model`.

    Use as a context manager (it hooks the model's modules); call `add(loss, sites, batch_size)` after each
    forward pass recorded with `self.capture.recording(batch_size)`, where `loss` is the sum over the batch of
    the per-example objectives; `named_sums()` gives the sums by `named_parameters()` name.
    """

    def __init__(self, model):
        self.names = {}  # id(parameter) → name
        self.parameters = {}  # id(parameter) → parameter
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                self.names[id(parameter)] = name
                self.parameters[id(parameter)] = parameter
        if not self.parameters:
            raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
        self.rule_modules, self.functional_modules = _assign_parameters(model, self.parameters)
        # Sums in the parameters' precision, at least float32, as the authors' loop keeps them: one buffer the size
        # of the model (float64 totals would double it and cost a float64 pass over every parameter per batch).
        self.sums = {id_: _zeros(p, torch.promote_types(p.dtype, torch.float32)) for id_, p in self.parameters.items()}
        self.capture = ModuleCapture({**self.rule_modules, **{n: m for n, (m, _) in self.functional_modules.items()}})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.capture.remove()

    def describe(self):
        return (
            f"{len(self.parameters)} trainable tensors ({sum(p.numel() for p in self.parameters.values()):,} values): "
            f"{len(self.rule_modules)} linear/embedding/layer-norm layers by layer-wise rules, "
            f"{len(self.functional_modules)} other modules by torch.func"
        )

    def add(self, loss, sites, batch_size):
        """Add the batch's squared per-example gradients. A layer-wise rule's squares are added as soon as the
        backward pass reaches its layer, and the layer's output gradient and inputs are dropped then: the batch's
        gradients never all exist at once. The modules by torch.func follow the backward pass (their vector-Jacobian
        products cannot run inside it), as do the squares of parameters used in several calls (summed first)."""
        calls = defaultdict(int)
        for site in sites:
            for parameter in self._site_parameters(site):
                calls[id(parameter)] += 1
        pending = defaultdict(list)  # per-example gradients of parameters used in several calls
        used = set()

        def use(site):
            with torch.no_grad():
                for parameter, gradients in self._site_gradients(site, site.output_grads(), batch_size):
                    if calls[id(parameter)] == 1:
                        self._accumulate(self.sums[id(parameter)], [gradients])
                    else:
                        pending[id(parameter)].append(gradients)
            used.add(id(site))
            site.on_gradients, site.grads, site.args, site.kwargs = None, [None] * len(site.grads), (), {}

        for site in sites:
            if site.name in self.rule_modules:
                site.on_gradients = use
        backpropagate(loss, sites)
        for site in sites:
            if id(site) not in used:  # by torch.func, or a layer the loss does not reach (zero gradients)
                use(site)
        with torch.no_grad():
            for id_, gradients in pending.items():
                self._accumulate(self.sums[id_], gradients)

    def _accumulate(self, total, gradients):
        _add_squares(total, gradients)

    def named_sums(self):
        """name → Σ of squared per-example gradients (at least float32), in the parameter's shape."""
        return {self.names[id_]: total.reshape(self.parameters[id_].shape) for id_, total in self.sums.items()}

    def _site_parameters(self, site):
        if site.name in self.rule_modules:
            return [p for p in site.module.parameters(recurse=False) if p.requires_grad]
        return list(self.functional_modules[site.name][1].values())

    def _site_gradients(self, site, output_grads, batch_size):
        if site.name in self.rule_modules:
            rule = layer_rule(site.module)
            return rule(site.module, site.first_input(), output_grads[0], batch_size)
        with torch.enable_grad(), self.capture.paused():
            return functional_gradients(site, output_grads, self.functional_modules[site.name][1], batch_size)


class AbsoluteGradientSums(SquaredGradientSums):
    """Σ over examples of the absolute per-example gradient |∇_θ| of every trainable parameter (TATR's statistic,
    statistics/gradient_magnitude.py); used as `SquaredGradientSums`."""

    def _accumulate(self, total, gradients):
        _add_absolutes(total, gradients)


def _assign_parameters(model, parameters):
    """Split the modules holding trainable parameters: those a layer-wise rule covers (name → module) and the
    others (name → (module, {parameter name relative to the module: parameter})), each the nearest module that
    is actually called (not a container)."""
    modules = dict(model.named_modules())
    rule_modules, functional_modules = {}, {}
    for module_name, module in modules.items():
        for local_name, parameter in module.named_parameters(recurse=False):
            if id(parameter) not in parameters:
                continue
            if layer_rule(module) is not None:
                rule_modules[module_name] = module
                continue
            owner_name, relative = module_name, local_name
            while isinstance(modules[owner_name], CONTAINERS) and owner_name:
                owner_name, _, child = owner_name.rpartition(".")
                relative = f"{child}.{relative}"
            functional_modules.setdefault(owner_name, (modules[owner_name], {}))[1][relative] = parameter
    return rule_modules, functional_modules


def _zeros(parameter, dtype):
    """Sums are kept as [rows, rest] (a scalar as [1, 1]) so that dense and row-sparse gradients add alike."""
    rows = parameter.shape[0] if parameter.dim() > 0 else 1
    return torch.zeros(rows, parameter.numel() // rows if rows else 0, dtype=dtype, device=parameter.device)


def _add_squares(total, gradients):
    """Add Σ_examples (per-example gradient)² to `total` ([rows, rest]); the gradients of several calls are summed
    per example first."""
    if len(gradients) == 1:
        gradients[0].add_squares_to(total)
        return
    rows, rest = total.shape
    sparse = [g for g in gradients if isinstance(g, RowGradients)]
    dense = [g for g in gradients if not isinstance(g, RowGradients)]
    if len(dense) == 1 and isinstance(dense[0], OuterProductGradients):
        # A tied embedding and output layer: (D + S)² = D² + (2D + S)·S on the few rows S touches, so the dense
        # part is squared blockwise as usual and never formed per example in full ([batch, vocab, dim]).
        dense[0].add_squares_to(total)
        merged = _summed_rows(sparse, rows, rest)
        values = merged.values.to(total.dtype)
        d = dense[0].rows_of(merged.examples, merged.rows).to(total.dtype)
        total.index_add_(0, merged.rows, (2 * d + values) * values)
        return
    _summed_rows([g.as_rows(rows) for g in gradients], rows, rest).add_squares_to(total)


def _add_absolutes(total, gradients):
    """Add Σ_examples |per-example gradient| to `total` ([rows, rest]); the gradients of several calls are summed
    per example first (a tied embedding and output layer: |D + S| = |D| + (|D + S| − |D|) on the rows S touches)."""
    if len(gradients) == 1:
        gradients[0].add_absolutes_to(total)
        return
    rows, rest = total.shape
    sparse = [g for g in gradients if isinstance(g, RowGradients)]
    dense = [g for g in gradients if not isinstance(g, RowGradients)]
    if len(dense) == 1 and isinstance(dense[0], OuterProductGradients):
        dense[0].add_absolutes_to(total)
        merged = _summed_rows(sparse, rows, rest)
        values = merged.values.to(total.dtype)
        d = dense[0].rows_of(merged.examples, merged.rows).to(total.dtype)
        total.index_add_(0, merged.rows, (d + values).abs() - d.abs())
        return
    _summed_rows([g.as_rows(rows) for g in gradients], rows, rest).add_absolutes_to(total)


def _summed_rows(parts, rows, rest):
    """Row gradients of several calls as one, entries of the same (example, row) added."""
    if len(parts) == 1:
        return parts[0]
    keys = torch.cat([part.examples * rows + part.rows for part in parts])
    values = torch.cat([part.values.reshape(-1, rest) for part in parts])
    unique, inverse = torch.unique(keys, return_inverse=True)
    summed = values.new_zeros(len(unique), rest).index_add_(0, inverse, values)
    return RowGradients(unique // rows, unique % rows, summed)
