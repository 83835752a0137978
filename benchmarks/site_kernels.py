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

Two tables, each with the time the constants in force lose against always taking the faster
kernel and the constants that lose the least over the grid (:func:`fit`):

* ``"fastest"``: row-wise / dense time (median of per-repetition ratios), ``*`` where the cost
  model in force (:func:`exprune_fx.runtime.fast.choose`) picks the row-wise kernel;
  constants :data:`fast.DENSE_BUDGET`, :data:`fast.OUTPUT_COST` and :data:`fast.MIN_TERMS`;
* ``"auto"``: row-wise / blas time, ``*`` where it picks the row-wise kernel; constant
  :data:`fast.ROW_BUDGET`.

    python benchmarks/site_kernels.py [--repeats 30] [--runs 3] [--out bench-out]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import random
import statistics
import sys
from pathlib import Path
from unittest import mock

import torch

from exprune_fx.runtime import fast
from exprune_fx.runtime.counters import INDEX, new_counters

sys.path.insert(0, str(Path(__file__).parent))
from timing import interleaved_times  # noqa: E402

THRESHOLD = 1
# (outputs N, terms K, unit, k): the MLP's and the VGG's sites, the byte-level LM's FFN fc1, a
# wide and a narrow layer, two with short rows
SHAPES = ((1024, 1024, 1, 16), (256, 3136, 49, 8), (512, 128, 1, 32), (1024, 784, 1, 16), (128, 512, 1, 32),
          (2048, 128, 1, 16), (512, 256, 1, 16))
ROWS = (1, 2, 3, 4, 8, 16, 32)
SURVIVORS = (1.0, 0.7, 0.5, 0.3, 0.1)
KERNELS = (fast.ROW, fast.BLAS, fast.DENSE)
# the constants of each setting's choice, the kernel it weighs the row-wise kernel against, and
# the candidates fit() searches
CHOICES = {
    "fastest": {"other": fast.DENSE, "constants": ("DENSE_BUDGET", "OUTPUT_COST", "MIN_TERMS"),
                "candidates": list(itertools.product((1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0, 16.0),
                                                     (0, 128, 256, 384, 512, 768, 1024, 1536),
                                                     (0, 192, 256, 384, 512)))},
    "auto": {"other": fast.BLAS, "constants": ("ROW_BUDGET",),
             "candidates": [(b,) for b in (2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 16.0, 24.0, 32.0)]},
}


def _cell(n: int, big_k: int, unit: int, k: int, rows: int, share: float, copies: int, g: torch.Generator) -> dict:
    weights = [torch.randn(n, big_k, generator=g) for _ in range(copies)]
    x = torch.relu(torch.randn(rows, big_k, generator=g))
    offset = torch.randn(n, generator=g)
    kh = k * unit
    means = (x[:, :kh] @ weights[0][:, :kh].T) / k + offset / (big_k // unit)
    critical = torch.tensor(-1e30 if share >= 1 else float(torch.quantile(means.flatten(), 1 - share)))
    return {"n": n, "k_terms": big_k, "unit": unit, "k": k, "rows": rows, "survivors": share,
            "args": (x, weights, torch.ones(n), offset.expand(rows, n), critical)}


def _runner(cell: dict, kernel: str):
    x, weights, scale, offset, critical = cell["args"]
    stats, turn = new_counters(), [0]

    def run():
        turn[0] += 1
        return fast.relu_linear(x, weights[turn[0] % len(weights)], scale, offset, cell["unit"], cell["k"], THRESHOLD,
                                critical, stats, kernel=kernel)
    return run


def side_by_side(fns: dict, repeats: int, rnd: random.Random) -> dict:
    """Median ms per kernel, and the median per-repetition ratio of the row-wise kernel to each other."""
    names = list(fns)
    times = interleaved_times(fns, repeats, rnd, warmup=1)
    return {**{f"{name}_ms": 1e3 * statistics.median(times[name]) for name in names},
            **{f"{name}_ratio": statistics.median(a / b for a, b in zip(times[fast.ROW], times[name]))
               for name in names if name != fast.ROW}}


def grid(shapes=SHAPES, rows=ROWS, survivors=SURVIVORS, repeats: int = 30, runs: int = 3,
         weight_bytes: int = 16 << 20, seed: int = 0) -> list[dict]:
    """Every cell's row-wise and dense times; the weight rotates over enough copies to fill
    ``weight_bytes`` (2 to 32 copies)."""
    g, rnd = torch.Generator().manual_seed(seed), random.Random(seed)
    cells = []
    for (n, big_k, unit, k), m, share in itertools.product(shapes, rows, survivors):
        copies = min(32, max(2, weight_bytes // (4 * n * big_k)))
        cells.append(_cell(n, big_k, unit, k, m, share, copies, g))
    sweeps = [[] for _ in cells]
    with torch.no_grad():
        for _ in range(runs):
            for cell, kept in zip(cells, sweeps):
                kept.append(side_by_side({kernel: _runner(cell, kernel) for kernel in KERNELS}, repeats, rnd))
    for cell, kept in zip(cells, sweeps):
        del cell["args"]
        for key in kept[0]:
            cell[key] = statistics.median(t[key] for t in kept)
    return cells


def row_chosen(cell: dict, setting: str, constants: tuple | None = None) -> bool:
    """Whether ``setting``'s cost model picks the row-wise kernel for this cell (with the
    constants in force, or those given), at the cell's survivor share."""
    stats = new_counters()
    stats[INDEX["outputs"]], stats[INDEX["pruned"]] = 1000.0, 1000.0 * (1 - cell["survivors"])  # the share kept
    names = CHOICES[setting]["constants"]
    values = dict(zip(names, constants)) if constants is not None else {}
    with mock.patch.multiple(fast, **values) if values else contextlib.nullcontext(), fast.use(setting):
        return fast.choose(cell["rows"], cell["k"] * cell["unit"] / cell["k_terms"], stats, cell["k_terms"]) == fast.ROW


def loss(cells: list[dict], setting: str, constants: tuple | None = None) -> float:
    """Mean over the cells of (time of the kernel picked) / (time of the faster of the two) - 1."""
    other = CHOICES[setting]["other"]
    lost = [(c["row-wise_ms"] if row_chosen(c, setting, constants) else c[f"{other}_ms"])
            / min(c["row-wise_ms"], c[f"{other}_ms"]) - 1 for c in cells]
    return sum(lost) / len(lost)


def fit(cells: list[dict], setting: str) -> tuple[tuple, float]:
    """``setting``'s constants of least :func:`loss`, by grid search."""
    best = min(CHOICES[setting]["candidates"], key=lambda c: (loss(cells, setting, c), c))
    return best, loss(cells, setting, best)


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
