"""``exprune_fx.compile``: lift, analyse, rewrite, and wrap the result for the caller.

The returned :class:`CompiledModel` is called like the original model (same positional and
keyword inputs, same output structure: tensors, tuples, dicts, Hugging Face ``ModelOutput``)
and accepts other batch sizes than the example's. The original model is never modified; the
compiled one shares its (read-only) weights.

Example:
    >>> import torch, exprune_fx
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(8, 128), torch.nn.ReLU(),
    ...                           torch.nn.Linear(128, 128), torch.nn.ReLU()).eval()
    >>> fast = exprune_fx.compile(mlp, torch.randn(4, 8), exprune_fx.Config(alpha=0.0))
    >>> x = torch.randn(16, 8)
    >>> torch.allclose(fast(x), mlp(x), atol=1e-5)
    True
    >>> fast.exprune_stats()["sites"]["linear_1"]["prune_rate"]
    0.0
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from .analysis import Analysis, OutputSpec, analyze
from .config import Config
from .errors import InputError
from .fastcall import INNER, LeanCall
from .lifting import lift, normalize_inputs
from .passes.rewrite import SiteReport, rewrite_sites
from .passes.zero_skip import ZeroSkipReport, add_zero_skip
from .runtime import zero_skip
from .runtime.counters import read

FLOPS_NOTE = "FLOPs are 2 x multiply-accumulates (MACs) of the reductions, as torch.utils.flop_counter counts them"


class ExPruneWarning(UserWarning):
    """The compiled model runs (partly) dense, and why."""


def batch_rows(args: tuple, kwargs: dict) -> int:
    """The batch size of a call: the leading size of its first tensor input (1 if none)."""
    return _leading_size(tree_leaves((args, kwargs)))


def _leading_size(leaves) -> int:
    """:func:`batch_rows` of a call given as its flat inputs."""
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    return 1


class CompiledModel(torch.nn.Module):
    """A model whose eligible reductions exit early. Call it like the original.

    ``exprune_stats()`` reports per-site prune rates and work, and whole-model FLOPs;
    ``reset_stats()`` clears the counters; ``sites`` lists what the rewrite did per site;
    ``analysis`` is the exchangeability analysis it was built from (None after
    :func:`exprune_fx.load`); ``example_inputs`` the ``(args, kwargs)`` it was compiled on.
    """

    def __init__(self, graph_module: torch.nn.Module, sites: list[SiteReport], analysis: Analysis | None,
                 config: Config, other_flops_per_row: float, example_inputs: tuple[tuple, dict],
                 dynamic_batch: bool, outputs: dict[str, str], zero_skip: list[ZeroSkipReport] = ()):
        super().__init__()
        self.graph_module = graph_module
        self.sites = sites
        self.analysis = analysis
        self.config = config
        self.example_inputs = example_inputs
        self.dynamic_batch = dynamic_batch
        self.outputs = outputs
        self.zero_skip = list(zero_skip)  # the linears fed by a ReLU that Config(zero_skip=True) considered
        self._other_flops_per_row = other_flops_per_row
        self._calls = 0
        self._rows = 0
        self.__dict__["_inner"] = "eager"  # see set_inner()

    def set_inner(self, inner: str) -> None:
        """Run the rewritten graph eagerly (``"eager"``, the default) or compiled by inductor
        around the runtime ops (``"inductor"``, as ``torch.compile(model, backend="exprune")``
        does). Under inductor the first call of each input signature (shapes, dtypes) runs
        eagerly through the exported graph's guards and the next one compiles a flat function
        of the call's tensors (:mod:`.fastcall`), which later calls with that signature run.
        The call and row counts stay here either way.

        Example:
            >>> import torch, exprune_fx
            >>> mlp = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
            ...                           torch.nn.ReLU(), torch.nn.Linear(64, 4)).eval()
            >>> compiled = exprune_fx.compile(mlp, torch.randn(2, 8), exprune_fx.Config(alpha=0.0, k=16))
            >>> compiled.set_inner("inductor")
            >>> x = torch.randn(3, 8)
            >>> [torch.allclose(compiled(x), mlp(x), atol=1e-5) for _ in range(3)]  # eager, compiling, compiled
            [True, True, True]
            >>> compiled.exprune_stats()["sites"]["linear_1"]["calls"]
            3
        """
        if inner not in INNER:
            raise InputError(f"inner must be one of {INNER}, got {inner!r}")
        self.__dict__["_inner"] = inner
        self.__dict__.pop("_lean", None)

    def forward(self, *args, **kwargs):
        # The call and row counts are written through __dict__: nn.Module.__setattr__ costs about
        # 2 us a write, a few percent of a batch-1 call of a small model.
        state = self.__dict__
        state["_calls"] += 1
        lean = self._lean_call()
        leaves = None if lean is None else lean.leaves(args, kwargs)
        if leaves is not None:
            out = lean.run(leaves)
            if out is not None:
                state["_rows"] += _leading_size(leaves)
                return out
        if lean is not None:
            self._check_dtypes(args, kwargs)
        state["_rows"] += batch_rows(args, kwargs)
        try:
            # once per signature (and for calls the lean path cannot take): the guarded module,
            # eagerly; the lean path compiles for the inner compiler
            out = self._modules["graph_module"](*args, **kwargs)
            if leaves is not None:
                lean.accept(leaves)
            return out
        except AssertionError as exc:
            if "Guard failed" not in str(exc):
                raise
            shapes = "a dynamic batch axis" if self.dynamic_batch else "the example's exact shapes"
            raise InputError(
                f"these inputs do not fit the compiled graph ({str(exc).strip()}); it was exported for "
                f"{shapes} and the example's values of its non-tensor inputs (flags, ints). Compile again "
                f"with example inputs like the ones you run.") from None
        except (ValueError, TypeError):
            self._check_structure(args, kwargs)
            raise

    def _check_structure(self, args: tuple, kwargs: dict) -> None:
        """A call whose arguments are not laid out like the example's (another number of
        positional inputs, other keywords): the exported module's own error names tree specs."""
        example_args, example_kwargs = self.example_inputs
        if len(args) != len(example_args) or set(kwargs) != set(example_kwargs):
            raise InputError(
                f"the model was compiled for {len(example_args)} positional input(s) and keyword inputs "
                f"{sorted(example_kwargs)}; this call has {len(args)} positional and {sorted(kwargs)}. Call it "
                f"as you called it on the example inputs, or compile again with example inputs laid out that way.")

    def _check_dtypes(self, args: tuple, kwargs: dict) -> None:
        """Tensor inputs of another dtype than the example's: the exported graph's guards do not
        check dtypes, and the failure would come from deep inside an operator."""
        example_args, example_kwargs = self.example_inputs
        pairs = [(f"input {i}", got, example_args[i]) for i, got in enumerate(args[:len(example_args)])]
        pairs += [(f"input {name!r}", got, example_kwargs[name]) for name, got in kwargs.items() if name in example_kwargs]
        for name, got, example in pairs:
            if isinstance(got, torch.Tensor) and isinstance(example, torch.Tensor) and got.dtype != example.dtype:
                raise InputError(f"{name} has dtype {got.dtype}; the model was compiled for {example.dtype}. "
                                 f"Cast the input, or compile again with example inputs of that dtype.")

    def _lean_call(self) -> LeanCall | None:
        """The lean path (:mod:`.fastcall`) of the exported graph, eager or under the inner
        compiler (a frame dynamo traces sees the graph and its ops, not their kernels)."""
        gm = self._modules["graph_module"]
        if not isinstance(gm, torch.fx.GraphModule) or torch.compiler.is_compiling():
            return None
        state = self.__dict__
        lean = state.get("_lean")
        if lean is None or lean.gm is not gm:
            lean = state["_lean"] = LeanCall(gm, state["_inner"])
        return lean

    @property
    def rewritten_sites(self) -> list[SiteReport]:
        return [s for s in self.sites if s.rewritten]

    @property
    def zero_skipped(self) -> list[ZeroSkipReport]:
        """The linears the zero-skip pass rewrote."""
        return [r for r in self.zero_skip if r.rewritten]

    def _counters(self, report: SiteReport) -> torch.Tensor:
        return getattr(self.graph_module, report.counters)

    def retune(self, site: str, **settings) -> None:
        """Change a rewritten site's ``alpha``, ``threshold`` or per-output ``thresholds`` (a
        ReLU site's, one per output feature or channel) in place, without recompiling: its
        critical value is a buffer of the graph. ``k``, ``test`` and ``enabled`` need a recompile."""
        report = next((r for r in self.rewritten_sites if r.name == site), None)
        if report is None:
            raise InputError(f"{site!r} is not a rewritten site; rewritten: {[r.name for r in self.rewritten_sites]}")
        if report.critical is None:
            raise InputError(f"{site!r} runs in exact mode: it has no alpha or threshold to retune")
        bad = set(settings) - {"alpha", "threshold", "thresholds"}
        if bad:
            raise InputError(f"retune() changes alpha, threshold and thresholds only (got {sorted(bad)}); "
                             f"recompile for k, test or enabled")
        config = self.config.with_site(site, **settings)  # validates the values
        resolved = config.for_site(site)
        buffer = getattr(self.graph_module, report.critical)
        if resolved.thresholds is None:
            value = resolved.critical if report.decision == "relu" else resolved.dominance_critical(report.classes)
            buffer.fill_(value)
        else:
            if report.per_output is None:
                raise InputError(f"{site!r}: per-output thresholds apply to ReLU sites with a compile-time weight")
            if len(resolved.thresholds) != report.per_output:
                raise InputError(f"{site!r} has {report.per_output} outputs; got {len(resolved.thresholds)} thresholds")
            value = torch.tensor(resolved.thresholds, dtype=buffer.dtype, device=buffer.device)
            if buffer.shape == value.shape:
                buffer.copy_(value)
            else:  # a 0-d critical value becomes a vector: the graph reads the buffer by name
                self.graph_module.register_buffer(report.critical, value)
        self.config = config

    def reset_stats(self) -> None:
        """Zero every site's counters and the call count."""
        for report in self.rewritten_sites:
            self._counters(report).zero_()
        for report in self.zero_skipped:
            getattr(self.graph_module, report.counters).zero_()
        self._calls = self._rows = 0

    def exprune_stats(self) -> dict[str, Any]:
        """Counters since the last reset. Reading them synchronises with the device once."""
        sites, site_dense, site_executed = {}, 0.0, 0.0
        for report in self.rewritten_sites:
            c = read(self._counters(report))
            executed = c["partial"] + c["test"] + c["remainder"]
            sites[report.name] = {
                "kind": report.kind, "decision": report.decision, "n": report.n, "k": report.k,
                "stages": report.stages, "test": report.test, "order": report.order,
                "per_output_thresholds": _per_output(report, self.config),
                "calls": int(c["calls"]),
                "outputs": int(c["outputs"]), "pruned": int(c["pruned"]), "untested_outputs": int(c["untested"]),
                "prune_rate": c["pruned"] / c["outputs"] if c["outputs"] else 0.0,
                "dense_macs": c["dense"], "executed_macs": executed, "partial_macs": c["partial"],
                "test_macs": c["test"], "remainder_macs": c["remainder"], "computed_macs": c["computed"],
                # a perfect sign predictor at this k skips the remainder of every negative output
                # (at the first stage's k: the same share k/n of every output's terms); a perfect
                # dominance predictor (argmax) stops every row
                "oracle_saved_macs": (c["dense"] if report.decision == "argmax" else c["negative"] * c["dense"]
                                      / c["outputs"]) * (1 - report.k / report.n) if c["outputs"] else 0.0,
            }
            site_dense += c["dense"]
            site_executed += executed
        other = self._other_flops_per_row * self._rows
        dense_flops = 2 * site_dense + other
        executed_flops = 2 * site_executed + other
        oracle_saved = {d: 2 * sum(s["oracle_saved_macs"] for s in sites.values() if s["decision"] == d)
                        for d in ("relu", "argmax")}
        return {
            "sites": sites, "calls": self._calls, "rows": self._rows,
            "dense_flops": dense_flops, "executed_flops": executed_flops,
            "reduction": 1.0 - executed_flops / dense_flops if dense_flops else 0.0,
            "oracle_reduction": oracle_saved["relu"] / dense_flops if dense_flops else 0.0,
            "argmax_oracle_reduction": oracle_saved["argmax"] / dense_flops if dense_flops else 0.0,
            "zero_skip": self._zero_skip_stats(dense_flops, executed_flops),
            "note": FLOPS_NOTE,
        }

    def _zero_skip_stats(self, dense_flops: float, executed_flops: float) -> dict[str, Any]:
        """Per zero-skip linear: its dense and executed MACs (nonzero inputs x outputs) and input
        density; whole model: the FLOPs it saves and ``executed_flops`` with them subtracted
        (the top-level ``executed_flops`` and ``reduction`` count ExPrune sites only)."""
        nodes, saved = {}, 0.0
        for r in self.zero_skipped:
            c = zero_skip.read(getattr(self.graph_module, r.counters))
            nodes[r.name] = {
                "kind": r.kind, "in_features": r.in_features, "out_features": r.out_features,
                "calls": int(c["calls"]), "rows": int(c["rows"]), "sparse_calls": int(c["sparse_calls"]),
                "dense_macs": c["dense"], "executed_macs": c["executed"], "computed_macs": c["computed"],
                "density": c["nonzero"] / (c["rows"] * r.in_features) if c["rows"] else 0.0,
            }
            saved += 2 * (c["dense"] - c["executed"])
        executed = executed_flops - saved
        return {"nodes": nodes, "saved_flops": saved, "executed_flops": executed,
                "reduction": 1.0 - executed / dense_flops if dense_flops else 0.0}

    def report(self) -> str:
        """A table of every site: rewritten or why not, and its prune rate so far."""
        stats = self.exprune_stats()
        width = max([24] + [len(s.name) for s in self.sites])
        lines = [f"{'site':<{width}} {'kind':<9} {'decision':<8} {'n':>5} {'k':>4} {'prune rate':>10}  status"]
        for s in self.sites:
            counted = stats["sites"].get(s.name, {})
            rate = f"{counted['prune_rate']:.1%}" if counted.get("calls") else "-"
            lines.append(f"{s.name:<{width}} {s.kind:<9} {s.decision or '-':<8} {s.n or '-':>5} "
                         f"{s.k if s.rewritten else '-':>4} {rate:>10}  "
                         f"{_status(s, self.config)}")
        if not stats["calls"]:
            lines.append("whole model: no calls counted yet (run the compiled model, then report)")
        else:
            lines.append(f"whole model over {stats['calls']} call(s), {stats['rows']} row(s): "
                         f"{stats['dense_flops']:.4g} dense FLOPs, {stats['executed_flops']:.4g} executed, "
                         f"reduction {stats['reduction']:.2%} ({FLOPS_NOTE})")
        zs = stats["zero_skip"]
        if zs["nodes"] and stats["calls"]:
            density = ", ".join(f"{name} {v['density']:.1%}" for name, v in zs["nodes"].items())
            lines.append(f"zero-skip: input density {density}; with it {zs['executed_flops']:.4g} executed FLOPs, "
                         f"reduction {zs['reduction']:.2%}")
        lines += [f"zero-skip: {r.name} stays dense: {r.reason}" for r in self.zero_skip if not r.rewritten]
        return "\n".join(lines)


