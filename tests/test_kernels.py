"""The early-exit kernels against their reference semantics (docs/method.md)."""

import math
from statistics import NormalDist

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from exprune_fx.runtime import kernels
from exprune_fx.runtime import ops  # noqa: F401
from exprune_fx.runtime.counters import new_counters, read

NEVER, ALWAYS = -math.inf, math.inf


def relu_matmul(x, w, scale, offset, unit, k, test, critical):
    c = new_counters()
    return kernels.relu_matmul(x, w, scale, offset, unit, k, test, critical, c), read(c)


@settings(max_examples=60)
@given(st.integers(1, 5), st.integers(2, 12), st.integers(1, 3), st.integers(3, 10), st.data())
def test_relu_matmul_semantics(rows, outputs, unit, n, data):
    k = data.draw(st.integers(2, n - 1))
    torch.manual_seed(data.draw(st.integers(0, 1000)))
    x, w = torch.randn(rows, n * unit), torch.randn(outputs, n * unit)
    scale, offset = torch.randn(outputs), torch.randn(rows, outputs)
    dense = scale * (x @ w.T) + offset
    z, _ = relu_matmul(x, w, scale, offset, unit, k, kernels.STATS, NEVER)
    torch.testing.assert_close(z, dense, rtol=1e-5, atol=1e-5)  # nothing pruned: the dense result
    critical = data.draw(st.floats(-3, 0.5))
    z, counts = relu_matmul(x, w, scale, offset, unit, k, kernels.STATS, critical)
    pruned = z == 0
    torch.testing.assert_close(z[~pruned], dense[~pruned], rtol=1e-5, atol=1e-5)
    assert counts["pruned"] >= 0 and counts["outputs"] == rows * outputs
    z, counts = relu_matmul(x, w, scale, offset, unit, k, kernels.THRESHOLD, ALWAYS)
    assert torch.all(z == 0) and counts["pruned"] == rows * outputs
    assert counts["remainder"] == 0 and counts["computed"] == counts["partial"] + counts["test"]


def test_relu_matmul_counts():
    x, w = torch.randn(3, 40), torch.randn(5, 40)
    _, c = relu_matmul(x, w, torch.ones(5), None, 1, 8, kernels.STATS, -1.0)
    assert c["dense"] == 3 * 5 * 40 and c["partial"] == 3 * 5 * 8 and c["test"] == 3 * 5 * (8 + 4)
    assert c["remainder"] == (15 - c["pruned"]) * 32


