"""ExPrune on top of static pruning, and exact mode, on the Fashion-MNIST CNNs.

For each model, static pruner (global magnitude, SynFlow, sensitivity sampling) and sparsity:
prune the trained checkpoint, fine-tune it with its masks fixed (``--finetune-epochs`` passes
over ``--train`` training images, Adam 1e-3, batch 128, seeded; batch-norm statistics then
re-estimated), and report

* test accuracy after pruning and after fine-tuning;
* the extra whole-model FLOPs reduction ExPrune adds on the pruned model, calibrated (stats
  test) to a negligible (0.1%) and a 1% accuracy drop on the validation split, reported on
  held-out test images: FLOPs are 2 x multiply-accumulates with nonzero weights, so the
  reduction is relative to the pruned model, not the dense one;
* exact mode's reduction (lossless) on the pruned model, and on the dense model once.

    python benchmarks/static_pruning.py --out bench-out [--models vgg] [--sparsities 0.9 0.95 0.98]

Paper (ExPrune v2, VGG at about 98% magnitude sparsity): +10.24-11.11% at negligible drop,
+13.91-14.39% at <= 1% drop.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import exprune_fx
from exprune_fx import Config, static
from exprune_fx.datasets import load_fashion_mnist

sys.path.insert(0, str(Path(__file__).parent))
import tasks  # noqa: E402
from train_cnns import TRAIN_SPLIT, accuracy, recalibrate_batch_norm  # noqa: E402

BUDGETS = {"negligible (0.1%)": 0.001, "1%": 0.01}
PRUNERS = ("magnitude", "synflow", "sensitivity_sampling")


def prune(method: str, model, sparsity: float, x_batch: torch.Tensor) -> static.Pruned:
    if method == "magnitude":
        return static.magnitude(model, sparsity)
    if method == "synflow":
        return static.synflow(model, sparsity, x_batch[:1], iterations=100)
    return static.sensitivity_sampling(model, sparsity, x_batch[:256], seed=0)


def finetune(pruned: static.Pruned, x, y, epochs: int, seed: int = 0) -> static.Pruned:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        batches += [(x[order[i:i + 128]], y[order[i:i + 128]]) for i in range(0, len(x), 128)]
    torch.manual_seed(seed)
    tuned = static.finetune(pruned, batches, F.cross_entropy, epochs=1,
                            optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-3))
    recalibrate_batch_norm(tuned.model, x[:5000])
    tuned.model.eval()
    return tuned


def exact_reduction(model, x: torch.Tensor, k: int) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = exprune_fx.compile(model, x[:4], Config(mode="exact", k=k))
    with torch.no_grad():
        for i in range(0, len(x), 250):
            compiled(x[i:i + 250])
    return compiled.exprune_stats()["reduction"]


def expruned(model, val, xt, yt, ks, alphas) -> list[dict]:
    """Calibrate the stats test per budget on ``val``; report on the test images."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = exprune_fx.compile(model, xt[:4])
    dense = accuracy(model, xt, yt)
    rows = []
    for label, budget in BUDGETS.items():
        result = exprune_fx.calibrate(compiled, val, max_drop=budget, ks=ks, alphas=alphas, exact=False,
                                      progress=False)
        final = result.compiled
        final.reset_stats()
        value = accuracy(final, xt, yt, batch=500)
        stats = final.exprune_stats()
        rows.append({"budget": label, "dense_accuracy": dense, "accuracy": value, "drop": dense - value,
                     "reduction": stats["reduction"], "evaluations": result.report["evaluations"],
                     "seconds": result.report["seconds"], "sites": result.report["sites"]})
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--models", nargs="*", default=["vgg"], choices=list(tasks.CNNS))
    parser.add_argument("--pruners", nargs="*", default=list(PRUNERS), choices=list(PRUNERS))
    parser.add_argument("--sparsities", type=float, nargs="*", default=[0.9, 0.95, 0.98])
    parser.add_argument("--train", type=int, default=10000, help="training images for fine-tuning")
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--val", type=int, default=500, help="validation images (calibration)")
    parser.add_argument("--test", type=int, default=2000, help="test images (report)")
    parser.add_argument("--exact-test", type=int, default=500, help="test images for exact mode")
    parser.add_argument("--exact-k", type=int, default=32)
    parser.add_argument("--ks", type=int, nargs="*", default=[8, 16])
    parser.add_argument("--alphas", type=float, nargs="*", default=[0.01, 0.05, 0.2])
    args = parser.parse_args(argv)
    start = time.time()
    x, y = load_fashion_mnist("train")
    xtrain, ytrain = x[:args.train], y[:args.train]
    val = tasks.batches(x[TRAIN_SPLIT:TRAIN_SPLIT + args.val], y[TRAIN_SPLIT:TRAIN_SPLIT + args.val], 50)
    xt, yt = load_fashion_mnist("test", limit=args.test)
    rows = []
    for name in args.models:
        model = tasks.load_cnn(name)
        dense_exact = exact_reduction(model, xt[:args.exact_test], args.exact_k)
        for method in args.pruners:
            for sparsity in args.sparsities:
                t = time.time()
                pruned = prune(method, model, sparsity, xtrain)
                tuned = finetune(pruned, xtrain, ytrain, args.finetune_epochs)
                base = {"model": name, "pruner": method, "sparsity": sparsity,
                        "achieved_sparsity": pruned.report()["achieved"], "dense_model_accuracy": accuracy(model, xt, yt),
                        "pruned_accuracy": accuracy(pruned.model, xt, yt), "finetuned_accuracy": accuracy(tuned.model, xt, yt),
                        "exact_reduction": exact_reduction(tuned.model, xt[:args.exact_test], args.exact_k),
                        "exact_reduction_dense_model": dense_exact}
                for r in expruned(tuned.model, val, xt, yt, tuple(args.ks), tuple(args.alphas)):
                    rows.append({**base, **r, "seconds_total": time.time() - t})
                    print(json.dumps({k: v for k, v in rows[-1].items() if k != "sites"}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "static_pruning.json").write_text(json.dumps(rows, indent=2))
    table = to_markdown(rows)
    (args.out / "static_pruning.md").write_text(table)
    print(f"{time.time() - start:.0f} s, torch {torch.__version__}, {torch.get_num_threads()} threads\n{table}")
    return rows


def to_markdown(rows: list[dict]) -> str:
    head = ("| model | pruner | sparsity | acc. pruned | acc. fine-tuned | budget | acc. ExPrune (test) "
            "| extra FLOPs reduction | exact mode reduction | evaluations |\n"
            "|---|---|---:|---:|---:|---|---:|---:|---:|---:|\n")
    return head + "".join(
        f"| {r['model']} | {r['pruner']} | {r['sparsity']:.0%} | {r['pruned_accuracy']:.4f} | {r['finetuned_accuracy']:.4f} "
        f"| {r['budget']} | {r['accuracy']:.4f} | {r['reduction']:.2%} | {r['exact_reduction']:.2%} "
        f"| {r['evaluations']} |\n" for r in rows)


if __name__ == "__main__":
    main()
