"""The main job (``make demo``, ``exprune-fx demo``): calibrate the shipped ResNet-style CNN
on Fashion-MNIST to an accuracy budget and report what it saves on held-out images.

1. load the checkpoint shipped in ``exprune_fx/checkpoints/resnet.pt`` (trained by
   ``benchmarks/train_cnns.py``) and Fashion-MNIST (``apt-get install dataset-fashion-mnist``);
2. compile it, check the symmetries the analysis found by permuting the weights, and
   calibrate (:func:`exprune_fx.calibrate`: k = 8, each output's largest-weight channels
   first, one threshold per output channel fitted on the data, ``test="fitted"``) to at
   most ``max_drop`` accuracy drop on the validation split (training images 55000 and up,
   which the model never trained on). Exact and hybrid mode are left out here: they save
   more (docs/benchmarks.md), but their reference convolution kernels cost several dense
   convolutions of wall-clock time, which takes the demo past 3 minutes on 2 cores;
3. print the per-site table, the test accuracy and the whole-model FLOPs reduction against
   the dense model (FLOPs = 2 x multiply-accumulates);
4. write the rewritten graph's dump (text, JSON, DOT, and SVG with graphviz), ``results.json``
   and two plots (per-site prune rates; validation accuracy against FLOPs saved over the
   calibration's steps) to the output folder.

Example:
    >>> from exprune_fx.demo import load_demo_model
    >>> model = load_demo_model()
    >>> sum(p.numel() for p in model.parameters())
    204650
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from .calibrate import calibrate
from .compiler import FLOPS_NOTE, ExPruneWarning
from .compiler import compile as compile_model
from .datasets import load_fashion_mnist
from .dump import graphviz_available, render_compiled, write_dump
from .errors import InputError
from .symmetry import check_symmetry
from .zoo import ResidualCNN

CHECKPOINT = Path(__file__).parent / "checkpoints" / "resnet.pt"
VALIDATION_START = 55000  # training images [55000, 60000) are never trained on
NAME = "resnet_rewritten"


def load_demo_model() -> torch.nn.Module:
    """The shipped ResNet-style CNN (Fashion-MNIST, 1x28x28 inputs), in eval mode."""
    if not CHECKPOINT.is_file():
        raise InputError(f"{CHECKPOINT} is missing: reinstall exprune-fx, or retrain it with "
                         f"'python benchmarks/train_cnns.py --models resnet'")
    model = ResidualCNN()
    model.load_state_dict(torch.load(CHECKPOINT, weights_only=True))
    return model.eval()


def _batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list:
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def _accuracy(model, data) -> float:
    with torch.no_grad():
        return sum((model(x).argmax(1) == y).sum().item() for x, y in data) / sum(len(y) for _, y in data)


def check_sizes(val: int, test: int, max_drop: float) -> None:
    """Refuse settings the demo cannot honour, saying which."""
    if not 50 <= val <= 5000:
        raise InputError(f"val must be between 50 and 5000 validation images (got {val})")
    if not 1 <= test <= 10000:
        raise InputError(f"test must be between 1 and 10000 test images (got {test})")
    if not 0 <= max_drop < 1:
        raise InputError(f"max-drop must be a fraction in [0, 1) (got {max_drop})")


def run(out: str | Path = "demo-out", val: int = 1000, test: int = 10000, max_drop: float = 0.01,
        seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Run the demo; print as it goes; return (and write to ``out/results.json``) the results."""
    check_sizes(val, test, max_drop)
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = load_demo_model()
    xv, yv = load_fashion_mnist("train")
    xt, yt = load_fashion_mnist("test", limit=test)
    val_batches = _batches(xv[VALIDATION_START:VALIDATION_START + val], yv[VALIDATION_START:VALIDATION_START + val], 50)
    test_batches = _batches(xt, yt, 500)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExPruneWarning)
        compiled = compile_model(model, xt[:4])
    failures = check_symmetry(model, xt[:4], compiled.analysis)
    free = sum(1 for c in compiled.analysis.free_classes if c.parameters)
    sites = compiled.analysis.sites
    exact = sum(s.exact_reason is None for s in sites)
    print(f"ResNet-style CNN, {len(sites)} reduction sites ({sum(s.eligible for s in sites)} eligible for "
          f"ExPrune, {exact} for exact mode); symmetry check: permuted {free} free classes, {len(failures)} failures")
    for failure in failures:
        print(f"  {failure}")

    print(f"calibrating to at most {max_drop:.1%} accuracy drop on {val} validation images ...")
    result = calibrate(compiled, val_batches, max_drop=max_drop, ks=(8,), test="fitted", order="magnitude",
                       prices=(0.05, 0.1, 0.2, 0.4), exact=False, hybrid=False, seed=seed, progress=progress)
    final = result.compiled
    dense_acc = _accuracy(model, test_batches)
    final.reset_stats()
    acc = _accuracy(final, test_batches)
    stats = final.exprune_stats()

    print()
    print(final.report())
    print()
    rows = stats["rows"]
    summary = {
        "test_images": test, "validation_images": val, "max_drop": max_drop,
        "dense_accuracy": dense_acc, "accuracy": acc, "accuracy_drop": dense_acc - acc,
        "dense_mflops_per_image": stats["dense_flops"] / rows / 1e6,
        "executed_mflops_per_image": stats["executed_flops"] / rows / 1e6,
        "flops_reduction": stats["reduction"], "validation_dense_accuracy": result.report["dense_metric"],
        "validation_drop": result.report["metric_drop"],
        "calibration_evaluations": result.report["evaluations"], "calibration_seconds": result.report["seconds"],
        "symmetry_failures": len(failures),
        "sites": {name: {"k": s["k"], "test": s["test"], "prune_rate": s["prune_rate"]}
                  for name, s in stats["sites"].items()},
        "calibration_steps": result.report["steps"],
    }
    print(f"test accuracy: dense {dense_acc:.4f}, ExPrune {acc:.4f} (drop {dense_acc - acc:+.2%}; "
          f"budget {max_drop:.1%} on validation, where it dropped {result.report['metric_drop']:.2%})")
    print(f"FLOPs per image: dense {summary['dense_mflops_per_image']:.2f} M, executed "
          f"{summary['executed_mflops_per_image']:.2f} M: whole-model reduction {stats['reduction']:.2%} "
          f"({FLOPS_NOTE})")
    print(f"calibration: {result.report['evaluations']} full-validation evaluations in "
          f"{result.report['seconds']:.0f} s")

    written = _write_outputs(Path(out), final, summary)
    summary["seconds"] = time.perf_counter() - start
    (Path(out) / "results.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {', '.join(str(p) for p in written + [Path(out) / 'results.json'])} "
          f"in {summary['seconds']:.0f} s in all")
    return summary


