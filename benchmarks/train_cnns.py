"""Train the Fashion-MNIST CNNs the benchmarks and the demo use, reproducibly.

    python benchmarks/train_cnns.py [--out DIR] [--epochs 1] [--seed 0]

Without ``--out``, the ResNet-style model (the demo's) goes to ``exprune_fx/checkpoints``
(shipped in the package) and the VGG models to ``benchmarks/checkpoints``.

Seeded (model initialisation and data order), Adam at 2e-3, batch 128, on the first 55000
training images (the last 5000 are the validation split used for calibration); batch-norm
statistics are then re-estimated on 10000 training images with the final weights. Writes
``{name}.pt`` (a state dict, float32) and ``{name}.json`` (accuracy on the 10000 test
images, seconds, settings) per model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from exprune_fx.datasets import load_fashion_mnist
from exprune_fx.demo import CHECKPOINT as DEMO_CHECKPOINT
from exprune_fx.zoo import ResidualCNN, VGGStyle

MODELS = {
    "vgg_bn": lambda: VGGStyle(batch_norm=True),
    "vgg": lambda: VGGStyle(batch_norm=False),
    "resnet": lambda: ResidualCNN(),
}
TRAIN_SPLIT = 55000  # images [55000, 60000) of the training file are the validation split


def recalibrate_batch_norm(model: torch.nn.Module, x: torch.Tensor, batch: int = 500) -> None:
    """Exact running statistics for the final weights (the exponential averages lag)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if not norms:
        return
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for i in range(0, len(x), batch):
            model(x[i:i + batch])
    for m in norms:
        m.momentum = 0.1


def accuracy(model, x, y, batch: int = 1000) -> float:
    with torch.no_grad():
        return sum((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item()
                   for i in range(0, len(x), batch)) / len(x)


def train(name: str, epochs: int, seed: int) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(seed)
    model = MODELS[name]()
    x, y = load_fashion_mnist("train")
    x, y = x[:TRAIN_SPLIT], y[:TRAIN_SPLIT]
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    start = time.time()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 128):
            idx = order[i:i + 128]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    recalibrate_batch_norm(model, x[:10000])
    model.eval()
    xt, yt = load_fashion_mnist("test")
    info = {"model": name, "epochs": epochs, "seed": seed, "seconds": round(time.time() - start, 1),
            "test_accuracy": accuracy(model, xt, yt), "torch": torch.__version__}
    return model, info


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    args = parser.parse_args(argv)
    for name in args.models:
        out = args.out or (DEMO_CHECKPOINT.parent if name == "resnet" else Path(__file__).parent / "checkpoints")
        out.mkdir(parents=True, exist_ok=True)
        model, info = train(name, args.epochs, args.seed)
        torch.save(model.state_dict(), out / f"{name}.pt")
        (out / f"{name}.json").write_text(json.dumps(info, indent=2))
        print(json.dumps(info))


if __name__ == "__main__":
    main()
