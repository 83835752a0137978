"""What the rewrite saves at alpha = 0.05: per-site prune rates and whole-model FLOPs.

* a small ResNet-style CNN (exprune_fx.zoo.ResidualCNN) trained here for one epoch on
  Fashion-MNIST (Debian package dataset-fashion-mnist), evaluated on the 10000 test images;
* HF OPTForCausalLM from a small config with random weights, on random tokens, with the LM
  head declared argmax-only (dominance prediction).

FLOPs are 2 x multiply-accumulates. Accuracy is measured, not assumed.

    python benchmarks/prune_effect.py --out bench-out
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import exprune_fx
from exprune_fx import Config
from exprune_fx.datasets import load_fashion_mnist
from exprune_fx.zoo import ResidualCNN, hf_opt


def train_cnn(out: Path, epochs: int = 1, seed: int = 0) -> ResidualCNN:
    path = out / f"residual_cnn_fmnist_e{epochs}_s{seed}.pt"
    torch.manual_seed(seed)
    model = ResidualCNN()
    if path.exists():
        model.load_state_dict(torch.load(path))
        return model.eval()
    x, y = load_fashion_mnist("train")
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 128):
            idx = order[i:i + 128]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    recalibrate_batch_norm(model, x[:10000])
    print(f"trained the CNN for {epochs} epoch(s) in {time.time() - t0:.0f} s")
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def recalibrate_batch_norm(model: torch.nn.Module, x: torch.Tensor, batch: int = 500) -> None:
    """Replace the running statistics by exact averages over ``x`` with the final weights
    (after one epoch at a high learning rate, the exponential averages lag behind)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for i in range(0, len(x), batch):
            model(x[i:i + batch])
    for m in norms:
        m.momentum = 0.1
    model.eval()


def accuracy(model, x, y, batch: int = 500) -> float:
    with torch.no_grad():
        return sum((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item()
                   for i in range(0, len(x), batch)) / len(x)


def cnn_rows(out: Path, alpha: float, ks: list[int]) -> list[dict]:
    model = train_cnn(out)
    x, y = load_fashion_mnist("test")
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
    args = parser.parse_args(argv)
    rows = cnn_rows(args.out, args.alpha, args.k) + opt_rows(args.alpha, args.k)
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
