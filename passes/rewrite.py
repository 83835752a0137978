"""The rewrite pass: replace each eligible reduction + affine epilogue with an early-exit op.

Runs on the *unlifted* graph module of the export (``ExportedProgram.module()``: parameters
are ``get_attr`` nodes) after :mod:`.sites` marked the eligible sites. For each site the
config enables, it

1. folds the epilogue between the reduction and its decision into ``z = a * y + c``: ``a`` a
   compile-time vector over output features (bias, batch-norm scale, constant scales), ``c``
   the rest (bias, batch-norm shift, a residual), emitted as graph nodes when it depends on
   the input;
2. reorders the weight at compile time so that each term's elements are contiguous (and the
   input at run time, when the free factor is not the outermost contraction factor);
3. inserts one ``torch.ops.exprune.*`` call and points the decision (the ReLU, the argmax, or
   the declared-argmax output) at it; the old reduction and epilogue become dead and go.

Sites that cannot be rewritten stay dense, with the reason in their :class:`SiteReport`.

Example:
    >>> import torch
    >>> from exprune_fx import Config, analyze, lift
    >>> from exprune_fx.passes.rewrite import rewrite_sites
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.ReLU(),
    ...                           torch.nn.Linear(64, 64), torch.nn.ReLU()).eval()
    >>> analysis = analyze(lift(mlp, torch.randn(2, 4), dynamic_batch=True))
    >>> gm = analysis.lifted.exported.module()
    >>> [(r.name, r.rewritten) for r in rewrite_sites(gm, analysis, Config(k=16))]
    [('linear', False), ('linear_1', True)]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node

from exprune_fx.config import Config, ResolvedSiteConfig
from exprune_fx.errors import InputError
from exprune_fx.runtime import ops  # noqa: F401  (registers torch.ops.exprune)
from exprune_fx.runtime.counters import new_counters
from exprune_fx.runtime.exact import sign_order
from exprune_fx.runtime.sparse import conv_layout, first_and_rest, linear_layout, term_magnitude
from exprune_fx.runtime.kernels import STATS, THRESHOLD, valid_k
from .exchangeability import META_AXES
from .rules import RuleContext
from .sites import Site

aten = torch.ops.aten
_LINEAR_KINDS = ("linear", "addmm", "mm", "matmul", "bmm")
_CONV_KINDS = ("conv2d", "conv")


@dataclass(frozen=True)
class SiteReport:
    """What the rewrite did with one site."""

    name: str
    kind: str
    decision: str | None
    n: int | None
    k: int | None
    test: str | None
    rewritten: bool
    reason: str | None = None
    counters: str | None = None  # buffer name of the site's counters on the graph module
    critical: str | None = None  # buffer name of the site's critical value (0-d, or one per output)
    classes: int | None = None  # output features of an argmax site (for its Bonferroni z)
    stages: int = 1  # sequential test stages (k, 2k, ...); argmax sites test once
    order: str = "natural"  # which terms the test reads first (Config.order; "magnitude" where it applied)
    per_output: int | None = None  # how many per-output thresholds it takes (features or channels); None: none


class NotRewritable(Exception):
    """Raised inside the pass: the site stays dense for the given reason."""


def rewrite_sites(gm: GraphModule, analysis, config: Config) -> list[SiteReport]:
    """Rewrite every eligible, enabled site of ``gm`` in place; report on every site."""
    reports = []
    read_before = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    lifted_nodes = {n.name: n for n in analysis.graph_module.graph.nodes}
    for index, site in enumerate(analysis.sites):
        cfg = config.for_site(site.name)
        exact = cfg.mode == "exact"
        test = {"exact": "exact", "hybrid": f"{cfg.test}+exact"}.get(cfg.mode, cfg.test)
        staged = site.decision == "relu" and cfg.mode == "statistical"
        base = dict(name=site.name, kind=site.kind, decision=site.decision, n=site.n, k=cfg.k,
                    test=test, stages=cfg.stages if staged else 1)
        reason = _precheck(site, cfg)
        if reason is None:
            try:
                prefix, classes, terms, order, outputs = _rewrite_one(gm, site, lifted_nodes, cfg, index)
                reports.append(SiteReport(**{**base, "n": terms or site.n}, rewritten=True,
                                          counters=f"{prefix}_counters",
                                          critical=None if exact else f"{prefix}_critical", classes=classes,
                                          order=order, per_output=outputs))
                continue
            except NotRewritable as exc:
                reason = str(exc)
        reports.append(SiteReport(**base, rewritten=False, reason=reason))
    gm.graph.eliminate_dead_code()
    drop_unread(gm, read_before)  # e.g. a weight a site reordered into its own buffer, a folded batch norm's
    gm.graph.lint()
    gm.recompile()
    return reports


def _precheck(site: Site, cfg: ResolvedSiteConfig) -> str | None:
    if cfg.mode == "exact":
        return site.exact_reason or (None if cfg.enabled else "disabled in the config")
    if cfg.mode == "hybrid" and site.exact_reason:
        return f"hybrid mode: {site.exact_reason}"
    if not site.eligible:
        return site.reason
    if not cfg.enabled:
        return "disabled in the config"
    if not valid_k(site.n, cfg.k):
        return f"n={site.n} <= k={cfg.k}: no terms left to skip"
    if site.kind not in _LINEAR_KINDS + _CONV_KINDS:
        return f"no early-exit kernel for {site.kind} sites yet"
    return None


class _Builder:
    """Adds buffers and nodes to ``gm`` for one site; ``rollback`` removes them again."""

    def __init__(self, gm: GraphModule, site: Site, index: int, before: Node):
        self.gm, self.prefix, self.before = gm, f"exprune_{index}_{site.name}", before
        self.site_name = site.name
        self.nodes: list[Node] = []
        self.buffers: list[str] = []
        self.order = "natural"  # set to "magnitude" by a call that reorders each output's terms
        self.outputs: int | None = None  # set by a call whose test takes one threshold per output

    def buffer(self, suffix: str, value: torch.Tensor) -> Node:
        name = f"{self.prefix}_{suffix}"
        if hasattr(self.gm, name):
            name = f"{name}_{len(self.buffers)}"
        self.gm.register_buffer(name, value.detach().to(_device(self.gm)).contiguous())
        self.buffers.append(name)
        with self.gm.graph.inserting_before(self.before):
            node = self.gm.graph.get_attr(name)
        self.nodes.append(node)
        return node

    def call(self, target, *args) -> Node:
        with self.gm.graph.inserting_before(self.before):
            node = self.gm.graph.call_function(target, args)
        self.nodes.append(node)
        return node

    def rollback(self) -> None:
        for node in reversed(self.nodes):
            self.gm.graph.erase_node(node)
        for name in self.buffers:
            delattr(self.gm, name)


def drop_unread(gm: GraphModule, targets: set[str]) -> None:
    """Delete the parameters/buffers in ``targets`` that no node of the graph reads any more, so
    that the rewritten graph module holds each weight once."""
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for target in sorted(targets - read):
        owner, _, name = target.rpartition(".")
        module = gm.get_submodule(owner) if owner else gm
        if name in module._parameters or name in module._buffers:
            delattr(module, name)


def static_value(gm: GraphModule, value: Any) -> Any:
    """Evaluate ``value`` at compile time (parameters, buffers and ops on them), or raise."""
    if not isinstance(value, Node):
        return value
    if value.op == "get_attr":
        obj = gm
        for part in value.target.split("."):
            obj = getattr(obj, part)
        return obj.detach()
    schema = getattr(value.target, "_schema", None)
    mutates = schema is not None and schema.is_mutable
    if value.op == "call_function" and value.target is not torch.ops.aten.sym_size.int and not mutates:
        args = torch.fx.node.map_arg(value.args, lambda n: static_value(gm, n))
        kwargs = torch.fx.node.map_arg(value.kwargs, lambda n: static_value(gm, n))
        with torch.no_grad():
            return value.target(*args, **kwargs)
    raise NotRewritable(f"'{value.name}' is not a compile-time value")


def _is_static(gm: GraphModule, value: Any) -> bool:
    try:
        static_value(gm, value)
        return True
    except NotRewritable:
        return False


class _Affine:
    """``z = a * y + c``, with ``c = c_static + c_dynamic``, built step by step."""

    def __init__(self, builder: _Builder):
        self.b = builder
        self.a: torch.Tensor = torch.tensor(1.0)
        self.c_static: torch.Tensor = torch.tensor(0.0)
        self.c_dyn: Node | None = None

    def add(self, other: Any, sign: float = 1.0) -> None:
        gm = self.b.gm
        if _is_static(gm, other):
            self.c_static = self.c_static + sign * torch.as_tensor(static_value(gm, other), dtype=torch.float32)
            return
        term = other if sign > 0 else self.b.call(aten.neg.default, other)
        self.c_dyn = term if self.c_dyn is None else self.b.call(aten.add.Tensor, self.c_dyn, term)

    def scale(self, s: torch.Tensor) -> None:
        s = torch.as_tensor(s, dtype=torch.float32)
        self.a, self.c_static = self.a * s, self.c_static * s
        if self.c_dyn is not None:
            factor = self.b.buffer("epilogue_scale", s) if s.dim() else s.item()
            self.c_dyn = self.b.call(aten.mul.Tensor, self.c_dyn, factor)

    def negate(self) -> None:
        self.scale(torch.tensor(-1.0))


_IN_PLACE = (aten.add_, aten.sub_, aten.mul_, aten.div_)


def _fold_step(aff: _Affine, step: Node, value: Node) -> None:
    gm = aff.b.gm
    p = step.target.overloadpacket
    mutated = step.args[0]
    if p in _IN_PLACE and mutated is not value and isinstance(mutated, Node) and len(mutated.users) > 1:
        raise NotRewritable(f"in-place '{step.name}' mutates '{mutated.name}', which is read elsewhere")
    other = [a for a in step.args[:2] if a is not value]
    if p in (aten.add, aten.add_):
        if RuleContext.arg(step, "alpha", 1) != 1:
            raise NotRewritable("add with alpha != 1 in the epilogue")
        if other:
            aff.add(other[0])
        else:
            aff.scale(torch.tensor(2.0))  # v + v
    elif p in (aten.sub, aten.sub_):
        if RuleContext.arg(step, "alpha", 1) != 1:
            raise NotRewritable("sub with alpha != 1 in the epilogue")
        if step.args[0] is value:
            aff.add(step.args[1], sign=-1.0)
        else:
            aff.negate()
            aff.add(step.args[0])
    elif p in (aten.mul, aten.mul_):
        aff.scale(static_value(gm, other[0] if other else value))
    elif p in (aten.div, aten.div_):
        aff.scale(1.0 / torch.as_tensor(static_value(gm, step.args[1]), dtype=torch.float32))
    elif p is aten.batch_norm:
        weight, bias, mean, var = (static_value(gm, RuleContext.arg(step, n)) for n in
                                   ("weight", "bias", "running_mean", "running_var"))
        eps = RuleContext.arg(step, "eps", 1e-5)
        channels = mean.shape[0]
        shape = (channels,) + (1,) * (len(RuleContext.shape(step)) - 2)
        s = (torch.ones(channels) if weight is None else weight.float()) / torch.sqrt(var.float() + eps)
        shift = (torch.zeros(channels) if bias is None else bias.float()) - mean.float() * s
        aff.scale(s.reshape(shape))
        aff.add(shift.reshape(shape))
    else:
        raise NotRewritable(f"'{step.name}' ({p.__name__}) in the epilogue is not supported by the rewrite")


def _feature_vector(t: torch.Tensor, features: int, feature_dim_from_end: int, what: str) -> torch.Tensor:
    """Reduce a broadcastable tensor to one value per output feature, or raise."""
    t = torch.as_tensor(t, dtype=torch.float32)
    if t.numel() == 1:
        return t.reshape(1).expand(features).clone()
    shape = list(t.shape)
    d = len(shape) - feature_dim_from_end
    if d < 0 or shape[d] != features or math.prod(shape) != features:
        raise NotRewritable(f"the epilogue's {what} varies along axes other than the output features")
    return t.reshape(features)


def _largest_free(factors: list[tuple[int, int, bool]]) -> tuple[int, int, int]:
    """(A, n, B): sizes before, of, and after the largest free factor."""
    free = [i for i, (_, size, is_free) in enumerate(factors) if is_free]
    if not free:
        raise NotRewritable("no free factor in the contraction")
    f = max(free, key=lambda i: (factors[i][1], -i))
    sizes = [size for _, size, _ in factors]
    return math.prod(sizes[:f]), sizes[f], math.prod(sizes[f + 1:])


def _rewrite_one(gm: GraphModule, site: Site, lifted: dict, cfg: ResolvedSiteConfig, index: int):
    """Rewrite one site; return (buffer prefix, classes of an argmax site, terms per output
    of an exact-mode site, the term order its test reads, the number of per-output thresholds
    it takes or None)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    if any(c not in nodes for c in site.chain):
        raise NotRewritable("the site is not in the runnable graph")
    chain = [nodes[c] for c in site.chain]
    consumer, value = _consumer(gm, site, chain)
    builder = _Builder(gm, site, index, consumer)
    try:
        aff = _Affine(builder)
        test = STATS if cfg.test == "stats" else THRESHOLD
        terms = None
        if cfg.mode == "exact":
            call, terms = _exact_call(gm, builder, chain, value, site, aff, cfg)
        elif site.kind in _CONV_KINDS:
            call = _conv_call(gm, builder, chain, value, lifted[site.name], aff, cfg, test)
        else:
            call = _matmul_call(gm, builder, chain, value, site, aff, cfg, test)
    except Exception:
        builder.rollback()
        raise
    consumer.replace_input_with(value, call)
    # Erase the old reduction and epilogue explicitly: in-place steps (add_) are not dead code.
    for old in reversed(chain[: chain.index(value) + 1]):
        if not old.users:
            gm.graph.erase_node(old)
    classes = RuleContext.shape(value)[-1] if site.decision == "argmax" else None
    return builder.prefix, classes, terms, builder.order, builder.outputs


