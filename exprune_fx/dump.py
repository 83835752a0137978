"""Render a lifted, analysed or rewritten graph as text, JSON or graphviz DOT (what ``exprune-fx dump`` prints).

The lifted and analysed renderers take the graph module and, for an analysed graph, the
analysis' symmetry classes. With ``classes=None`` (the *lifted* stage) nodes show their
shapes; with classes (the *analysed* stage) every axis shows its factors, ``f{id}:{size}``
for a free class and ``p{id}:{size}`` for a pinned one (``1`` for a size-1 axis, factors of
one axis joined by ``x``), and reduction sites show whether ExPrune can rewrite them.

The *rewritten* stage renders a :class:`~exprune_fx.compiler.CompiledModel`: its unlifted
graph module, where every early-exit op (a ``torch.ops.exprune.*`` call) is marked with its
site and settings (``EARLY-EXIT site=linear_1 k=32 test=stats decision=relu``) and every
site left dense with its reason (``DENSE site=linear: <reason>``); see
:func:`render_compiled`. The renderers only read the graph; they store nothing on it.

Example:
    >>> import torch
    >>> from exprune_fx import analyze, lift
    >>> from exprune_fx.dump import render_json, render_text
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(),
    ...                           torch.nn.Linear(16, 16), torch.nn.ReLU()).eval()
    >>> x = torch.randn(2, 4)
    >>> print(render_text(lift(mlp, x).graph_module).splitlines()[-2])
    %relu_1 = aten.relu.default(%linear_1)  f32[2, 16]
    >>> a = analyze(mlp, x)
    >>> lines = render_text(a.graph_module, a.classes).splitlines()
    >>> print(lines[5])  # doctest: +ELLIPSIS
    %linear = aten.linear.default(%input, ...)  [p3:2, f0:16]  SITE linear n=- ... ineligible: ...
    >>> print(lines[7])  # the 16 hidden units (class f0) are free: an ExPrune site
    %linear_1 = aten.linear.default(%relu, %p_2_weight, %p_2_bias)  [p3:2, p2:16]  SITE linear n=16 decision=relu eligible
    >>> [(s["name"], s["eligible"]) for s in render_json(a.graph_module, a.classes)["sites"]]
    [('linear', False), ('linear_1', True)]
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch
from torch.fx import GraphModule, Node

from .passes.exchangeability import META_AXES, META_ROLE, META_TARGET, SymmetryClass
from .passes.rewrite import SiteReport
from .passes.sites import META_SITE, Site

if TYPE_CHECKING:
    from .compiler import CompiledModel

FORMATS = ("text", "json", "dot")
IMAGE_SUFFIXES = (".svg", ".png")
EARLY_EXIT_PREFIX = "exprune."
_ELIGIBLE_COLOR = "palegreen"
_INELIGIBLE_COLOR = "orange"
_EARLY_EXIT_COLOR = "lightblue"

AxisLabels = tuple[tuple[int, ...], ...]


# -- small pieces ------------------------------------------------------------------------------

def _class_map(classes: Iterable[SymmetryClass] | None) -> dict[int, SymmetryClass] | None:
    return None if classes is None else {c.id: c for c in classes}


def _target_name(node: Node) -> str:
    """``aten.linear.default`` for ATen ops, the function's name for other callables."""
    target = node.target
    if isinstance(target, str):
        return target
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(target)
    return getattr(target, "__name__", str(target))


