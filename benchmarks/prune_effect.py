"""What the rewrite saves at alpha = 0.05: per-site prune rates and whole-model FLOPs.

* the ResNet-style CNN (exprune_fx.zoo.ResidualCNN) of exprune_fx/checkpoints (trained by
  benchmarks/train_cnns.py on Fashion-MNIST), evaluated on the 10000 test images, with one
  global alpha (no calibration: see calibration.py for the calibrated results);
* HF OPTForCausalLM from a small config with random weights, on random tokens, with the LM
  head declared argmax-only (dominance prediction).

FLOPs are 2 x multiply-accumulates. Accuracy is measured, not assumed.

    python benchmarks/prune_effect.py --out bench-out
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

import exprune_fx
from exprune_fx import Config
from exprune_fx.datasets import load_fashion_mnist
from exprune_fx.zoo import hf_opt

sys.path.insert(0, str(Path(__file__).parent))
from tasks import load_cnn  # noqa: E402


def accuracy(model, x, y, batch: int = 500) -> float:
    with torch.no_grad():
        return sum((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item()
                   for i in range(0, len(x), batch)) / len(x)


def cnn_rows(alpha: float, ks: list[int], test_images: int) -> list[dict]:
    model = load_cnn("resnet")
    x, y = load_fashion_mnist("test", limit=test_images)
    dense = accuracy(model, x, y)
    rows = []
    for k in ks:
        compiled = exprune_fx.compile(model, x[:4], Config(alpha=alpha, k=k))
        acc = accuracy(compiled, x, y)
        stats = compiled.exprune_stats()
        rows.append({"model": "ResidualCNN / Fashion-MNIST test", "alpha": alpha, "k": k,
                     "dense_metric": dense, "metric": acc, "reduction": stats["reduction"],
                     "sites": {n: round(s["prune_rate"], 4) for n, s in stats["sites"].items()},
                     "dense_flops_per_image": stats["dense_flops"] / len(x)})
        print(compiled.report())
    return rows


def opt_rows(alpha: float, ks: list[int]) -> list[dict]:
    model, inputs = hf_opt(batch=2)
    ids = torch.randint(0, 96, (64, 8), generator=torch.Generator().manual_seed(1))
    rows = []
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits.argmax(-1)
    for k in ks:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = exprune_fx.compile(model, inputs, Config(alpha=alpha, k=k), outputs={"logits": "argmax"})
        with torch.no_grad():
            agree = (compiled(input_ids=ids, use_cache=False).logits.argmax(-1) == ref).float().mean().item()
        stats = compiled.exprune_stats()
        rows.append({"model": "HF OPT small (random weights, random tokens)", "alpha": alpha, "k": k,
                     "dense_metric": 1.0, "metric": agree, "reduction": stats["reduction"],
                     "sites": {n: round(s["prune_rate"], 4) for n, s in stats["sites"].items()}})
        print(compiled.report())
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--k", type=int, nargs="*", default=[8, 16])
    parser.add_argument("--test", type=int, default=10000, help="test images to evaluate the CNN on")
    args = parser.parse_args(argv)
    rows = cnn_rows(args.alpha, args.k, args.test) + opt_rows(args.alpha, args.k)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "prune_effect.json").write_text(json.dumps(rows, indent=2))
    table = ("| model | alpha | k | dense metric | metric | whole-model FLOPs reduction | per-site prune rates |\n"
             "|---|---:|---:|---:|---:|---:|---|\n" + "".join(
                 f"| {r['model']} | {r['alpha']} | {r['k']} | {r['dense_metric']:.4f} | {r['metric']:.4f} "
                 f"| {r['reduction']:.2%} | {', '.join(f'{n} {p:.1%}' for n, p in r['sites'].items())} |\n"
                 for r in rows))
    (args.out / "prune_effect.md").write_text(table)
    print(table)
    return rows


if __name__ == "__main__":
    main()
