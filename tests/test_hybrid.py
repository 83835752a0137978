"""Hybrid mode: the statistical test at k terms, then exact early exit on the remainder."""

import math

import pytest
import torch
from archgen import architectures
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import exprune_fx
from exprune_fx import Config, InputError
from exprune_fx.runtime.counters import new_counters, read
from exprune_fx.runtime.exact import sign_order
from exprune_fx.runtime.hybrid import hybrid_relu_conv2d, hybrid_relu_linear
from exprune_fx.runtime.kernels import STATS, THRESHOLD, relu_conv2d, relu_linear
from exprune_fx.zoo import residual_cnn
from test_exact import compile_quietly, run


def reference_counts(x, w, a, c, unit: int, k: int, threshold: float, interval: int) -> dict:
    """Per output, one at a time in plain Python: the threshold test on the first k terms,
    then positive rest terms, then negative ones (most negative folded weight first),
    checking the running sum before every block of ``interval``."""
    rows, big_k = x.shape
    kh, n = k * unit, big_k // unit
    counts = dict(pruned=0, partial=0, test=0, remainder=0)
    for i in range(rows):
        for j in range(w.shape[0]):
            s1 = float(x[i, :kh] @ w[j, :kh])
            counts["partial"] += kh
            counts["test"] += 2
            if a[j] * s1 / k + c[i, j] / n < threshold:
                counts["pruned"] += 1
                continue
            folded = a[j] * w[j, kh:]
            positive = folded > 0
            running = a[j] * s1 + c[i, j] + float(x[i, kh:][positive] @ folded[positive])
            counts["remainder"] += int(positive.sum())
            negative = sorted((float(f), t) for t, f in enumerate(folded.tolist()) if f < 0)
            for lo in range(0, len(negative), interval):
                counts["test"] += 1
                if running < 0:
                    counts["pruned"] += 1
                    break
                block = negative[lo:lo + interval]
                running += sum(f * float(x[i, kh + t]) for f, t in block)
                counts["remainder"] += len(block)
    return counts


def _layer(g, rows, outputs, big_k, negative_scale):
    w = torch.randn(outputs, big_k, generator=g, dtype=torch.float64)
    x = torch.rand(rows, big_k, generator=g, dtype=torch.float64) * (torch.rand(rows, big_k, generator=g) > 0.3)
    a = torch.rand(outputs, generator=g, dtype=torch.float64) + 0.5
    if negative_scale:
        a = -a
    c = torch.randn(rows, outputs, generator=g, dtype=torch.float64)
    return x, w, a, c


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(1, 7), st.sampled_from([1, 2, 3]), st.integers(2, 6), st.integers(3, 12),
       st.integers(1, 9), st.sampled_from([-math.inf, -0.1, 0.0, 0.2, math.inf]), st.booleans(),
       st.integers(0, 2**16))
def test_hybrid_linear_kernel_equals_the_test_then_exact_reference(rows, outputs, unit, k, n, interval, threshold,
                                                                   negative_scale, seed):
    """relu(hybrid) == relu(statistical kernel) (it prunes what the test prunes and stops only
    outputs that are negative), and every counter equals a per-output Python reference;
    thresholds of +-inf make every mask empty or full."""
    n = max(n, k + 1)
    g = torch.Generator().manual_seed(seed)
    x, w, a, c = _layer(g, rows, outputs, n * unit, negative_scale)
    kh = k * unit
    stats = new_counters()
    layouts = sign_order(a.view(-1, 1) * w[:, kh:])
    z = hybrid_relu_linear(x, w[:, :kh], a, c, *layouts, unit, k, THRESHOLD, torch.tensor(threshold), interval,
                           stats)
    statistical = relu_linear(x, w, a, c, unit, k, THRESHOLD, torch.tensor(threshold), new_counters())
    torch.testing.assert_close(z.relu(), statistical.relu())
    got, want = read(stats), reference_counts(x, w, a, c, unit, k, threshold, interval)
    assert {name: got[name] for name in want} == want
    assert got["dense"] == rows * outputs * n * unit


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 2), st.integers(3, 6), st.integers(1, 5), st.sampled_from([1, 3]), st.integers(2, 3),
       st.integers(1, 9), st.sampled_from([-math.inf, -0.05, 0.0, math.inf]), st.sampled_from([0, 1]),
       st.integers(0, 2**16))