def _fold_epilogue(aff: _Affine, chain: list[Node], value: Node) -> None:
    """Fold the steps after the reduction up to ``value`` (what the decision reads)."""
    prev = chain[0]
    for step in chain[1: chain.index(value) + 1]:
        _fold_step(aff, step, prev)
        prev = step


def _consumer(gm: GraphModule, site: Site, chain: list[Node]) -> tuple[Node, Node]:
    """The decision node (or output node) and the value it reads from the chain."""
    last = chain[-1]
    if site.decision == "relu" or last.op == "call_function" and \
            getattr(last.target, "overloadpacket", None) is aten.argmax:
        return last, chain[-2]
    output = next(n for n in gm.graph.nodes if n.op == "output")
    return output, last


def _device(gm: GraphModule) -> torch.device:
    for t in list(gm.parameters()) + list(gm.buffers()):
        return t.device
    return torch.device("cpu")


def _static_operands(gm, node: Node, kind: str):
    """``(x, weight node or None, weight [N, K], bias)`` of a linear/addmm/mm/matmul node whose
    weight is a compile-time value (the node is given only for ``linear``, whose weight needs
    no transpose), or None when the right operand is a run-time value."""
    args = node.args
    if kind == "linear":
        return args[0], args[1], static_value(gm, args[1]), RuleContext.arg(node, "bias")
    if kind == "addmm":
        return args[1], None, static_value(gm, args[2]).T, args[0]
    if not _is_static(gm, args[1]):
        return None
    weight = static_value(gm, args[1])  # mm / matmul / bmm with a compile-time right operand
    if weight.dim() != 2:
        raise NotRewritable("batched matmul with a compile-time operand: not rewritten yet")
    return args[0], None, weight.T, None


