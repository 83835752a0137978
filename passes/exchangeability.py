"""The exchangeability analysis pass: label every axis factor with a symmetry class.

Runs the per-op rules of :mod:`.rules` over a lifted ATen graph, adds the boundary
constraints (graph inputs and counted outputs are pinned; constants are pinned along every
axis they are not uniform along), and records the result in ``node.meta``:

``exprune.axes``
    For a tensor-valued node, one tuple per axis of the class ids of its factors (major to
    minor; a size-1 axis has none). For a node returning several tensors, a tuple of those.
``exprune.role``
    On placeholders: ``"parameter"``, ``"buffer"``, ``"constant"`` or ``"input"``.
``exprune.target``
    On parameter, buffer and constant placeholders: the state-dict name.

Example:
    >>> import torch
    >>> from exprune_fx import lift
    >>> from exprune_fx.passes.exchangeability import label_classes
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> lifted = lift(mlp.eval(), (torch.randn(3, 4),))
    >>> classes = label_classes(lifted.graph_module, lifted.constants)
    >>> [(c.size, c.free) for c in classes if c.free]
    [(8, True)]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch.fx import GraphModule, Node

from .factors import FactorStore
from .rules import RuleContext, concrete_size, find_rule
from .rules_nn import batch_norm

META_AXES = "exprune.axes"
META_ROLE = "exprune.role"
META_TARGET = "exprune.target"

_BN_STAT_SLOTS = ("running_mean", "running_var")


@dataclass(frozen=True)
class Member:
    """One factor of one axis of a value or a parameter, belonging to a class."""

    kind: str  # "parameter", "buffer", "constant", "input" or "value"
    name: str  # state-dict name for parameters/buffers/constants, node name otherwise
    node: str  # graph node name
    axis: int
    factor: int  # position of the factor within the axis, major to minor
    factors: tuple[int, ...]  # sizes of all factors of that axis (to permute one of them)


@dataclass(frozen=True)
class Pin:
    """Why a class cannot be permuted: the node that pinned it and the rule's reason."""

    op: str
    reason: str

    def __str__(self) -> str:
        return f"{self.op}: {self.reason}"


@dataclass(frozen=True)
class SymmetryClass:
    """A set of factors that a permutation must move together; free when nothing pins it."""

    id: int
    size: int
    free: bool
    members: tuple[Member, ...] = field(repr=False)
    pins: tuple[Pin, ...] = ()

    @property
    def parameters(self) -> tuple[Member, ...]:
        """The parameter and buffer slices that a permutation of this class moves."""
        return tuple(m for m in self.members if m.kind in ("parameter", "buffer"))


class AnalysisError(RuntimeError):
    """A rule failed on a node; the message carries the node."""


def _fresh_axes(store: FactorStore, val: Any) -> Any:
    if isinstance(val, torch.Tensor):
        axes = []
        for s in val.shape:
            size = concrete_size(s)
            axes.append([store.new(size)] if size > 1 or isinstance(s, torch.SymInt) and size > 0 else [])
            if isinstance(s, torch.SymInt) and axes[-1]:
                store.pin(axes[-1][0], ("", "dynamic dimension"))
        return axes
    if isinstance(val, (tuple, list)):
        return tuple(_fresh_axes(store, v) for v in val)
    return None


def _only_batch_norm_stats(node: Node) -> bool:
    """True when every use of a buffer is as batch-norm running statistics."""
    users = list(node.users)
    return bool(users) and all(
        find_rule(u.target) is batch_norm
        and any(RuleContext.arg(u, slot) is node for slot in _BN_STAT_SLOTS)
        for u in users
    )


def _pin_nonuniform(ctx: RuleContext, node: Node, value: torch.Tensor, axes: list[list[int]]):
    """Pin each axis along which a constant is not the same slice repeated."""
    for d, axis in enumerate(axes):
        if not axis:
            continue
        first = value.narrow(d, 0, 1)
        if value.is_sparse or not torch.equal(value, first.expand_as(value)):
            ctx.pin(axis, node, "constant is not uniform along this axis")


