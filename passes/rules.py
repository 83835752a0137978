"""Per-op constraint rules of the exchangeability analysis.

A rule states which axis factors of an op's tensors must be permuted together (unite) and
which cannot be permuted at all (pin), such that permuting every united factor with one
permutation permutes the op's output the same way (equivariance) or leaves it unchanged
(invariance). Ops without a rule pin every axis of every tensor they touch, so an unknown op
can cost savings but never soundness.

Adding a rule for a new op (see docs/architecture.md):

    >>> import torch
    >>> from exprune_fx.passes.rules import RULES, rule, elementwise
    >>> @rule(torch.ops.aten.softplus)
    ... def _softplus(ctx, node):
    ...     elementwise(ctx, node)
    >>> torch.ops.aten.softplus in RULES
    True

``ctx`` is a :class:`RuleContext`; ``ctx.arg(node, "name")`` binds an argument by its schema
name, ``ctx.axes(value)`` returns one list of factor variables per axis.
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch
from torch.fx import Node

from .factors import FactorStore

aten = torch.ops.aten
Rule = Callable[["RuleContext", Node], None]
RULES: dict[Any, Rule] = {}


def rule(*ops: Any) -> Callable[[Rule], Rule]:
    """Register a rule for op packets (``aten.add``) or overloads (``aten.add.Tensor``)."""

    def register(fn: Rule) -> Rule:
        for op in ops:
            RULES[op] = fn
        return fn

    return register


def concrete_size(size: Any) -> int:
    """An axis size as an int; a symbolic (dynamic) size gives its example value."""
    if isinstance(size, torch.SymInt):
        hint = size.node.hint
        return int(hint) if hint is not None else 2
    return int(size)


def find_rule(target: Any) -> Rule | None:
    if target in RULES:
        return RULES[target]
    packet = getattr(target, "overloadpacket", None)
    return RULES.get(packet) if packet is not None else None


class RuleContext:
    """What a rule sees: the factor store and the factor variables of every value."""

    def __init__(self, store: FactorStore, axes: dict[Node, Any]):
        self.store = store
        self._axes = axes

    # -- values ------------------------------------------------------------------------
    def axes(self, value: Any) -> list[list[int]] | None:
        """Per-axis factor variables of a tensor-valued node (None for non-tensors)."""
        if not isinstance(value, Node):
            return None
        ax = self._axes.get(value)
        return ax if isinstance(ax, list) else None

    def outputs(self, node: Node) -> list[list[list[int]]]:
        """Axes of each tensor result of ``node`` (one entry for a single tensor)."""
        ax = self._axes.get(node)
        if isinstance(ax, list):
            return [ax]
        if isinstance(ax, tuple):
            return [a for a in ax if isinstance(a, list)]
        return []

    @staticmethod
    def shape(value: Any) -> tuple[int, ...]:
        val = value.meta.get("val") if isinstance(value, Node) else None
        return tuple(concrete_size(s) for s in val.shape) if isinstance(val, torch.Tensor) else ()

    @staticmethod
    def arg(node: Node, name: str, default: Any = None) -> Any:
        """Bind an argument of an aten op by its schema name."""
        schema = getattr(node.target, "_schema", None)
        if schema is None:
            return default
        for i, a in enumerate(schema.arguments):
            if a.name == name:
                if a.kwarg_only or i >= len(node.args):
                    if name in node.kwargs:
                        return node.kwargs[name]
                    return a.default_value if a.has_default_value() else default
                return node.args[i]
        return default

    def tensor_inputs(self, node: Node) -> list[Node]:
        flat = torch.fx.node.map_aggregate((node.args, node.kwargs), lambda x: x)
        out: list[Node] = []
        torch.fx.node.map_arg(flat, lambda n: out.append(n) if self.axes(n) is not None else None)
        return out

    # -- constraints -------------------------------------------------------------------
    def unite(self, a: list[int], b: list[int], node: Node) -> None:
        """Unite two axes (each a list of factors) of equal total size."""
        if a or b:
            self.store.unite_shapes(a, b, (node.name, "incompatible reshapes"))

    def pin(self, axis: list[int] | None, node: Node, why: str) -> None:
        for v in axis or ():
            self.store.pin(v, (node.name, why))

    def pin_all(self, node: Node, why: str) -> None:
        """Pin every axis of every tensor input and output of ``node``."""
        for value in self.tensor_inputs(node):
            for axis in self.axes(value) or ():
                self.pin(axis, node, why)
        for out in self.outputs(node):
            for axis in out:
                self.pin(axis, node, why)


def _dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def unite_broadcast(ctx: RuleContext, node: Node, value: Any, out: list[list[int]]) -> None:
    """Unite the axes of ``value`` with ``out``'s, aligned from the right (numpy broadcasting)."""
    ax = ctx.axes(value)
    if ax is None:
        return
    shape, oshape = ctx.shape(value), ctx.shape(node) if ctx.axes(node) else ()
    offset = len(out) - len(ax)
    for i, axis in enumerate(ax):
        j = i + offset
        if j < 0:
            continue
        if len(oshape) == len(out) and shape[i] != oshape[j]:
            continue  # a broadcast size-1 axis carries no factor
        ctx.unite(axis, out[j], node)


