"""Zero-skip propagation: a linear layer fed by a ReLU skips the inputs known to be zero.

Runs on the *unlifted* graph module (parameters are ``get_attr`` nodes), after
:mod:`.rewrite` (``Config(zero_skip=True)``), or alone. It replaces every linear reduction
(``aten.linear``, ``aten.addmm``, ``aten.mm``, ``aten.matmul`` with a 2-d right operand)
whose weight is a compile-time value and whose input is the output of a ReLU-family op
(``relu``, ``relu6``, ``hardtanh(0, .)``, ``clamp_min(0)``, ``threshold(0, 0)``; the same
family as the sites' ReLU decision), possibly through layout ops and eval-mode dropout, by
``torch.ops.exprune.zero_skip_linear`` (:mod:`exprune_fx.runtime.zero_skip`): per call it
sums only the weight rows of the nonzero inputs when its cost model says that pays, and runs
the dense product otherwise. The result equals the dense linear up to float summation order.
A layer on which the cost model says the sparse path can never win (``CostModel.can_pay``:
a small product such as a 512 -> 128 projection or a 1024 -> 10 head, where the op's own
overhead exceeds anything skipping saves) stays a plain linear, with the reason in its
report, unless ``every_linear=True``.

An ExPrune site's op returns its pruned outputs as 0 and the ReLU after it stays in the
graph, so the linear after an ExPrune site is found the same way, and sees more zeros. A
linear that is itself a rewritten ExPrune site is an ``exprune.*`` op, not a linear: it is
not zero-skipped (the early-exit kernels read every input).

State: per rewritten node, two buffers named ``exprune_zs_{node}_{what}``: ``weight_t`` (the
weight transposed, [K, N], contiguous: each input's weight row is contiguous, as the
embedding-bag sum needs) and ``counters`` (:data:`exprune_fx.runtime.zero_skip.FIELDS`).
The new op node carries a :class:`ZeroSkipReport` in ``node.meta["exprune.zero_skip"]``
(a linear left dense by the cost model carries its report, with the reason, there too).

Memory: ``weight_t`` is a copy of the weight (``K * N`` elements per rewritten linear; none
when the weight is already stored ``[K, N]`` contiguous, as for ``x @ W``). The pass drops
the graph module's own reference to the original weight when nothing else in the graph reads
it, so the rewritten graph holds each weight once; the original model's parameter stays
alive as long as something else holds it (``exprune_fx.compile`` keeps the source model, for
:func:`exprune_fx.calibrate`), so the process holds that weight twice while both live. A
model saved with :func:`exprune_fx.save` and loaded back holds only the transposed copy.

Example:
    >>> import torch
    >>> from exprune_fx import lift
    >>> from exprune_fx.passes.zero_skip import add_zero_skip
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.ReLU(),
    ...                           torch.nn.Linear(32, 8), torch.nn.Linear(8, 2)).eval()
    >>> gm = lift(mlp, torch.randn(2, 4), dynamic_batch=True).exported.module()
    >>> [(r.name, r.in_features, r.out_features, r.rewritten) for r in add_zero_skip(gm)]
    [('linear_1', 32, 8, False)]
    >>> [(r.name, r.rewritten) for r in add_zero_skip(gm, every_linear=True)]  # small: forced
    [('linear_1', True)]
    >>> x = torch.randn(3, 4)
    >>> torch.allclose(gm(x), mlp(x), atol=1e-5)
    True
    >>> hasattr(gm.get_submodule("2"), "weight")  # the graph holds the transposed copy only
    False
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from exprune_fx.runtime import ops  # noqa: F401  (registers torch.ops.exprune)
from exprune_fx.runtime import zero_skip
from exprune_fx.runtime.zero_skip import new_counters
from .rewrite import NotRewritable, _Builder, _device, _static_operands, drop_unread
from .rules import RuleContext
from .sites import _LAYOUT, _is_relu, _packet, SITE_KINDS

META_ZERO_SKIP = "exprune.zero_skip"
KINDS = ("linear", "addmm", "mm", "matmul")


@dataclass(frozen=True)
class ZeroSkipReport:
    """One linear fed by a ReLU: the node's name in the graph before the pass, its sizes,
    the ReLU-family node feeding it, whether it was rewritten (else why not), and the names
    of its buffers on the graph module."""

    name: str
    kind: str
    in_features: int
    out_features: int
    relu: str
    rewritten: bool = True
    reason: str | None = None
    weight_t: str | None = None
    counters: str | None = None


def relu_source(value) -> Node | None:
    """The ReLU-family node whose output ``value`` is (through layout ops), or None."""
    while isinstance(value, Node) and value.op == "call_function":
        if _is_relu(value):
            return value
        if _packet(value) not in _LAYOUT or not value.args:
            return None
        value = value.args[0]
    return None


def add_zero_skip(gm: GraphModule, every_linear: bool = False) -> list[ZeroSkipReport]:
    """Rewrite, in place, every linear of ``gm`` with a static weight fed by a ReLU on which
    the sparse path can pay (every one with ``every_linear=True``); report on each linear
    with a static weight fed by a ReLU (module docstring)."""
    reports, weights = [], set()
    for node in list(gm.graph.nodes):
        kind = SITE_KINDS.get(_packet(node)) if node.op == "call_function" else None
        if kind not in KINDS:
            continue
        try:
            rewritten = _rewrite(gm, node, kind, every_linear)
        except NotRewritable:
            continue
        except Exception as exc:  # a bug here must name the node, as the other passes do
            raise RuntimeError(f"zero-skip failed on {node.format_node()}: {exc}") from exc
        if rewritten is not None:
            report, sources = rewritten
            reports.append(report)
            weights |= sources
    gm.graph.eliminate_dead_code()
    drop_unread(gm, weights)
    gm.graph.lint()
    gm.recompile()
    return reports


def _rewrite(gm: GraphModule, node: Node, kind: str, every_linear: bool):
    """Replace one linear node and return its report and the attributes its weight came from;
    None when it does not qualify (no ReLU input, run-time weight)."""
    x_arg = node.args[1] if kind == "addmm" else node.args[0]
    relu = relu_source(x_arg)
    if relu is None:
        return None
    if kind == "addmm" and (RuleContext.arg(node, "beta", 1) != 1 or RuleContext.arg(node, "alpha", 1) != 1):
        return None
    operands = _static_operands(gm, node, kind)  # raises NotRewritable for a run-time linear weight
    if operands is None:
        return None
    x, _, weight, bias = operands
    if weight.dim() != 2 or not weight.is_floating_point():
        return None
    out_features, in_features = weight.shape
    if not every_linear and not zero_skip.COST.can_pay(in_features, out_features):
        reason = f"the sparse path cannot pay on a {in_features} -> {out_features} product (cost model)"
        node.meta[META_ZERO_SKIP] = ZeroSkipReport(node.name, kind, in_features, out_features, relu.name, False, reason)
        return node.meta[META_ZERO_SKIP], set()
    weight_arg = node.args[2] if kind == "addmm" else node.args[1]
    # _Builder names buffers f"exprune_{index}_{site.name}_{what}": here exprune_zs_{node}_{what}
    builder = _Builder(gm, types.SimpleNamespace(name=node.name), "zs", node)
    weight_t = builder.buffer("weight_t", weight.T)  # contiguous [K, N] (a copy unless stored so)
    counters = builder.buffer("counters", new_counters(_device(gm)))
    call = builder.call(torch.ops.exprune.zero_skip_linear.default, x, weight_t, bias, counters)
    report = ZeroSkipReport(node.name, kind, in_features, out_features, relu.name, True, None, weight_t.target,
                            counters.target)
    call.meta[META_ZERO_SKIP] = report
    node.replace_all_uses_with(call)
    gm.graph.erase_node(node)
    return report, _attributes(weight_arg)


def _attributes(value) -> set[str]:
    """Targets of the ``get_attr`` nodes a compile-time value is computed from."""
    out, todo = set(), [value] if isinstance(value, Node) else []
    while todo:
        n = todo.pop()
        if n.op == "get_attr":
            out.add(n.target)
        todo.extend(n.all_input_nodes)
    return out
