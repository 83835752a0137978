"""Wall-clock cost of the reference early-exit kernels when they prune nothing.

Compiles each model with ``Config(alpha=0)`` (every site rewritten, no output pruned) and
times it against the dense eager model side by side: repetitions interleaved (dense,
compiled, dense, ...), medians, and the ratio compiled/dense. This is the overhead the fast
kernels must remove; it is measured here, never asserted in tests.

    python benchmarks/overhead.py --out bench-out --repeats 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch

import exprune_fx
from exprune_fx import Config
from exprune_fx.zoo import hf_opt, mlp, residual_cnn


def _call(model, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def _batch(inputs, size: int):
    def grow(t):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        reps = (size + t.shape[0] - 1) // t.shape[0]
        return t.repeat((reps,) + (1,) * (t.dim() - 1))[:size]
    return {k: grow(v) for k, v in inputs.items()} if isinstance(inputs, dict) else grow(inputs)


def time_pair(dense, compiled, inputs, repeats: int) -> dict:
    times = {"dense": [], "compiled": []}
    with torch.no_grad():
        for _ in range(3):  # warm-up
            _call(dense, inputs), _call(compiled, inputs)
        for _ in range(repeats):
            for name, model in (("dense", dense), ("compiled", compiled)):
                t0 = time.perf_counter()
                _call(model, inputs)
                times[name].append(time.perf_counter() - t0)
    ratios = [c / d for c, d in zip(times["compiled"], times["dense"])]
    return {"dense_ms": 1e3 * statistics.median(times["dense"]),
            "compiled_ms": 1e3 * statistics.median(times["compiled"]),
            "ratio_median": statistics.median(ratios)}


MODELS = {
    "mlp 784-1024-1024-10": lambda: mlp(widths=(784, 1024, 1024, 10)),
    "residual_cnn": residual_cnn,
    "hf_opt (small, random)": hf_opt,
}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 32])
    parser.add_argument("--k", type=int, default=16)
    args = parser.parse_args(argv)
    rows = []
    for name, factory in MODELS.items():
        model, inputs = factory()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = exprune_fx.compile(model, inputs, Config(alpha=0.0, k=args.k))
        for batch in args.batches:
            row = {"model": name, "batch": batch, "sites_rewritten": len(compiled.rewritten_sites),
                   **time_pair(model, compiled, _batch(inputs, batch), args.repeats)}
            rows.append(row)
            print(f"{name:<24} batch {batch:>3}: dense {row['dense_ms']:.3f} ms, nothing-pruned "
                  f"{row['compiled_ms']:.3f} ms, ratio {row['ratio_median']:.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overhead.json").write_text(json.dumps(rows, indent=2))
    table = ("| model | batch | sites rewritten | dense ms (median) | nothing-pruned ms (median) | ratio (median) |\n"
             "|---|---:|---:|---:|---:|---:|\n" + "".join(
                 f"| {r['model']} | {r['batch']} | {r['sites_rewritten']} | {r['dense_ms']:.3f} "
                 f"| {r['compiled_ms']:.3f} | {r['ratio_median']:.2f} |\n" for r in rows))
    (args.out / "overhead.md").write_text(table)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n{table}")
    return rows


if __name__ == "__main__":
    main()