def _matmul_call(gm, builder, chain, value, site, aff, cfg, test) -> Node:
    operands = _static_operands(gm, chain[0], site.kind)
    if operands is None:  # a product of two run-time values: the kernel takes the right operand transposed
        if cfg.mode == "hybrid":
            raise NotRewritable("hybrid mode needs a compile-time weight")
        return _dynamic_matmul_call(builder, chain, value, site, aff, cfg, test)
    x, w_node, weight, bias = operands
    features, big_k = weight.shape
    if bias is not None:
        aff.add(bias)  # y = x W^T + b: the bias is the first step of the epilogue
    _fold_epilogue(aff, chain, value)
    before, n, after = _largest_free(list(site.contraction))
    if before * n * after != big_k:
        raise NotRewritable("contraction factors do not match the weight")
    if before > 1:  # make each term contiguous: [A, n, B] -> [n, A, B]
        weight = weight.reshape(features, before, n, after).transpose(1, 2).reshape(features, big_k)
        split = builder.call(aten.unflatten.int, x, -1, [before, n, after])
        x = builder.call(aten.flatten.using_ints, builder.call(aten.transpose.int, split, -3, -2), -3, -1)
        w_node = None
    scale = builder.buffer("scale", _feature_vector(aff.a, features, 1, "scale"))
    offset = _offset(builder, aff)
    counters = builder.buffer("counters", new_counters(_device(gm)))
    single = site.decision == "relu" and before * after == 1  # one element per term: sparse layouts apply
    by_magnitude = single and cfg.order == "magnitude"
    zeros = single and bool((weight == 0).any())
    if cfg.mode == "hybrid":
        if zeros:
            raise NotRewritable(_HYBRID_SPARSE)
        return _hybrid_call(builder, torch.ops.exprune.hybrid_relu_linear.default, x, weight, scale, offset,
                            before * after, cfg, test, counters, (), by_magnitude)
    sparse = zeros or by_magnitude
    if sparse:
        builder.order = "magnitude" if by_magnitude else "natural"
        layout = [builder.buffer(f"sparse_{i}", t) for i, t in enumerate(linear_layout(weight, cfg.k, test,
                                                                                         builder.order))]
        return builder.call(torch.ops.exprune.sparse_relu_matmul.default, x, *layout, scale, offset, cfg.k, test,
                            _relu_critical(builder, cfg, features), counters)
    if w_node is None:  # reordered: a buffer replaces the parameter (which the graph no longer reads)
        w_node = builder.buffer("weight", weight.contiguous())
    if site.decision == "relu":
        return builder.call(torch.ops.exprune.relu_linear.default, x, w_node, scale, offset, before * after, cfg.k,
                            test, _relu_critical(builder, cfg, features), counters, cfg.stages)
    if cfg.thresholds is not None:
        raise InputError(f"Config.sites[{site.name!r}].thresholds: per-output thresholds apply to ReLU sites; "
                         f"{site.name} feeds an argmax (use threshold)")
    return builder.call(torch.ops.exprune.argmax_matmul.default, x, w_node, scale, offset, before * after, cfg.k,
                        test, _critical(builder, cfg.dominance_critical(features)), counters)


