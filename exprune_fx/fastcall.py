"""A lean call path for exported graphs: no pytree flattening, no guard re-check on known inputs.

``torch.export``'s module flattens the call's arguments against its input spec, runs its guard
function (shape and dtype checks) and unflattens the outputs on every call. On a batch-1 call of
a small model that is a measurable share of the time (docs/benchmarks.md, "Wall-clock time").
:class:`LeanCall` runs the same graph as a plain function of the call's tensors:

* it applies to calls laid out as the graph's input spec whose leaves are tensors or the plain
  constants torch.export accepts (int, float, bool, str, None; the signature holds their
  values): positional tensors as they are (no flattening), other layouts (keyword inputs,
  nested tuples) flattened as the exported module flattens them, keywords in any order;
* the first call with a given signature (shapes, dtypes, devices) goes through the full,
  guarded module; once that call has succeeded, later calls with the same signature skip the
  flattening and the guards (the guards are a function of that signature only);
* attributes (weights, counters) are read from the graph module at every call, so moving it to
  another device or replacing a buffer takes effect;
* the ``exprune`` ops' Python kernels are called directly (:data:`runtime.ops.PYTHON_KERNELS`),
  not through the dispatcher, whose boxing of a site's dozen arguments costs 6-12 us per call
  (docs/benchmarks.md, "Wall-clock time"); the whole call runs with dynamo disabled, as the
  ops' kernels do;
* every other ATen op is called through its C++ callable (``OpOverload._op``), without the
  Python frame of ``OpOverload.__call__``, and an eval-mode dropout (``aten.dropout`` with
  ``train=False``, which returns its input itself) is not called at all: on the byte-level LM's
  decode step (87 ops) that is 73 us of 560, on the CNNs 10-28 us a call at batch 1.

With ``inner="inductor"`` the same flat function is compiled by inductor (``torch.compile``,
which specialises it per signature as it does any function and guards on the graph module's
attributes) instead; its site ops are left as ops, except that a site the ``"fastest"``
kernels run dense on every call is written in torch ops (:mod:`.runtime.lowering`), so that
inductor fuses and lays it out as it does the dense model. Compiling the exported module
itself would keep its pytree flattening, input checks and forward hooks around the compiled
code, on every call: 60-90 us a call on a 784-1024-1024-10 MLP, more than the model's batch-1
time.

Example:
    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU()).eval()
    >>> gm = torch.export.export(m, (torch.randn(2, 4),)).module()
    >>> lean = LeanCall(gm)
    >>> x = torch.randn(2, 4)
    >>> lean(x) is None  # first call with this signature: the caller runs the guarded module
    True
    >>> out = gm(x); lean.accept((x,))
    >>> torch.equal(lean(x), m(x))
    True
"""

from __future__ import annotations

import torch
from torch.utils import _pytree as pytree

from .runtime.lowering import TRACEABLE
from .runtime.ops import PYTHON_KERNELS

MAX_SIGNATURES = 64  # a model called with ever-new shapes keeps the guarded path
INNER = ("eager", "inductor")


def inference_compile(fn, backend: str):
    """``torch.compile(fn)`` run without gradients: the ``exprune`` ops have no autograd
    formula (ExPrune is for inference), and under grad mode inductor would build a joint
    graph around them and warn that backpropagating through them is wrong."""
    return torch.no_grad()(torch.compile(fn, backend=backend))


# Leaves a call may have on the lean path: tensors, and the plain constants torch.export
# specialises on (flags such as ``use_cache=False``), which the signature holds by value.
_LEAF_TYPES = (torch.Tensor, bool, int, float, str, type(None))


def _signature(leaves: tuple):
    return tuple((a.shape, a.dtype, a.device) if isinstance(a, torch.Tensor) else (type(a), a) for a in leaves)