def _status(site: SiteReport, config) -> str:
    if not site.rewritten:
        return f"dense: {site.reason}"
    return "rewritten" + (", magnitude order" if site.order == "magnitude" else "") + \
        (", per-output thresholds" if _per_output(site, config) else "")


def _per_output(site: SiteReport, config) -> bool:
    """Whether a rewritten site tests against one threshold per output."""
    return site.per_output is not None and config.for_site(site.name).thresholds is not None


SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
SUPPORTED_DEVICES = ("cpu", "cuda")


def _check_environment(model: torch.nn.Module, example_inputs: Any) -> None:
    """Refuse weights and inputs of dtypes and devices the runtime ops are not written for."""
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    tensors = list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]
    tensors += [t for t in tree_leaves(normalize_inputs(example_inputs)) if isinstance(t, torch.Tensor)]
    for t in tensors:
        if t.device.type not in SUPPORTED_DEVICES:
            raise InputError(f"tensors on {t.device.type!r} are not supported: exprune-fx runs on "
                             f"{' and '.join(SUPPORTED_DEVICES)}; move the model and inputs there first.")
    for p in model.parameters():
        if p.dtype not in SUPPORTED_DTYPES:
            raise InputError(f"parameters of dtype {p.dtype} are not supported (supported: "
                             f"{', '.join(str(d).replace('torch.', '') for d in SUPPORTED_DTYPES)}); "
                             f"for a quantized model, compile the float model.")