@settings(max_examples=30)
@given(st.integers(1, 3), st.sampled_from([1, 2]), st.integers(1, 2), st.integers(3, 5), st.data())
def test_relu_conv2d_semantics(batch, groups, unit, n, data):
    torch.manual_seed(data.draw(st.integers(0, 1000)))
    k = data.draw(st.integers(2, n - 1))
    cin, cout = groups * n * unit, groups * data.draw(st.integers(1, 3))
    x, w = torch.randn(batch, cin, 6, 6), torch.randn(cout, cin // groups, 3, 3)
    stride, padding = data.draw(st.sampled_from([1, 2])), data.draw(st.sampled_from([0, 1]))
    scale = torch.randn(cout)
    dense = F.conv2d(x, w, None, stride, padding, 1, groups) * scale.view(1, -1, 1, 1)
    offset = torch.randn_like(dense)
    dense = dense + offset
    args = ([stride] * 2, [padding] * 2, [1, 1], groups, unit, k)
    c = new_counters()
    z = kernels.relu_conv2d(x, w, scale, offset, *args, kernels.STATS, NEVER, c)
    torch.testing.assert_close(z, dense, rtol=1e-4, atol=1e-4)
    z = kernels.relu_conv2d(x, w, scale, offset, *args, kernels.STATS, -0.5, c)
    kept = z != 0
    torch.testing.assert_close(z[kept], dense[kept], rtol=1e-4, atol=1e-4)
    c = new_counters()
    z = kernels.relu_conv2d(x, w, scale, offset, *args, kernels.THRESHOLD, ALWAYS, c)
    counts = read(c)
    assert torch.all(z == 0) and counts["remainder"] == 0 and counts["pruned"] == dense.numel()


def _near_zero_outputs(n: int, outputs: int, scale: float, seed: int):
    """Exchangeable terms (i.i.d. per output) whose folded totals are just above zero."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(outputs, n, generator=g) + 0.3  # one row per output, paired with w = 1
    y = x.sum(1)
    se_total = scale * x.std(1) * math.sqrt(n)
    offset = -scale * y + torch.rand(outputs, generator=g) * 0.5 * se_total  # z = a*y + c >= 0
    return x, offset


@pytest.mark.parametrize("alpha", [0.05, 0.2])
def test_stats_test_false_prune_rate_is_at_most_alpha(alpha):
    """Positive outputs are wrongly pruned in at most alpha of cases (within sampling error),
    with a non-trivial folded scale and offset."""
    n, k, outputs, scale = 256, 32, 20000, 3.0
    x, offset = _near_zero_outputs(n, outputs, scale, seed=1)
    critical = NormalDist().inv_cdf(alpha)
    pruned = _prune_decisions(x, offset, scale, k, critical)
    bound = alpha + 3 * math.sqrt(alpha * (1 - alpha) / outputs)
    assert pruned.float().mean() <= bound


def _prune_decisions(x, offset, scale, k, critical):
    outputs, n = x.shape
    # one output per row: a diagonal weight would be wasteful, so test each row as its own site
    s1, s2 = x[:, :k].sum(1), (x[:, :k] ** 2).sum(1)
    a = torch.full((outputs,), scale)
    mean = a * s1 / k + offset / n
    return kernels._decide_negative(mean, s1, s2, a, k, n, kernels.STATS, critical)


def test_mis_derived_variance_fails_the_calibration(monkeypatch):
    """The reference implementation's variance (raw second moment minus the squared mean of
    the affine-transformed terms) prunes positive outputs far more often than alpha."""

    def reference_bug(mean, s1, s2, scale, k, n, test, critical):
        var = (s2 / k - mean * mean).clamp_min(0)
        se = (var / k * ((n - k) / (n - 1))).sqrt()
        return mean < critical * se

    monkeypatch.setattr(kernels, "_decide_negative", reference_bug)
    x, offset = _near_zero_outputs(256, 20000, 3.0, seed=1)
    pruned = _prune_decisions(x, offset, 3.0, 32, NormalDist().inv_cdf(0.05))
    assert pruned.float().mean() > 0.05 + 3 * math.sqrt(0.05 * 0.95 / 20000)


def test_relu_matmul_matches_the_direct_test():
    """The kernel's decisions equal the textbook statistic computed term by term."""
    torch.manual_seed(3)
    x, w = torch.randn(6, 64), torch.randn(7, 64)
    scale, offset = torch.rand(7) + 0.5, torch.randn(6, 7)
    k, n, crit = 16, 64, NormalDist().inv_cdf(0.1)
    z, _ = relu_matmul(x, w, scale, offset, 1, k, kernels.STATS, crit)
    terms = scale[None, :, None] * x[:, None, :k] * w[None, :, :k] + offset[:, :, None] / n  # [6, 7, k]
    mean, sd = terms.mean(-1), terms.std(-1)
    se = sd / math.sqrt(k) * math.sqrt((n - k) / (n - 1))
    expected = mean < crit * se
    assert torch.equal(z == 0, expected)



@pytest.mark.parametrize("groups,unit", [(1, 1), (2, 1), (1, 2), (2, 3)])
def test_relu_conv2d_matches_the_direct_test(groups, unit):
    """The conv kernel's decisions equal the textbook statistic over per-term convolutions
    (term i = ``unit`` input channels of each group, whole window)."""
    torch.manual_seed(4)
    n, k, cout_g = 12, 5, 3
    cin_g, cout = n * unit, groups * cout_g
    x, w = torch.randn(2, groups * cin_g, 7, 7), torch.randn(cout, cin_g, 3, 3)
    scale = torch.rand(cout) + 0.5
    offset = torch.randn(2, cout, 4, 4)
    crit = NormalDist().inv_cdf(0.2)
    z = kernels.relu_conv2d(x, w, scale, offset, [2, 2], [1, 1], [1, 1], groups, unit, k, kernels.STATS, crit,
                            new_counters())
    xg, wg = x.view(2, groups, cin_g, 7, 7), w.view(groups, cout_g, cin_g, 3, 3)
    terms = torch.stack([
        torch.cat([F.conv2d(xg[:, gi, i * unit:(i + 1) * unit], wg[gi, :, i * unit:(i + 1) * unit], None, 2, 1)
                   for gi in range(groups)], 1) for i in range(k)], -1)  # [2, cout, 4, 4, k]
    terms = scale.view(1, -1, 1, 1, 1) * terms + offset.unsqueeze(-1) / n
    mean, sd = terms.mean(-1), terms.std(-1)
    expected = mean < crit * sd / math.sqrt(k) * math.sqrt((n - k) / (n - 1))
    assert 0 < expected.sum() < expected.numel()
    assert torch.equal(z == 0, expected)


def _textbook_prunes(terms: torch.Tensor, n: int, k: int, crit: float) -> torch.Tensor:
    """The stats test on the first k of the per-term values ``terms[..., i]``."""
    mean, sd = terms[..., :k].mean(-1), terms[..., :k].std(-1)
    return mean < crit * sd / math.sqrt(k) * math.sqrt((n - k) / (n - 1))