def _dynamic_matmul_call(builder, chain, value, site, aff, cfg, test) -> Node:
    x, right = chain[0].args[0], chain[0].args[1]
    shape_x, shape_r = RuleContext.shape(x), RuleContext.shape(right)
    if len(shape_x) < 2 or len(shape_r) < 2:
        raise NotRewritable("matrix-vector products are not rewritten")
    features = shape_r[-1]
    if site.decision != "relu":
        raise NotRewritable("argmax over a product of two run-time values: not rewritten yet")
    before, n, after = _largest_free(list(site.contraction))
    if before > 1:
        raise NotRewritable("the free factor of a run-time contraction is not the outermost one")
    _fold_epilogue(aff, chain, value)
    scale = builder.buffer("scale", _feature_vector(aff.a, features, 1, "scale"))
    offset = _offset(builder, aff)
    counters = builder.buffer("counters", new_counters(_device(builder.gm)))
    if cfg.thresholds is not None:
        raise InputError(f"Config.sites[{site.name!r}].thresholds: per-output thresholds need a compile-time "
                         f"weight; {site.name} multiplies two run-time values (use threshold)")
    weight = builder.call(aten.transpose.int, right, -1, -2)
    return builder.call(torch.ops.exprune.relu_matmul.default, x, weight, scale, offset, after, cfg.k, test,
                        _critical(builder, cfg.critical), counters, cfg.stages)