def format_arg(arg: Any) -> str:
    """One argument as text: ``%name`` for nodes, brackets for sequences, repr otherwise."""
    if isinstance(arg, Node):
        return f"%{arg.name}"
    if isinstance(arg, list):
        return "[" + ", ".join(format_arg(a) for a in arg) + "]"
    if isinstance(arg, tuple):
        inner = ", ".join(format_arg(a) for a in arg)
        return f"({inner},)" if len(arg) == 1 else f"({inner})"
    if isinstance(arg, dict):
        return "{" + ", ".join(f"{k!r}: {format_arg(v)}" for k, v in arg.items()) + "}"
    if isinstance(arg, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return str(arg)
    return repr(arg)


def _call_text(node: Node) -> str:
    """The right-hand side of a node's line: ``aten.relu.default(%x)``, ``placeholder[...]``."""
    if node.op == "placeholder":
        role = node.meta.get(META_ROLE, "input")
        name = node.meta.get(META_TARGET)
        return f"placeholder[{role} {name}]" if name else f"placeholder[{role}]"
    if node.op == "get_attr":
        return f"get_attr[{node.target}]"
    if node.op == "output":
        single = len(node.args) == 1 and isinstance(node.args[0], (tuple, list))
        values = node.args[0] if single else node.args
        return "output(" + ", ".join(format_arg(v) for v in values) + ")"
    parts = [format_arg(a) for a in node.args]
    parts += [f"{k}={format_arg(v)}" for k, v in node.kwargs.items()]
    return f"{_target_name(node)}({', '.join(parts)})"


def _dim(size: Any) -> int | str:
    try:
        return int(size)
    except (TypeError, ValueError):  # an unbacked symbolic size
        return str(size)


def _shape_of(val: Any) -> Any:
    """Shape list of a tensor value, a list of those for several results, else None."""
    if isinstance(val, torch.Tensor):
        return [_dim(s) for s in val.shape]
    if isinstance(val, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in val):
        return [_shape_of(v) for v in val]
    return None


def dtype_short(dtype: torch.dtype) -> str:
    """``f32`` for torch.float32, ``i64`` for torch.int64, the dtype's name for the rarer ones."""
    short = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
             torch.int64: "i64", torch.int32: "i32", torch.bool: "bool", torch.uint8: "u8"}
    return short.get(dtype, str(dtype).replace("torch.", ""))


def _shape_text(val: Any) -> str:
    """``f32[2, 16]`` for a tensor, a parenthesised list for several results, '' otherwise."""
    if isinstance(val, torch.Tensor):
        return f"{dtype_short(val.dtype)}[{', '.join(str(_dim(s)) for s in val.shape)}]"
    if isinstance(val, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in val):
        return "(" + ", ".join(_shape_text(v) or "-" for v in val) + ")"
    return ""


def factor_label(class_id: int, by_id: dict[int, SymmetryClass]) -> str:
    """``f3:16`` for free class 3 of size 16, ``p0:2`` for pinned class 0."""
    cls = by_id.get(class_id)
    if cls is None:
        return f"?{class_id}"
    return f"{'f' if cls.free else 'p'}{class_id}:{cls.size}"


def axes_label(axes: AxisLabels, by_id: dict[int, SymmetryClass]) -> str:
    """``[p0:2, f3:16]``: one entry per axis, factors joined by ``x``, ``1`` for size 1."""
    return "[" + ", ".join("x".join(factor_label(c, by_id) for c in axis) or "1" for axis in axes) + "]"


def _is_single(axes: Any) -> bool:
    """True for the labels of one tensor (a tuple of tuples of ints)."""
    return isinstance(axes, tuple) and all(
        isinstance(axis, tuple) and all(isinstance(c, int) for c in axis) for axis in axes)


def _node_axes_text(node: Node, by_id: dict[int, SymmetryClass]) -> str:
    axes = node.meta.get(META_AXES)
    if axes is None:
        return ""
    if _is_single(axes):
        return axes_label(axes, by_id)
    return "(" + ", ".join(axes_label(a, by_id) if a is not None else "-" for a in axes) + ")"


def site_text(site: Site) -> str:
    """``SITE linear n=16 decision=relu eligible`` (or ``ineligible: <reason>``)."""
    n = site.n if site.n is not None else "-"
    verdict = "eligible" if site.eligible else f"ineligible: {site.reason}"
    return f"SITE {site.kind} n={n} decision={site.decision or '-'} {verdict}"


def _sites(gm: GraphModule) -> list[Site]:
    return [node.meta[META_SITE] for node in gm.graph.nodes if isinstance(node.meta.get(META_SITE), Site)]