def _write_outputs(out: Path, compiled, summary: dict) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = [write_dump(render_compiled(compiled, fmt), fmt, out / f"{NAME}{ext}")
               for fmt, ext in (("text", ".txt"), ("json", ".json"), ("dot", ".dot"))]
    if graphviz_available():
        svg = write_dump(render_compiled(compiled, "dot"), "dot", out / f"{NAME}.svg")
        if svg.suffix == ".svg":
            written.append(svg)
    try:
        written += _plots(out, summary)
    except ImportError:
        print("(install matplotlib to also get the plots)")
    return written


def _plots(out: Path, summary: dict) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    names = list(summary["sites"])
    ax.bar(names, [summary["sites"][n]["prune_rate"] for n in names], color="tab:blue")
    ax.set_ylabel("prune rate (test)")
    ax.set_title(f"per-site prune rate; whole-model FLOPs reduction {summary['flops_reduction']:.1%}")
    ax.tick_params(axis="x", rotation=45, labelsize=7)
    fig.tight_layout()
    rates = out / "prune_rates.png"
    fig.savefig(rates, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    steps = summary["calibration_steps"]
    for accepted, color, label in ((True, "tab:green", "accepted"), (False, "tab:red", "rejected")):
        pts = [(s["reduction"], s["metric"]) for s in steps if s["accepted"] == accepted]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=color, label=label, s=18)
    ax.axhline(summary["validation_dense_accuracy"] - summary["max_drop"], color="gray", linestyle=":",
               label="dense - budget")
    ax.set_xlabel("whole-model FLOPs reduction")
    ax.set_ylabel("validation accuracy")
    ax.set_title("calibration steps")
    ax.legend(fontsize=8)
    fig.tight_layout()
    steps_path = out / "calibration.png"
    fig.savefig(steps_path, dpi=110)
    plt.close(fig)
    return [rates, steps_path]
