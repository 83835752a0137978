"""Wall-clock time against the dense model: does the clock see the FLOPs that ExPrune skips?

For each case, six variants run side by side in one process, repetitions interleaved (each
repetition runs every variant once, in a random order), and each reports its median wall time
and the median of its per-repetition ratios to dense eager:

* ``dense eager``: the original model;
* ``dense inductor``: ``torch.compile(model)`` (inductor, CPU);
* ``dense graph``: the model through ``exprune_fx.compile`` with every site disabled (the
  exported graph's own cost, without ExPrune);
* ``count-only``: the ExPrune graph on the reference kernels (``fast.use("reference")``):
  the simulation, which counts skipped work but does not skip it;
* ``fast``: the same graph on the fast kernels where the cost model picks them
  (``fast.use("auto")``): the same decisions as count-only;
* ``fastest``: ``fast.use("fastest")``: per call, the row-wise kernel where the cost model
  says it beats the dense layer, else the dense layer (that call prunes nothing); conv and
  argmax sites run dense. Its accuracy and FLOPs reduction are measured at the row's batch
  size (they depend on it) and reported beside the others;
* ``fastest + inductor``: the same, the rewritten graph compiled by inductor around the runtime
  ops (``compiled.set_inner("inductor")``, what ``torch.compile(model, backend="exprune")``
  runs per graph): set against ``dense inductor``, it says whether ExPrune adds to what the
  compiler gives.

For the CNNs it also reports, per convolution site, the share of its output tiles (channels x
consecutive positions) whose outputs are all pruned: the most a remainder kernel that skips
whole tiles could skip (:func:`conv_tile_rows`).

``realization`` = (1 - fast time / dense time) / (whole-model FLOPs reduction), for the fast
variant (and the same for fastest, with its own reduction): 100% means the clock sees every
FLOP skipped. FLOPs are 2 x multiply-accumulates.

Cases (configs chosen at <= 1% accuracy drop on a validation split, reported on a test split):

* ``mlp``: a ReLU MLP 784-1024-1024-10 trained here on Fashion-MNIST (seeded, one epoch),
  batch 1 and 32;
* ``resnet``, ``vgg``: the shipped Fashion-MNIST CNNs, batch 1 and 32;
* ``opt_lm decode``: one KV-cache decode step (batch 1, one new token) of the byte-level OPT
  LM after a context of 8 and of 100 tokens. Its config is one global ``alpha`` chosen on the
  full-sequence model's validation windows (an FFN site decides per token, so the decisions
  are those of the decode step).

    python benchmarks/wallclock.py --out bench-out [--cases mlp resnet vgg opt_lm] [--repeats 50]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import statistics
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import exprune_fx
from exprune_fx import Config
from exprune_fx.datasets import load_fashion_mnist
from exprune_fx.runtime import fast
from exprune_fx.runtime.counters import new_counters, read

sys.path.insert(0, str(Path(__file__).parent))
import tasks  # noqa: E402
from exprune_fx.timing import interleaved_times  # noqa: E402
from calibration import _call, evaluate  # noqa: E402

CASES = ("mlp", "resnet", "vgg", "opt_lm")
COMPILED_PAIRS = {"fastest + inductor": "dense inductor"}
VARIANTS = ("dense eager", "dense inductor", "dense graph", "count-only", "fast", "fastest", "fastest + inductor")


def side_by_side(fns: dict, inputs, repeats: int, seed: int = 0) -> dict:
    """Median seconds per variant and the median of per-repetition ratios to the first, the
    repetitions interleaved in a random order (:func:`timing.interleaved_times`)."""
    names = list(fns)
    times = interleaved_times({name: functools.partial(fn, inputs) for name, fn in fns.items()}, repeats,
                              random.Random(seed))
    base = times[names[0]]
    out = {name: {"median_ms": 1e3 * statistics.median(t),
                  "ratio": statistics.median(a / b for a, b in zip(t, base))} for name, t in times.items()}
    for name, baseline in COMPILED_PAIRS.items():  # a compiled variant against its dense counterpart too
        if name in times and baseline in times:
            out[name]["ratio_to_" + baseline.replace(" ", "_")] = statistics.median(
                a / b for a, b in zip(times[name], times[baseline]))
    return out


def variants(model, compiled, example) -> dict:
    """The variants as callables on one input; ``example`` is what ``compiled`` was compiled on.
    Dynamo's caches are cleared first: ``torch.compile(model)`` for another batch size would
    otherwise share the cache of ``model.forward`` with the earlier one, and recompile it for a
    dynamic batch axis (slower code, and the old entry checked on every call)."""
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inductor = torch.compile(model, backend="inductor")
        no_sites = Config(sites={s.name: {"enabled": False} for s in compiled.sites})
        graph = exprune_fx.compile(model, example, no_sites)
        under_inductor = exprune_fx.compile(model, example, compiled.config)
    under_inductor.set_inner("inductor")

    def with_kernels(setting, which=compiled):
        def run(inputs):
            with fast.use(setting):
                return _call(which, inputs)
        return run

    return {"dense eager": lambda i: _call(model, i), "dense inductor": lambda i: _call(inductor, i),
            "dense graph": lambda i: _call(graph, i), "count-only": with_kernels("reference"), "fast": with_kernels("auto"),
            "fastest": with_kernels("fastest"), "fastest + inductor": with_kernels("fastest", under_inductor)}


def flops_reduction(compiled, inputs, setting: str = "reference") -> float:
    """Whole-model FLOPs reduction over ``inputs`` (one call, or a list of calls) under a setting."""
    compiled.reset_stats()
    with torch.no_grad(), fast.use(setting):
        for one in inputs if isinstance(inputs, list) else [inputs]:
            _call(compiled, one)
    return compiled.exprune_stats()["reduction"]


def _realization(ratio: float, reduction: float):
    return (1 - ratio) / reduction if reduction > 0 else None


def row(case: str, batch, timing: dict, reduction: float, extra: dict) -> dict:
    """``extra`` may carry ``fastest_reduction`` (the fastest variant's own FLOPs reduction)."""
    out = {"case": case, "batch": batch, "flops_reduction": reduction, "timing": timing,
           "realization": _realization(timing["fast"]["ratio"], reduction), **extra}
    if "fastest_reduction" in extra:
        out["fastest_realization"] = _realization(timing["fastest"]["ratio"], extra["fastest_reduction"])
        # under inductor, against dense inductor (the same decisions as fastest, up to float rounding)
        out["inductor_realization"] = _realization(timing["fastest + inductor"]["ratio_to_dense_inductor"],
                                                   extra["fastest_reduction"])
    return out


class OpCalls(torch.fx.Interpreter):
    """Runs a graph and keeps the arguments and the result of every call of ``op`` (an op
    overload)."""

    def __init__(self, gm, op):
        super().__init__(gm)
        self.op = op
        self.calls, self.results = [], []

    def call_function(self, target, args, kwargs):
        out = super().call_function(target, args, kwargs)
        if target is self.op:
            self.calls.append(args)
            self.results.append(out)
        return out


def site_rows(case: str, compiled, inputs, repeats: int) -> list[dict]:
    """Each linear ReLU site alone, on its real input: the fast and the reference op against
    the dense layer it replaced (``relu(a * x @ W.T + c)``), and its own FLOPs reduction. The
    op's kernel is called as a compiled model calls it (exprune_fx/fastcall.py: directly, not
    through the dispatcher), and every variant, dense included, runs inside the same kernel
    setting switch, so that only their work differs."""
    from torch.utils._pytree import tree_flatten

    from exprune_fx.runtime.ops import PYTHON_KERNELS

    kernel = PYTHON_KERNELS[torch.ops.exprune.relu_linear.default]

    gm = compiled.graph_module
    flat = tree_flatten(((inputs,), {}))[0]
    with torch.no_grad(), fast.use("reference"):
        recorder = OpCalls(gm, torch.ops.exprune.relu_linear.default)
        recorder.run(*flat)
    rows = []
    for args in recorder.calls:
        x, weight, scale, offset, unit, k, test, critical, _, stages = args
        counters = {setting: new_counters() for setting in ("reference", "auto", "fastest")}

        def dense(_):
            with fast.use("auto"):
                z = F.linear(x, weight) * scale
                return torch.relu(z if offset is None else z + offset)

        def op(setting):
            def run(_):
                with fast.use(setting):
                    return kernel(x, weight, scale, offset, unit, k, test, critical, counters[setting], stages)
            return run

        timing = side_by_side({"dense eager": dense, "count-only": op("reference"), "fast": op("auto"),
                               "fastest": op("fastest")}, None, repeats)
        c = read(counters["reference"])
        reduction = _site_reduction(counters["reference"])
        rows.append({"case": case, "site_shape": list(weight.shape), "rows": int(x.reshape(-1, x.shape[-1]).shape[0]),
                     "prune_rate": c["pruned"] / c["outputs"], "flops_reduction": reduction, "timing": timing,
                     "realization": _realization(timing["fast"]["ratio"], reduction),
                     # the fastest op with its own reduction: it runs dense where pruning does not pay
                     "fastest_realization": _realization(timing["fastest"]["ratio"],
                                                         _site_reduction(counters["fastest"]))})
    return rows


# Output tiles a convolution kernel could skip whole: (output channels, consecutive positions in
# raster order); None = the whole map. A vector kernel computes 16 channels (AVX-512 lanes) or
# 16 positions of one channel at once; the C++ head kernel's task is 32 channels x 4 positions.
CONV_TILES = {"1 x 1": (1, 1), "1 x 4": (1, 4), "1 x 16": (1, 16), "16 x 4": (16, 4), "32 x 4": (32, 4),
              "map": (1, None)}


def pruned_tile_share(pruned: torch.Tensor, channels: int, positions: int | None) -> float:
    """The share of (image, channel block, position block) tiles of a convolution's output whose
    outputs are all pruned: the remainder work a kernel skipping whole tiles could skip.
    ``pruned`` [B, C, H, W] bool; a partial tile at the end of a map or of the channels counts
    its missing outputs as pruned (an upper bound).

    >>> p = torch.zeros(1, 2, 2, 2, dtype=torch.bool); p[0, 0] = True
    >>> pruned_tile_share(p, 1, 4), pruned_tile_share(p, 2, 4), pruned_tile_share(p, 1, 1)
    (0.5, 0.0, 0.5)
    """
    b, c, h, w = pruned.shape
    positions = positions or h * w
    cp, lp = -(-c // channels) * channels, -(-(h * w) // positions) * positions
    padded = torch.ones(b, cp, lp, dtype=torch.bool)
    padded[:, :c, :h * w] = pruned.reshape(b, c, h * w)
    tiles = padded.view(b, cp // channels, channels, lp // positions, positions).all(4).all(2)
    return tiles.float().mean().item()


def conv_tile_rows(case: str, compiled, inputs) -> list[dict]:
    """Each convolution ReLU site's pruned outputs on real inputs (the reference kernel's
    decisions; its output is exactly 0 where pruned), as shares of whole tiles
    (:data:`CONV_TILES`). Tiles lie within one image, so the shares hold at any batch size."""
    from torch.utils._pytree import tree_flatten

    with torch.no_grad(), fast.use("reference"):
        recorder = OpCalls(compiled.graph_module, torch.ops.exprune.relu_conv2d.default)
        recorder.run(*tree_flatten(((inputs,), {}))[0])
    rows = []
    for args, out in zip(recorder.calls, recorder.results):
        x, weight = args[0], args[1]
        rows.append({"case": case, "site_shape": list(weight.shape), "input_shape": list(x.shape[1:]),
                     "k": int(args[9]), "images": int(x.shape[0]),
                     "tiles": {name: pruned_tile_share(out == 0, *t) for name, t in CONV_TILES.items()}})
    return rows


def _site_reduction(counters: torch.Tensor) -> float:
    """One site's FLOPs reduction from its counters: 1 - (partial + test + remainder) / dense."""
    c = read(counters)
    return 1 - (c["partial"] + c["test"] + c["remainder"]) / c["dense"]


def train_mlp(seed: int = 0) -> torch.nn.Module:
    """A ReLU MLP 784-1024-1024-10, one epoch of Adam on the first 50000 training images."""
    x, y = load_fashion_mnist("train", limit=50000)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 1024), torch.nn.ReLU(),
                                torch.nn.Linear(1024, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for i in torch.randperm(len(x)).split(128):
        opt.zero_grad()
        F.cross_entropy(model(x[i]), y[i]).backward()
        opt.step()
    return model.eval()


def image_case(name: str, model, repeats: int, val: int, test: int) -> list[dict]:
    xv, yv = load_fashion_mnist("train")
    xt, yt = load_fashion_mnist("test", limit=test)
    val_data = tasks.batches(xv[55000:55000 + val], yv[55000:55000 + val], 50)
    test_data = tasks.batches(xt, yt, 500)
    compiled = exprune_fx.compile(model, xv[:4])
    # statistical mode only: exact and hybrid mode have no fast kernel (they save FLOPs, not time)
    cal = exprune_fx.calibrate(compiled, val_data, max_drop=0.01, exact=False, hybrid=False, progress=False)
    dense_acc, acc = evaluate(model, test_data, None), evaluate(cal.compiled, test_data, None)
    rows = []
    for batch in (1, 32):
        inputs = xt[:batch]
        timing = side_by_side(variants(model, cal.compiled, xv[:4]), inputs, repeats)
        at_batch = tasks.batches(xt[:512], yt[:512], batch)  # "fastest" decides per call: measured at this batch
        with fast.use("fastest"):
            fastest_acc = evaluate(cal.compiled, at_batch, None)
        rows.append(row(name, batch, timing, flops_reduction(cal.compiled, xt[:500]),
                        {"dense_accuracy": dense_acc, "accuracy": acc, "fastest_accuracy_512": fastest_acc,
                         "fastest_reduction": flops_reduction(cal.compiled, [x for x, _ in at_batch], "fastest"),
                         "sites": [s.name for s in cal.compiled.rewritten_sites],
                         "linear_sites": site_rows(name, cal.compiled, inputs, repeats)}))
    rows[-1]["conv_tiles"] = conv_tile_rows(name, cal.compiled, xt[:64])
    return rows


def lm_case(repeats: int, contexts=(8, 100)) -> list[dict]:
    from transformers import DynamicCache

    task = tasks.lm_task(val=200, test=200)
    model = task.model
    dense_test = evaluate(model, task.test, task.metric)
    chosen, acc, dense_val = None, dense_test, evaluate(model, task.val, task.metric)
    for alpha in (0.05, 0.01, 0.001):  # the largest alpha whose validation drop is within 1%
        compiled = exprune_fx.compile(model, task.example, Config(alpha=alpha, k=32))
        if dense_val - evaluate(compiled, task.val, task.metric) <= 0.01:
            chosen, acc = alpha, evaluate(compiled, task.test, task.metric)
            break
    chosen = 0.0 if chosen is None else chosen

    def cache_of(kv):
        cache = DynamicCache(ddp_cache_data=[(None, None)] * (len(kv) // 2))
        for layer, k, v in zip(cache.layers, kv[0::2], kv[1::2]):
            layer.dtype, layer.device, layer.keys, layer.values, layer.is_initialized = k.dtype, k.device, k, v, True
        return cache

    class DecodeStep(torch.nn.Module):
        """(new token [1, 1], per-layer keys and values) -> logits of the new token."""

        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, *kv):
            return self.lm(input_ids=input_ids, past_key_values=cache_of(kv), use_cache=True).logits

    rows = []
    windows = task.test[0][0]["input_ids"]
    for context in contexts:
        prompt = windows.reshape(-1)[:context + 1].unsqueeze(0)
        with torch.no_grad():
            past = model(input_ids=prompt[:, :context], use_cache=True).past_key_values
        kv = tuple(t.clone() for layer in past.layers for t in (layer.keys, layer.values))
        step = DecodeStep(model).eval()
        inputs = (prompt[:, context:context + 1], *kv)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = exprune_fx.compile(step, inputs, Config(alpha=chosen, k=32))
        timing = side_by_side(variants(step, compiled, inputs), inputs, repeats)
        rows.append(row(f"opt_lm decode, context {context}", 1, timing, flops_reduction(compiled, inputs),
                        {"dense_accuracy": dense_test, "accuracy": acc, "alpha": chosen,
                         "fastest_reduction": flops_reduction(compiled, inputs, "fastest"),
                         "sites": [s.name for s in compiled.rewritten_sites]}))
    return rows


def _percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def markdown(rows: list[dict], machine: str) -> str:
    lines = [f"Machine: {machine}", "",
             "| case | batch | accuracy (dense -> ExPrune) | FLOPs reduction | " +
             " | ".join(f"{v} ms (x dense)" for v in VARIANTS) + " | realization |",
             "|---|---:|---|---:|" + "---:|" * len(VARIANTS) + "---:|"]
    for r in rows:
        t = r["timing"]
        real = _percent(r["realization"])
        lines.append(f"| {r['case']} | {r['batch']} | {r['dense_accuracy']:.4f} -> {r['accuracy']:.4f} | "
                     f"{100 * r['flops_reduction']:.2f}% | " +
                     " | ".join(f"{t[v]['median_ms']:.3f} (x{t[v]['ratio']:.2f})" for v in VARIANTS) +
                     f" | {real} |")
    lines += ["", "The fastest variant: its own FLOPs reduction and realization at the row's batch size "
              "(its accuracy on the first 512 test images at that batch size); under inductor, its time "
              "against dense inductor and the realization that gives:", "",
              "| case | batch | fastest ms (x dense) | FLOPs reduction | realization | accuracy (512 images) | "
              "fastest + inductor ms (x dense inductor) | realization vs inductor |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        t, real = r["timing"]["fastest"], r.get("fastest_realization")
        ti = r["timing"]["fastest + inductor"]
        acc = r.get("fastest_accuracy_512")
        lines.append(f"| {r['case']} | {r['batch']} | {t['median_ms']:.3f} (x{t['ratio']:.2f}) | "
                     f"{100 * r.get('fastest_reduction', 0.0):.2f}% | "
                     f"{_percent(real)} | {'-' if acc is None else f'{acc:.4f}'} | "
                     f"{ti['median_ms']:.3f} (x{ti['ratio_to_dense_inductor']:.2f}) | "
                     f"{_percent(r.get('inductor_realization'))} |")
    sites = [(r, s) for r in rows for s in r.get("linear_sites", [])]
    if sites:
        lines += ["", "Linear ReLU sites alone, on their real inputs (the op against the dense layer it replaced):", "",
                  "| case | site (N x K) | rows | prune rate | site FLOPs reduction | dense ms | count-only (x dense) | "
                  "fast (x dense) | realization | fastest (x dense) | fastest realization |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

        for r, s in sites:
            t = s["timing"]
            lines.append(f"| {r['case']} | {s['site_shape'][0]} x {s['site_shape'][1]} | {s['rows']} | "
                         f"{100 * s['prune_rate']:.1f}% | {100 * s['flops_reduction']:.2f}% | "
                         f"{t['dense eager']['median_ms']:.3f} | x{t['count-only']['ratio']:.2f} | "
                         f"x{t['fast']['ratio']:.2f} | {_percent(s['realization'])} | x{t['fastest']['ratio']:.2f} | "
                         f"{_percent(s.get('fastest_realization'))} |")
    convs = [s for r in rows for s in r.get("conv_tiles", [])]
    if convs:
        lines += ["", "Convolution ReLU sites: the share of output tiles (channels x consecutive positions) "
                  f"pruned whole, on {convs[0]['images']} test images (what a kernel skipping whole tiles "
                  "could skip of the remainder):", "",
                  "| case | site (Cout x Cin x kh x kw) | input (C x H x W) | k | " + " | ".join(CONV_TILES) + " |",
                  "|---|---|---|---:|" + "---:|" * len(CONV_TILES)]
        for s in convs:
            lines.append(f"| {s['case']} | {' x '.join(map(str, s['site_shape']))} | "
                         f"{' x '.join(map(str, s['input_shape']))} | {s['k']} | " +
                         " | ".join(_percent(s["tiles"][name]) for name in CONV_TILES) + " |")
    return "\n".join(lines) + "\n"


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU") if Path("/proc/cpuinfo").exists() else "unknown CPU"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench-out")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--val", type=int, default=2000, help="validation images for the CNN/MLP calibration")
    parser.add_argument("--test", type=int, default=2000, help="test images for the reported accuracy")
    args = parser.parse_args(argv)
    if fast.module() is None:
        parser.error("the fast kernels could not be built (see the warning): nothing to compare")
    rows = []
    for case in args.cases:
        if case == "mlp":
            rows += image_case("mlp 784-1024-1024-10", train_mlp(), args.repeats, args.val, args.test)
        elif case == "opt_lm":
            rows += lm_case(args.repeats)
        else:
            rows += image_case(case, tasks.load_cnn(case), args.repeats, args.val, args.test)
        print(markdown(rows[-2:], machine()), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "wallclock.json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))
    (out / "wallclock.md").write_text(markdown(rows, machine()))
    print(markdown(rows, machine()))


if __name__ == "__main__":
    main()