# -- shape-preserving and element-wise ops ---------------------------------------------
ELEMENTWISE = [
    aten.add, aten.add_, aten.sub, aten.sub_, aten.mul, aten.mul_, aten.div, aten.div_,
    aten.rsub, aten.neg, aten.relu, aten.relu_, aten.relu6, aten.gelu, aten.silu, aten.sigmoid,
    aten.tanh, aten.exp, aten.log, aten.sqrt, aten.rsqrt, aten.pow, aten.abs, aten.clamp,
    aten.clamp_min, aten.clamp_max, aten.hardtanh, aten.hardtanh_, aten.leaky_relu,
    aten.elu, aten.erf, aten.sin, aten.cos, aten.reciprocal, aten.square, aten.softplus,
    aten.hardswish, aten.hardsigmoid, aten.mish, aten.where, aten.masked_fill, aten.maximum,
    aten.minimum, aten.eq, aten.ne, aten.lt, aten.le, aten.gt, aten.ge, aten.__and__,
    aten.__or__, aten.bitwise_and, aten.bitwise_or, aten.bitwise_not, aten.logical_not,
    aten.logical_and, aten.logical_or, aten.dropout, aten.clone, aten.contiguous, aten.alias,
    aten.detach, aten.to, aten._to_copy, aten.type_as, aten.lift_fresh_copy, aten.expand,
    aten.expand_as, aten.zeros_like, aten.ones_like, aten.full_like, aten.fill, aten.copy,
    aten.lerp, aten.addcmul, aten.addcdiv, aten.floor, aten.ceil, aten.round, aten.sign,
    aten.trunc, aten.isnan, aten.logical_xor, aten.floor_divide, aten.remainder, aten.fmod,
]


@rule(*ELEMENTWISE)
def elementwise(ctx: RuleContext, node: Node) -> None:
    """Unite the aligned axes of every tensor operand with the output's."""
    out = ctx.axes(node)
    if out is None:
        return
    for value in ctx.tensor_inputs(node):
        unite_broadcast(ctx, node, value, out)


@rule(aten.ones, aten.zeros, aten.full, aten.empty, aten.new_ones, aten.new_zeros,
      aten.new_full, aten.new_empty, aten.scalar_tensor)
def uniform_fill(ctx: RuleContext, node: Node) -> None:
    """A tensor filled with one value is invariant under any permutation: no constraint."""


@rule(aten._assert_tensor_metadata, aten.sym_size, aten.sym_numel, aten._assert_scalar)
def no_tensor_result(ctx: RuleContext, node: Node) -> None:
    """Assertions and size queries constrain nothing."""


@rule(operator.getitem)
def getitem(ctx: RuleContext, node: Node) -> None:
    source, index = node.args
    parts = ctx._axes.get(source)
    out = ctx.axes(node)
    if isinstance(parts, tuple) and isinstance(index, int) and out is not None:
        part = parts[index]
        if isinstance(part, list):
            for a, b in zip(part, out):
                ctx.unite(a, b, node)
            return
    ctx.pin_all(node, "indexing into a result this analysis does not model")


