"""Sparse-aware rewrite: samples are the first k nonzero terms, the cost rule, nonzero counting."""

import math
import warnings

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import exprune_fx
from exprune_fx import Config, ExPruneWarning, static
from exprune_fx.compiler import dense_flops
from exprune_fx.runtime.counters import new_counters, read
from exprune_fx.runtime.kernels import STATS, THRESHOLD
from exprune_fx.runtime.sparse import conv_layout, linear_layout, sparse_relu_conv2d, sparse_relu_matmul

NEVER, ALWAYS = torch.tensor(-math.inf), torch.tensor(math.inf)


def _sparse(shape, density, g):
    return torch.randn(*shape, generator=g) * (torch.rand(*shape, generator=g) < density)


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 5), st.integers(2, 60), st.integers(1, 8), st.integers(2, 8), st.floats(0.0, 1.0),
       st.integers(0, 2**16), st.sampled_from([STATS, THRESHOLD]), st.sampled_from(["natural", "magnitude"]))
def test_sparse_matmul_never_prune_is_dense(rows, terms, outputs, k, density, seed, test, order):
    g = torch.Generator().manual_seed(seed)
    w, x = _sparse((outputs, terms), density, g), torch.randn(rows, terms, generator=g)
    scale, offset = torch.rand(outputs, generator=g) + 0.5, torch.randn(rows, outputs, generator=g)
    stats = new_counters()
    z = sparse_relu_matmul(x, *linear_layout(w, k, test, order), scale, offset, k, test, NEVER, stats)
    torch.testing.assert_close(z, scale * (x @ w.T) + offset, rtol=1e-5, atol=1e-5)
    c = read(stats)
    assert c["pruned"] == 0
    assert c["dense"] == rows * int((w != 0).sum())  # only nonzero multiply-accumulates
    assert c["partial"] + c["remainder"] == c["dense"]


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 5), st.integers(2, 60), st.integers(1, 8), st.integers(2, 8), st.floats(0.0, 1.0),
       st.integers(0, 2**16))
def test_sparse_matmul_prune_everything_obeys_the_cost_rule(rows, terms, outputs, k, density, seed):
    """threshold=+inf prunes exactly the outputs the cost rule tests; the others are exact."""
    g = torch.Generator().manual_seed(seed)
    w, x = _sparse((outputs, terms), density, g), torch.randn(rows, terms, generator=g)
    layout = linear_layout(w, k, THRESHOLD)
    nonzero, tested = layout[4], layout[5]
    assert torch.equal(nonzero, (w != 0).sum(1))
    assert torch.equal(tested, (nonzero - k >= 2) & (nonzero > k))
    stats = new_counters()
    z = sparse_relu_matmul(x, *layout, torch.ones(outputs), None, k, THRESHOLD, ALWAYS, stats)
    assert torch.all(z[:, tested] == 0)
    torch.testing.assert_close(z[:, ~tested], (x @ w.T)[:, ~tested], rtol=1e-5, atol=1e-5)
    c = read(stats)
    assert c["pruned"] == rows * int(tested.sum())
    assert c["partial"] == rows * int(nonzero.clamp(max=k).sum())


def test_the_test_reads_the_first_k_nonzero_terms():
    """Zero-weight terms in front must not count as samples: the first 4 nonzero terms are
    strongly negative, the sum is positive; a threshold test at 0 prunes (it sees the 4
    negative samples), a dense-layout kernel would have read zeros and kept it."""
    w = torch.zeros(1, 40)
    w[0, 10:14] = -1.0
    w[0, 20:40] = 1.0
    x = torch.ones(2, 40)
    stats = new_counters()
    z = sparse_relu_matmul(x, *linear_layout(w, 4, THRESHOLD), torch.ones(1), None, 4, THRESHOLD,
                           torch.tensor(0.0), stats)
    assert torch.all(z == 0) and read(stats)["pruned"] == 2
    first = linear_layout(w, 4, THRESHOLD)[0]
    assert first.tolist() == [[10, 11, 12, 13]]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 10), st.integers(1, 6), st.sampled_from([1, 3]), st.integers(2, 4),
       st.floats(0.0, 1.0), st.integers(0, 2**16), st.sampled_from([STATS, THRESHOLD]),
       st.sampled_from(["natural", "magnitude"]))