def _critical(builder: _Builder, value: float) -> Node:
    """The site's critical value as a 0-d buffer, so that it can be retuned in place."""
    return builder.buffer("critical", torch.tensor(value, dtype=torch.float64))


def _relu_critical(builder: _Builder, cfg: ResolvedSiteConfig, outputs: int) -> Node:
    """A ReLU site's critical value: 0-d, or its per-output thresholds (one per output feature
    or channel, ``SiteConfig.thresholds``), as a buffer that can be retuned in place."""
    builder.outputs = outputs
    if cfg.thresholds is None:
        return _critical(builder, cfg.critical)
    if len(cfg.thresholds) != outputs:
        raise InputError(f"Config.sites[{builder.site_name!r}].thresholds has {len(cfg.thresholds)} values; the "
                         f"site has {outputs} outputs (features or channels): give one threshold per output")
    return builder.buffer("critical", torch.tensor(cfg.thresholds, dtype=torch.float64))


def _offset(builder: _Builder, aff: _Affine) -> Node | None:
    """The node computing ``c`` (None when it is zero)."""
    static = aff.c_static
    static_node = builder.buffer("offset", static) if bool(torch.any(static != 0)) else None
    if aff.c_dyn is None:
        return static_node
    if static_node is None:
        return aff.c_dyn
    return builder.call(aten.add.Tensor, aff.c_dyn, static_node)