# -- layout ops ------------------------------------------------------------------------
@rule(aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten,
      aten.squeeze, aten.unsqueeze, aten.view_as, aten.reshape_as)
def reshape(ctx: RuleContext, node: Node) -> None:
    """Group the axes into runs of equal extent and unite their factor sequences."""
    src = node.args[0]
    ax_in, ax_out = ctx.axes(src), ctx.axes(node)
    if ax_in is None or ax_out is None:
        return ctx.pin_all(node, "reshape of a non-tensor")
    s_in, s_out = ctx.shape(src), ctx.shape(node)
    i = j = 0
    while i < len(s_in) or j < len(s_out):
        gi, gj, pi, pj = [], [], 1, 1
        while i < len(s_in) and s_in[i] == 1:
            i += 1
        while j < len(s_out) and s_out[j] == 1:
            j += 1
        if i == len(s_in) or j == len(s_out):
            break
        gi.append(i); pi *= s_in[i]; i += 1
        gj.append(j); pj *= s_out[j]; j += 1
        while pi != pj:
            if pi < pj:
                gi.append(i); pi *= s_in[i]; i += 1
            else:
                gj.append(j); pj *= s_out[j]; j += 1
        ctx.unite([v for a in gi for v in ax_in[a]], [v for a in gj for v in ax_out[a]], node)


@rule(aten.permute, aten.transpose, aten.t, aten.numpy_T, aten.movedim, aten.swapaxes)
def permute_axes(ctx: RuleContext, node: Node) -> None:
    src = node.args[0]
    ax_in, ax_out = ctx.axes(src), ctx.axes(node)
    if ax_in is None or ax_out is None:
        return
    nd = len(ax_in)
    order = list(range(nd))
    name = node.target.overloadpacket
    if name is aten.permute:
        order = [_dim(d, nd) for d in node.args[1]]
    elif name in (aten.transpose, aten.swapaxes):
        a, b = _dim(node.args[1], nd), _dim(node.args[2], nd)
        order[a], order[b] = order[b], order[a]
    elif name in (aten.t, aten.numpy_T):
        order = order[::-1]
    else:  # movedim
        src_d, dst_d = node.args[1], node.args[2]
        src_d = [src_d] if isinstance(src_d, int) else list(src_d)
        dst_d = [dst_d] if isinstance(dst_d, int) else list(dst_d)
        src_d, dst_d = [_dim(d, nd) for d in src_d], [_dim(d, nd) for d in dst_d]
        rest = iter([d for d in range(nd) if d not in src_d])
        placed = dict(zip(dst_d, src_d))
        order = [placed[k] if k in placed else next(rest) for k in range(nd)]
    for j, i in enumerate(order):
        ctx.unite(ax_in[i], ax_out[j], node)


def _positional(ctx: RuleContext, node: Node, dims: list[int], why: str) -> None:
    """Pin ``dims`` of input and output; unite all other axes one-to-one (same rank)."""
    src = node.args[0]
    ax_in, ax_out = ctx.axes(src), ctx.axes(node)
    if ax_in is None or ax_out is None:
        return ctx.pin_all(node, why)
    nd = len(ax_in)
    dims = [_dim(d, nd) for d in dims]
    for d in range(nd):
        if d in dims:
            ctx.pin(ax_in[d], node, why)
            ctx.pin(ax_out[d] if d < len(ax_out) else None, node, why)
        elif d < len(ax_out):
            ctx.unite(ax_in[d], ax_out[d], node)


@rule(aten.slice)
def slice_(ctx: RuleContext, node: Node) -> None:
    dim = ctx.arg(node, "dim", 0)
    src = node.args[0]
    s_in, s_out = ctx.shape(src), ctx.shape(node)
    if s_in == s_out and ctx.arg(node, "step", 1) == 1:
        return elementwise(ctx, node)  # a full slice is the identity
    _positional(ctx, node, [dim], "sliced axis")


@rule(aten.narrow)
def narrow(ctx: RuleContext, node: Node) -> None:
    _positional(ctx, node, [node.args[1]], "sliced axis")