def _reason_summary(reports: list[SiteReport]) -> str:
    """'linear_1: no decision; linear, linear_2: no free factor ...' grouped by reason."""
    if not reports:
        return "the model has no reduction"
    groups: dict[str, list[str]] = {}
    for r in reports:
        key = str(r.reason).split(":")[0].split(" (")[0]
        groups.setdefault(key, []).append(r.name)
    return "; ".join(f"{', '.join(names[:3])}{f' and {len(names) - 3} more' if len(names) > 3 else ''}: {key}"
                     for key, names in groups.items())


def weights_fingerprint(model: torch.nn.Module) -> dict[str, list]:
    """Name -> [shape, dtype, sum of |values|] of every floating parameter and buffer."""
    out = {}
    for name, t in model.state_dict().items():
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            out[name] = [list(t.shape), str(t.dtype), float(t.detach().double().abs().sum())]
    return out


def _nonzero_macs(operand: torch.Tensor, sparse_weights: frozenset) -> int | None:
    """Nonzero entries of ``operand`` when it is (a view of) a weight with zeros, else None."""
    if operand.layout != torch.strided or operand.untyped_storage().data_ptr() not in sparse_weights:
        return None
    return int(torch.count_nonzero(operand))


def _flop_mapping(sparse_weights: frozenset) -> dict:
    """FlopCounterMode formulas that count multiply-accumulates with nonzero weights only
    (statically pruned models), and a sparse operand's stored entries only (the stock
    formula counts a sparse adjacency as dense)."""

    def mm(a: torch.Tensor, b: torch.Tensor, *, out_val=None, **_) -> int:
        if a.layout != torch.strided:
            return 2 * a._nnz() * b.shape[-1]
        if b.layout != torch.strided:
            return 2 * b._nnz() * a.shape[0]
        nb, na = _nonzero_macs(b, sparse_weights), _nonzero_macs(a, sparse_weights)
        if nb is not None:
            return 2 * a.shape[0] * nb
        if na is not None:
            return 2 * na * b.shape[1]
        return 2 * a.shape[0] * a.shape[1] * b.shape[1]

    def addmm(bias, a, b, *, out_val=None, **_) -> int:
        return mm(a, b)

    def convolution(x, w, bias, stride, padding, dilation, transposed, *args, out_val=None, **_) -> int:
        nonzero = None if transposed else _nonzero_macs(w, sparse_weights)
        if nonzero is None:
            return conv_flop_count(list(x.shape), list(w.shape), list(out_val.shape), transposed)
        return 2 * nonzero * out_val.shape[0] * math.prod(out_val.shape[2:])

    for formula in (mm, addmm, convolution):
        formula._get_raw = True  # FlopCounterMode passes tensors, not shapes
    return {torch.ops.aten.mm: mm, torch.ops.aten.addmm: addmm, torch.ops.aten.convolution: convolution}


