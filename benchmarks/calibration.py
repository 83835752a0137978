"""Paper-style results on real data: FLOPs saved within a metric budget, per model.

For each task of ``benchmarks/tasks.py`` (Fashion-MNIST CNNs, a GCN on a k-nearest-neighbour
graph of Fashion-MNIST, a byte-level OPT language model on the Python standard library):
calibrate on the validation split (``--val`` items), for each test (stats, threshold, and
the sequential stats test) and each budget (0.1% "negligible" and 1% metric drop), with
exact mode (checked every 32 terms) offered to the sites that admit it, then report on the
held-out test split:
dense and calibrated metric, whole-model FLOPs reduction (FLOPs = 2 x MACs), the oracle bound
(a perfect sign predictor at the smallest k, measured on the test split) and the fraction of
it reached (with an argmax head, also what a perfect dominance predictor would add there, and
the fraction of both: "25.40% + 7.21% argmax | 84% / 65%"), and the calibration's cost
(evaluations in full-data equivalents, seconds).
Writes ``calibration.json``, ``calibration.md`` and PNG plots (metric-vs-FLOPs per model,
per-site prune rates).

    python benchmarks/calibration.py --out bench-out [--models resnet gcn opt_lm] [--val 1000]
        [--tests stats threshold] [--budgets negligible 1%] [--margin 1] [--zero-skip]

``--zero-skip`` compiles with ``Config(zero_skip=True)`` and adds two columns: the reduction
counting also the zero inputs that the linears after a ReLU skip, and what zero-skip alone
saves with every site dense (ours, not ExPrune's: kept apart from the paper's comparison).

Paper (ExPrune v2) for comparison: 10.98-17.33% FLOPs reduction at negligible drop,
21.61-27.16% at <= 1% drop.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

import exprune_fx
from exprune_fx import Config, SiteConfig
from exprune_fx.calibrate import accuracy as default_metric

sys.path.insert(0, str(Path(__file__).parent))
import tasks  # noqa: E402

BUDGETS = {"negligible (0.1%)": 0.001, "1%": 0.01}
PRICES = (0.025, 0.05, 0.1, 0.2, 0.4, 0.8)
# label -> calibrate() arguments; "stats x3" is the sequential test (k, 2k, 4k)
SEARCH = {"stats": {"test": "stats", "alphas": (0.01, 0.05, 0.2)},
          "stats x3": {"test": "stats", "alphas": (0.01, 0.05, 0.2), "stages": 3},
          "threshold": {"test": "threshold", "thresholds": (-0.02, -0.005, 0.0)},
          "threshold-magnitude": {"test": "threshold", "order": "magnitude",
                                  "thresholds": (-0.16, -0.08, -0.04, -0.02, -0.01, 0.0)},
          # one threshold per output, fitted on the validation data at each price
          "fitted": {"test": "fitted", "prices": PRICES},
          "fitted-magnitude": {"test": "fitted", "order": "magnitude", "prices": PRICES}}
MODELS = [*tasks.CNNS, "gcn", "opt_lm"]


def _call(model, inputs):
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def evaluate(model, data, metric) -> float:
    """The metric averaged over batches, weighted by their label count."""
    metric = metric or default_metric
    total = weight = 0.0
    with torch.no_grad():
        for inputs, labels in data:
            n = int((labels >= 0).sum())
            total += n * metric(_call(model, inputs), labels)
            weight += n
    return total / weight


def run_model(task: tasks.Task, ks, progress: bool, search: dict = SEARCH, budgets: dict = BUDGETS,
              margin: float = 1.0, zero_skip: bool = False) -> list[dict]:
    dense = evaluate(task.model, task.test, task.metric)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oracle_model = exprune_fx.compile(task.model, task.example, Config(k=min(ks), alpha=0.0), task.outputs)
        # zero-skip alone: every site dense, the linears after a ReLU skip its zeros
        skip_alone = exprune_fx.compile(task.model, task.example, Config(zero_skip=True, sites={
            s.name: SiteConfig(enabled=False) for s in oracle_model.sites}), task.outputs) if zero_skip else None
    evaluate(oracle_model, task.test, task.metric)
    oracle_stats = oracle_model.exprune_stats()
    oracle, argmax_oracle = oracle_stats["oracle_reduction"], oracle_stats["argmax_oracle_reduction"]
    if skip_alone is not None:
        evaluate(skip_alone, task.test, task.metric)
    compiled = exprune_fx.compile(task.model, task.example, Config(zero_skip=zero_skip), outputs=task.outputs)
    rows = []
    for test_kind, grid in search.items():
        for label, budget in budgets.items():
            result = exprune_fx.calibrate(compiled, task.val, task.metric, max_drop=budget, ks=ks, exact_k=32,
                                          margin=margin, progress=progress, **grid)
            final = result.compiled
            final.reset_stats()
            value = evaluate(final, task.test, task.metric)
            stats = final.exprune_stats()
            rows.append({
                "model": task.name, "metric_name": task.metric_name, "test": test_kind, "budget": label,
                "max_drop": budget, "margin": margin, "dense_accuracy": dense, "accuracy": value, "drop": dense - value,
                "dense_flops_per_item": stats["dense_flops"] / stats["rows"],
                "reduction": stats["reduction"], "oracle_reduction": oracle,
                "fraction_of_oracle": stats["reduction"] / oracle if oracle > 0 else 0.0,
                # a perfect dominance predictor on the argmax heads, on top of the sign oracle
                "argmax_oracle_reduction": argmax_oracle,
                "fraction_of_both_oracles": stats["reduction"] / (oracle + argmax_oracle)
                if oracle + argmax_oracle > 0 else 0.0,
                # with Config(zero_skip=True): the whole model's reduction counting the skipped
                # zero inputs too, and what zero-skip saves with no ExPrune site
                **({"reduction_with_zero_skip": stats["zero_skip"]["reduction"],
                    "zero_skip_alone": skip_alone.exprune_stats()["zero_skip"]["reduction"]} if zero_skip else {}),
                "evaluations": result.report["evaluations"], "seconds": result.report["seconds"],
                "sites": {n: s["prune_rate"] for n, s in stats["sites"].items()},
                "config": {n: _summary(sc) for n, sc in result.report["sites"].items() if sc.get("enabled")},
                "notes": task.notes,
            })
            print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("sites", "config", "notes")}))
    return rows


def _summary(settings: dict) -> dict:
    """A site's settings for the JSON: per-output thresholds as their count and how many prune."""
    if settings.get("thresholds") is None:
        return settings
    values = settings["thresholds"]
    return {**settings, "thresholds": f"{len(values)} per-output values, {sum(v > -1e30 for v in values)} finite"}