@rule(aten.cumsum, aten.cumprod, aten.flip, aten.roll, aten.sort, aten.topk,
      aten.cummax, aten.cummin, aten.tril, aten.triu)
def positional(ctx: RuleContext, node: Node) -> None:
    """Ops whose result depends on positions along the axes they name."""
    name = node.target.overloadpacket
    src = node.args[0]
    nd = len(ctx.shape(src))
    if name in (aten.flip,):
        dims = list(node.args[1])
    elif name is aten.roll:
        dims = ctx.arg(node, "dims", []) or list(range(nd))
        dims = [dims] if isinstance(dims, int) else list(dims)
    elif name in (aten.tril, aten.triu):
        dims = [nd - 2, nd - 1]
    elif name in (aten.sort, aten.topk):
        dims = [ctx.arg(node, "dim", -1)]
    else:
        dims = [ctx.arg(node, "dim", 0)]
    why = f"{name.__name__} is position-dependent along this axis"
    if isinstance(ctx._axes.get(node), tuple):  # sort / topk / cummax: (values, indices)
        outs = ctx.outputs(node)
        ax_in = ctx.axes(src) or []
        for out in outs:
            for d in range(nd):
                if d in [_dim(x, nd) for x in dims]:
                    ctx.pin(ax_in[d], node, why)
                    ctx.pin(out[d], node, why)
                else:
                    ctx.unite(ax_in[d], out[d], node)
        return
    _positional(ctx, node, dims, why)


@rule(aten.select)
def select(ctx: RuleContext, node: Node) -> None:
    src = node.args[0]
    ax_in, ax_out = ctx.axes(src), ctx.axes(node)
    nd = len(ax_in or [])
    dim = _dim(node.args[1], nd)
    ctx.pin(ax_in[dim], node, "indexed axis")
    rest = [ax_in[d] for d in range(nd) if d != dim]
    for a, b in zip(rest, ax_out or []):
        ctx.unite(a, b, node)


def _skipped_by_cat(value: Any) -> bool:
    """True for an operand that ``torch.cat`` ignores: a 1-d tensor of static size 0 (legacy
    semantics, whatever the rank of the other operands; Hugging Face caches start as one)."""
    val = value.meta.get("val") if isinstance(value, Node) else None
    return isinstance(val, torch.Tensor) and val.dim() == 1 and \
        not isinstance(val.shape[0], torch.SymInt) and val.shape[0] == 0


@rule(aten.cat, aten.concat, aten.stack)
def concat(ctx: RuleContext, node: Node) -> None:
    stack = node.target.overloadpacket is aten.stack
    values = [v for v in node.args[0] if ctx.axes(v) is not None and (stack or not _skipped_by_cat(v))]
    out = ctx.axes(node)
    nd_out = len(out)
    dim = _dim(ctx.arg(node, "dim", 0), nd_out)
    if not stack and len(values) == 1:  # what remains is the identity (a copy)
        for a, b in zip(ctx.axes(values[0]), out):
            ctx.unite(a, b, node)
        return
    why = "concatenated axis"
    ctx.pin(out[dim], node, why)
    for v in values:
        ax = ctx.axes(v)
        for d in range(nd_out):
            src_d = d if not stack or d < dim else d - 1
            if d == dim:
                if not stack:
                    ctx.pin(ax[d], node, why)
                continue
            ctx.unite(ax[src_d], out[d], node)


