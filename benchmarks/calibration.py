"""Paper-style results on real data: FLOPs saved within an accuracy budget, per model.

For each Fashion-MNIST CNN checkpoint (``benchmarks/train_cnns.py`` makes them):
calibrate on the validation split (the last 5000 training images, ``--val`` of them), for
each test (stats, threshold) and each budget (0.1% "negligible" and 1% accuracy drop), then
report on the held-out test split: dense and calibrated accuracy, whole-model FLOPs
reduction (FLOPs = 2 x MACs), the oracle bound (a perfect sign predictor at the smallest k,
measured on the test split) and the fraction of it reached, and the calibration's cost
(evaluations in full-data equivalents, seconds). Writes ``calibration.json``,
``calibration.md`` and PNG plots (metric-vs-FLOPs per model, per-site prune rates).

    python benchmarks/calibration.py --out bench-out [--models resnet vgg_bn vgg] [--val 1000]

Paper (ExPrune v2) for comparison: 10.98-17.33% FLOPs reduction at negligible drop,
21.61-27.16% at <= 1% drop.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

import exprune_fx
from exprune_fx import Config
from exprune_fx.datasets import load_fashion_mnist
from exprune_fx.zoo import ResidualCNN, VGGStyle

CHECKPOINTS = Path(__file__).parent / "checkpoints"
MODELS = {"resnet": ResidualCNN, "vgg_bn": lambda: VGGStyle(batch_norm=True), "vgg": lambda: VGGStyle(batch_norm=False)}
BUDGETS = {"negligible (0.1%)": 0.001, "1%": 0.01}
SEARCH = {"stats": {"alphas": (0.01, 0.05, 0.2)}, "threshold": {"thresholds": (-0.02, -0.005, 0.0)}}


def load_model(name: str) -> torch.nn.Module:
    model = MODELS[name]()
    model.load_state_dict(torch.load(CHECKPOINTS / f"{name}.pt"))
    return model.eval()


def batches(x, y, size: int = 250) -> list:
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def accuracy(model, data) -> float:
    with torch.no_grad():
        return sum((model(x).argmax(1) == y).sum().item() for x, y in data) / sum(len(y) for _, y in data)


def run_model(name: str, val, test, ks, progress: bool) -> list[dict]:
    model = load_model(name)
    dense = accuracy(model, test)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oracle_model = exprune_fx.compile(model, val[0][0][:4], Config(k=min(ks), alpha=0.0))
    accuracy(oracle_model, test)
    oracle = oracle_model.exprune_stats()["oracle_reduction"]
    compiled = exprune_fx.compile(model, val[0][0][:4])
    rows = []
    for test_kind, grid in SEARCH.items():
        for label, budget in BUDGETS.items():
            result = exprune_fx.calibrate(compiled, val, max_drop=budget, ks=ks, test=test_kind,
                                          progress=progress, **grid)
            final = result.compiled
            final.reset_stats()
            acc = accuracy(final, test)
            stats = final.exprune_stats()
            rows.append({
                "model": name, "test": test_kind, "budget": label, "max_drop": budget,
                "dense_accuracy": dense, "accuracy": acc, "drop": dense - acc,
                "dense_flops_per_image": stats["dense_flops"] / stats["rows"],
                "reduction": stats["reduction"], "oracle_reduction": oracle,
                "fraction_of_oracle": stats["reduction"] / oracle if oracle > 0 else 0.0,
                "evaluations": result.report["evaluations"], "seconds": result.report["seconds"],
                "sites": {n: s["prune_rate"] for n, s in stats["sites"].items()},
                "config": {n: sc for n, sc in result.report["sites"].items() if sc.get("enabled")},
            })
            print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("sites", "config")}))
    return rows


def to_markdown(rows: list[dict]) -> str:
    head = ("| model | test | budget | dense acc. | acc. (test) | FLOPs reduction | oracle | of oracle "
            "| evaluations | seconds |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|\n")
    return head + "".join(
        f"| {r['model']} | {r['test']} | {r['budget']} | {r['dense_accuracy']:.4f} | {r['accuracy']:.4f} "
        f"| {r['reduction']:.2%} | {r['oracle_reduction']:.2%} | {r['fraction_of_oracle']:.0%} "
        f"| {r['evaluations']} | {r['seconds']:.0f} |\n" for r in rows)


def plot(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for name in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == name]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.scatter([0], [mine[0]["dense_accuracy"]], marker="s", color="black", label="dense")
        for test_kind, color in (("stats", "tab:blue"), ("threshold", "tab:orange")):
            pts = sorted((r["reduction"], r["accuracy"]) for r in mine if r["test"] == test_kind)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color, label=test_kind)
        ax.axvline(mine[0]["oracle_reduction"], color="gray", linestyle=":", label="oracle bound")
        ax.set_xlabel("whole-model FLOPs reduction")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{name}: accuracy vs FLOPs saved")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"pareto_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
        best = max((r for r in mine if r["test"] == "stats"), key=lambda r: r["max_drop"])
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.bar(list(best["sites"]), list(best["sites"].values()), color="tab:blue")
        ax.set_ylabel("prune rate")
        ax.set_title(f"{name}: per-site prune rate (stats, {best['budget']})")
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
    parser.add_argument("--val", type=int, default=1000, help="validation images used to calibrate")
    parser.add_argument("--test", type=int, default=10000, help="test images used to report")
    parser.add_argument("--ks", type=int, nargs="*", default=[8, 16])
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    xv, yv = load_fashion_mnist("train")
    # small batches: the calibration's acceptance margin comes from their spread
    val = batches(xv[55000:55000 + args.val], yv[55000:55000 + args.val], size=50)
    xt, yt = load_fashion_mnist("test", limit=args.test)
    test = batches(xt, yt, 500)
    start = time.time()
    rows = [r for name in args.models for r in run_model(name, val, test, tuple(args.ks), not args.quiet)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "calibration.json").write_text(json.dumps(rows, indent=2))
    table = to_markdown(rows)
    (args.out / "calibration.md").write_text(table)
    plot(rows, args.out)
    print(f"{time.time() - start:.0f} s, torch {torch.__version__}, {torch.get_num_threads()} threads\n{table}")
    return rows


if __name__ == "__main__":
    main()