def to_markdown(rows: list[dict]) -> str:
    skip = any("reduction_with_zero_skip" in r for r in rows)
    head = ("| model | metric | test | budget | dense | calibrated (test) | FLOPs reduction | oracle | of oracle "
            + ("| with zero-skip | zero-skip alone " if skip else "") + "| evaluations | seconds |\n"
            + "|---|---|---|---|" + "---:|" * (9 if skip else 7) + "\n")

    def skipped(r: dict) -> str:
        if not skip:
            return ""
        if "reduction_with_zero_skip" not in r:
            return "| - | - "
        return f"| {r['reduction_with_zero_skip']:.2%} | {r['zero_skip_alone']:.2%} "

    def oracle(r: dict) -> str:  # with an argmax head: "sign + dominance | of sign / of both"
        if not r.get("argmax_oracle_reduction"):
            return f"{r['oracle_reduction']:.2%} | {r['fraction_of_oracle']:.0%}"
        return (f"{r['oracle_reduction']:.2%} + {r['argmax_oracle_reduction']:.2%} argmax "
                f"| {r['fraction_of_oracle']:.0%} / {r['fraction_of_both_oracles']:.0%}")

    return head + "".join(
        f"| {r['model']} | {r['metric_name']} | {r['test']} | {r['budget']} | {r['dense_accuracy']:.4f} "
        f"| {r['accuracy']:.4f} | {r['reduction']:.2%} | {oracle(r)} "
        f"{skipped(r)}| {r['evaluations']} | {r['seconds']:.0f} |\n" for r in rows)


def plot(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == name]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.scatter([0], [mine[0]["dense_accuracy"]], marker="s", color="black", label="dense")
        for test_kind in dict.fromkeys(r["test"] for r in mine):  # the tests run, in their order
            pts = sorted((r["reduction"], r["accuracy"]) for r in mine if r["test"] == test_kind)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=test_kind)
        ax.axvline(mine[0]["oracle_reduction"], color="gray", linestyle=":", label="oracle bound")
        ax.set_xlabel("whole-model FLOPs reduction")
        ax.set_ylabel(f"test {mine[0]['metric_name']}")
        ax.set_title(f"{name}: {mine[0]['metric_name']} vs FLOPs saved")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"pareto_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
        best = max(mine, key=lambda r: (r["max_drop"], r["reduction"]))  # the most saving row at the largest budget
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.bar(list(best["sites"]), list(best["sites"].values()), color="tab:blue")
        ax.set_ylabel("prune rate (exact sites: stopped early)", fontsize=8)
        ax.set_title(f"{name}: per-site prune rate ({best['test']}, {best['budget']})")
        ax.tick_params(axis="x", rotation=45, labelsize=7)
        fig.tight_layout()
        path = out / f"prune_rates_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--val", type=int, default=1000, help="validation items (images, nodes, token windows)")
    parser.add_argument("--test", type=int, default=10000, help="test items used to report")
    parser.add_argument("--ks", type=int, nargs="*", default=[8, 16])
    parser.add_argument("--tests", nargs="*", default=list(SEARCH), choices=list(SEARCH))
    short = {label.split()[0]: label for label in BUDGETS}  # "negligible", "1%"
    parser.add_argument("--budgets", nargs="*", default=list(short), choices=list(short))
    parser.add_argument("--margin", type=float, default=1.0,
                        help="standard errors of the validation drop kept below the budget (calibrate's margin)")
    parser.add_argument("--zero-skip", action="store_true",
                        help="compile with Config(zero_skip=True) and also report the reduction counting the "
                             "zero inputs that the linears after a ReLU skip (ours, not ExPrune's)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    start = time.time()
    rows = []
    for name in args.models:
        rows += run_model(tasks.build(name, args.val, args.test), tuple(args.ks), not args.quiet,
                          {t: SEARCH[t] for t in args.tests}, {short[b]: BUDGETS[short[b]] for b in args.budgets},
                          args.margin, args.zero_skip)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "calibration.json").write_text(json.dumps(rows, indent=2))
    table = to_markdown(rows)
    (args.out / "calibration.md").write_text(table)
    plot(rows, args.out)
    print(f"{time.time() - start:.0f} s, torch {torch.__version__}, {torch.get_num_threads()} threads\n{table}")
    return rows


if __name__ == "__main__":
    main()