def _parameter_names(cls: SymmetryClass) -> list[str]:
    return sorted({m.name for m in cls.parameters})


# -- text --------------------------------------------------------------------------------------

def node_line(node: Node, by_id: dict[int, SymmetryClass] | None = None) -> str:
    """One node as ``%name = target(args)  labels-or-shape  [SITE ...]``."""
    line = f"%{node.name} = {_call_text(node)}"
    labels = _node_axes_text(node, by_id) if by_id is not None else ""
    extra = labels or _shape_text(node.meta.get("val"))
    if extra:
        line += f"  {extra}"
    site = node.meta.get(META_SITE) if by_id is not None else None
    if isinstance(site, Site):
        line += f"  {site_text(site)}"
    return line


def _class_lines(classes: Sequence[SymmetryClass]) -> list[str]:
    free = sum(c.free for c in classes)
    lines = [f"classes ({len(classes)}, {free} free):"]
    for c in classes:
        tag = f"{'f' if c.free else 'p'}{c.id}"
        state = "free" if c.free else f"pinned by {c.pins[0]}" if c.pins else "pinned"
        count = len(_parameter_names(c))
        noun = "parameter" if count == 1 else "parameters"
        lines.append(f"  {tag:<5} size {c.size:<6} {count:>3} {noun:<10}  {state}")
    return lines


def _site_lines(sites: Sequence[Site]) -> list[str]:
    eligible = sum(s.eligible for s in sites)
    width = max([len("site"), *(len(s.name) for s in sites)])
    lines = [f"sites ({len(sites)}, {eligible} eligible):",
             f"  {'site':<{width}} {'kind':<10} {'n':>6} {'decision':<9} {'eligible':<8} reason"]
    for s in sites:
        n = s.n if s.n is not None else "-"
        lines.append(f"  {s.name:<{width}} {s.kind:<10} {n:>6} {s.decision or '-':<9} "
                     f"{'yes' if s.eligible else 'no':<8} {s.reason or ''}".rstrip())
    return lines


def render_text(gm: GraphModule, classes: Sequence[SymmetryClass] | None = None) -> str:
    """One line per node; for the analysed stage, a footer listing the classes and sites."""
    by_id = _class_map(classes)
    lines = [node_line(node, by_id) for node in gm.graph.nodes]
    if classes is not None:
        lines += ["", *_class_lines(classes), "", *_site_lines(_sites(gm))]
    return "\n".join(lines) + "\n"


# -- json --------------------------------------------------------------------------------------

def _axes_json(axes: Any, by_id: dict[int, SymmetryClass]) -> Any:
    if axes is None:
        return None
    if not _is_single(axes):
        return [_axes_json(a, by_id) for a in axes]
    return [[{"class": c, "size": by_id[c].size if c in by_id else None,
              "free": by_id[c].free if c in by_id else None} for c in axis] for axis in axes]


def site_json(site: Site) -> dict[str, Any]:
    """A :class:`Site` as a JSON object."""
    return {
        "name": site.name, "kind": site.kind, "n": site.n, "decision": site.decision,
        "eligible": site.eligible, "reason": site.reason,
        "contraction": [{"class": c, "size": size, "free": free} for c, size, free in site.contraction],
        "chain": list(site.chain),
    }


def class_json(cls: SymmetryClass) -> dict[str, Any]:
    """A :class:`SymmetryClass` as a JSON object (its parameter and buffer names)."""
    return {"id": cls.id, "size": cls.size, "free": cls.free,
            "pins": [{"op": p.op, "reason": p.reason} for p in cls.pins],
            "parameters": _parameter_names(cls)}


