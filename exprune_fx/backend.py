"""The torch.compile backend: ``torch.compile(model, backend="exprune")``.

Every graph dynamo hands over (one per region between graph breaks, again on recompilation)
goes through the same pipeline as :func:`exprune_fx.compile`: the dynamo graph module is
wrapped in a module that holds its parameters and batch-norm statistics as parameters and
buffers (dynamo passes them as graph inputs), exported, analysed and rewritten. With
``inner="inductor"`` inductor then compiles the rewritten graph around the runtime ops.

Weights are read when the graph is compiled: the backend is for inference, like the rest of
exprune-fx; changing a model's weights in place afterwards needs a fresh ``torch.compile``.

Example:
    >>> import torch, exprune_fx
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(),
    ...                           torch.nn.Linear(64, 64), torch.nn.ReLU()).eval()
    >>> fast = torch.compile(mlp, backend=exprune_fx.backend(exprune_fx.Config(alpha=0.0, k=16), inner="eager"))
    >>> x = torch.randn(4, 8)
    >>> torch.allclose(fast(x), mlp(x), atol=1e-5)
    True
    >>> exprune_fx.stats(fast)["sites"]["graph0.linear_1"]["prune_rate"]
    0.0
"""

from __future__ import annotations

import re
import threading
import warnings
import weakref
from typing import Any, Callable, Sequence

import torch
from torch.fx import GraphModule

from .analysis import OutputSpec
from .compiler import FLOPS_NOTE, CompiledModel, ExPruneWarning, compile_graph
from .config import Config
from .errors import InputError, TrainingModeError
from .fastcall import INNER

_REGISTRY: "weakref.WeakSet[ExPruneBackend]" = weakref.WeakSet()
_LOCK = threading.Lock()


def _source_name(node) -> str:
    arg = node.meta.get("grapharg")
    source = getattr(arg, "source", None)
    return source.name() if callable(getattr(source, "name", None)) else str(getattr(source, "name", ""))


def _state_name(source: str) -> str:
    """``L['self']._modules['stem']._parameters['weight']`` -> ``stem.weight``."""
    return ".".join(re.findall(r"\['([^']+)'\]", source)[1:]) or source


_SIZE = re.compile(r"^(?P<base>.+)\.size\(\)\[(?P<dim>\d+)\]$")


class _DynamoGraphModel(torch.nn.Module):
    """A dynamo graph as a module: its weight inputs become parameters and buffers, so that
    torch.export lifts them with the right roles; symbolic sizes of other inputs (automatic
    dynamic shapes) are read from those inputs; the rest stay inputs."""

    def __init__(self, gm: GraphModule, example_inputs: Sequence[Any]):
        super().__init__()
        self.gm = gm
        self.slots: list[tuple[str, Any]] = []  # per graph input: (kind, attribute / (position, dim))
        self.names: dict[str, str] = {}  # attribute -> state-dict name in the user's model
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        sources = [_source_name(n) for n in placeholders]
        for i, (source, value) in enumerate(zip(sources, example_inputs)):
            attribute = f"w{i}"
            size = _SIZE.match(source)
            if size and size["base"] in sources:
                self.slots.append(("size", (sources.index(size["base"]), int(size["dim"]))))
                continue
            if isinstance(value, torch.nn.Parameter) or "._parameters[" in source:
                self.register_parameter(attribute, torch.nn.Parameter(value.detach(), requires_grad=False))
                self.slots.append(("parameter", attribute))
            elif isinstance(value, torch.Tensor) and "._buffers[" in source:
                self.register_buffer(attribute, value.detach())
                self.slots.append(("buffer", attribute))
            else:
                self.slots.append(("input", None))
                continue
            self.names[attribute] = _state_name(source)
        self.eval()

    def user_positions(self) -> list[int]:
        return [i for i, (kind, _) in enumerate(self.slots) if kind == "input"]

    def forward(self, *inputs):
        it = iter(inputs)
        args = [next(it) if kind == "input" else getattr(self, where) if kind != "size" else None
                for kind, where in self.slots]
        for i, (kind, where) in enumerate(self.slots):
            if kind == "size":
                args[i] = args[where[0]].shape[where[1]]
        return self.gm(*args)


def _refuse_training(gm: GraphModule) -> None:
    """Dynamo traces modules in their current mode: batch norm or dropout in training mode
    shows as a functional call with training=True."""
    F = torch.nn.functional
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in (F.batch_norm, F.dropout):
            continue
        position = 5 if node.target is F.batch_norm else 2
        training = node.kwargs.get("training", node.args[position] if len(node.args) > position else False)
        if training is True:
            raise TrainingModeError(
                f"the model is in training mode ({node.target.__name__} with training=True). ExPrune rewrites "
                f"inference graphs: call model.eval() before torch.compile(model, backend='exprune').")


def _concrete(value: Any) -> Any:
    """Dynamo passes symbolic sizes (automatic dynamic shapes) as SymInts: use their values."""
    if isinstance(value, torch.SymInt):
        return int(value.node.hint)
    return value


