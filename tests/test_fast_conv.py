"""The fast convolution-site path (C++ head sums and test, torch's remainder convolution, C++
epilogue) against the reference kernel: same outputs, decisions and counters, on generated
shapes (groups, strides, padding, dilation, multi-channel terms, channel counts around the
kernel's 32-channel blocks) and masks (nothing pruned, everything pruned, drawn)."""

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from exprune_fx.runtime import fast, kernels, observe
from exprune_fx.runtime.counters import new_counters, read

NEVER, ALWAYS = -math.inf, math.inf
pytestmark = pytest.mark.skipif(fast.module() is None, reason="the fast kernels could not be built here")


def _run(setting, x, w, scale, offset, conv, unit, k, test, critical, stages=1):
    c = new_counters()
    with fast.use(setting):
        z = kernels.relu_conv2d(x, w, scale, offset, *conv, unit, k, test, critical, c, stages)
    return z, read(c)


def _margin(x, w, scale, offset, conv, unit, k, n, test, critical) -> float:
    """The smallest distance, in float64, of any output's test statistic from its critical value
    (decisions closer than float32 rounding may differ between the two paths)."""
    stride, padding, dilation, groups = conv
    b, cin, h, wd = x.shape
    cout, cin_g, kh, kw = w.shape
    xg = x.double().view(b, groups, cin_g, h, wd)[:, :, :k * unit]
    wg = w.double().view(groups, cout // groups, cin_g, kh, kw)[:, :, :k * unit]
    with fast.use("reference"):
        s1, s2 = kernels._conv_term_sums(xg, wg, k, unit, kernels.STATS, stride, padding, dilation)
    a = scale.double().view(1, -1, 1, 1)
    c = 0.0 if offset is None else offset.double()
    mean = a * s1 / k + c / n
    crit = critical.double().view(1, -1, 1, 1) if isinstance(critical, torch.Tensor) else critical
    if test == kernels.THRESHOLD:
        return float((mean - crit).abs().min())
    se = (a * a * (s2 - s1 * s1 / k).clamp_min(0) / (k - 1) / k * ((n - k) / (n - 1))).sqrt()
    return float((mean - crit * se).abs().min())


def _same_counters(fast_counters, reference, whole_conv_macs):
    """Every counter the same but ``computed`` (the MACs actually spent): at least the
    reference's (every survivor's remainder is computed) and at most its head and test plus
    one whole convolution (the fast path computes whole channels, or reads the head's input
    channels with zero weights, where that costs no more time)."""
    assert {k: v for k, v in fast_counters.items() if k != "computed"} == \
        {k: v for k, v in reference.items() if k != "computed"}
    assert reference["computed"] <= fast_counters["computed"] <= \
        reference["partial"] + reference["test"] + whole_conv_macs


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 3), st.integers(1, 2), st.integers(1, 2), st.integers(3, 7), st.integers(1, 40),
       st.integers(1, 3), st.integers(1, 2), st.integers(0, 1), st.integers(1, 2), st.integers(3, 7),
       st.sampled_from([kernels.STATS, kernels.THRESHOLD]), st.sampled_from(["none", "scalar", "channel", "full"]),
       st.sampled_from(["drawn", "per-channel", "empty", "full"]), st.data())