def _conv_call(gm, builder, chain, value, lifted_node, aff, cfg, test) -> Node:
    node, args = chain[0], chain[0].args
    x, w_node = args[0], args[1]
    weight = static_value(gm, w_node)
    bias = RuleContext.arg(node, "bias")
    stride, padding, dilation, groups = _conv_geometry(node, weight)
    cout = weight.shape[0]
    channel_classes = lifted_node.args[1].meta[META_AXES][1]
    by_id = {cid: (cid, size, free) for cid, size, free in _site_factors(lifted_node)}
    before, n, unit = _largest_free([by_id[c] for c in channel_classes])
    if before > 1:
        raise NotRewritable("the free channel factor is not the outermost one")
    if bias is not None:
        aff.add(static_value(gm, bias).reshape(-1, 1, 1))
    _fold_epilogue(aff, chain, value)
    scale = builder.buffer("scale", _feature_vector(aff.a, cout, 3, "scale"))
    offset = _offset(builder, aff)
    counters = builder.buffer("counters", new_counters(_device(gm)))
    single = unit == 1 and groups == 1  # one input channel per term: sparse layouts apply
    by_magnitude = single and cfg.order == "magnitude"
    zero_windows = single and bool((weight.flatten(2) == 0).all(2).any())
    if cfg.mode == "hybrid":
        if groups != 1:
            raise NotRewritable("hybrid mode: grouped convolutions are not rewritten yet")
        if zero_windows:
            raise NotRewritable(_HYBRID_SPARSE)
        return _hybrid_call(builder, torch.ops.exprune.hybrid_relu_conv2d.default, x, weight, scale, offset,
                            unit, cfg, test, counters, (stride, padding, dilation), by_magnitude)
    sparse = zero_windows or by_magnitude
    if sparse:
        builder.order = "magnitude" if by_magnitude else "natural"
        layout = [builder.buffer(f"sparse_{i}", t) for i, t in enumerate(conv_layout(weight, cfg.k, test,
                                                                                       builder.order))]
        return builder.call(torch.ops.exprune.sparse_relu_conv2d.default, x, *layout, scale, offset, stride, padding,
                            dilation, cfg.k, test, _relu_critical(builder, cfg, cout), counters)
    return builder.call(torch.ops.exprune.relu_conv2d.default, x, w_node, scale, offset, stride,
                        padding, dilation, groups, unit, cfg.k, test,
                        _relu_critical(builder, cfg, cout), counters, cfg.stages)


_HYBRID_SPARSE = ("hybrid mode: a weight with pruned (zero) terms takes the sparse kernel, which samples "
                  "nonzero terms only; use statistical or exact mode for this site")


