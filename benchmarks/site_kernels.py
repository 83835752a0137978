"""The linear-site kernels on the wall clock: the data behind the ``"fastest"`` cost model.

One linear ReLU site (``fast.relu_linear``, threshold test, one stage) on random weights, its
kernels forced: the ``row-wise`` early-exit kernel, the ``blas`` kernel (the same decisions
from matrix products) and the ``dense`` layer (one matrix product and the epilogue, nothing
pruned), over a grid of layer shapes, rows per call and
survivor shares (the critical value is the quantile of the head means that keeps that share
of the (row, output) pairs). Both run side by side in one process, repetitions interleaved in
a random order, on ``--copies`` rotating copies of the weight (a whole model's other layers
evict a site's weight from the core's cache between its calls); each cell keeps the median
over ``--runs`` sweeps of the grid (a burst of load from other tenants then spoils one
sweep's cell, not the result).

The grid and the fit are ``exprune_fx.runtime.tuning``'s (what ``exprune-fx tune`` runs to
fit the constants to another machine). Two tables, each with the time the constants in force
lose against always taking the faster kernel and the constants that lose the least over the
grid (``tuning.fit``):

* ``"fastest"``: row-wise / dense time (median of per-repetition ratios), ``*`` where the cost
  model in force (:func:`exprune_fx.runtime.fast.choose`) picks the row-wise kernel;
  constants :data:`fast.DENSE_BUDGET`, :data:`fast.OUTPUT_COST` and :data:`fast.MIN_TERMS`;
* ``"auto"``: row-wise / blas time, ``*`` where it picks the row-wise kernel; constant
  :data:`fast.ROW_BUDGET`.

    python benchmarks/site_kernels.py [--repeats 30] [--runs 3] [--out bench-out]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from exprune_fx.runtime import fast
from exprune_fx.runtime.tuning import CHOICES, fit, grid, loss, row_chosen


def markdown(cells: list[dict]) -> str:
    shares = sorted({c["survivors"] for c in cells}, reverse=True)
    groups = {}
    for c in cells:
        groups.setdefault((c["n"], c["k_terms"], c["unit"], c["k"], c["rows"]), {})[c["survivors"]] = c
    lines = []
    for setting, choice in CHOICES.items():
        other, names = choice["other"], choice["constants"]
        lines += [f"`\"{setting}\"`: row-wise / {other} time; `*` where the cost model in force picks the row-wise "
                  "kernel", "",
                  f"| N x K (unit, k) | rows | {other} ms | " + " | ".join(f"kept {s:.0%}" for s in shares) + " |",
                  "|---|---:|---:|" + "---:|" * len(shares)]
        for (n, big_k, unit, k, m), row in groups.items():
            base = statistics.median(c[f"{other}_ms"] for c in row.values())
            lines.append(f"| {n} x {big_k} ({unit}, {k}) | {m} | {base:.3f} | " + " | ".join(
                f"{row[s][f'{other}_ratio']:.2f}{'*' if row_chosen(row[s], setting) else ''}" for s in shares) + " |")
        best, best_loss = fit(cells, setting)
        never = sum(c[f"{other}_ms"] / min(c["row-wise_ms"], c[f"{other}_ms"]) - 1 for c in cells) / len(cells)
        in_force = ", ".join(f"{name}={getattr(fast, name):g}" for name in names)
        fitted = ", ".join(f"{name}={value:g}" for name, value in zip(names, best))
        lines += ["", f"Time lost against always taking the faster kernel, mean over the cells: constants in force "
                  f"({in_force}) {100 * loss(cells, setting):.1f}%; least-loss fit ({fitted}) {100 * best_loss:.1f}%; "
                  f"never row-wise {100 * never:.1f}%.", ""]
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30, help="repetitions per kernel and cell in one sweep")
    parser.add_argument("--runs", type=int, default=3, help="sweeps over all cells (median per cell)")
    parser.add_argument("--out", default=None, help="also write site_kernels.json / .md here")
    args = parser.parse_args(argv)
    if fast.module() is None:
        parser.error("the fast kernels could not be built (see the warning): nothing to compare")
    torch.manual_seed(0)
    cells = grid(repeats=args.repeats, runs=args.runs)
    text = markdown(cells)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "site_kernels.json").write_text(json.dumps(cells, indent=1))
        (out / "site_kernels.md").write_text(text)
    return cells


if __name__ == "__main__":
    sys.exit(main() and 0)