def test_fast_relu_conv2d_equals_reference(batch, groups, unit, n, cout_g, ksize, stride, padding, dilation, size,
                                           test, offset_kind, mask, data):
    """Integer-valued data (exact sums) and power-of-two scales: the same decisions, kept values
    and counters as the reference kernel."""
    k = data.draw(st.integers(2, n - 1))
    assume((size + 2 * padding - dilation * (ksize - 1)) >= 1)
    torch.manual_seed(data.draw(st.integers(0, 10_000)))
    cin_g, cout = n * unit, groups * cout_g
    x = torch.randint(-3, 4, (batch, groups * cin_g, size, size + 1)).float()
    w = torch.randint(-3, 4, (cout, cin_g, ksize, ksize)).float()
    scale = 2.0 ** torch.randint(-2, 3, (cout,)).float()
    conv = ([stride, stride], [padding, padding], [dilation, dilation], groups)
    oh = (size + 2 * padding - dilation * (ksize - 1) - 1) // stride + 1
    ow = (size + 1 + 2 * padding - dilation * (ksize - 1) - 1) // stride + 1
    offset = {"none": None, "scalar": torch.tensor(3.0), "channel": torch.randint(-6, 7, (cout, 1, 1)).float(),
              "full": torch.randint(-6, 7, (batch, cout, oh, ow)).float()}[offset_kind]
    critical = {"empty": NEVER, "full": ALWAYS, "drawn": data.draw(st.integers(-3, 1)) + 0.37,
                "per-channel": torch.randint(-3, 2, (cout,)).float() + 0.37}[mask]
    if mask in ("drawn", "per-channel"):
        assume(_margin(x, w, scale, offset, conv, unit, k, n, test, critical) > 1e-3)
    zr, cr = _run("reference", x, w, scale, offset, conv, unit, k, test, critical)
    zf, cf = _run("auto", x, w, scale, offset, conv, unit, k, test, critical)
    assert zf.shape == zr.shape == (batch, cout, oh, ow)
    assert torch.equal(zf == 0, zr == 0)
    torch.testing.assert_close(zf, zr, rtol=0, atol=1e-4)
    _same_counters(cf, cr, cout * cin_g * batch * oh * ow * ksize * ksize)
    if mask == "empty":
        assert cf["pruned"] == 0
    if mask == "full" and test == kernels.THRESHOLD:
        assert cf["pruned"] == cf["outputs"] and cf["remainder"] == 0


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 2), st.integers(3, 12), st.integers(1, 40), st.integers(1, 3), st.integers(1, 3),
       st.integers(1, 2), st.integers(0, 1), st.integers(1, 2), st.integers(3, 9),
       st.sampled_from([kernels.STATS, kernels.THRESHOLD]), st.sampled_from(["none", "channel", "full"]),
       st.sampled_from(["drawn", "per-channel", "empty"]), st.data())