def dense_flops(model: torch.nn.Module, args: tuple, kwargs: dict) -> float:
    """FLOPs of one eager call, counted by torch.utils.flop_counter, with two corrections:
    a weight with zeros (static pruning) counts only its nonzero multiply-accumulates, and a
    sparse @ dense product counts the sparse operand's stored entries."""
    sparse_weights = frozenset(p.untyped_storage().data_ptr() for p in model.parameters()
                               if p.dim() >= 2 and bool((p == 0).any()))
    counter = FlopCounterMode(display=False, custom_mapping=_flop_mapping(sparse_weights))
    with torch.no_grad(), counter:
        model(*args, **kwargs)
    return float(counter.get_total_flops())


def compile(model: torch.nn.Module, example_inputs: Any, config: Config | None = None,
            outputs: OutputSpec = None) -> CompiledModel:
    """Compile ``model`` with ExPrune. See the module docstring and docs/usage.md."""
    return compile_graph(model, example_inputs, config, outputs, check_guards=True)


def compile_graph(model: torch.nn.Module, example_inputs: Any, config: Config | None, outputs: OutputSpec,
                  check_guards: bool) -> CompiledModel:
    """:func:`compile`; ``check_guards=False`` leaves input checks to the caller (the
    torch.compile backend, whose dynamo guards already check every call)."""
    config = Config() if config is None else config
    if not isinstance(config, Config):
        raise InputError(f"config must be an exprune_fx.Config, got {type(config).__name__}")
    return Prepared(model, example_inputs, outputs).compile(config, check_guards, stacklevel=4)