def _node_json(node: Node, by_id: dict[int, SymmetryClass] | None) -> dict[str, Any]:
    site = node.meta.get(META_SITE) if by_id is not None else None
    return {
        "name": node.name,
        "op": node.op,
        "target": _target_name(node),
        "args": [format_arg(a) for a in node.args],
        "kwargs": {k: format_arg(v) for k, v in node.kwargs.items()},
        "shape": _shape_of(node.meta.get("val")),
        "role": node.meta.get(META_ROLE) if node.op == "placeholder" else None,
        "state_name": node.meta.get(META_TARGET) if node.op == "placeholder" else None,
        "axes": _axes_json(node.meta.get(META_AXES), by_id) if by_id is not None else None,
        "site": site_json(site) if isinstance(site, Site) else None,
    }


def render_json(gm: GraphModule, classes: Sequence[SymmetryClass] | None = None) -> dict[str, Any]:
    """The graph as a JSON-serialisable dict: ``stage``, ``nodes``, ``classes``, ``sites``.

    For a node returning several tensors, ``shape`` and ``axes`` hold one entry per result.
    """
    by_id = _class_map(classes)
    return {
        "stage": "lifted" if classes is None else "analyzed",
        "nodes": [_node_json(node, by_id) for node in gm.graph.nodes],
        "classes": [class_json(c) for c in classes or ()],
        "sites": [site_json(s) for s in _sites(gm)] if classes is not None else [],
    }


# -- dot ---------------------------------------------------------------------------------------

def _dot_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _dot_head(node: Node) -> str:
    """A node's name and what it is: its op target, or its fx op."""
    if node.op == "call_function":
        return f"{node.name}\n{_target_name(node)}"
    return node.name if node.name == node.op else f"{node.name}\n{node.op}"


def _dot_label(node: Node, by_id: dict[int, SymmetryClass] | None) -> str:
    if node.op == "placeholder":
        head = f"{node.name}\n{node.meta.get(META_ROLE, 'input')}"
    else:
        head = _dot_head(node)
    detail = (_node_axes_text(node, by_id) if by_id is not None else "") or _shape_text(node.meta.get("val"))
    site = node.meta.get(META_SITE) if by_id is not None else None
    if isinstance(site, Site):
        detail += f"\nsite n={site.n if site.n is not None else '-'} " + (
            "eligible" if site.eligible else "ineligible")
    return f"{head}\n{detail}" if detail else head


def _dot_style(node: Node, by_id: dict[int, SymmetryClass] | None) -> str:
    site = node.meta.get(META_SITE) if by_id is not None else None
    if isinstance(site, Site):
        color = _ELIGIBLE_COLOR if site.eligible else _INELIGIBLE_COLOR
        return f', style="filled", fillcolor="{color}"'
    if node.op == "placeholder":
        return ', style="filled", fillcolor="gray92"'
    return ""


def render_dot(gm: GraphModule, classes: Sequence[SymmetryClass] | None = None) -> str:
    """A graphviz digraph: one box per node (op and axis labels), one edge per data use.

    Eligible sites are filled green, ineligible sites orange.
    """
    by_id = _class_map(classes)
    return _digraph(gm, lambda node: _dot_label(node, by_id), lambda node: _dot_style(node, by_id))