@settings(max_examples=30)
@given(st.integers(1, 4), st.integers(1, 9), st.sampled_from([1, 2]), st.integers(2, 4), st.data())
def test_sequential_test_matches_the_textbook_stages(rows, outputs, unit, stages, data):
    """With stages, an output is pruned iff the test at some k, 2k, 4k, ... says so; the
    outputs kept are exact; the counters charge each output the terms it consumed."""
    torch.manual_seed(data.draw(st.integers(0, 1000)))
    n, k = data.draw(st.integers(9, 40)), data.draw(st.integers(2, 4))
    x, w = torch.randn(rows, n * unit), torch.randn(outputs, n * unit)
    scale, offset = torch.rand(outputs) + 0.5, torch.randn(rows, outputs)
    crit = NormalDist().inv_cdf(data.draw(st.floats(0.01, 0.4)))
    c = new_counters()
    z = kernels.relu_matmul(x, w, scale, offset, unit, k, kernels.STATS, crit, c, stages)
    terms = (x.view(rows, 1, n, unit) * w.view(1, outputs, n, unit)).sum(-1)
    terms = scale[None, :, None] * terms + offset[:, :, None] / n
    ks = kernels.stage_ks(k, n, stages)
    expected = torch.zeros(rows, outputs, dtype=torch.bool)
    used = torch.zeros(rows, outputs)
    for kk in ks:
        used = torch.where(expected, used, float(kk))
        expected |= _textbook_prunes(terms, n, kk, crit)
    assert torch.equal(z == 0, expected)
    dense = terms.sum(-1)
    torch.testing.assert_close(z[~expected], dense[~expected], rtol=1e-4, atol=1e-4)
    counts = read(c)
    assert counts["partial"] == pytest.approx(float(used.sum()) * unit)
    kept = ~expected
    assert counts["remainder"] == pytest.approx(float((n * unit - used[kept] * unit).sum()))


def test_sequential_conv_matches_single_stage_decisions_at_each_k():
    """Conv with stages: pruned iff the single-stage kernel at some stage's k prunes."""
    torch.manual_seed(5)
    x, w = torch.randn(2, 24, 6, 6), torch.randn(5, 24, 3, 3)
    scale, offset = torch.rand(5) + 0.5, torch.randn(2, 5, 6, 6)
    crit = NormalDist().inv_cdf(0.1)
    args = ([1, 1], [1, 1], [1, 1], 1, 1)
    z = kernels.relu_conv2d(x, w, scale, offset, *args, 3, kernels.STATS, crit, new_counters(), 3)
    expected = torch.zeros_like(z, dtype=torch.bool)
    for kk in (3, 6, 12):
        expected |= kernels.relu_conv2d(x, w, scale, offset, *args, kk, kernels.STATS, crit, new_counters()) == 0
    assert 0 < expected.sum() < expected.numel()
    assert torch.equal(z == 0, expected)
    dense = F.conv2d(x, w, None, 1, 1) * scale.view(1, -1, 1, 1) + offset
    torch.testing.assert_close(z[~expected], dense[~expected], rtol=1e-4, atol=1e-4)


def test_sequential_counts_never_and_always():
    x, w = torch.randn(3, 64), torch.randn(5, 64)
    c = new_counters()
    kernels.relu_matmul(x, w, torch.ones(5), None, 1, 8, kernels.STATS, NEVER, c, 3)  # 8, 16, 32: all go on
    counts = read(c)
    assert counts["partial"] == 15 * 32 and counts["test"] == 15 * (32 + 3 * 4) and counts["remainder"] == 15 * 32
    c = new_counters()
    kernels.relu_matmul(x, w, torch.ones(5), None, 1, 8, kernels.THRESHOLD, ALWAYS, c, 3)  # all stop at 8
    counts = read(c)
    assert counts["partial"] == 15 * 8 and counts["test"] == 15 * 2 and counts["remainder"] == 0

def _head_data(rows: int, classes: int, n: int, seed: int):
    """Exchangeable head terms x_i * w_ci (i.i.d. over i): the row's sign picks the class
    with the largest or the smallest mean weight; the row's mean sets its margin."""
    g = torch.Generator().manual_seed(seed)
    sign = torch.randint(0, 2, (rows, 1), generator=g) * 2.0 - 1.0
    strength = 0.05 + torch.rand(rows, 1, generator=g)
    x = torch.randn(rows, n, generator=g) * 0.5 + sign * strength
    mu = (torch.arange(classes) * 0.4)[torch.randperm(classes, generator=g)]
    w = torch.randn(classes, n, generator=g) * 0.2 + mu[:, None]
    return x, w