class Prepared:
    """A model lifted and analysed once, to be compiled with many configs (calibration
    compiles dozens): each :meth:`compile` rewrites a fresh copy of the exported graph."""

    def __init__(self, model: torch.nn.Module, example_inputs: Any, outputs: OutputSpec):
        _check_environment(model, example_inputs)
        self.model = model
        self.lifted = lift(model, example_inputs, dynamic_batch=True)
        self.analysis = analyze(self.lifted, outputs=outputs)
        self.args, self.kwargs = normalize_inputs(example_inputs)
        self.total_flops = dense_flops(model, self.args, self.kwargs)
        self.fingerprint = weights_fingerprint(model)

    def compile(self, config: Config, check_guards: bool = True, stacklevel: int = 2) -> CompiledModel:
        analysis = self.analysis
        unknown = config.unknown_sites(s.name for s in analysis.sites)
        if unknown:
            raise InputError(f"Config.sites names unknown sites {unknown}; the sites are "
                             f"{[s.name for s in analysis.sites]}")
        graph_module = self.lifted.exported.module(check_guards=check_guards)
        reports = rewrite_sites(graph_module, analysis, config)
        # zero-skip propagation: linears fed by a ReLU (after a site or not) skip zero inputs
        skips = add_zero_skip(graph_module) if config.zero_skip else []
        args, kwargs = self.args, self.kwargs
        compiled = CompiledModel(graph_module, reports, analysis, config, 0.0, (args, kwargs),
                                 self.lifted.dynamic_batch, analysis.outputs, skips)
        with torch.no_grad():
            compiled(*args, **kwargs)  # runs the rewritten graph once, and measures its sites' work
        site_dense = sum(2 * read(compiled._counters(r))["dense"] for r in compiled.rewritten_sites)
        compiled._other_flops_per_row = max(self.total_flops - site_dense, 0.0) / batch_rows(args, kwargs)
        compiled.source_fingerprint = self.fingerprint
        object.__setattr__(compiled, "source_model", self.model)  # for calibrate(); not a submodule
        compiled.reset_stats()
        if not compiled.rewritten_sites and not compiled.zero_skipped:
            warnings.warn(f"exprune: no site was rewritten, the compiled model runs dense "
                          f"({_reason_summary(reports)}); compiled.report() gives every site's reason",
                          ExPruneWarning, stacklevel=stacklevel)
        return compiled