def label_classes(
    gm: GraphModule,
    constants: Mapping[str, torch.Tensor],
    counted_outputs: set[int] | None = None,
    strict: bool = False,
) -> list[SymmetryClass]:
    """Run the analysis on ``gm`` (roles already in ``node.meta``); return the classes.

    ``constants`` maps buffer/constant state-dict names to their values (to test
    uniformity). ``counted_outputs`` are the positions of the graph outputs that define the
    model's function (None: all). With ``strict``, a failing rule raises
    :class:`AnalysisError` instead of pinning the node's axes.
    """
    store = FactorStore()
    axes: dict[Node, Any] = {}
    ctx = RuleContext(store, axes)
    for node in gm.graph.nodes:
        unused = node.op == "placeholder" and not node.users  # e.g. the alias of a tied weight
        axes[node] = None if unused else _fresh_axes(store, node.meta.get("val"))

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            _constrain_placeholder(ctx, node, constants)
        elif node.op == "call_function":
            _apply_rule(ctx, node, strict)
        elif node.op == "output":
            for i, value in enumerate(node.args[0]):
                if counted_outputs is None or i in counted_outputs:
                    for axis in ctx.axes(value) or ():
                        ctx.pin(axis, node, "graph output")
        elif node.op != "get_attr":
            ctx.pin_all(node, f"{node.op} nodes are not modelled")
    return _collect(gm, store, axes)


def _constrain_placeholder(ctx: RuleContext, node: Node, constants: Mapping[str, torch.Tensor]):
    role = node.meta.get(META_ROLE, "input")
    ax = ctx.axes(node)
    if ax is None:
        return
    if role == "input":
        for axis in ax:
            ctx.pin(axis, node, "graph input")
    elif role in ("buffer", "constant") and not _only_batch_norm_stats(node):
        value = constants.get(node.meta.get(META_TARGET))
        if value is None:
            for axis in ax:
                ctx.pin(axis, node, "constant of unknown value")
        else:
            _pin_nonuniform(ctx, node, value, ax)


def _apply_rule(ctx: RuleContext, node: Node, strict: bool) -> None:
    fn = find_rule(node.target)
    if fn is None:
        ctx.pin_all(node, f"no rule for {_op_name(node)} (unknown ops pin every axis)")
        return
    try:
        fn(ctx, node)
    except Exception as exc:  # a rule bug must never make the analysis unsound
        if strict:
            raise AnalysisError(f"rule for {_op_name(node)} failed on {node.format_node()}: {exc}") from exc
        ctx.pin_all(node, f"rule for {_op_name(node)} failed: {exc}")


def _op_name(node: Node) -> str:
    target = node.target
    return str(getattr(target, "__name__", target)) if not hasattr(target, "_schema") else str(target)


def _collect(gm: GraphModule, store: FactorStore, axes: dict[Node, Any]) -> list[SymmetryClass]:
    ids: dict[int, int] = {}
    members: dict[int, list[Member]] = {}

    def label(node: Node, ax: list[list[int]]) -> tuple[tuple[int, ...], ...]:
        role = node.meta.get(META_ROLE, "value") if node.op == "placeholder" else "value"
        name = node.meta.get(META_TARGET, node.name)
        out = []
        for d, axis in enumerate(ax):
            leaves = [leaf for v in axis for leaf in store.leaves(v)]
            sizes = tuple(store.size(v) for v in leaves)
            row = []
            for f, leaf in enumerate(leaves):
                root = store.find(leaf)
                cid = ids.setdefault(root, len(ids))
                members.setdefault(cid, []).append(Member(role, name, node.name, d, f, sizes))
                row.append(cid)
            out.append(tuple(row))
        return tuple(out)

    for node in gm.graph.nodes:
        ax = axes.get(node)
        if isinstance(ax, list):
            node.meta[META_AXES] = label(node, ax)
        elif isinstance(ax, tuple):
            node.meta[META_AXES] = tuple(label(node, a) if isinstance(a, list) else None for a in ax)
    classes = []
    for root, cid in ids.items():
        pins = tuple(Pin(*r) if isinstance(r, tuple) else Pin("", str(r)) for r in store.pins(root))
        classes.append(SymmetryClass(cid, store.size(root), not pins, tuple(members[cid]), pins))
    return sorted(classes, key=lambda c: c.id)
