"""Find the reduction sites of a labelled graph and decide which qualify for ExPrune.

A *site* is a reduction node (linear, convolution, matmul/bmm, einsum, attention). It
qualifies (``eligible``) when

1. its contraction has a free factor (see :mod:`.exchangeability`); ``n`` is the size of the
   largest one, and the other contraction factors form the unit term (a conv's unit term is
   one input channel's whole kernel window);
2. its result only matters through a *decision*: ``"relu"`` when it reaches a ReLU-family op
   through an affine epilogue (bias, eval batch norm, residual add, scaling by an
   input-independent value, reshapes), ``"argmax"`` when it reaches an argmax over its output
   features or a graph output the caller declared argmax-only;
3. no value in that chain has another user (a skipped term would be read elsewhere).

Recorded in ``node.meta["exprune.site"]`` as a :class:`Site`.

Example:
    >>> import torch
    >>> from exprune_fx import analyze
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> [(s.name, s.n, s.decision, s.eligible) for s in analyze(mlp.eval(), (torch.randn(3, 4),)).sites]
    [('linear', None, 'relu', False), ('linear_1', 8, None, False)]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch.fx import GraphModule, Node

from .exchangeability import META_AXES, META_ROLE, SymmetryClass
from .nonnegative import META_NONNEGATIVE
from .rules import RuleContext

aten = torch.ops.aten
META_SITE = "exprune.site"

SITE_KINDS = {
    aten.linear: "linear",
    aten.conv1d: "conv1d", aten.conv2d: "conv2d", aten.conv3d: "conv3d",
    aten.convolution: "conv", aten._convolution: "conv",
    aten.matmul: "matmul", aten.mm: "mm", aten.bmm: "bmm", aten.addmm: "addmm",
    aten.baddbmm: "baddbmm", aten._sparse_mm: "sparse_mm", aten.mv: "mv", aten.addmv: "addmv",
    aten.einsum: "einsum", aten.scaled_dot_product_attention: "attention",
}
# Ops between a reduction and its decision that keep each output an affine function of it.
_LAYOUT = {aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten,
           aten.squeeze, aten.unsqueeze, aten.contiguous, aten.clone, aten.alias,
           aten.dropout, aten.to, aten._to_copy}
_ADD = {aten.add, aten.add_, aten.sub, aten.sub_}
_SCALE = {aten.mul, aten.mul_, aten.div, aten.div_}
_BATCH_NORM = {aten.batch_norm, aten._native_batch_norm_legit_no_training}
_RELU = {aten.relu, aten.relu_}


@dataclass(frozen=True)
class Site:
    """A reduction node and whether ExPrune can rewrite it. See the module docstring."""

    name: str
    kind: str
    n: int | None
    decision: str | None
    eligible: bool
    reason: str | None
    contraction: tuple[tuple[int, int, bool], ...] = ()  # (class id, size, free) per factor
    chain: tuple[str, ...] = ()  # node names from the reduction to the decision
    exact_reason: str | None = "not analysed"  # why exact mode cannot rewrite it (None: it can)


def _packet(node: Node):
    return getattr(node.target, "overloadpacket", node.target)


def _is_relu(node: Node) -> bool:
    p = _packet(node)
    if p in _RELU:
        return True
    if p in (aten.hardtanh, aten.hardtanh_):
        return RuleContext.arg(node, "min_val", -1.0) == 0
    if p is aten.clamp_min or (p is aten.clamp and RuleContext.arg(node, "max") is None):
        return RuleContext.arg(node, "min") == 0
    if p is aten.threshold:
        return node.args[1] == 0 and node.args[2] == 0
    return p is aten.relu6


def _dynamic_nodes(gm: GraphModule) -> set[Node]:
    """Nodes whose value depends on a graph input (everything else is a compile-time value)."""
    dynamic: set[Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if node.meta.get(META_ROLE, "input") == "input":
                dynamic.add(node)
        elif any(a in dynamic for a in node.all_input_nodes):
            dynamic.add(node)
    return dynamic


def _epilogue_step(node: Node, value: Node, dynamic: set[Node]) -> bool:
    """Is ``node`` an affine per-output step applied to ``value``?"""
    p = _packet(node)
    if p in _LAYOUT:
        return node.args[0] is value
    operands = list(node.args[:2])
    if p in _ADD:
        return not (p in (aten.sub, aten.sub_) and operands.count(value) == 2)  # v - v is no decision input
    if p in _SCALE:
        if operands.count(value) != 1 or (p in (aten.div, aten.div_) and operands[0] is not value):
            return False  # v * v, or s / v, is not affine in v
        other = operands[1] if operands[0] is value else operands[0]
        return not isinstance(other, Node) or other not in dynamic
    if p in _BATCH_NORM:
        return node.args[0] is value and not RuleContext.arg(node, "training", False)
    return False


def _argmax_over_features(node: Node, value: Node) -> bool:
    if _packet(node) is not aten.argmax or node.args[0] is not value:
        return False
    dim = RuleContext.arg(node, "dim")
    ndim = len(RuleContext.shape(value))
    return dim is not None and dim % max(ndim, 1) == ndim - 1


def find_decision(site: Node, dynamic: set[Node], output_modes: Mapping[int, str]):
    """Follow the affine chain from ``site``; return (decision, chain, blocker, why_none)."""
    chain, cur, blocker = [site.name], site, None
    while True:
        users = list(cur.users)
        decisive = [u for u in users if _is_relu(u) or _argmax_over_features(u, cur)]
        outputs = [u for u in users if u.op == "output"]
        steps = [u for u in users if u not in decisive and _epilogue_step(u, cur, dynamic)]
        if decisive:
            nxt = decisive[0]
            decision = "relu" if _is_relu(nxt) else "argmax"
        elif outputs and not steps:
            index = [i for i, v in enumerate(outputs[0].args[0]) if v is cur]
            modes = {output_modes.get(i, "value") for i in index}
            if modes == {"argmax"}:
                nxt, decision = outputs[0], "argmax"
            else:
                return None, tuple(chain), None, f"'{cur.name}' is a model output"
        elif len(steps) == 1 and len(users) == 1:
            nxt, decision = steps[0], None
        elif not users:
            return None, tuple(chain), None, f"'{cur.name}' is unused"
        else:
            names = ", ".join(f"'{u.name}' ({_op(u)})" for u in users)
            return None, tuple(chain), None, (f"'{cur.name}' feeds {names}: neither an affine "
                                              f"epilogue step nor a ReLU/argmax decision")
        if blocker is None and len(users) > 1:
            other = next(u for u in users if u is not nxt)
            blocker = f"'{cur.name}' inside the epilogue chain is also used by '{other.name}' ({_op(other)})"
        if decision is not None:
            if nxt.op != "output":
                chain.append(nxt.name)
            return decision, tuple(chain), blocker, None
        chain.append(nxt.name)
        cur = nxt


def _op(node: Node) -> str:
    p = _packet(node)
    return getattr(p, "__name__", str(p)) if node.op == "call_function" else node.op


def _contraction(node: Node) -> list[tuple[int, ...]] | None:
    """Class ids of the contracted axes, from the operands' ``exprune.axes``."""
    p = _packet(node)
    args = node.args

    def ax(value, d):
        labels = value.meta.get(META_AXES) if isinstance(value, Node) else None
        return labels[d] if labels is not None and isinstance(labels, tuple) and labels and \
            isinstance(labels[0], tuple) else ()

    if p is aten.linear or p in (aten.matmul, aten.mm, aten.bmm, aten._sparse_mm, aten.mv):
        return [ax(args[0], -1)]
    if p in (aten.addmm, aten.baddbmm, aten.addmv):
        return [ax(args[1], -1)]
    if p in (aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution, aten._convolution):
        w = args[1].meta.get(META_AXES)
        return list(w[1:]) if w else None
    if p is aten.einsum:
        lhs, rhs = args[0].replace(" ", "").split("->")
        summed, out = [], []
        for subs, value in zip(lhs.split(","), args[1]):
            for d, ch in enumerate(subs):
                if ch not in rhs and ch not in out:
                    out.append(ch)
                    summed.append(ax(value, d))
        return summed
    return None