def test_hybrid_conv_kernel_equals_the_test_then_exact_reference(batch, cin, cout, size, k, interval, threshold,
                                                                 pad, seed):
    """The convolution kernel against the statistical one (outputs) and against the same
    reference on the unfolded input (counters): a conv output is a linear output whose
    terms are input channels' windows."""
    k = min(k, cin - 1)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(cout, cin, size, size, generator=g, dtype=torch.float64)
    x = torch.rand(batch, cin, 5, 5, generator=g, dtype=torch.float64)
    a = torch.rand(cout, generator=g, dtype=torch.float64) - 0.3
    offset = torch.randn(1, cout, 1, 1, generator=g, dtype=torch.float64)
    stats = new_counters()
    pos, order, neg, count = sign_order(a.view(-1, 1) * w[:, k:].reshape(cout, -1))
    geometry = ([1, 1], [pad, pad], [1, 1])
    z = hybrid_relu_conv2d(x, w[:, :k], a, offset, pos.reshape(w[:, k:].shape), order, neg, count, *geometry, 1, k,
                           THRESHOLD, torch.tensor(threshold), interval, stats)
    statistical = relu_conv2d(x, w, a, offset, *geometry, 1, 1, k, THRESHOLD, torch.tensor(threshold), new_counters())
    torch.testing.assert_close(z.relu(), statistical.relu())
    patches = torch.nn.functional.unfold(x, size, padding=pad).transpose(1, 2).reshape(-1, cin * size * size)
    positions = patches.shape[0] // batch
    c = offset.view(1, cout).expand(patches.shape[0], cout)
    want = reference_counts(patches, w.reshape(cout, -1), a, c, size * size, k, threshold, interval)
    got = read(stats)
    assert {name: got[name] for name in want} == want
    assert got["outputs"] == batch * cout * positions


def test_stats_test_prunes_what_statistical_mode_prunes():
    g = torch.Generator().manual_seed(0)
    x, w, a, c = _layer(g, 64, 16, 96, False)
    critical = torch.tensor(-1.0)
    stats = new_counters()
    z = hybrid_relu_linear(x, w[:, :16], a, c, *sign_order(a.view(-1, 1) * w[:, 16:]), 1, 16, STATS, critical, 32,
                           stats)
    statistical = relu_linear(x, w, a, c, 1, 16, STATS, critical, new_counters())
    torch.testing.assert_close(z.relu(), statistical.relu())
    assert read(stats)["test"] >= 64 * 16 * (16 + 4)  # the stats test's cost, plus the exact checks


def _residual():
    model, _ = residual_cnn()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(-1.5, 1.5)  # negative scales flip the folded signs
    return model, torch.rand(4, 1, 28, 28)


@pytest.mark.parametrize("order", ["natural", "magnitude"])
def test_hybrid_sites_on_the_residual_cnn(order):
    """Hybrid mode rewrites the sites exact mode can (with a reason for the others); pruning
    nothing it equals the dense model; at the same threshold it gives the statistical mode's
    outputs and saves at least as many MACs on these sites, in either term order."""
    model, x = _residual()
    nothing = compile_quietly(model, x[:2], Config(k=2, test="threshold", threshold=-math.inf, mode="hybrid",
                                                   order=order))
    assert all(r.order == order for r in nothing.rewritten_sites)
    exact = compile_quietly(model, x[:2], Config(k=2, mode="exact"))
    assert [r.name for r in nothing.rewritten_sites] == [r.name for r in exact.rewritten_sites]
    assert all(r.test == "threshold+exact" for r in nothing.rewritten_sites)
    assert all(r.reason.startswith("hybrid mode: ") for r in nothing.sites if not r.rewritten)
    torch.testing.assert_close(run(nothing, x), run(model, x), rtol=1e-4, atol=1e-4)
    sites = {r.name: {"mode": "hybrid"} for r in exact.rewritten_sites}
    hybrid = compile_quietly(model, x[:2], Config(k=2, test="threshold", threshold=0.0, sites=sites, order=order))
    statistical = compile_quietly(model, x[:2], Config(k=2, test="threshold", threshold=0.0, order=order))
    torch.testing.assert_close(run(hybrid, x), run(statistical, x), rtol=1e-4, atol=1e-4)
    h, s = hybrid.exprune_stats()["sites"], statistical.exprune_stats()["sites"]
    assert any(h[name]["pruned"] > s[name]["pruned"] for name in sites)  # kept outputs that stopped early
    for name in sites:
        assert h[name]["pruned"] >= s[name]["pruned"]
        assert h[name]["executed_macs"] <= s[name]["executed_macs"] + h[name]["test_macs"] - s[name]["test_macs"]


