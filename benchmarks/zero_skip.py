"""Zero-skip propagation: the zero-skip linear against the dense linear, on the wall clock.

Each measurement runs its variants side by side in one process, repetitions interleaved,
and reports medians and the median of the per-repetition ratios to dense, over several
sweeps of all its cells (the machine is shared and noisy).

Default (:func:`mlp_rows`, :func:`lm_rows`):

* each zero-skip linear of a compiled model alone, on the real ReLU outputs that reach it
  (:func:`zero_skip_rows`, callable from other benchmarks): the ``dense linear``
  (``F.linear`` with the original weight), the ``zero-skip`` op as the graph calls it (the
  cost model picks the path) and the kernel with its ``sparse path`` forced. Every linear
  after a ReLU is rewritten here, also those the pass leaves dense by default because
  skipping cannot pay on them (column "rewritten by default"), to show why. Cases: the ReLU
  MLP 784-1024-1024-10 of ``wallclock.py`` (trained there, one epoch on Fashion-MNIST) on 1,
  8 and 32 test images, every site disabled (plain ReLU sparsity) and with ExPrune
  (``alpha=0.05, k=32``, whose only zero-skipped consumer is the 1024 -> 10 head: the
  1024 x 1024 layer is itself an ExPrune site); the byte-level OPT LM's FFN down projections
  (``fc2``, 512 -> 128) on 1, 8 and 32 token rows of a held-out window, plain and with
  ExPrune (``alpha=0.05, k=32`` on ``fc1``);
* the whole MLP with every ExPrune site disabled, compiled without and with
  ``zero_skip=True`` (the layers the pass picks by default), at batch 1, 8 and 32
  (:func:`model_rows`).

``--grid``: the cost model's data (``exprune_fx/runtime/zero_skip.py``). Both paths of the
kernel, forced, on random weights ``K x N`` = 1024 x 1024, 512 x 128 and 2048 x 512, 1 to 64
rows, input densities 0.05 to 0.9; then the cost model that loses the least time over the
grid (:func:`fit`) and what the constants in force lose.

    python benchmarks/zero_skip.py [--repeats 50] [--runs 5] [--out bench-out]
    python benchmarks/zero_skip.py --grid [--repeats 30] [--runs 5]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

import exprune_fx
from exprune_fx import Config
from exprune_fx.lifting import normalize_inputs
from exprune_fx.runtime import zero_skip

sys.path.insert(0, str(Path(__file__).parent))

VARIANTS = ("dense linear", "zero-skip", "sparse path")


def side_by_side(fns: dict, repeats: int) -> dict:
    """Median ms per variant and the median per-repetition ratio to the first variant."""
    names = list(fns)
    times = {name: [] for name in names}
    with torch.no_grad():
        for name in names:
            for _ in range(3):
                fns[name]()
        for _ in range(repeats):
            for name in names:
                t0 = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - t0)
    base = times[names[0]]
    return {name: {"median_ms": 1e3 * statistics.median(t),
                   "ratio": statistics.median(a / b for a, b in zip(t, base))} for name, t in times.items()}


def _forced(setting: str, x, weight_t, bias, stats):
    def run():
        with zero_skip.use(setting):
            return zero_skip.zero_skip_linear(x, weight_t, bias, stats)
    return run


def grid(shapes=((1024, 1024), (512, 128), (2048, 512)), rows=(1, 2, 4, 8, 16, 32, 64),
         densities=(0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9), repeats: int = 30, runs: int = 3,
         seed: int = 0) -> list[dict]:
    """Both kernel paths on random inputs of each density (zeros placed uniformly at random);
    the grid is swept ``runs`` times and each cell keeps the median over the sweeps (a burst
    of load from other processes then spoils one sweep's cell, not the result)."""
    g = torch.Generator().manual_seed(seed)
    cells = []
    for (k, n), m, d in itertools.product(shapes, rows, densities):
        weight_t = torch.randn(k, n, generator=g)
        x = torch.randn(m, k, generator=g) * (torch.rand(m, k, generator=g) < d)
        cells.append({"k": k, "n": n, "rows": m, "density": d, "nonzero": int(torch.count_nonzero(x)),
                      "x": x, "weight_t": weight_t, "sweeps": []})
    for _ in range(runs):
        for c in cells:
            stats = zero_skip.new_counters()
            c["sweeps"].append(side_by_side({"dense": _forced("dense", c["x"], c["weight_t"], None, stats),
                                             "sparse": _forced("sparse", c["x"], c["weight_t"], None, stats)}, repeats))
    for c in cells:
        sweeps = c.pop("sweeps")
        del c["x"], c["weight_t"]
        c["dense_ms"] = statistics.median(t["dense"]["median_ms"] for t in sweeps)
        c["sparse_ms"] = statistics.median(t["sparse"]["median_ms"] for t in sweeps)
        c["ratio"] = statistics.median(t["sparse"]["ratio"] for t in sweeps)
    return cells


def _sparse_chosen(cell: dict, model: zero_skip.CostModel) -> bool:
    return model.sparse(cell["rows"], cell["k"], cell["n"], cell["nonzero"])


def loss(cells: list[dict], model: zero_skip.CostModel) -> float:
    """Mean over the cells of (time of the path the model picks) / (time of the faster path) - 1."""
    lost = []
    for c in cells:
        chosen = c["sparse_ms"] if _sparse_chosen(c, model) else c["dense_ms"]
        lost.append(chosen / min(c["sparse_ms"], c["dense_ms"]) - 1)
    return sum(lost) / len(lost)


def fit(cells: list[dict]) -> tuple[zero_skip.CostModel, float]:
    """The :class:`~exprune_fx.runtime.zero_skip.CostModel` of least :func:`loss`, by grid search."""
    candidates = [zero_skip.CostModel(*c) for c in itertools.product(
        (2, 4, 6, 8, 12, 16, 24, 32), (0.1, 0.15, 0.2, 0.25, 0.35, 0.5, 0.75, 1.0), (0, 5, 10, 20, 40, 80),
        (0, 25_000, 50_000, 100_000, 200_000, 400_000))]
    best = min(candidates, key=lambda m: (loss(cells, m), tuple(m)))
    return best, loss(cells, best)


def grid_markdown(cells: list[dict]) -> str:
    """Sparse / dense time ratios, one row per shape and row count, one column per density
    (``*`` marks the cells where the constants in force pick the sparse path)."""
    in_force = zero_skip.COST
    densities = sorted({c["density"] for c in cells})
    lines = ["| K x N | rows | dense ms | " + " | ".join(f"d={d:g}" for d in densities) + " |",
             "|---|---:|---:|" + "---:|" * len(densities)]
    for (k, n, m), group in itertools.groupby(cells, key=lambda c: (c["k"], c["n"], c["rows"])):
        group = list(group)
        ratios = " | ".join(f"{c['ratio']:.2f}{'*' if _sparse_chosen(c, in_force) else ''}" for c in group)
        lines.append(f"| {k} x {n} | {m} | {statistics.median(c['dense_ms'] for c in group):.3f} | {ratios} |")
    return "\n".join(lines) + "\n"


def zero_skip_rows(case: str, compiled, inputs, repeats: int, rows=(1, 8, 32), runs: int = 3) -> list[dict]:
    """Each zero-skip linear of ``compiled`` (compiled with ``Config(zero_skip=True)``) alone,
    on the input it receives when ``compiled`` runs ``inputs`` (a tensor, a tuple of
    positional inputs or a dict of keyword inputs), cut to its first ``rows`` rows: the dense
    linear (``F.linear``, the layer's own [N, K] weight), the zero-skip op as the graph calls
    it (the cost model picks the path) and the kernel with its sparse path forced, side by
    side. All cells are swept ``runs`` times; each keeps its median over the sweeps."""
    from torch.utils._pytree import tree_flatten
    from wallclock import OpCalls

    args, kwargs = normalize_inputs(inputs)
    recorder = OpCalls(compiled.graph_module, torch.ops.exprune.zero_skip_linear.default)
    with torch.no_grad():
        recorder.run(*tree_flatten((args, kwargs))[0])
    op = torch.ops.exprune.zero_skip_linear.default
    cells = []
    for report, (x, weight_t, bias, _) in zip(compiled.zero_skipped, recorder.calls):
        x2 = x.reshape(-1, x.shape[-1])
        weight = weight_t.T.contiguous()
        for r in rows:
            if r <= x2.shape[0]:
                xr, stats = x2[:r].contiguous(), zero_skip.new_counters()
                fns = {"dense linear": lambda xr=xr, weight=weight, bias=bias: F.linear(xr, weight, bias),
                       "zero-skip": lambda xr=xr, weight_t=weight_t, bias=bias, stats=stats: op(xr, weight_t, bias, stats),
                       "sparse path": _forced("sparse", xr, weight_t, bias, zero_skip.new_counters())}
                cells.append((report, xr, stats, fns))
    sweeps = [[side_by_side(fns, repeats) for _, _, _, fns in cells] for _ in range(runs)]
    out = []
    for i, (report, xr, stats, _) in enumerate(cells):
        c = zero_skip.read(stats)
        timing = {v: {key: statistics.median(sweep[i][v][key] for sweep in sweeps) for key in ("median_ms", "ratio")}
                  for v in VARIANTS}
        out.append({"case": case, "node": report.name, "shape": [report.in_features, report.out_features],
                    "rows": xr.shape[0], "density": float(torch.count_nonzero(xr)) / xr.numel(),
                    "rewritten_by_default": zero_skip.COST.can_pay(report.in_features, report.out_features),
                    "sparse_share": c["sparse_calls"] / c["calls"], "timing": timing})
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| case | node (K -> N) | rewritten by default | rows | input density | dense linear ms | "
             "zero-skip (x dense) | path taken | sparse path (x dense) |", "|---|---|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        t = r["timing"]
        path = "sparse" if r["sparse_share"] == 1 else "dense" if r["sparse_share"] == 0 else \
            f"sparse {r['sparse_share']:.0%}"
        lines.append(f"| {r['case']} | {r['node']} ({r['shape'][0]} -> {r['shape'][1]}) | "
                     f"{'yes' if r['rewritten_by_default'] else 'no'} | {r['rows']} | "
                     f"{100 * r['density']:.1f}% | {t['dense linear']['median_ms']:.3f} | "
                     f"{t['zero-skip']['median_ms']:.3f} (x{t['zero-skip']['ratio']:.2f}) | {path} | "
                     f"{t['sparse path']['median_ms']:.3f} (x{t['sparse path']['ratio']:.2f}) |")
    return "\n".join(lines) + "\n"


def model_rows(case: str, model, example, batches: dict, repeats: int, runs: int = 3) -> list[dict]:
    """The whole model with every ExPrune site disabled, as compiled without and with
    ``zero_skip=True`` (the pass's default choice of layers), per batch in ``batches``
    (batch size -> input tensor): median ms and the ratio to the graph without zero-skip."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sites = exprune_fx.compile(model, example, Config()).sites
        off = exprune_fx.compile(model, example, Config(sites=_disabled(sites)))
        on = exprune_fx.compile(model, example, Config(zero_skip=True, sites=_disabled(sites)))
    out = []
    for batch, x in batches.items():
        fns = {"dense graph": lambda x=x: off(x), "zero-skip graph": lambda x=x: on(x)}
        sweeps = [side_by_side(fns, repeats) for _ in range(runs)]
        out.append({"case": case, "batch": batch, "zero_skipped": [r.name for r in on.zero_skipped],
                    "timing": {v: {key: statistics.median(t[v][key] for t in sweeps) for key in ("median_ms", "ratio")}
                               for v in fns}})
    return out


def model_markdown(rows: list[dict]) -> str:
    lines = ["| case | batch | zero-skipped layers | dense graph ms | zero-skip graph ms (x dense graph) |",
             "|---|---:|---|---:|---:|"]
    for r in rows:
        t = r["timing"]
        lines.append(f"| {r['case']} | {r['batch']} | {', '.join(r['zero_skipped']) or '-'} | "
                     f"{t['dense graph']['median_ms']:.3f} | {t['zero-skip graph']['median_ms']:.3f} "
                     f"(x{t['zero-skip graph']['ratio']:.2f}) |")
    return "\n".join(lines) + "\n"


def _disabled(compiled_sites) -> dict:
    return {s.name: {"enabled": False} for s in compiled_sites}


def _compile(model, example, config: Config):
    """Compile with every linear after a ReLU rewritten, including those the pass leaves dense
    by default because skipping cannot pay on them (to measure why)."""
    with warnings.catch_warnings(), mock.patch.object(zero_skip.CostModel, "can_pay", lambda *_: True):
        warnings.simplefilter("ignore")
        return exprune_fx.compile(model, example, config)


def mlp_rows(repeats: int, runs: int = 3) -> tuple[list[dict], list[dict]]:
    """The MLP 784-1024-1024-10 of wallclock.py, on 32 test images (cut to 1, 8, 32 rows):
    its layers (:func:`zero_skip_rows`) and the whole model (:func:`model_rows`)."""
    import wallclock
    from exprune_fx.datasets import load_fashion_mnist

    model = wallclock.train_mlp()
    xt, _ = load_fashion_mnist("test", limit=32)
    sites = _compile(model, xt[:4], Config()).sites
    rows = []
    for case, config in (("mlp, plain ReLU", Config(zero_skip=True, sites=_disabled(sites))),
                         ("mlp, ExPrune alpha=0.05", Config(zero_skip=True, alpha=0.05, k=32))):
        rows += zero_skip_rows(case, _compile(model, xt[:4], config), xt, repeats, runs=runs)
    whole = model_rows("mlp 784-1024-1024-10", model, xt[:4], {b: xt[:b] for b in (1, 8, 32)}, repeats, runs)
    return rows, whole


def lm_rows(repeats: int, runs: int = 3) -> list[dict]:
    """The OPT LM's FFN down projections on the token rows of one held-out window."""
    import tasks

    task = tasks.lm_task(val=2, test=8)
    ids = task.test[0][0]["input_ids"][:1]  # [1, 64]: one window, 64 token rows
    example = {"input_ids": ids, "use_cache": False}
    sites = _compile(task.model, example, Config()).sites
    rows = []
    for case, config in (("opt_lm, plain ReLU", Config(zero_skip=True, sites=_disabled(sites))),
                         ("opt_lm, ExPrune alpha=0.05", Config(zero_skip=True, alpha=0.05, k=32))):
        compiled = _compile(task.model, example, config)
        rows += [r for r in zero_skip_rows(case, compiled, example, repeats, runs=runs) if r["shape"] == [512, 128]]
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", action="store_true", help="the cost model's grid and fit instead")
    parser.add_argument("--repeats", type=int, default=None, help="repetitions per variant (50; 30 for --grid)")
    parser.add_argument("--runs", type=int, default=5, help="sweeps over all cells (median per cell)")
    parser.add_argument("--out", default=None, help="also write zero_skip.json / .md here")
    args = parser.parse_args(argv)
    from wallclock import machine

    if args.grid:
        cells = grid(repeats=args.repeats or 30, runs=args.runs)
        best, lost = fit(cells)
        in_force = loss(cells, zero_skip.COST)
        always_dense = sum(c["dense_ms"] / min(c["dense_ms"], c["sparse_ms"]) - 1 for c in cells) / len(cells)
        text = (f"Machine: {machine()}\n\nsparse path / dense path, median per-repetition ratio "
                f"(* = the cost model in force picks sparse):\n\n{grid_markdown(cells)}\n"
                f"fit: {best} (mean time lost against the faster path {lost:.1%}); "
                f"in force: {zero_skip.COST} ({in_force:.1%}); "
                f"always dense loses {always_dense:.1%}\n")
        result = cells
    else:
        layers, whole = mlp_rows(args.repeats or 50, args.runs)
        layers += lm_rows(args.repeats or 50, args.runs)
        result = {"layers": layers, "models": whole}
        text = (f"Machine: {machine()}\n\nEach layer alone, on its real ReLU input:\n\n{markdown(layers)}\n"
                f"Whole model, every ExPrune site disabled (plain ReLU sparsity):\n\n{model_markdown(whole)}")
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = "zero_skip_grid" if args.grid else "zero_skip"
        (out / f"{stem}.json").write_text(json.dumps({"machine": machine(), "rows": result}, indent=2))
        (out / f"{stem}.md").write_text(text)
    return result


if __name__ == "__main__":
    main()