def test_direct_remainder_at_batch_one_equals_reference(unit, n, cout, kh, kw, stride, padding, dilation, size, test,
                                                         offset_kind, mask, data):
    """One small image, one group: the remainder runs on the C++ kernel too (where torch would
    run its im2col convolution). The same decisions, values and counters as the reference."""
    k = data.draw(st.integers(2, n - 1))
    assume(size + 2 * padding - dilation * (kh - 1) >= 1 and size + 1 + 2 * padding - dilation * (kw - 1) >= 1)
    torch.manual_seed(data.draw(st.integers(0, 10_000)))
    cin = n * unit
    assert fast._direct_remainder(1, 1, (cin - k * unit) * size * (size + 1), kh, kw)
    x = torch.randint(-3, 4, (1, cin, size, size + 1)).float()
    w = torch.randint(-3, 4, (cout, cin, kh, kw)).float()
    scale = 2.0 ** torch.randint(-2, 3, (cout,)).float()
    conv = ([stride, stride], [padding, padding], [dilation, dilation], 1)
    oh = (size + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    ow = (size + 1 + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    offset = {"none": None, "channel": torch.randint(-6, 7, (cout, 1, 1)).float(),
              "full": torch.randint(-6, 7, (1, cout, oh, ow)).float()}[offset_kind]
    critical = {"empty": NEVER, "drawn": data.draw(st.integers(-3, 1)) + 0.37,
                "per-channel": torch.randint(-3, 2, (cout,)).float() + 0.37}[mask]
    if mask != "empty":
        assume(_margin(x, w, scale, offset, conv, unit, k, n, test, critical) > 1e-3)
    zr, cr = _run("reference", x, w, scale, offset, conv, unit, k, test, critical)
    zf, cf = _run("auto", x, w, scale, offset, conv, unit, k, test, critical)
    assert torch.equal(zf == 0, zr == 0)
    torch.testing.assert_close(zf, zr, rtol=0, atol=1e-4)
    _same_counters(cf, cr, cout * cin * oh * ow * kh * kw)


def test_fast_relu_conv2d_on_float_data():
    """Real-valued data, decisions fixed (never / always prune): the dense convolution's values
    and nothing computed beyond the head when everything is pruned; a channel subset when only
    some channels survive."""
    torch.manual_seed(0)
    x, w = torch.randn(2, 64, 14, 14), torch.randn(64, 64, 3, 3)
    scale, offset = torch.rand(64) + 0.5, torch.randn(64, 1, 1)
    conv = ([1, 1], [1, 1], [1, 1], 1)
    z, counters = _run("auto", x, w, scale, offset, conv, 1, 16, kernels.STATS, NEVER)
    dense = scale.view(1, -1, 1, 1) * torch.nn.functional.conv2d(x, w, None, 1, 1) + offset
    torch.testing.assert_close(z, dense, rtol=1e-4, atol=1e-4)
    assert counters["pruned"] == 0 and z.is_contiguous()
    z, counters = _run("auto", x, w, scale, offset, conv, 1, 16, kernels.THRESHOLD, ALWAYS)
    assert torch.all(z == 0) and counters["remainder"] == 0
    some = torch.where(torch.arange(64) % 3 == 0, NEVER, ALWAYS)  # a third of the channels survive
    zf, cf = _run("auto", x, w, scale, offset, conv, 1, 16, kernels.THRESHOLD, some)
    zr, cr = _run("reference", x, w, scale, offset, conv, 1, 16, kernels.THRESHOLD, some)
    torch.testing.assert_close(zf, zr, rtol=1e-4, atol=1e-4)
    _same_counters(cf, cr, 2 * 64 * 64 * 14 * 14 * 9)
    assert 0 < cf["remainder"] < cf["dense"] - cf["partial"]
    assert cf["computed"] == cr["computed"]  # 22 of 64 channels: only theirs computed


@pytest.mark.parametrize("survive", ["all", "some"])
def test_fast_relu_conv2d_takes_a_channels_last_input(survive):
    """A channels-last input (its remainder convolution comes out channels-last too): the same
    result as the contiguous input, through both remainder branches."""
    torch.manual_seed(1)
    x, w = torch.randn(2, 32, 9, 9), torch.randn(32, 32, 3, 3)
    scale, offset = torch.rand(32) + 0.5, torch.randn(32, 1, 1)
    conv = ([1, 1], [1, 1], [1, 1], 1)
    critical = NEVER if survive == "all" else torch.where(torch.arange(32) % 3 == 0, NEVER, ALWAYS)
    zc, cc = _run("auto", x, w, scale, offset, conv, 1, 8, kernels.THRESHOLD, critical)
    zl, cl = _run("auto", x.contiguous(memory_format=torch.channels_last), w, scale, offset, conv, 1, 8,
                  kernels.THRESHOLD, critical)
    torch.testing.assert_close(zl, zc, rtol=1e-4, atol=1e-4)  # (oneDNN sums a channels-last input in another order)
    assert cl == cc


def test_conv_term_sums_equal_the_reference_term_by_term():
    """The C++ head sums (also used by several-stage calls) equal the reference's, strided and
    grouped."""
    torch.manual_seed(1)
    xk = torch.randint(-3, 4, (2, 2, 6, 9, 8)).float()
    wk = torch.randint(-3, 4, (2, 35, 6, 3, 2)).float()
    args = (3, 2, kernels.STATS, [2, 1], [1, 0], [1, 2])
    with fast.use("reference"):
        r1, r2 = kernels._conv_term_sums(xk, wk, *args)
    f1, f2 = fast.conv_term_sums(xk, wk, *args)
    assert torch.equal(f1, r1) and torch.equal(f2, r2)
    with fast.use("reference"):
        assert fast.conv_term_sums(xk, wk, *args) is None


def test_fast_conv_path_is_skipped_where_it_does_not_apply():
    """Several stages, observation and non-float32 inputs run the reference kernel."""
    torch.manual_seed(2)
    x, w = torch.randn(1, 8, 5, 5), torch.randn(4, 8, 3, 3)
    conv = ([1, 1], [1, 1], [1, 1], 1)
    with fast.use("auto"):
        assert fast.relu_conv2d(x, w, torch.ones(4), None, *conv, 1, 2, kernels.STATS, 0.0, new_counters(), 2) is None
        assert fast.relu_conv2d(x.double(), w.double(), torch.ones(4), None, *conv, 1, 2, kernels.STATS, 0.0,
                                new_counters()) is None
    with fast.use("reference"):
        assert fast.relu_conv2d(x, w, torch.ones(4), None, *conv, 1, 2, kernels.STATS, 0.0, new_counters()) is None
    zr, cr = _run("reference", x, w, torch.ones(4), None, conv, 1, 2, kernels.STATS, -0.5, 2)
    zf, cf = _run("auto", x, w, torch.ones(4), None, conv, 1, 2, kernels.STATS, -0.5, 2)
    torch.testing.assert_close(zf, zr)
    assert cf == cr
    recorded = []
    for setting in ("reference", "auto"):  # threshold fitting records the statistics: the reference runs
        counters = new_counters()
        with fast.use(setting), observe.recording() as record:
            kernels.relu_conv2d(x, w, torch.ones(4), None, *conv, 1, 2, kernels.THRESHOLD, NEVER, counters)
        recorded.append(record.samples(counters))
    assert recorded[0][0].numel() == 100
    assert all(torch.equal(r, a) for r, a in zip(*recorded))
