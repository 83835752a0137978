"""Lift a model to the canonical ATen-level torch.fx graph with torch.export (non-strict).

Every placeholder of the lifted graph is labelled in ``node.meta``:
``exprune.role`` is ``"parameter"``, ``"buffer"``, ``"constant"`` or ``"input"``, and
``exprune.target`` is the state-dict name of parameters, buffers and constants.

Models in training mode are refused (:class:`TrainingModeError`): dropout and batch
statistics make training-mode outputs random, and ExPrune is an inference pass. Call
``model.eval()`` first. The caller's model is never modified.

Example:
    >>> import torch
    >>> from exprune_fx import lift
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU()).eval()
    >>> lifted = lift(mlp, torch.randn(2, 4))
    >>> [n.meta["exprune.role"] for n in lifted.graph_module.graph.nodes if n.op == "placeholder"]
    ['parameter', 'parameter', 'input']
    >>> lifted.output_names
    ('output',)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind
from torch.fx import GraphModule
from torch.utils._pytree import keystr, tree_flatten_with_path, tree_leaves

from .errors import ExportError, InputError, TrainingModeError

META_ROLE = "exprune.role"
META_TARGET = "exprune.target"

_ROLES = {
    InputKind.PARAMETER: "parameter",
    InputKind.BUFFER: "buffer",
    InputKind.CONSTANT_TENSOR: "constant",
    InputKind.USER_INPUT: "input",
}


@dataclass
class Lifted:
    """A model lifted to an ATen graph, with what the later passes need to know about it."""

    exported: ExportedProgram
    args: tuple
    kwargs: dict
    output_names: tuple[str, ...]  # one per flat graph output, e.g. ("logits",)
    reference_outputs: tuple  # the eager model's flat outputs on the example inputs
    dynamic_batch: bool = False  # whether the graph accepts other batch sizes

    @property
    def graph_module(self) -> GraphModule:
        return self.exported.graph_module

    @property
    def constants(self) -> dict[str, torch.Tensor]:
        """Buffers and lifted constants by state-dict name (to check their uniformity)."""
        out = dict(self.exported.constants)
        out.update({k: v for k, v in self.exported.state_dict.items() if not isinstance(v, torch.nn.Parameter)})
        return out


def normalize_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """Accept a tensor, a tuple/list of positional inputs, a dict of keyword inputs, or
    ``(args_tuple, kwargs_dict)``."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, list):
        example_inputs = tuple(example_inputs)
    if isinstance(example_inputs, tuple):
        if len(example_inputs) == 2 and isinstance(example_inputs[0], tuple) and \
                isinstance(example_inputs[1], Mapping):
            return example_inputs[0], dict(example_inputs[1])
        return example_inputs, {}
    raise InputError(
        f"example_inputs must be a tensor, a tuple of positional inputs, a dict of keyword "
        f"inputs, or (args, kwargs); got {type(example_inputs).__name__}."
    )


def output_names(outputs: Any) -> tuple[str, ...]:
    """Names of the flat outputs: their pytree paths joined by '.' ('output' for a tensor)."""
    names = []
    for path, _ in tree_flatten_with_path(outputs)[0]:
        text = keystr(path)
        for ch in "[]()'\"":
            text = text.replace(ch, ".")
        parts = [p for p in text.split(".") if p]
        names.append(".".join(parts) or "output")
    return tuple(names)


@contextlib.contextmanager
def _module_tracker(model: torch.nn.Module) -> Iterator[list[str]]:
    """Track which submodule is running, to name it when the model fails inside it."""
    names = {id(m): (name or type(model).__name__, type(m).__name__) for name, m in model.named_modules()}
    stack: list[str] = []

    def pre(module, *_):
        info = names.get(id(module))
        if info is not None:
            stack.append(f"'{info[0]}' ({info[1]})")

    def post(module, *_):
        if id(module) in names and stack:
            stack.pop()

    handles = [torch.nn.modules.module.register_module_forward_pre_hook(pre),
               torch.nn.modules.module.register_module_forward_hook(post)]  # not on errors: the stack then ends at the failing module
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _batch_dynamic(args: tuple, kwargs: dict) -> tuple[tuple, dict, Any]:
    """Example inputs and ``dynamic_shapes`` with a dynamic leading (batch) axis.

    torch.export specialises an axis whose example size is 1, so such inputs are repeated to
    size 2 for the export only; the graph then accepts any batch size.
    """

    def widen(x):
        return torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == 1 else x

    def spec(x):
        return {0: torch.export.Dim.AUTO} if isinstance(x, torch.Tensor) and x.dim() > 0 else None

    args = tuple(widen(a) for a in args)
    kwargs = {k: widen(v) for k, v in kwargs.items()}
    shapes = (tuple(spec(a) for a in args), {k: spec(v) for k, v in kwargs.items()})
    return args, kwargs, shapes