class LeanCall:
    """Runs ``gm`` (a module made by ``torch.export``'s ``ExportedProgram.module()``) on known
    input signatures without its per-call flattening and guards; None otherwise."""

    def __init__(self, gm: torch.fx.GraphModule, inner: str = "eager"):
        if inner not in INNER:
            raise ValueError(f"inner must be one of {INNER}, got {inner!r}")
        self.gm = gm
        self.inner = inner
        self.known: set = set()
        if inner == "eager":
            self.fn = torch.compiler.disable(self._flat_forward(gm, raw=True))
        else:  # inductor traces the flat function (the ops as ops) and reads gm's attributes itself
            self.fn = inference_compile(self._flat_forward(gm, raw=False), inner)
        self.in_spec = getattr(gm, "_in_spec", None)
        self.arity = _positional_arity(self.in_spec)
        self.keywords = _keyword_order(self.in_spec)
        self.out_spec = getattr(gm, "_out_spec", None)

    def leaves(self, args: tuple, kwargs: dict | None = None) -> tuple | None:
        """The call's inputs as the graph's flat inputs, or None where the lean path does not
        apply: a layout other than the input spec's, or a leaf of another type. Positional
        calls of plain tensors are the inputs themselves; others are flattened as the exported
        module flattens them (keywords in the spec's order, whatever the call's)."""
        if self.out_spec is None:
            return None
        if not kwargs and self.arity == len(args):
            leaves = args
        elif self.keywords is None or kwargs is None or set(kwargs) != self.keywords.keys():
            return None
        else:
            leaves, spec = pytree.tree_flatten((args, {name: kwargs[name] for name in self.keywords}))
            if spec != self.in_spec:
                return None
        for a in leaves:
            if not isinstance(a, _LEAF_TYPES):
                return None
        return tuple(leaves)

    def run(self, leaves: tuple):
        """The outputs for :meth:`leaves`' result, or None for a signature not yet accepted."""
        if _signature(leaves) not in self.known:
            return None
        flat = self.fn(self.gm, *leaves)
        return pytree.tree_unflatten(list(flat), self.out_spec)

    def __call__(self, *args, **kwargs):
        """The outputs, or None when this call must take the guarded path."""
        leaves = self.leaves(args, kwargs)
        return None if leaves is None else self.run(leaves)

    def accept(self, leaves: tuple) -> None:
        """Record that the guarded module accepted a call with these flat inputs (:meth:`leaves`)."""
        if len(self.known) < MAX_SIGNATURES:
            self.known.add(_signature(leaves))

    @staticmethod
    def _flat_forward(gm: torch.fx.GraphModule, raw: bool):
        """The graph as ``forward(self, *flat_inputs) -> flat outputs``, without the guard call
        and without eval-mode dropouts; ``raw``: the ``exprune`` ops as their Python kernels and
        the other ATen ops as their C++ callables (for running eagerly); else the site ops that
        have a dense form as their :mod:`.runtime.lowering` functions (for inductor)."""
        graph = torch.fx.Graph()
        out = graph.graph_copy(gm.graph, {})
        graph.output(out)
        for node in list(graph.nodes):
            if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
                graph.erase_node(node)
            elif node.op != "call_function":
                continue
            elif _is_eval_dropout(node):  # returns its input itself
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
            elif not raw:
                node.target = TRACEABLE.get(node.target, node.target)
            elif node.target in PYTHON_KERNELS:
                node.target = PYTHON_KERNELS[node.target]
            elif isinstance(node.target, torch._ops.OpOverload):
                node.target = _Raw(node.target)
        code = graph.python_code(root_module="self")
        namespace = {name: value.op._op if isinstance(value, _Raw) else value for name, value in code.globals.items()}
        exec(compile(code.src, "<exprune-fx lean forward>", "exec"), namespace)  # noqa: S102
        return namespace["forward"]


class _Raw:
    """An ATen op's place in the generated code, bound to the op's C++ callable (``op._op``)
    after code generation: calling an ``OpOverload`` adds a Python frame (its ``__call__``) to
    every op of the graph, 0.3-0.5 us each (torch.fx cannot name the bare callable itself)."""

    __module__ = __name__

    def __init__(self, op: torch._ops.OpOverload):
        self.op = op
        self.__name__ = str(op).replace(".", "_")

    def __call__(self, *args, **kwargs):  # (torch.fx wants a callable target)
        return self.op(*args, **kwargs)


def _is_eval_dropout(node: torch.fx.Node) -> bool:
    """``aten.dropout(x, p, train=False)``: the graph of an eval-mode model keeps its dropouts,
    which return their input itself."""
    if node.target is not torch.ops.aten.dropout.default:
        return False
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train")
    return train is False and isinstance(node.args[0], torch.fx.Node)


def _keyword_order(spec) -> dict | None:
    """The keyword inputs of a ``((positional...), {keywords})`` spec, in the spec's order (a
    dict used as an ordered set), or None for another layout."""
    if spec is None or spec.type is not tuple or spec.num_children != 2 or spec.child(1).type is not dict:
        return None
    return dict.fromkeys(spec.child(1).context)


def _positional_arity(spec) -> int:
    """Number of positional inputs when the spec is ``((tensors...), {})`` of plain leaves, else -1."""
    if spec is None or spec.type is not tuple or spec.num_children != 2:
        return -1
    positional, keywords = spec.child(0), spec.child(1)
    if positional.type is not tuple or keywords.type is not dict or keywords.num_children:
        return -1
    if any(not positional.child(i).is_leaf() for i in range(positional.num_children)):
        return -1
    return positional.num_children