def _hybrid_call(builder, op, x, weight, scale, offset, unit, cfg, test, counters, geometry,
                 by_magnitude: bool) -> Node:
    """Hybrid mode (``runtime/hybrid.py``): the first k terms' weights as they are (the
    test's), the rest folded with the epilogue's scale and split by sign at compile time. In
    magnitude order both are full width: each output's k largest terms, and the others."""
    if by_magnitude:
        builder.order = "magnitude"
        magnitude = term_magnitude(weight)
        first, _ = first_and_rest(magnitude, cfg.k, "magnitude")
        in_head = torch.zeros_like(magnitude, dtype=torch.bool).scatter_(1, first, True)
        in_head = in_head.reshape(in_head.shape + (1,) * (weight.dim() - 2))
        head, rest = weight * in_head, weight * ~in_head
    else:
        head, rest = weight[:, :cfg.k * unit], weight[:, cfg.k * unit:]
    scale_vector = getattr(builder.gm, scale.target)
    folded = rest.float() * scale_vector.reshape((-1,) + (1,) * (rest.dim() - 1))
    positive, order, negative, count = sign_order(folded.reshape(weight.shape[0], -1))
    nodes = [builder.buffer("head", head.contiguous()), scale, offset,
             builder.buffer("positive", positive.reshape(rest.shape).to(weight.dtype)), builder.buffer("order", order),
             builder.buffer("negative", negative.to(weight.dtype)), builder.buffer("count", count)]
    return builder.call(op, x, *nodes, *geometry, unit, cfg.k, test, _relu_critical(builder, cfg, weight.shape[0]),
                        cfg.interval, counters)


def _site_factors(lifted_node: Node) -> tuple:
    return lifted_node.meta["exprune.site"].contraction


def _conv_geometry(node: Node, weight: torch.Tensor):
    """(stride, padding, dilation, groups) of a conv node as pairs, or raise NotRewritable."""
    stride, padding, dilation = (RuleContext.arg(node, n) for n in ("stride", "padding", "dilation"))
    groups = int(RuleContext.arg(node, "groups", 1))
    if weight.dim() != 4 or RuleContext.arg(node, "transposed", False):
        raise NotRewritable("only 2-d, non-transposed convolutions have an early-exit kernel")
    if isinstance(padding, str) or any(not isinstance(v, int) for v in list(padding) + list(stride) + list(dilation)):
        raise NotRewritable("convolution with string or symbolic padding/stride: not rewritten yet")
    pair = lambda v: list(v) * 2 if len(v) == 1 else list(v)  # noqa: E731
    return pair(stride), pair(padding), pair(dilation), groups


def _exact_call(gm, builder, chain, value, site, aff, cfg) -> tuple[Node, int]:
    """Exact mode (``runtime/exact.py``): fold the epilogue's scale into the weight, split it
    by sign at compile time, and call the exact kernel. Returns the call and the terms per output."""
    node, args = chain[0], chain[0].args
    if site.kind in _CONV_KINDS:
        x, weight, bias = args[0], static_value(gm, args[1]), RuleContext.arg(node, "bias")
        stride, padding, dilation, groups = _conv_geometry(node, weight)
        if groups != 1:
            raise NotRewritable("exact mode: grouped convolutions are not rewritten yet")
        if bias is not None:
            aff.add(static_value(gm, bias).reshape(-1, 1, 1))
        features, feature_dim = weight.shape[0], 3
    else:
        operands = _static_operands(gm, node, site.kind)
        if operands is None:
            raise NotRewritable("exact mode needs a compile-time weight")
        x, _, weight, bias = operands
        if bias is not None:
            aff.add(bias)
        features, feature_dim = weight.shape[0], 1
    _fold_epilogue(aff, chain, value)
    scale = _feature_vector(aff.a, features, feature_dim, "scale")
    folded = weight.float() * scale.reshape((-1,) + (1,) * (weight.dim() - 1))
    positive, order, negative, count = sign_order(folded.reshape(features, -1))
    nodes = [builder.buffer("positive", positive.reshape(weight.shape).to(weight.dtype)),
             builder.buffer("order", order), builder.buffer("negative", negative.to(weight.dtype)),
             builder.buffer("count", count), _offset(builder, aff)]
    counters = builder.buffer("counters", new_counters(_device(gm)))
    if site.kind in _CONV_KINDS:
        call = builder.call(torch.ops.exprune.exact_relu_conv2d.default, x, *nodes, stride, padding, dilation,
                            cfg.k, counters)
    else:
        call = builder.call(torch.ops.exprune.exact_relu_matmul.default, x, *nodes, cfg.k, counters)
    return call, folded[0].numel()