def lift(model: torch.nn.Module, example_inputs: Any, dynamic_batch: bool = False) -> Lifted:
    """Export ``model`` on ``example_inputs`` to an ATen graph. See the module docstring.

    With ``dynamic_batch``, the leading axis of every tensor input is exported as dynamic
    (where the model allows it), so the graph runs on other batch sizes.
    """
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    training = [name or "<root>" for name, m in model.named_modules() if m.training]
    if training:
        raise TrainingModeError(
            f"the model is in training mode ({len(training)} module(s), e.g. "
            f"'{training[0]}'). ExPrune rewrites inference graphs, where dropout is off and batch "
            f"norm uses its running statistics: call model.eval() before compiling or analysing."
        )
    args, kwargs = normalize_inputs(example_inputs)
    with _module_tracker(model) as stack, torch.no_grad():
        try:
            reference = model(*args, **kwargs)
        except Exception as exc:
            where = f" in module {stack[-1]}" if stack else ""
            raise InputError(
                f"the model failed on the example inputs{where}: {_first_line(exc)}. Check that "
                f"the example inputs have the shapes, dtypes and argument names the model's "
                f"forward expects (inputs given: {_describe(args, kwargs)})."
            ) from exc
    exported = None
    if dynamic_batch and any(isinstance(t, torch.Tensor) and t.layout != torch.strided
                             for t in tree_leaves((args, kwargs))):
        dynamic_batch = False  # torch.export cannot trace sparse inputs with symbolic shapes
    if dynamic_batch:
        export_args, export_kwargs, shapes = _batch_dynamic(args, kwargs)
        try:
            exported = torch.export.export(model, export_args, export_kwargs,
                                           dynamic_shapes=_shapes_by_name(model, shapes), strict=False)
        except Exception:  # e.g. sparse inputs: fall back to the example's exact shapes
            exported = None
    with _module_tracker(model) as stack:
        try:
            if exported is None:
                exported = torch.export.export(model, args, kwargs, strict=False)
                dynamic_batch = False
        except Exception as exc:
            where = f" in module {stack[-1]}" if stack else ""
            raise ExportError(
                f"torch.export could not capture the model{where}: {_first_line(exc)}. "
                f"Data-dependent Python control flow, .item()/.tolist() on tensors and untraceable "
                f"library calls are the usual causes; rewrite that part with tensor ops "
                f"(torch.where, torch.cond) or exclude it from the module you compile."
            ) from exc
    _label_placeholders(exported)
    flat_ref = tuple(leaf for _, leaf in tree_flatten_with_path(reference)[0])
    return Lifted(exported, args, kwargs, output_names(reference), flat_ref, dynamic_batch)


def _shapes_by_name(model: torch.nn.Module, shapes: tuple) -> Any:
    """``dynamic_shapes`` keyed by forward's parameter names (a ``*args`` parameter takes the
    remaining positional specs as one tuple), as torch.export expects."""
    import inspect

    positional, named = shapes
    out: dict[str, Any] = {}
    rest = list(positional)
    for name, param in inspect.signature(model.forward).parameters.items():
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            out[name], rest = tuple(rest), []
        elif param.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) and rest:
            out[name] = rest.pop(0)
        elif name in named and param.kind is not inspect.Parameter.VAR_KEYWORD:
            out[name] = named[name]
    var_keyword = [n for n, p in inspect.signature(model.forward).parameters.items()
                   if p.kind is inspect.Parameter.VAR_KEYWORD]
    extra = {k: v for k, v in named.items() if k not in out}
    if extra and var_keyword:
        out[var_keyword[0]] = extra
    return out


def _describe(args: tuple, kwargs: dict) -> str:
    def one(x):
        return f"tensor{list(x.shape)} {str(x.dtype).replace('torch.', '')}" if isinstance(x, torch.Tensor) else type(x).__name__
    parts = [one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    return ", ".join(parts) or "none"


def _label_placeholders(exported: ExportedProgram) -> None:
    specs = {s.arg.name: s for s in exported.graph_signature.input_specs if hasattr(s.arg, "name")}
    for node in exported.graph_module.graph.nodes:
        if node.op != "placeholder":
            continue
        spec = specs.get(node.name)
        node.meta[META_ROLE] = _ROLES.get(spec.kind, "constant") if spec is not None else "input"
        if spec is not None and spec.target is not None:
            node.meta[META_TARGET] = spec.target