class _CompiledGraph:
    """What the backend returns for one dynamo graph; recompiles when inputs change shape
    beyond what the export allows (for example a new value of a symbolic size)."""

    def __init__(self, owner: "ExPruneBackend", gm: GraphModule, example_inputs: Sequence[Any]):
        _refuse_training(gm)
        example_inputs = [_concrete(x) for x in example_inputs]
        self.owner, self.model = owner, _DynamoGraphModel(gm, example_inputs)
        self.positions = self.model.user_positions()
        self.variants: dict[tuple, CompiledModel] = {}
        self._build([example_inputs[i] for i in self.positions])

    @staticmethod
    def _key(inputs: Sequence[Any]) -> tuple:
        return tuple(("t", x.dtype, x.dim()) if isinstance(x, torch.Tensor) else ("v", x) for x in inputs)

    def _build(self, inputs: list) -> CompiledModel:
        # torch.export must not add its guards to the frame dynamo is compiling: trace outside it.
        with warnings.catch_warnings(), torch._guards.tracing(None):
            warnings.simplefilter("ignore", ExPruneWarning)  # graphs without sites are normal here
            compiled = compile_graph(self.model, tuple(inputs), self.owner.config, self.owner.outputs,
                                     check_guards=False)
        compiled.set_inner(self.owner.inner)
        self.variants[self._key(inputs)] = compiled
        weights = {_storage(t) for t in list(self.model.parameters()) + list(self.model.buffers())}
        self.owner._graphs.append((compiled, weights))
        return compiled

    def __call__(self, *args):
        inputs = [args[i] for i in self.positions]
        compiled = self.variants.get(self._key(inputs))
        if compiled is None:
            compiled = self._build(inputs)
        try:
            return compiled(*inputs)
        except InputError:  # shapes the export specialised on changed: compile this variant
            return self._build(inputs)(*inputs)


class ExPruneBackend:
    """A configured torch.compile backend; see :func:`backend`."""

    def __init__(self, config: Config | None = None, inner: str = "inductor", outputs: OutputSpec = None):
        if inner not in INNER:
            raise InputError(f"inner must be one of {INNER}, got {inner!r}")
        if config is not None and not isinstance(config, Config):
            raise InputError(f"config must be an exprune_fx.Config, got {type(config).__name__}")
        self.config, self.inner, self.outputs = config or Config(), inner, outputs
        self._graphs: list[tuple[CompiledModel, set[int]]] = []  # with the storages of its weights
        with _LOCK:
            _REGISTRY.add(self)

    def __call__(self, gm: GraphModule, example_inputs: Sequence[Any]) -> Callable:
        return _CompiledGraph(self, gm, example_inputs)

    @property
    def graphs(self) -> list[CompiledModel]:
        """Every graph compiled so far (one per dynamo graph and shape variant)."""
        return [compiled for compiled, _ in self._graphs]


def backend(config: Config | None = None, inner: str = "inductor", outputs: OutputSpec = None) -> ExPruneBackend:
    """A torch.compile backend with these settings: ``torch.compile(m, backend=backend(cfg))``.

    ``inner`` compiles the rewritten graph: ``"inductor"`` (default) or ``"eager"``.
    ``outputs`` is as in :func:`exprune_fx.compile`, applied to each dynamo graph's outputs
    (named ``"0"``, ``"1"``, ... in graph order).
    """
    return ExPruneBackend(config, inner, outputs)


def exprune_backend(gm: GraphModule, example_inputs: Sequence[Any]) -> Callable:
    """The default backend registered as ``"exprune"`` (entry point ``torch_dynamo_backends``)."""
    return _default()(gm, example_inputs)


_DEFAULT: list[ExPruneBackend] = []


def _default() -> ExPruneBackend:
    if not _DEFAULT:
        _DEFAULT.append(ExPruneBackend())
    return _DEFAULT[0]


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _graphs_for(obj: Any) -> list[CompiledModel]:
    """The graphs any exprune backend compiled from ``obj``'s weights (or by ``obj``)."""
    if isinstance(obj, ExPruneBackend):
        return obj.graphs
    module = getattr(obj, "_orig_mod", obj)
    if not isinstance(module, torch.nn.Module):
        raise InputError("stats() takes a torch.compile'd module, the module itself, or the backend object "
                         "(b = exprune_fx.backend(...); torch.compile(fn, backend=b); exprune_fx.stats(b)).")
    owned = {_storage(t) for t in list(module.parameters()) + list(module.buffers())}
    return [compiled for b in list(_REGISTRY) for compiled, weights in b._graphs if weights & owned]


def stats(obj: Any) -> dict[str, Any]:
    """ExPrune statistics of everything a backend compiled for ``obj``, summed over graphs.

    Sites are named ``graph{i}.{site}``.
    """
    graphs = _graphs_for(obj)
    sites, dense, executed, calls = {}, 0.0, 0.0, 0
    skips, saved = {}, 0.0
    for i, compiled in enumerate(graphs):
        s = compiled.exprune_stats()
        sites.update({f"graph{i}.{name}": v for name, v in s["sites"].items()})
        dense += s["dense_flops"]
        executed += s["executed_flops"]
        calls += s["calls"]
        skips.update({f"graph{i}.{name}": v for name, v in s["zero_skip"]["nodes"].items()})
        saved += s["zero_skip"]["saved_flops"]
    zero_skip = {"nodes": skips, "saved_flops": saved, "executed_flops": executed - saved,
                 "reduction": 1.0 - (executed - saved) / dense if dense else 0.0}
    return {"graphs": len(graphs), "calls": calls, "sites": sites, "dense_flops": dense,
            "executed_flops": executed, "reduction": 1.0 - executed / dense if dense else 0.0,
            "zero_skip": zero_skip, "note": FLOPS_NOTE}


def reset_stats(obj: Any) -> None:
    for compiled in _graphs_for(obj):
        compiled.reset_stats()
