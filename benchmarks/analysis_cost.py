"""Analysis cost and findings per model: lift and analysis wall time (median of repeats),
classes, free classes, sites, eligible sites, and the symmetry check's verdict.

    python benchmarks/analysis_cost.py --out bench-out --repeats 5

Writes ``analysis.json`` and ``analysis.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from exprune_fx import analyze, check_symmetry, lift
from exprune_fx.zoo import HF_MODELS, gcn, mlp, residual_cnn, sinusoidal_encoder

MODELS = {
    "mlp": mlp, "residual_cnn": residual_cnn, "gcn": gcn, "sinusoidal_encoder": sinusoidal_encoder,
    **{f"hf_{k}": v for k, v in HF_MODELS.items()},
}


def measure(name: str, repeats: int) -> dict:
    model, inputs = MODELS[name]()
    lift_s, analyze_s = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        lifted = lift(model, inputs)
        t1 = time.perf_counter()
        analysis = analyze(lifted)
        t2 = time.perf_counter()
        lift_s.append(t1 - t0)
        analyze_s.append(t2 - t1)
    t0 = time.perf_counter()
    failures = check_symmetry(model, inputs, analysis)
    check_s = time.perf_counter() - t0
    return {
        "model": name, **analysis.summary(),
        "eligible": [f"{s.name} (n={s.n}, {s.decision})" for s in analysis.eligible_sites],
        "lift_s_median": statistics.median(lift_s),
        "analyze_s_median": statistics.median(analyze_s),
        "total_s_median": statistics.median(a + b for a, b in zip(lift_s, analyze_s)),
        "check_symmetry_s": check_s, "symmetry_failures": len(failures),
    }


def to_markdown(rows: list[dict]) -> str:
    head = ("| model | classes | free | sites | eligible | lift+analyze s (median) | of which analysis s "
            "| symmetry check |\n|---|---:|---:|---:|---:|---:|---:|---|\n")
    return head + "".join(
        f"| {r['model']} | {r['classes']} | {r['free_classes']} | {r['sites']} | {r['eligible_sites']} "
        f"| {r['total_s_median']:.2f} | {r['analyze_s_median']:.3f} "
        f"| {'pass' if r['symmetry_failures'] == 0 else str(r['symmetry_failures']) + ' failures'} |\n"
        for r in rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = [measure(name, args.repeats) for name in args.models]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "analysis.json").write_text(json.dumps(rows, indent=2))
    table = to_markdown(rows)
    (args.out / "analysis.md").write_text(table)
    print(f"machine: {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(table)


if __name__ == "__main__":
    main()