@settings(max_examples=40, deadline=None)
@given(architectures(), st.integers(2, 6), st.integers(1, 40), st.sampled_from(["natural", "magnitude"]))
def test_hybrid_mode_pruning_nothing_equals_the_dense_model(arch, k, interval, order):
    model, x = arch
    never = {"alpha": 0.0} if order == "natural" else {"test": "threshold", "threshold": -math.inf}
    compiled = compile_quietly(model, x, Config(mode="hybrid", k=k, interval=interval, order=order, **never))
    for batch in (x, torch.cat([x, -x, 3 * x])):
        torch.testing.assert_close(run(compiled, batch), run(model, batch), rtol=1e-4, atol=1e-4)


def test_hybrid_config_is_validated_saved_and_retunable(tmp_path):
    with pytest.raises(InputError, match="interval"):
        Config(interval=0)
    with pytest.raises(InputError, match="interval"):
        Config(sites={"conv2d_1": {"interval": 2.5}})
    model, x = _residual()
    compiled = compile_quietly(model, x[:2], Config(k=2, mode="hybrid", interval=5, alpha=0.0))
    site = compiled.rewritten_sites[0].name
    compiled.retune(site, alpha=0.2)
    exprune_fx.save(compiled, tmp_path / "m")
    loaded = exprune_fx.load(tmp_path / "m", model)
    assert loaded.config.mode == "hybrid" and loaded.config.interval == 5
    torch.testing.assert_close(run(loaded, x), run(compiled, x))


def test_pruned_weights_keep_the_sparse_kernel_and_calibration_falls_back():
    """A site whose weight has pruned (zero) terms is not rewritten in hybrid mode (the sparse
    kernel samples nonzero terms only), with a reason; calibrate() then profiles it in
    statistical mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    with torch.no_grad():
        model[2].weight[:, ::3] = 0
    x = torch.randn(256, 8)
    compiled = compile_quietly(model, x[:4], Config(k=8, mode="hybrid"))
    report = next(r for r in compiled.sites if r.name == "linear_1")
    assert not report.rewritten and "sparse kernel" in report.reason
    data = [(x[i:i + 64], model(x[i:i + 64]).argmax(1)) for i in range(0, 256, 64)]
    result = exprune_fx.calibrate(exprune_fx.compile(model, x[:4]), data, max_drop=1.0, ks=(8,), test="threshold",
                                  thresholds=(1.0,), exact=False, progress=False)
    assert all(s["mode"] == "statistical" for s in result.report["steps"] if s["site"] == "linear_1")
    assert any(s["site"] == "linear_1" for s in result.report["steps"])


@settings(max_examples=30, deadline=None)
@given(architectures(), st.integers(2, 6), st.sampled_from(["exact", "hybrid"]), st.sampled_from(["natural", "magnitude"]),
       st.booleans())
def test_fastest_runs_exact_and_hybrid_sites_dense(arch, k, mode, order, aggressive):
    """Under fast.use("fastest") an exact or hybrid site is one dense product with its whole
    folded weight (rebuilt from the layouts): the dense model's outputs whatever the settings,
    every site counted as run dense (nothing pruned, executed = dense)."""
    from exprune_fx.runtime import fast

    model, x = arch
    settings_ = {"test": "threshold", "threshold": 0.5 if aggressive else -math.inf} if mode == "hybrid" else {}
    if mode == "hybrid" and order == "natural" and not aggressive:
        settings_ = {"alpha": 0.0}
    compiled = compile_quietly(model, x, Config(mode=mode, k=k, order=order if mode == "hybrid" else "natural",
                                                **settings_))
    with fast.use("fastest"):
        for batch in (x, torch.cat([x, 3 * x])):
            compiled.reset_stats()
            torch.testing.assert_close(run(compiled, batch), run(model, batch), rtol=1e-4, atol=1e-4)
            for name, s in compiled.exprune_stats()["sites"].items():
                if s["calls"] and s["kind"] != "matmul":
                    assert s["pruned"] == 0 and s["executed_macs"] == pytest.approx(s["dense_macs"]), name


def test_the_dense_weight_is_built_once_per_layout_and_again_after_a_change():
    from exprune_fx.runtime import derived, exact

    w = torch.randn(8, 64)
    layouts = sign_order(w)
    built = []

    def build():
        built.append(1)
        return exact.unsorted(*layouts[:3])

    first = derived.built_once(layouts[:3], build)
    assert derived.built_once(layouts[:3], build) is first and len(built) == 1
    torch.testing.assert_close(first, w)
    layouts[0].mul_(1.0)  # an in-place change bumps the version: rebuilt
    assert derived.built_once(layouts[:3], build) is not first and len(built) == 2
    key_count = len(derived._BUILT)
    del first, layouts
    import gc
    gc.collect()
    assert len(derived._BUILT) <= key_count - 2  # freed layouts take their entries with them