def _digraph(gm: GraphModule, label: Any, style: Any) -> str:
    """The DOT source: one box per node with ``label(node)`` and ``style(node)``, one edge per use."""
    lines = ["digraph exprune {", "  rankdir=TB;",
             '  node [shape=box, fontname="monospace", fontsize=10];']
    for node in gm.graph.nodes:
        lines.append(f'  "{_dot_escape(node.name)}" [label="{_dot_escape(label(node))}"'
                     f"{style(node)}];")
    for node in gm.graph.nodes:
        for source in node.all_input_nodes:
            lines.append(f'  "{_dot_escape(source.name)}" -> "{_dot_escape(node.name)}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


# -- the rewritten stage -----------------------------------------------------------------------

def is_early_exit(node: Node) -> bool:
    """True for an early-exit op the rewrite inserted (a ``torch.ops.exprune.*`` call)."""
    return node.op == "call_function" and _target_name(node).startswith(EARLY_EXIT_PREFIX)


def early_exit_sites(gm: GraphModule, reports: Iterable[SiteReport]) -> dict[Node, SiteReport]:
    """Each early-exit node of a rewritten graph, mapped to the report of its site.

    One of an early-exit op's arguments is the ``get_attr`` of its site's counters buffer,
    which :attr:`SiteReport.counters` names.
    """
    by_counters = {r.counters: r for r in reports if r.rewritten and r.counters}
    found = {}
    for node in gm.graph.nodes:
        if is_early_exit(node):
            for arg in node.args:
                if isinstance(arg, Node) and arg.op == "get_attr" and arg.target in by_counters:
                    found[node] = by_counters[arg.target]
    return found


def _dense_sites(gm: GraphModule, reports: Iterable[SiteReport]) -> dict[Node, SiteReport]:
    """The reduction node of each site the rewrite left dense (sites keep their node names)."""
    nodes = {n.name: n for n in gm.graph.nodes if n.op == "call_function"}
    return {nodes[r.name]: r for r in reports if not r.rewritten and r.name in nodes}


def early_exit_text(report: SiteReport | None) -> str:
    """``EARLY-EXIT site=linear_1 k=32 test=stats decision=relu``."""
    if report is None:
        return "EARLY-EXIT site=?"
    order = " order=magnitude" if report.order == "magnitude" else ""
    return (f"EARLY-EXIT site={report.name} k={report.k} test={report.test}{order} "
            f"decision={report.decision or '-'}")


def dense_text(report: SiteReport) -> str:
    """``DENSE site=linear: <why the rewrite left it dense>``."""
    return f"DENSE site={report.name}: {report.reason or 'not rewritten'}"


def site_report_json(report: SiteReport) -> dict[str, Any]:
    """A :class:`SiteReport` as a JSON object (all its fields)."""
    return dataclasses.asdict(report)


def _json_float(value: Any) -> Any:
    """Non-finite floats as strings ('inf'), which strict JSON parsers accept."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_float(v) for k, v in value.items()}
    return value


class _Rewritten:
    """What the rewritten-stage renderers need to know about each node of a compiled model."""

    def __init__(self, compiled: "CompiledModel"):
        self.compiled = compiled
        self.gm: GraphModule = compiled.graph_module
        self.early = early_exit_sites(self.gm, compiled.sites)
        self.dense = _dense_sites(self.gm, compiled.sites)

    def value(self, node: Node) -> Any:
        """``meta['val']``, or the tensor itself for a ``get_attr`` the rewrite added."""
        val = node.meta.get("val")
        if val is None and node.op == "get_attr":
            obj: Any = self.gm
            for part in str(node.target).split("."):
                obj = getattr(obj, part, None)
            val = obj if isinstance(obj, torch.Tensor) else None
        return val

    def mark(self, node: Node) -> str:
        if node in self.early:
            return early_exit_text(self.early[node])
        if is_early_exit(node):
            return early_exit_text(None)
        if node in self.dense:
            return dense_text(self.dense[node])
        return ""

    def line(self, node: Node) -> str:
        line = f"%{node.name} = {_call_text(node)}"
        for extra in (_shape_text(self.value(node)), self.mark(node)):
            if extra:
                line += f"  {extra}"
        return line


def render_rewritten_text(compiled: "CompiledModel") -> str:
    """One line per node of the rewritten graph; the footer is ``compiled.report()``."""
    view = _Rewritten(compiled)
    rewritten = len(compiled.rewritten_sites)
    lines = [view.line(node) for node in view.gm.graph.nodes]
    lines += ["", f"sites ({len(compiled.sites)}, {rewritten} rewritten to early exit; "
                  f"`exprune-fx stats` measures prune rates and FLOPs):",
              *compiled.report().splitlines()]
    return "\n".join(lines) + "\n"


def render_rewritten_json(compiled: "CompiledModel") -> dict[str, Any]:
    """The rewritten graph as a JSON-serialisable dict: ``stage``, ``nodes``, ``sites``, ``config``.

    Early-exit nodes (``"early_exit": true``) and the reductions of sites left dense carry
    their site's report as ``site``; ``sites`` lists the reports of all sites.
    """
    view = _Rewritten(compiled)
    nodes = []
    for node in view.gm.graph.nodes:
        data = _node_json(node, None)
        data["shape"] = _shape_of(view.value(node))
        data["early_exit"] = is_early_exit(node)
        report = view.early.get(node) or view.dense.get(node)
        data["site"] = site_report_json(report) if report is not None else None
        nodes.append(data)
    config = getattr(compiled, "config", None)
    return {
        "stage": "rewritten",
        "nodes": nodes,
        "classes": [],
        "sites": [site_report_json(r) for r in compiled.sites],
        "config": _json_float(dataclasses.asdict(config)) if dataclasses.is_dataclass(config) else None,
    }


def render_rewritten_dot(compiled: "CompiledModel") -> str:
    """A graphviz digraph of the rewritten graph: early-exit ops filled light blue, the
    reductions of sites left dense orange."""
    view = _Rewritten(compiled)

    def label(node: Node) -> str:
        head = _dot_head(node)
        detail = _shape_text(view.value(node))
        report = view.early.get(node)
        if is_early_exit(node):
            detail += (f"\nearly exit: {report.name} k={report.k} {report.test}" if report is not None
                       else "\nearly exit")
        elif node in view.dense:
            detail += f"\ndense site {view.dense[node].name}"
        return f"{head}\n{detail.lstrip()}" if detail.strip() else head

    def style(node: Node) -> str:
        if is_early_exit(node):
            return f', style="filled", fillcolor="{_EARLY_EXIT_COLOR}"'
        if node in view.dense:
            return f', style="filled", fillcolor="{_INELIGIBLE_COLOR}"'
        if node.op == "placeholder":
            return ', style="filled", fillcolor="gray92"'
        return ""

    return _digraph(view.gm, label, style)


def render_compiled(compiled: "CompiledModel", fmt: str) -> str:
    """Render the rewritten graph of ``compiled`` in ``fmt`` (one of :data:`FORMATS`)."""
    if fmt == "text":
        return render_rewritten_text(compiled)
    if fmt == "json":
        return json.dumps(render_rewritten_json(compiled), indent=1) + "\n"
    if fmt == "dot":
        return render_rewritten_dot(compiled)
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")


# -- output ------------------------------------------------------------------------------------

def render(gm: GraphModule, classes: Sequence[SymmetryClass] | None, fmt: str) -> str:
    """Render in ``fmt`` (one of :data:`FORMATS`) as text ready to write."""
    if fmt == "text":
        return render_text(gm, classes)
    if fmt == "json":
        return json.dumps(render_json(gm, classes), indent=1) + "\n"
    if fmt == "dot":
        return render_dot(gm, classes)
    raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")


def graphviz_available() -> bool:
    """True when graphviz's ``dot`` program is on PATH."""
    return shutil.which("dot") is not None


def write_dump(content: str, fmt: str, path: str | Path) -> Path:
    """Write rendered ``content`` to ``path`` and return the path actually written.

    A DOT graph written to a ``.svg`` or ``.png`` path is rendered with graphviz's ``dot``.
    Without graphviz (or if ``dot`` fails) the graph is written next to it with the suffix
    ``.dot`` instead, and a one-line note says so on stderr.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if fmt == "dot" and suffix in IMAGE_SUFFIXES:
        dot = shutil.which("dot")
        if dot is not None:
            result = subprocess.run([dot, f"-T{suffix[1:]}", "-o", str(path)], input=content,
                                    text=True, capture_output=True)
            if result.returncode == 0:
                return path
            why = (result.stderr.strip().splitlines() or [f"exit status {result.returncode}"])[0]
            problem = f"graphviz 'dot' failed ({why})"
        else:
            problem = "graphviz is not installed ('dot' is not on PATH)"
        fallback = path.with_suffix(".dot")
        fallback.write_text(content)
        print(f"exprune-fx: note: {problem}; wrote the DOT source to {fallback} instead of {path}",
              file=sys.stderr)
        return fallback
    path.write_text(content)
    return path