def test_sparse_conv_never_prune_is_dense(batch, cin, cout, size, k, density, seed, test, order):
    g = torch.Generator().manual_seed(seed)
    w = _sparse((cout, cin, size, size), density, g)
    x = torch.randn(batch, cin, 5, 5, generator=g)
    scale = torch.rand(cout, generator=g) + 0.5
    stats = new_counters()
    z = sparse_relu_conv2d(x, *conv_layout(w, k, test, order), scale, None, [1, 1], [size // 2] * 2, [1, 1], k,
                           test, NEVER, stats)
    dense = torch.nn.functional.conv2d(x, w, None, 1, size // 2) * scale.view(1, -1, 1, 1)
    torch.testing.assert_close(z, dense, rtol=1e-5, atol=1e-5)
    c = read(stats)
    assert c["dense"] == batch * 25 * int((w != 0).sum())
    assert c["partial"] + c["remainder"] == c["dense"]


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 40), st.integers(1, 6), st.integers(2, 6), st.floats(0.3, 1.0), st.integers(0, 2**16))
def test_magnitude_layout_puts_each_outputs_largest_terms_first(terms, outputs, k, density, seed):
    g = torch.Generator().manual_seed(seed)
    w = _sparse((outputs, terms), density, g)
    first, first_w, rest, rest_w = linear_layout(w, k, THRESHOLD, "magnitude")[:4]
    for j in range(outputs):
        kept = min(k, int((w[j] != 0).sum()))
        top = w[j].abs().topk(kept).values
        torch.testing.assert_close(first_w[j, :kept].abs(), top)  # the k largest, largest first
        nonzero = int((w[j] != 0).sum())
        read = first[j, :kept].tolist() + rest[j, :nonzero - kept].tolist()
        assert sorted(read) == (w[j] != 0).nonzero().squeeze(1).tolist()  # every nonzero term, once
    wc = _sparse((outputs, terms, 3, 3), density, g)
    first_c = conv_layout(wc, k, THRESHOLD, "magnitude")[0]
    norms = wc.abs().flatten(2).sum(2)
    for j in range(outputs):
        kept = min(k, int((norms[j] > 0).sum()))
        torch.testing.assert_close(norms[j, first_c[j, :kept]], norms[j].topk(kept).values)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(4, 12), st.integers(1, 6), st.integers(2, 3), st.floats(-0.5, 0.5),
       st.integers(0, 2**16), st.sampled_from(["natural", "magnitude"]))
def test_sparse_conv_threshold_prunes_exactly_where_the_first_k_terms_say(batch, cin, cout, k, threshold, seed,
                                                                           order):
    """The threshold test's one-convolution head: its pruned outputs are exactly those whose
    first k terms (computed here one channel at a time) have a mean below the threshold, with
    the folded scale and offset; every other output is the dense value."""
    g = torch.Generator().manual_seed(seed)
    w, x = torch.randn(cout, cin, 3, 3, generator=g), torch.randn(batch, cin, 5, 5, generator=g)
    scale, offset = torch.rand(cout, generator=g) + 0.5, torch.randn(batch, cout, 5, 5, generator=g)
    layout = conv_layout(w, k, THRESHOLD, order)
    z = sparse_relu_conv2d(x, *layout, scale, offset, [1, 1], [1, 1], [1, 1], k, THRESHOLD,
                           torch.tensor(threshold), new_counters())
    a = scale.view(1, -1, 1, 1)
    partial = torch.stack([sum(torch.nn.functional.conv2d(x[:, i:i + 1], w[j:j + 1, i:i + 1], None, 1, 1)[:, 0]
                               for i in layout[0][j].tolist()) for j in range(cout)], 1)
    mean = a * partial / k + offset / cin
    expected_pruned = (mean < threshold) & layout[4].view(1, -1, 1, 1)
    dense = a * torch.nn.functional.conv2d(x, w, None, 1, 1) + offset
    close = (mean - threshold).abs() < 1e-4  # float ties either way
    assert torch.equal((z == 0)[~close], (expected_pruned | (dense == 0))[~close])
    torch.testing.assert_close(z[~expected_pruned & ~close], dense[~expected_pruned & ~close], rtol=1e-5, atol=1e-5)


def _pruned_cnn(sparsity):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                          nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 64),
                          nn.ReLU(), nn.Linear(64, 10)).eval()
    with torch.no_grad():
        model[3].running_mean.normal_(0, 0.1)
    return static.magnitude(model, sparsity).model


def test_compiled_pruned_model_counts_nonzero_work_and_is_exact_when_nothing_is_pruned():
    model, x = _pruned_cnn(0.7), torch.randn(8, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExPruneWarning)
        compiled = exprune_fx.compile(model, x[:2], Config(k=2, alpha=0.0))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    stats = compiled.exprune_stats()
    nonzero_macs = sum(int((m.weight != 0).sum()) * (64 if isinstance(m, nn.Conv2d) else 1)
                       for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert stats["dense_flops"] == 2 * 8 * nonzero_macs  # 2 x nonzero MACs over 8 images
    assert dense_flops(model, (x,), {}) == 2 * 8 * nonzero_macs
    rewritten = [s for s in compiled.sites if s.rewritten]
    ops = {str(n.target) for n in compiled.graph_module.graph.nodes if str(n.target).startswith("exprune")}
    assert rewritten and any("sparse_relu" in o for o in ops)


def test_pruned_model_prunes_outputs_and_saves_work():
    model, x = _pruned_cnn(0.5), torch.randn(64, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExPruneWarning)
        compiled = exprune_fx.compile(model, x[:2], Config(k=2, test="threshold", threshold=0.0))
    with torch.no_grad():
        compiled(x)
    stats = compiled.exprune_stats()
    assert stats["executed_flops"] < stats["dense_flops"]
    assert any(s["pruned"] > 0 for s in stats["sites"].values())