@rule(aten.split, aten.split_with_sizes, aten.chunk, aten.unbind, aten.tensor_split)
def split(ctx: RuleContext, node: Node) -> None:
    """Pieces along one axis. Equal pieces are a reshape to ``[pieces, size]``: the piece
    factor is pinned and each piece's axis unites with the size factor (a fused q/k/v
    projection keeps its heads free); otherwise the whole axis is pinned. The other axes
    unite with each piece."""
    src = node.args[0]
    ax_in = ctx.axes(src)
    nd = len(ax_in)
    dim = _dim(ctx.arg(node, "dim", 0), nd)
    unbind = node.target.overloadpacket is aten.unbind
    outs = ctx.outputs(node)
    sizes = {shape[dim] for shape in (_shape_of(v) for v in _values(node)) if len(shape) > dim}
    pieces = None
    if not unbind and len(outs) > 1 and len(sizes) == 1 and sizes != {1}:
        size = sizes.pop()
        pieces = ctx.store.refine(ax_in[dim], [len(outs), size]) if len(outs) * size == ctx.shape(src)[dim] else None
    if pieces is None:
        ctx.pin(ax_in[dim], node, "split axis")
    else:
        ctx.pin([pieces[0]], node, "split axis (which piece)")
    for out in outs:
        for d in range(nd):
            if d == dim:
                if pieces is not None:
                    ctx.unite([pieces[1]], out[d], node)
                elif not unbind:
                    ctx.pin(out[d], node, "split axis")
                continue
            ctx.unite(ax_in[d], out[d - 1 if unbind and d > dim else d], node)


def _values(node: Node) -> list:
    val = node.meta.get("val")
    return list(val) if isinstance(val, (tuple, list)) else [val]


def _shape_of(value: Any) -> tuple[int, ...]:
    return tuple(concrete_size(s) for s in value.shape) if isinstance(value, torch.Tensor) else ()


# -- reductions without a decision (invariant along the reduced axes) -------------------
@rule(aten.sum, aten.mean, aten.amax, aten.amin, aten.prod, aten.var, aten.std,
      aten.logsumexp, aten.norm, aten.linalg_vector_norm, aten.any, aten.all, aten.var_mean,
      aten.std_mean)
def reduce(ctx: RuleContext, node: Node) -> None:
    """A sum or max over an axis is invariant when that axis is permuted."""
    src = node.args[0]
    ax_in = ctx.axes(src)
    outs = ctx.outputs(node)
    if ax_in is None:
        return
    nd = len(ax_in)
    dims = ctx.arg(node, "dim", None)
    if dims is None and node.target.overloadpacket in (aten.norm, aten.linalg_vector_norm):
        dims = ctx.arg(node, "dim", None)
    if dims is None or dims == [] or dims == ():
        dims = list(range(nd))
    dims = [_dim(d, nd) for d in ([dims] if isinstance(dims, int) else dims)]
    keep = bool(ctx.arg(node, "keepdim", False))
    for out in outs:
        kept = [d for d in range(nd) if keep or d not in dims]
        if len(kept) != len(out):
            ctx.pin_all(node, "reduction with an unexpected result rank")
            return
        for j, d in enumerate(kept):
            if d not in dims:
                ctx.unite(ax_in[d], out[j], node)


@rule(aten.argmax, aten.argmin, aten.max, aten.min)
def arg_reduce(ctx: RuleContext, node: Node) -> None:
    """argmax returns a position: the reduced axis is pinned."""
    src = node.args[0]
    ax_in = ctx.axes(src)
    if ax_in is None:
        return
    nd = len(ax_in)
    if node.target.overloadpacket in (aten.max, aten.min) and len(node.args) == 2 and \
            not isinstance(node.args[1], int):
        return elementwise(ctx, node)  # max(a, b)
    dim = ctx.arg(node, "dim", None)
    if dim is None:
        if node.target.overloadpacket in (aten.max, aten.min):
            return  # global max: invariant
        for axis in ax_in:
            ctx.pin(axis, node, "argmax over all axes")
        return
    dim = _dim(dim, nd)
    ctx.pin(ax_in[dim], node, "argmax/argmin returns a position on this axis")
    keep = bool(ctx.arg(node, "keepdim", False))
    for out in ctx.outputs(node):
        kept = [d for d in range(nd) if keep or d != dim]
        for j, d in enumerate(kept):
            if d != dim:
                ctx.unite(ax_in[d], out[j], node)


@rule(aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax)
def softmax(ctx: RuleContext, node: Node) -> None:
    """Softmax is permutation-equivariant along its axis (and trivially along the others)."""
    elementwise(ctx, node)


# The layer rules (normalisation, contractions, convolutions, pooling, embeddings, attention)
# live in rules_nn; importing it registers them.
from . import rules_nn  # noqa: E402,F401