@pytest.mark.parametrize("alpha", [0.05, 0.2])
def test_dominance_stops_rows_with_the_right_argmax(alpha):
    rows, classes, n, k = 4000, 10, 256, 32
    x, w = _head_data(rows, classes, n, seed=0)
    scale, offset = torch.ones(classes), torch.randn(classes) * 0.1
    crit = NormalDist().inv_cdf(1 - alpha / (classes - 1))
    c = new_counters()
    logits = kernels.argmax_matmul(x, w, scale, offset, 1, k, kernels.STATS, crit, c)
    full = x @ w.T + offset
    counts = read(c)
    stopped = (logits - full).abs().amax(1) > 1e-4  # rows that kept an estimate
    assert rows * 0.2 < counts["pruned"] == stopped.sum().item() < rows
    wrong = logits.argmax(1) != full.argmax(1)
    assert (wrong & stopped).float().mean() <= alpha  # the test's guarantee, over all rows
    assert 1 - wrong[stopped].float().mean() >= 1 - alpha  # and over the rows that stopped
    torch.testing.assert_close(logits[~stopped], full[~stopped], rtol=1e-5, atol=1e-4)


def test_dominance_estimate_is_scaled_partial_and_never_stops_at_alpha_zero():
    x, w = _head_data(50, 5, 64, seed=1)
    c = new_counters()
    logits = kernels.argmax_matmul(x, w, torch.ones(5), None, 1, 16, kernels.STATS, math.inf, c)
    torch.testing.assert_close(logits, x @ w.T, rtol=1e-5, atol=1e-4)
    assert read(c)["pruned"] == 0
    logits = kernels.argmax_matmul(x, w, torch.ones(5), None, 1, 16, kernels.THRESHOLD, -math.inf, c)
    torch.testing.assert_close(logits, (x[:, :16] @ w[:, :16].T) * 4, rtol=1e-5, atol=1e-4)


def test_dominance_with_unit_terms():
    x, w = _head_data(300, 6, 128, seed=2)
    crit = NormalDist().inv_cdf(1 - 0.05 / 5)
    c1, c4 = new_counters(), new_counters()
    kernels.argmax_matmul(x, w, torch.ones(6), None, 1, 32, kernels.STATS, crit, c1)
    logits = kernels.argmax_matmul(x, w, torch.ones(6), None, 4, 8, kernels.STATS, crit, c4)
    assert read(c4)["partial"] == read(c1)["partial"]
    assert (logits.argmax(1) == (x @ w.T).argmax(1)).float().mean() >= 0.95


def test_ops_are_registered_with_fake_kernels():
    x = torch.randn(2, 3, 64)
    never = torch.tensor(NEVER)
    out = torch.ops.exprune.relu_matmul(x, torch.randn(8, 64), torch.ones(8), None, 1, 16, 0, never, new_counters())
    assert out.shape == (2, 3, 8)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        fx = torch.empty(4, 3, 10, 10)
        out = torch.ops.exprune.relu_conv2d(fx, torch.empty(6, 3, 3, 3), torch.empty(6), None, [2, 2], [1, 1],
                                            [1, 1], 1, 1, 2, 0, torch.empty(()), torch.empty(8, dtype=torch.float64))
        assert out.shape == (4, 6, 5, 5)


@pytest.mark.parametrize("unit", [1, 3])
def test_batched_relu_matmul(unit):
    torch.manual_seed(unit)
    x, w = torch.randn(2, 4, 10 * unit), torch.randn(2, 6, 10 * unit)  # w: a run-time [B, N, K]
    scale, offset = torch.rand(6) + 0.5, torch.randn(2, 4, 6)
    dense = scale * (x @ w.transpose(1, 2)) + offset
    z, _ = relu_matmul(x, w, scale, offset, unit, 4, kernels.STATS, NEVER)
    torch.testing.assert_close(z, dense, rtol=1e-5, atol=1e-5)
    z, counts = relu_matmul(x, w, scale, offset, unit, 4, kernels.STATS, -0.3)
    kept = z != 0
    torch.testing.assert_close(z[kept], dense[kept], rtol=1e-5, atol=1e-5)
    assert counts["outputs"] == 48 and counts["partial"] == 48 * 4 * unit


def test_negative_counter_gives_the_oracle_bound():
    torch.manual_seed(0)
    x, w = torch.randn(8, 40), torch.randn(6, 40)
    z, counts = relu_matmul(x, w, torch.ones(6), None, 1, 8, kernels.STATS, NEVER)
    assert counts["negative"] == (x @ w.T < 0).sum().item()
    z, counts = relu_matmul(x, w, torch.ones(6), None, 1, 8, kernels.THRESHOLD, ALWAYS)
    assert counts["negative"] == 0  # pruned outputs are zero, not negative
