"""Non-negativity analysis: which values of the graph are provably >= 0 for every input.

Exact mode (``Config(mode="exact")``) needs it: when a reduction's input is non-negative, the
sign of each term ``x_i * w_i`` is the sign of its (folded) weight, so an output whose
positive terms are summed first can stop as soon as its running sum is negative.

A value is non-negative when it is

* the output of a ReLU-family op (``relu``, ``clamp_min(0)``, ``hardtanh(0, .)``, ``relu6``,
  ``threshold(0, 0)``), ``sigmoid``, ``softmax``, ``exp`` or ``abs``;
* a layout op, pooling (max or average), a sum or mean, a slice or a tuple item of a
  non-negative value;
* ``add``/``mul``/``cat``/``stack`` of non-negative values and scalars >= 0 (``add`` with
  ``alpha >= 0``);
* a compile-time constant (not a graph input) whose entries are all >= 0.

Everything else (graph inputs, unknown ops) is not: the analysis is sound, not complete.
Results go to ``node.meta["exprune.nonnegative"]`` (a bool on every node).

Example:
    >>> import torch
    >>> from exprune_fx import analyze
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> gm = analyze(mlp.eval(), torch.randn(3, 4)).graph_module
    >>> [n.name for n in gm.graph.nodes if n.meta["exprune.nonnegative"]]
    ['relu']
"""

from __future__ import annotations

import numbers
import operator

import torch
from torch.fx import GraphModule, Node

from .rules import RuleContext

META_NONNEGATIVE = "exprune.nonnegative"

aten = torch.ops.aten
_ALWAYS = {aten.sigmoid, aten.sigmoid_, aten.softmax, aten._softmax, aten.exp, aten.exp_, aten.abs,
           aten.abs_, aten.relu, aten.relu_, aten.relu6}
# ops whose output is >= 0 when their first argument is
_PRESERVE = {aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten, aten.squeeze,
             aten.unsqueeze, aten.contiguous, aten.clone, aten.alias, aten.dropout, aten.to, aten._to_copy,
             aten.permute, aten.transpose, aten.t, aten.expand, aten.slice, aten.select, aten.narrow,
             aten.max_pool1d, aten.max_pool2d, aten.max_pool3d, aten.max_pool2d_with_indices,
             aten.avg_pool1d, aten.avg_pool2d, aten.avg_pool3d, aten.adaptive_avg_pool1d,
             aten.adaptive_avg_pool2d, aten._adaptive_avg_pool2d, aten.adaptive_max_pool2d,
             aten.mean, aten.sum, aten.amax, aten.amin, aten.max, aten.min, aten.detach, aten.repeat,
             aten.index_select, aten.chunk, aten.split, aten.split_with_sizes, aten.unbind}
_BOTH = {aten.add, aten.add_, aten.mul, aten.mul_}
_SEQUENCE = {aten.cat, aten.stack}


def _packet(node: Node):
    return getattr(node.target, "overloadpacket", node.target)


def _is_relu_family(node: Node) -> bool:
    p = _packet(node)
    if p in (aten.clamp_min, aten.clamp_min_, aten.clamp, aten.clamp_):
        low = RuleContext.arg(node, "min")
        return isinstance(low, numbers.Real) and low >= 0
    if p in (aten.hardtanh, aten.hardtanh_):
        return RuleContext.arg(node, "min_val", -1.0) >= 0
    if p is aten.threshold:
        return node.args[1] >= 0 and node.args[2] >= 0
    return False


def _value_ok(value, known: dict[Node, bool]) -> bool:
    """A non-negative node, a scalar >= 0, or a tuple/list of them."""
    if isinstance(value, Node):
        return known.get(value, False)
    if isinstance(value, numbers.Real):  # bools included
        return value >= 0
    if isinstance(value, (tuple, list)):
        return all(_value_ok(v, known) for v in value)
    return False


def _constant_ok(node: Node, constants: dict[str, torch.Tensor]) -> bool:
    value = constants.get(node.meta.get("exprune.target")) if node.op == "placeholder" else None
    return isinstance(value, torch.Tensor) and value.numel() > 0 and bool((value.detach() >= 0).all())


def _rule(node: Node, known: dict[Node, bool], constants: dict[str, torch.Tensor]) -> bool:
    if node.op == "placeholder":
        return _constant_ok(node, constants)
    if node.op != "call_function":
        return False
    p = _packet(node)
    if p in _ALWAYS or _is_relu_family(node):
        return True
    if p is operator.getitem or p in _PRESERVE or p in _SEQUENCE:  # cat/stack: args[0] is the list
        return _value_ok(node.args[0], known)
    if p in _BOTH:
        alpha = node.kwargs.get("alpha", 1)
        return _value_ok(list(node.args[:2]), known) and isinstance(alpha, numbers.Real) and alpha >= 0
    return False


def mark_nonnegative(gm: GraphModule, constants: dict[str, torch.Tensor] | None = None) -> set[str]:
    """Set ``node.meta["exprune.nonnegative"]`` on every node of ``gm``; return the names of
    the non-negative ones. ``constants`` maps the state-dict names (``exprune.target``) of
    buffers and lifted constants to their values; parameters count as unknown."""
    constants = constants or {}
    known: dict[Node, bool] = {}
    for node in gm.graph.nodes:
        try:
            known[node] = bool(_rule(node, known, constants))
        except (TypeError, IndexError):  # an unexpected signature: not provable
            known[node] = False
        node.meta[META_NONNEGATIVE] = known[node]
    return {n.name for n, ok in known.items() if ok}