def find_sites(
    gm: GraphModule, classes: list[SymmetryClass], output_modes: Mapping[int, str]
) -> list[Site]:
    """Describe every reduction of ``gm`` and store it in ``node.meta[META_SITE]``."""
    by_id = {c.id: c for c in classes}
    dynamic = _dynamic_nodes(gm)
    sites = []
    for node in gm.graph.nodes:
        kind = SITE_KINDS.get(_packet(node)) if node.op == "call_function" else None
        if kind is None:
            continue
        site = _describe(node, kind, by_id, dynamic, output_modes)
        node.meta[META_SITE] = site
        sites.append(site)
    return sites


def _describe(node, kind, by_id, dynamic, output_modes) -> Site:
    decision, chain, blocker, why_none = find_decision(node, dynamic, output_modes)
    factors = tuple((cid, by_id[cid].size, by_id[cid].free)
                    for axis in (_contraction(node) or []) for cid in axis)
    free = [size for _, size, is_free in factors if is_free]
    n = max(free) if free else None
    reason = None
    if kind == "attention":
        reason = "fused attention (softmax of a contraction) has no ReLU/argmax decision to exploit"
    elif kind == "sparse_mm":
        reason = "sparse matmul: its contraction runs over graph nodes, which are not exchangeable"
    elif n is None:
        pinned = [by_id[cid] for cid, _, is_free in factors if not is_free]
        why = f" (pinned by {pinned[0].pins[0]})" if pinned and pinned[0].pins else ""
        reason = "no free factor in the contraction" + why
    elif decision is None:
        reason = f"no decision: {why_none}"
    elif blocker is not None:
        reason = blocker
    return Site(node.name, kind, n, decision, reason is None, reason, factors, chain,
                _exact_reason(node, kind, decision, blocker, why_none))


def _exact_reason(node: Node, kind: str, decision: str | None, blocker: str | None, why_none: str | None):
    """Why exact mode (sign-ordered terms, no statistics, no exchangeability needed) cannot
    rewrite this site, or None when it can: a ReLU decision, a sole-user chain, and an input
    that :mod:`.nonnegative` proved >= 0."""
    if kind not in ("linear", "addmm", "mm", "matmul", "conv2d", "conv"):
        return f"exact mode has no kernel for {kind} sites"
    if decision is None:
        return f"no decision: {why_none}"
    if decision != "relu":
        return "exact mode needs a ReLU decision (an argmax head has no lossless early exit here)"
    if blocker is not None:
        return blocker
    x = node.args[1] if kind == "addmm" else node.args[0]
    if not (isinstance(x, Node) and x.meta.get(META_NONNEGATIVE, False)):
        name = x.name if isinstance(x, Node) else repr(x)
        return f"exact mode needs a non-negative input; '{name}' is not provably >= 0"
    return None
