"""Save and load compiled models.

``save(compiled, path)`` re-exports the rewritten graph with torch.export (the runtime ops
have fake implementations, so this works) and writes it with ``torch.export.save``, plus an
``exprune.json`` record: the format version, every site's report and settings, the config,
the FLOPs bookkeeping, and a fingerprint of the weights it was compiled from.

``load(path, model=None)`` reads it back. The file alone suffices; given the original
``model``, it also checks that the file was compiled from that model (same parameter names,
shapes and values), so a stale file is refused rather than silently used.

Example:
    >>> import torch, tempfile, os, exprune_fx
    >>> mlp = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(),
    ...                           torch.nn.Linear(64, 64), torch.nn.ReLU()).eval()
    >>> fast = exprune_fx.compile(mlp, torch.randn(2, 8), exprune_fx.Config(k=16))
    >>> path = os.path.join(tempfile.mkdtemp(), "mlp.pt2")
    >>> exprune_fx.save(fast, path)
    >>> again = exprune_fx.load(path, model=mlp)
    >>> x = torch.randn(5, 8)
    >>> torch.equal(again(x), fast(x))
    True
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import torch

from .compiler import CompiledModel, weights_fingerprint
from .config import Config, SiteConfig
from .errors import InputError
from .lifting import _batch_dynamic, _shapes_by_name
from .passes.rewrite import SiteReport
from .passes.zero_skip import ZeroSkipReport
from .runtime.counters import FIELDS, new_counters

FORMAT = "exprune-fx"
VERSION = 3  # 2: exprune::relu_linear takes the whole weight; 3: the site counters gain ``untested``
READS = (2, VERSION)  # a version-2 file loads with fresh counters (load() resets them anyway)
_META = "exprune.json"


def _config_to_json(config: Config) -> dict:
    return {"k": config.k, "test": config.test, "alpha": config.alpha, "threshold": _num(config.threshold),
            "stages": config.stages, "mode": config.mode, "zero_skip": config.zero_skip, "interval": config.interval,
            "order": config.order, "sites": {name: _site_to_json(sc) for name, sc in config.sites.items()}}


def _site_to_json(sc: SiteConfig) -> dict:
    data = dataclasses.asdict(sc)
    if sc.threshold is not None:
        data["threshold"] = _num(sc.threshold)
    if sc.thresholds is not None:
        data["thresholds"] = [_num(t) for t in sc.thresholds]
    return data


def _site_from_json(data: dict) -> SiteConfig:
    data = dict(data)
    if data.get("threshold") is not None:
        data["threshold"] = float(data["threshold"])
    if data.get("thresholds") is not None:
        data["thresholds"] = tuple(float(t) for t in data["thresholds"])
    return SiteConfig(**data)


def _num(x: float) -> Any:
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


def _config_from_json(data: dict) -> Config:
    sites = {name: _site_from_json(sc) for name, sc in data["sites"].items()}
    return Config(k=data["k"], test=data["test"], alpha=data["alpha"], threshold=float(data["threshold"]),
                  sites=sites, stages=data.get("stages", 1), mode=data.get("mode", "statistical"),
                  zero_skip=data.get("zero_skip", False), interval=data.get("interval", 32),
                  order=data.get("order", "natural"))


def save(compiled: CompiledModel, path: str | os.PathLike) -> None:
    """Write ``compiled`` to ``path`` (a torch.export archive, conventionally ``.pt2``)."""
    if not isinstance(compiled, CompiledModel):
        raise InputError(f"save() takes what exprune_fx.compile returned, got {type(compiled).__name__}")
    args, kwargs = compiled.example_inputs
    shapes = None
    if compiled.dynamic_batch:
        args, kwargs, shapes = _batch_dynamic(args, kwargs)
        shapes = _shapes_by_name(compiled.graph_module, shapes)
    exported = torch.export.export(compiled.graph_module, args, kwargs, dynamic_shapes=shapes, strict=False)
    source = compiled.source_fingerprint
    meta = {
        "format": FORMAT, "version": VERSION, "torch": torch.__version__,
        "sites": [dataclasses.asdict(s) for s in compiled.sites],
        "zero_skip": [dataclasses.asdict(r) for r in compiled.zero_skip],
        "config": _config_to_json(compiled.config),
        "other_flops_per_row": compiled._other_flops_per_row,
        "dynamic_batch": compiled.dynamic_batch, "outputs": compiled.outputs,
        "model_fingerprint": source,
    }
    torch.export.save(exported, path, extra_files={_META: json.dumps(meta)})


def load(path: str | os.PathLike, model: torch.nn.Module | None = None) -> CompiledModel:
    """Read a compiled model written by :func:`save`; see the module docstring."""
    if not os.path.exists(path):
        raise InputError(f"{path} does not exist")
    extra = {_META: ""}
    try:
        exported = torch.export.load(path, extra_files=extra)
    except Exception as exc:
        raise InputError(f"{path} is not a model saved by exprune_fx.save: {str(exc).splitlines()[0][:200]}") from None
    try:
        meta = json.loads(extra[_META])
    except json.JSONDecodeError:
        raise InputError(f"{path} has no exprune-fx record: it is a plain torch.export archive, not a file "
                         f"written by exprune_fx.save") from None
    if meta.get("format") != FORMAT or meta.get("version") not in READS:
        raise InputError(f"{path} has format {meta.get('format')!r} version {meta.get('version')!r}; this "
                         f"exprune-fx reads {FORMAT!r} versions {', '.join(map(str, READS))}. Compile the model "
                         f"again with this version.")
    if model is not None:
        _check_model(path, model, meta["model_fingerprint"])
    sites = [SiteReport(**s) for s in meta["sites"]]
    graph_module = exported.module()
    compiled = CompiledModel(graph_module, sites, None, _config_from_json(meta["config"]),
                             meta["other_flops_per_row"], ((), {}), meta["dynamic_batch"], meta["outputs"],
                             [ZeroSkipReport(**r) for r in meta.get("zero_skip", [])])
    compiled.source_fingerprint = meta["model_fingerprint"]
    missing = [s.counters for s in compiled.rewritten_sites if not hasattr(graph_module, s.counters)]
    missing += [r.counters for r in compiled.zero_skipped if not hasattr(graph_module, r.counters)]
    if missing:
        raise InputError(f"{path}: the saved graph lacks the counters {missing}; the file is damaged")
    for site in compiled.rewritten_sites:  # a version-2 file's counters lack the fields added since
        old = getattr(graph_module, site.counters)
        if old.shape != (len(FIELDS),):
            setattr(graph_module, site.counters, new_counters(old.device))
    compiled.reset_stats()
    return compiled


def _check_model(path, model: torch.nn.Module, saved: dict) -> None:
    current = weights_fingerprint(model)
    if set(current) != set(saved):
        diff = sorted(set(current) ^ set(saved))[:5]
        raise InputError(f"{path} was compiled from a different model (parameters that differ: {diff}); "
                         f"compile this model again")
    for name, (shape, dtype, total) in saved.items():
        now = current[name]
        if now[0] != shape or now[1] != dtype:
            raise InputError(f"{path} was compiled from a model whose {name} is {dtype}{shape}; this model's is "
                             f"{now[1]}{now[0]}: compile this model again")
        if not math.isclose(now[2], total, rel_tol=1e-6, abs_tol=1e-9):
            raise InputError(f"{path} was compiled from other weights ({name} changed since); compile this "
                             f"model again so the early exits are calibrated to these weights")
